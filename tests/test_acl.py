"""Redis ACL users from `agentfleet acl`, applied on both real servers: each part of the fleet
does its job under its own user, and each refusal the roles promise is proven."""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
import sys
import time
from urllib.parse import urlsplit

import openai
import pytest
import redis as redis_sync
from redis.exceptions import NoPermissionError, ResponseError

from agentfleet.ops import acl
from agentfleet.producer.batch import BatchClient
from agentfleet.producer.client import Producer
from agentfleet.producer.connection import connect
from agentfleet.schemas import keys
from agentfleet.schemas.wire import FollowUp, Task
from agentfleet.workers.fake_engine import FakeEngine
from agentfleet.workers.worker import Worker

PASSWORDS = {role: f"pw-{role}" for role in acl.ROLES}


@pytest.fixture
async def users(server, redis):
    """The users applied on the server (deleted after the test); role -> URL."""
    made = acl.lines(prefix="t-", passwords=PASSWORDS)
    made += acl.lines(prefix="t-", tenant="acme", passwords={"producer": "pw-acme"})
    for _, _, args in made:
        assert await redis.execute_command(*args) in (b"OK", "OK")
    parts = urlsplit(server.url)
    urls = {name.removeprefix("t-"): f"redis://{name}:{password}@{parts.hostname}:{parts.port}"
            for name, password, _ in made}
    yield urls
    await redis.execute_command("ACL", "DELUSER", *[name for name, _, _ in made])


async def test_each_part_does_its_job_under_its_own_user(users, settings, redis):
    worker_redis = connect(users["worker"])
    engines = {"m1": FakeEngine(slots=64), "m2": FakeEngine(slots=64)}
    worker = Worker(settings, worker_redis, engines,
                    worker_id="w-acl")
    running = asyncio.create_task(worker.run(drain_timeout_s=5))
    await asyncio.wait_for(worker.ready.wait(), 10)
    producer = Producer(connect(users["producer"]), settings=settings)
    batches = BatchClient(Producer(connect(users["producer"]), settings=settings))
    try:
        task_id = await producer.submit(Task(model="m1", prompt="least privilege",
                                             correlation_id="chain-1",
                                             followups=[FollowUp(prompt="again {output}")]))
        first, second = await producer.wait_chain(task_id, timeout_s=10)
        assert second.text == "echo: again echo: least privilege"
        await producer.cancel("nothing-1", "m2")
        report = await batches.submit([{"custom_id": f"r{i}", "method": "POST",
                                        "url": "/v1/completions",
                                        "body": {"model": "m2", "prompt": "x"}}
                                       for i in range(20)])
        status = await batches.wait(report.batch_id, timeout_s=10, poll_s=0.05)
        assert status.status == "completed" and status.completed == 20
        assert len([line async for line in batches.output_lines(report.batch_id)]) == 20
        from agentfleet.ops.exporter import read_queues
        from agentfleet.ops.report import load_window

        exporter = redis_sync.Redis.from_url(users["exporter"], protocol=2)
        try:
            gauges = read_queues(exporter, ["m1", "m2"])
            window = load_window(exporter, ["m1", "m2"], 3600, time.time())  # report, status
        finally:
            exporter.close()
        assert gauges and window is not None
    finally:
        await producer.close()
        await batches.close()
        worker.request_stop()
        await asyncio.wait_for(running, 10)
        await worker_redis.aclose()
    assert worker.runners[0].stats.committed == 2  # nothing refused on the way


