"""Data rules: a tenant's data erased by `agentfleet purge` (and the purge recorded), text
kept out of traces, and out of logs and Sentry for tenants whose rules redact it."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import subprocess
import sys

import httpx
import msgspec
import openai

from agentfleet.ops import approvals, datarules
from agentfleet.ops.logs import JsonFormatter
from agentfleet.ops.purge import purge_log, purge_tenant
from agentfleet.schemas import keys
from agentfleet.schemas.settings import Settings
from agentfleet.schemas.wire import FollowUp, Task, decode_result
from agentfleet.workers.fake_engine import FakeEngine

A_TEXT, B_TEXT = "alpha-secret-0451", "bravo-public-9921"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def make_data(url: str, key: str, text: str) -> dict:
    """Results, a chain's trace, a file, a finished batch and a held task of one tenant."""
    made = {}
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0) as ai:
        await ai.chat.completions.create(model="m1",
                                         messages=[{"role": "user", "content": text}])
        line = json.dumps({"custom_id": "c1", "method": "POST", "url": "/v1/completions",
                           "body": {"model": "m1", "prompt": text}}).encode()
        made["file"] = (await ai.files.create(file=("in.jsonl", line), purpose="batch")).id
        batch = await ai.batches.create(input_file_id=made["file"], endpoint="/v1/completions",
                                        completion_window="1h")
        for _ in range(200):
            done = await ai.batches.retrieve(batch.id)
            if done.status == "completed":
                break
            await asyncio.sleep(0.05)
        made["output"] = done.output_file_id
    async with httpx.AsyncClient(base_url=url, headers=auth(key)) as http:
        chain = await http.post("/v1/tasks", json={"model": "m1", "prompt": text,
                                                   "correlation_id": "chain",
                                                   "followups": [{"prompt": "{output}"}]})
        made["task"] = chain.json()["id"]
        await http.post("/v1/tasks", json={"model": "m1", "prompt": text,
                                           "needs_approval": True})
        queued = await http.post("/v1/tasks", json={"model": "m2", "prompt": text})
        made["queued"] = queued.json()["id"]
        for _ in range(200):
            if (await http.get(f"/v1/tasks/{made['task']}.1")).json()["status"] == "succeeded":
                break
            await asyncio.sleep(0.05)
    return made


async def tenant_text_in_redis(redis, text: str) -> list[bytes]:
    """Every key whose value holds `text` (strings, lists, streams, hashes)."""
    found = []
    async for key in redis.scan_iter(count=1000):
        kind = (await redis.type(key)).decode()
        if kind == "string":
            blobs = [await redis.get(key)]
        elif kind == "list":
            blobs = await redis.lrange(key, 0, -1)
        elif kind == "hash":
            blobs = list((await redis.hgetall(key)).values())
        elif kind == "stream":
            blobs = [v for _, f in await redis.xrange(key) for v in f.values()]
        else:
            blobs = []
        if any(text.encode() in (b or b"") for b in blobs):
            found.append(key)
    return found


async def test_purge_erases_a_tenants_data_and_records_it(gateway, api_key, start_worker, redis,
                                                          settings):
    # m2 has no worker: its tasks stay queued; slots, as a real engine has (bulk lanes get a
    # share of them)
    await start_worker(models=("m1",), engines={"m1": FakeEngine(slots=64)})
    url, gw = await gateway()
    key_a, key_b = await api_key("a"), await api_key("b")
    a = await make_data(url, key_a, A_TEXT)
    b = await make_data(url, key_b, B_TEXT)
    assert await tenant_text_in_redis(redis, A_TEXT)
    report = await purge_tenant(redis, gw.settings, "a", by="test")  # its files directory
    assert report.results >= 4 and report.traces == 1 and report.files == 2
    assert report.batches == 1 and report.held == 1 and report.queued_cancelled == 1
    assert report.task_entries == 4  # chat, batch line, chain of two: done, not trimmed
    # the queued task may be in m2's stream still: its payload holds the prompt until it runs
    leftover = [k for k in await tenant_text_in_redis(redis, A_TEXT)
                if k != keys.task_stream("m2", "a").encode()]
    assert leftover == []
    assert await redis.zscore(keys.cancelled_key("m2"), a["queued"])
    assert not list(gw.files.dir.glob(a["file"])) and not list(gw.files.dir.glob(a["output"]))
    assert set(map(bytes, await tenant_text_in_redis(redis, B_TEXT))) >= {
        keys.result_key("m1", b["task"]).encode()}
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=key_b, max_retries=0) as ai:
        assert B_TEXT.encode() in (await ai.files.content(b["file"])).content
    [logged] = await purge_log(redis)
    assert (logged.tenant, logged.by, logged.results) == ("a", "test", report.results)
    again = await purge_tenant(redis, settings, "a", by="test")
    assert again.results == 0 and len(await purge_log(redis)) == 2


