"""A small fleet's worth of data for the console tests, and the console served from the CLI.

`populate` runs a worker (fake engines) and a producer against a real server: two tenants'
tasks, a follow-up chain, a failing task, two tasks that die as dead letters, two bulk jobs
(one per tenant); then it creates API keys.  `ConsoleProcess` starts `agentfleet console` as
an operator would and waits until it answers.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import msgspec

from agentfleet.ops import apikeys
from agentfleet.producer.batch import BatchClient
from agentfleet.producer.client import Producer
from agentfleet.producer.connection import connect
from agentfleet.schemas import keys
from agentfleet.schemas.settings import ModelSpec, Settings
from agentfleet.schemas.wire import FollowUp, Task
from agentfleet.workers.fake_engine import FakeEngine
from agentfleet.workers.worker import Worker

SETTINGS = Settings(models={"m1": ModelSpec(name="m1", max_model_len=512),
                            "m2": ModelSpec(name="m2", max_model_len=256)},
                    default_model="m1", engine="fake", block_ms=20, retry_base_s=0.02,
                    retry_max_s=0.05)


class Fleet(msgspec.Struct, kw_only=True):
    admin_key: str
    acme_key: str
    globex_key: str
    acme_chain: str  # a correlation id with follow-ups, tenant acme
    globex_task: str  # a correlation id of tenant globex
    failed_corr: str
    acme_batch: str
    globex_batch: str
    acme_batch_ok: int
    dead: dict[str, str]  # tenant -> dead-letter entry id (model m1)


def _lines(n: int, tag: str) -> list[dict]:
    return [{"custom_id": f"{tag}{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "m1", "messages": [{"role": "user", "content": f"{tag} {i}"}],
                      "max_tokens": 4}} for i in range(n)]


async def populate(url: str) -> Fleet:
    redis = connect(url)
    await redis.flushall()
    worker = Worker(SETTINGS, redis, {m: FakeEngine() for m in SETTINGS.models},
                    worker_id="console-test-worker")
    running = asyncio.create_task(worker.run(drain_timeout_s=5))
    await asyncio.wait_for(worker.ready.wait(), 10)
    producer = Producer(connect(url), settings=SETTINGS)
    try:
        chain = await producer.submit(model="m1", prompt="plan a trip", tenant="acme",
                                      followups=[FollowUp(prompt="in five words: {output}",
                                                          followups=[FollowUp(prompt="again")]),
                                                 FollowUp(model="m2", prompt="score: {output}")])
        tasks = [Task(model="m1", prompt=f"a {i}", tenant="acme") for i in range(30)]
        tasks += [Task(model="m2", prompt=f"g {i}", tenant="globex") for i in range(10)]
        ids = await producer.submit_many(tasks)
        failed = await producer.submit(model="m1", prompt="x", tenant="acme",
                                       metadata={"fake_error": "internal"})
        dying = {t: await producer.submit(model="m1", prompt=f"dies {t}", tenant=t,
                                          metadata={"fake_fail_attempts": "9"})
                 for t in ("acme", "globex")}
        await producer.wait_chain(chain, timeout_s=20)
        await producer.wait_many([*ids, failed, *dying.values()], timeout_s=20)
        batches = BatchClient(producer)
        acme = await batches.submit(_lines(40, "a"))
        globex = await batches.submit(_lines(5, "g"))
        await redis.hset(keys.batch_meta(acme.batch_id), "tenant", "acme")  # as the gateway
        await redis.hset(keys.batch_meta(globex.batch_id), "tenant", "globex")  # will record
        for job in (acme, globex):
            await batches.wait(job.batch_id, timeout_s=20)
        dead = {}
        for eid, d in reversed(await redis.xrevrange(keys.dead_stream("m1"))):
            for tenant, task_id in dying.items():
                if d[b"d"] and task_id.encode() in d[b"d"]:
                    dead[tenant] = eid.decode()
        worker.request_stop()
        await asyncio.wait_for(running, 10)
        _, admin = await apikeys.create(redis, tenant="ops", role="admin")
        _, acme_key = await apikeys.create(redis, tenant="acme", role="read")
        _, globex_key = await apikeys.create(redis, tenant="globex", role="submit")
        globex_task = (await producer.redis.get(keys.result_key("m2", ids[-1])) and ids[-1])
        return Fleet(admin_key=admin, acme_key=acme_key, globex_key=globex_key,
                     acme_chain=chain, globex_task=globex_task, failed_corr=failed,
                     acme_batch=acme.batch_id, globex_batch=globex.batch_id,
                     acme_batch_ok=40, dead=dead)
    finally:
        await producer.close()
        await redis.aclose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ConsoleProcess:
    """`agentfleet console` in a child process, on a free port of the loopback."""

    def __init__(self, redis_url: str, home: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        models = home / "models.toml"
        models.write_text("[models.m1]\nmax_model_len = 512\n[models.m2]\nmax_model_len = 256\n")
        env = {**os.environ, "REDIS_URL": redis_url, "AGENTFLEET_HOME": str(home),
               "AGENTFLEET_MODELS_FILE": str(models), "AGENTFLEET_DEFAULT_MODEL": "m1",
               "AGENTFLEET_LOG_FORMAT": "text"}
        self.log = (home / "console.log").open("w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "agentfleet", "console", "--port",
                                      str(self.port)], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"console exited: {self.output()}")
            try:
                httpx.get(self.url + "/login", timeout=1)
                return
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"console did not answer in 30 s: {self.output()}")
                time.sleep(0.1)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def populated(server_url: str) -> Fleet:
    return asyncio.run(populate(server_url))