REFUSED = [
    # a producer cannot take, read, acknowledge or claim tasks
    ("producer", ["XREADGROUP", "GROUP", keys.GROUP, "c", "STREAMS", keys.task_stream("m1"),
                  ">"]),
    ("producer", ["XACK", keys.task_stream("m1"), keys.GROUP, "0-1"]),
    ("producer", ["XCLAIM", keys.task_stream("m1"), keys.GROUP, "c", "0", "0-1"]),
    ("producer", ["XRANGE", keys.task_stream("m1"), "-", "+"]),
    ("producer", ["XRANGE", keys.bulk_stream("m1"), "-", "+"]),
    # ... nor touch API keys, the model registry or the tenants
    ("producer", ["HGET", keys.api_keys(), "x"]),
    ("producer", ["HSET", "af:registry", "m1", "x"]),
    ("producer", ["HSET", "af:tenant:acme", "share", "9"]),
    ("producer", ["HSET", keys.tenants(), "acme", "x"]),
    ("producer", ["INCR", keys.tenants_version()]),
    # ... and a script runs with the caller's rights
    ("producer", ["EVAL", "return redis.call('XREADGROUP', 'GROUP', 'workers', 'c', "
                  "'STREAMS', KEYS[1], '>')", "1", keys.task_stream("m1")]),
    ("producer", ["FLUSHALL"]),
    # a worker cannot change the registry, the tenants or the API keys
    ("worker", ["HSET", keys.api_keys(), "x", "y"]),
    ("worker", ["HGET", keys.api_keys(), "x"]),
    ("worker", ["HSET", "af:registry", "m1", "x"]),
    ("worker", ["DEL", "af:tenant:acme"]),
    ("worker", ["HSET", keys.tenants(), "acme", "x"]),
    ("worker", ["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"]),
    ("worker", ["FLUSHALL"]),
    # the gateway reads keys (HGET) but never writes them, and takes no tasks
    ("gateway", ["HSET", keys.api_keys(), "x", "y"]),
    ("gateway", ["HGETALL", keys.api_keys()]),
    ("gateway", ["XREADGROUP", "GROUP", keys.GROUP, "c", "STREAMS", keys.task_stream("m1"),
                 ">"]),
    # the exporter only reads gauges
    ("exporter", ["XADD", keys.task_stream("m1"), "*", "d", "x"]),
    ("exporter", ["GET", keys.result_key("m1", "t1")]),
    ("exporter", ["HSET", keys.workers_key("m1"), "w", "1"]),
    # a tenant's producer reads its own results and traces only
    ("producer-acme", ["GET", keys.result_key("m1", "other:1")]),
    ("producer-acme", ["LRANGE", keys.trace_key("m1", "other:c"), "0", "-1"]),
    ("producer-acme", ["XREAD", "STREAMS", keys.reply_stream("m1", "other-p"), "0"]),
    ("producer-acme", ["HGETALL", keys.batch_meta("batch_other")]),
    ("producer-acme", ["XADD", keys.task_stream("m1", "other"), "*", "d", "x"]),
    ("producer-acme", ["XRANGE", keys.batch_output("m1", "batch_other"), "-", "+"]),
    ("producer-acme", ["ZRANGE", keys.batch_index(), "0", "-1"]),
]


@pytest.mark.parametrize(("role", "command"), REFUSED,
                         ids=[f"{r}-{' '.join(c[:2])[:40]}" for r, c in REFUSED])
async def test_a_role_is_refused_what_it_must_not_do(users, role, command):
    client = connect(users[role])
    try:
        with pytest.raises(ResponseError) as refused:
            await client.execute_command(*command)
        assert is_acl_refusal(refused.value), refused.value
    finally:
        await client.aclose()


def is_acl_refusal(exc: ResponseError) -> bool:
    """NOPERM, as each server words it (Redis 7.0 inside a script: "can't run this command")."""
    text = str(exc).lower()
    return isinstance(exc, NoPermissionError) or "noperm" in text or "permission" in text \
        or "can't run this command" in text


async def test_a_tenants_producer_reads_its_own_keys(users, redis):
    await redis.set(keys.result_key("m1", "acme:1"), b"r")
    client = connect(users["producer-acme"])
    try:
        assert await client.get(keys.result_key("m1", "acme:1")) == b"r"
        assert await client.xread({keys.reply_stream("m1", "acme:p1"): "0"}) == []
        assert await client.hgetall(keys.batch_meta("acme-job-1")) == {}
        await client.xadd(keys.task_stream("m1", "acme"), {"d": b"x"})  # what the script does
        with pytest.raises(ResponseError):
            await client.xlen(keys.task_stream("m1", "acme"))
    finally:
        await client.aclose()


async def test_the_gateway_serves_under_its_own_user(users, gateway, api_key, start_worker):
    await start_worker(engines={"m1": FakeEngine(slots=64), "m2": FakeEngine(slots=64)})
    url, _ = await gateway(redis_url=users["gateway"])
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=await api_key(),
                                  max_retries=0) as ai:
        answer = await ai.chat.completions.create(
            model="m1", messages=[{"role": "user", "content": "as the gateway user"}])
        stream = await ai.chat.completions.create(
            model="m1", messages=[{"role": "user", "content": "streamed"}], stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        upload = await ai.files.create(file=("x.jsonl", b'{"custom_id": "a", "method": "POST", '
                                             b'"url": "/v1/completions", "body": {"model": '
                                             b'"m1", "prompt": "hi"}}\n'), purpose="batch")
        batch = await ai.batches.create(input_file_id=upload.id, endpoint="/v1/completions",
                                        completion_window="1h")
        for _ in range(200):
            if (await ai.batches.retrieve(batch.id)).status == "completed":
                break
            await asyncio.sleep(0.05)
        done = await ai.batches.retrieve(batch.id)
    assert answer.choices[0].message.content == "echo: as the gateway user"
    assert text == "echo: streamed" and done.output_file_id is not None


def test_cli_prints_lines_redis_cli_applies(server):
    made = subprocess.run([sys.executable, "-m", "agentfleet", "acl", "--prefix", "cli-"],
                          env={**os.environ, "REDIS_URL": server.url}, capture_output=True,
                          text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    lines = made.stdout.strip().splitlines()
    assert [shlex.split(line)[2] for line in lines] == [f"cli-{r}" for r in acl.ROLES]
    client = redis_sync.Redis.from_url(server.url)
    try:
        for line in lines:
            assert client.execute_command(*shlex.split(line)) in (b"OK", "OK")
    finally:
        client.execute_command("ACL", "DELUSER", *[f"cli-{r}" for r in acl.ROLES])
        client.close()