async def test_traces_hold_no_prompt_or_output(producer, start_worker, redis):
    await start_worker()
    task_id = await producer.submit(Task(model="m1", prompt=A_TEXT, correlation_id="trace-1",
                                         followups=[FollowUp(prompt="again {output}")]))
    await producer.wait_chain(task_id, timeout_s=10)
    raw = await redis.lrange(keys.trace_key("m1", "trace-1"), 0, -1)
    assert len(raw) == 3 and not any(A_TEXT.encode() in r for r in raw)
    assert decode_result(await redis.get(keys.result_key("m1", task_id))).text.endswith(A_TEXT)


def test_logs_of_a_redacting_tenant_lose_their_text(settings):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(datarules.RedactTextFilter(settings))
    log = logging.getLogger("test.datarules")
    log.addHandler(handler)
    log.propagate = False
    datarules.set_rules("open", datarules.TenantRules(redact_text=False))
    try:
        task = Task(model="m1", prompt=A_TEXT)
        log.warning("refused %r", task, extra={"tenant": "closed", "prompt": A_TEXT})
        token = datarules.current_tenant.set("closed")
        log.warning("refused %r", task)
        datarules.current_tenant.reset(token)
        log.warning("kept %r", task, extra={"tenant": "open", "prompt": A_TEXT})
    finally:
        datarules.set_rules("open", None)
        log.removeHandler(handler)
    first, second, third = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert A_TEXT not in json.dumps(first) and A_TEXT not in json.dumps(second)
    assert "[scrubbed]" in first["msg"] and "[scrubbed]" in second["msg"]
    assert A_TEXT in third["msg"]


def test_sentry_events_follow_their_tenants_rules(settings):
    hook = datarules.sentry_before_send(settings)
    datarules.set_rules("open", datarules.TenantRules(redact_text=False))
    try:
        closed = hook({"extra": {"tenant": "closed", "prompt": A_TEXT}})
        kept = hook({"extra": {"tenant": "open", "prompt": A_TEXT}})
        token = datarules.current_tenant.set("closed")
        contextual = hook({"extra": {"prompt": A_TEXT}})
        datarules.current_tenant.reset(token)
    finally:
        datarules.set_rules("open", None)
    assert closed["extra"]["prompt"] == "[scrubbed]" and contextual["extra"]["prompt"] == \
        "[scrubbed]"
    assert kept["extra"]["prompt"] == A_TEXT


async def test_a_tenants_registry_entry_sets_its_rules(redis, settings):
    from agentfleet.producer.tenants import TenantRegistry
    from agentfleet.schemas.tenants import TableCache
    from agentfleet.schemas.wire import TenantConfig

    open_settings = msgspec.structs.replace(settings, sentry_include_text=True)
    await TenantRegistry(redis).set("careful", TenantConfig(redact=True, result_ttl_s=60),
                                    who="test")
    cache = TableCache(redis)
    await cache.current()
    datarules.use_registry(lambda: cache.table)
    try:
        careful = datarules.rules_for("careful", open_settings)
        other = datarules.rules_for("other", open_settings)
    finally:
        datarules.use_registry(None)
    assert careful.redact_text and careful.result_ttl_s == 60
    assert not other.redact_text and other.result_ttl_s == settings.result_ttl_s


async def test_cli_purge_needs_yes_and_records_who(server, redis):
    await approvals.hold(redis, Task(id="z:1", tenant="z", model="smollm2-135m", prompt="x"),
                         Settings())
    env = {**os.environ, "REDIS_URL": server.url, "AGENTFLEET_MODELS_FILE": "",
           "AGENTFLEET_DEFAULT_MODEL": "smollm2-135m"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "agentfleet", "purge", *args], env=env,
                              capture_output=True, text=True, timeout=60)

    refused = cli("--tenant", "z")
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert await redis.hlen(keys.approvals_held("smollm2-135m")) == 1
    done = cli("--tenant", "z", "--yes", "--by", "erin")
    assert done.returncode == 0, done.stderr
    assert "held 1" in done.stdout and "by erin" in done.stdout
    assert await redis.hlen(keys.approvals_held("smollm2-135m")) == 0
    assert (await purge_log(redis))[0].by == "erin"
