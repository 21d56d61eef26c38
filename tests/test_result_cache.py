"""The result cache (docs/result-cache.md): identical deterministic tasks of a tenant that
opted in run once; the others are answered from the cached result ("hit") or by the
identical task in flight ("joined"), each with a result of its own, exactly once."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest

from agentfleet.ops.trace import load_trace, render
from agentfleet.producer.connection import connect_sync
from agentfleet.producer.tenants import TenantRegistry
from agentfleet.schemas import keys, resultcache
from agentfleet.schemas.errors import ErrorCode
from agentfleet.schemas.wire import (
    Finished,
    FollowUp,
    Result,
    Sampling,
    Status,
    Task,
    TenantConfig,
    decode_event,
    decode_result,
    encode,
)
from agentfleet.workers.fake_engine import FakeEngine
from agentfleet.workers.scripts import CacheWrite, commit_args
from tests.test_scripts import HEAD, _rec


async def _opt_in(redis, tenant: str = "acme", ttl_s: int = 60) -> None:
    await TenantRegistry(redis).set(tenant, TenantConfig(result_cache_ttl_s=ttl_s))


async def _worker(start_worker, **kw):
    engine = FakeEngine(**kw)
    await start_worker(engines={"m1": engine, "m2": FakeEngine()})
    return engine


# ---- without a server: the halves the scripts put together -----------------------------


def _assemble(stub: bytes, shared: bytes, mark: str) -> bytes:
    """What rc_answer (schemas/lua/resultcache.lua) writes, in Python."""
    n = stub[0] + shared[0] + 1
    head = bytes((0x80 + n,)) if n < 16 else b"\xde" + n.to_bytes(2, "big")
    return head + stub[1:] + encode("cache") + encode(mark) + shared[1:]


def test_a_copied_result_is_the_answer_with_the_tasks_own_identity():
    ran = Result(task_id="lead", correlation_id="lead", tenant="acme", model="m1",
                 status=Status.SUCCEEDED, text="echo: hi", prompt_tokens=3, output_tokens=2,
                 parsed={"a": [1, {}]}, worker_id="w1", model_version="v1")
    task = Task(id="t2", correlation_id="c2", tenant="acme", agent_id="ag", model="m1",
                prompt="hi", enqueued_at=12.5)
    shared, bare = resultcache.shared(ran)
    got = decode_result(_assemble(resultcache.stub(task), shared, "joined"))
    assert got == msgspec.structs.replace(
        ran, task_id="t2", correlation_id="c2", agent_id="ag", cache="joined",
        cached_from="lead", timings=msgspec.structs.replace(ran.timings, enqueued=12.5))
    fin = (b"\x82" + encode("type") + encode("fin") + encode("result")
           + _assemble(resultcache.stub(task), bare, "hit"))
    event = decode_event(fin)
    assert isinstance(event, Finished) and event.result.cache == "hit"
    assert event.result.text == "" and event.result.parsed is None  # no content in traces
    assert event.result.task_id == "t2" and event.result.output_tokens == 2


def test_the_digest_covers_tenant_model_version_input_and_sampling_only():
    base = Task(id="a", model="m1", tenant="acme", prompt="hi", sampling=Sampling(seed=1))
    d = resultcache.digest(base, "v1")
    same = msgspec.structs.replace(base, id="b", metadata={"x": "y"}, priority=3, deadline=9.0)
    assert resultcache.digest(same, "v1") == d
    for other in (msgspec.structs.replace(base, tenant="bob"),
                  msgspec.structs.replace(base, model="m2"),
                  msgspec.structs.replace(base, prompt="hi!"),
                  msgspec.structs.replace(base, sampling=Sampling(seed=2))):
        assert resultcache.digest(other, "v1") != d
    assert resultcache.digest(base, "v2") != d


@pytest.mark.parametrize("task, why", [
    (Task(model="m1", prompt="x", sampling=Sampling(temperature=0.7)), "neither greedy"),
    (Task(model="m1", prompt="x", followups=[FollowUp(prompt="{output}")]), "follow-ups"),
    (Task(model="m1", prompt="x", batch_id="b1"), "bulk job"),
    (Task(model="m1", prompt="x", stream=True), "streams"),
    (Task(model="m1", prompt="x", needs_approval=True), "approval"),
])
def test_tasks_with_effects_or_random_sampling_are_never_cached(task, why):
    assert why in resultcache.ineligible(task)
    assert not resultcache.ineligible(Task(model="m1", prompt="x",
                                           sampling=Sampling(temperature=0.7, seed=4)))


def test_a_cached_record_carries_flag_c_and_its_keys_last():
    rec = _rec(b"5-0", cache=CacheWrite(cache_key="ck", inflight_key="ik", cancelled_key="cx",
                                        task_id="t", ttl_s=9, shared=b"S", bare=b"B",
                                        cancelled=b"X", expired=b"E", now=12.5))
    keys_, args = commit_args(HEAD, [rec])
    assert keys_ == ["st", "dl", "dd", "qu", "s1", "res:5-0", "ck", "ik", "cx"]
    assert args[6] == "rS-----C" and args[-7:] == ["t", 9, b"S", b"B", b"X", b"E", "12.5"]


# ---- with a server and a worker --------------------------------------------------------


@pytest.mark.cluster_too
async def test_identical_tasks_run_once_the_rest_join_or_hit(producer, start_worker, redis):
    await _opt_in(redis)
    engine = await _worker(start_worker, delay_s=0.3)
    ids = await asyncio.gather(*(producer.submit(model="m1", prompt="same", tenant="acme")
                                 for _ in range(5)))
    results = await producer.wait_many(ids, timeout_s=10)
    assert engine.submitted == 1
    assert {r.text for r in results} == {"echo: same"}
    assert all(r.ok for r in results) and len({r.task_id for r in results}) == 5
    (lead,) = [r for r in results if not r.cache]  # concurrent submits: any one leads
    joined = [r for r in results if r.cache]
    assert [r.cache for r in joined] == ["joined"] * 4
    assert {r.cached_from for r in joined} == {lead.task_id}
    # Later: answered at submit from the cache, with no engine.
    later = await producer.submit(model="m1", prompt="same", tenant="acme")
    hit = await producer.wait(later, timeout_s=5)
    assert hit.cache == "hit" and hit.text == "echo: same" and hit.tenant == "acme"
    assert hit.cached_from == lead.task_id and hit.timings.enqueued > 0
    assert engine.submitted == 1
    stats = await redis.hgetall(keys.stats_key("m1"))
    assert int(stats[b"cache_joins"]) == 4 and int(stats[b"cache_hits"]) == 1
    assert int(stats[b"written"]) == 1  # results of tasks that ran; the others are counted apart
    assert await redis.hget(keys.queued_counts("m1"), "acme") in (b"0", None)
    stream = keys.task_stream("m1", "acme")
    assert (await redis.xpending(stream, keys.GROUP))["pending"] == 0


async def test_tenants_never_share_and_tenants_not_opted_in_are_unchanged(
        producer, start_worker, redis):
    await _opt_in(redis, "acme")
    await _opt_in(redis, "bob")
    engine = await _worker(start_worker)
    for tenant in ("acme", "bob", "carol", "carol"):
        r = await producer.wait(await producer.submit(model="m1", prompt="p", tenant=tenant))
        assert r.ok and r.cache == "" and r.tenant == tenant
    assert engine.submitted == 4
    again = await producer.wait(await producer.submit(model="m1", prompt="p", tenant="bob"))
    assert again.cache == "hit" and again.tenant == "bob"
    assert engine.submitted == 4
    # carol's tasks carry no digest: nothing of hers is kept
    assert not [k async for k in redis.scan_iter(match="af:{m1}:rc*:carol:*")]


async def test_random_sampling_and_tasks_with_followups_always_run(producer, start_worker,
                                                                   redis):
    await _opt_in(redis)
    engine = await _worker(start_worker)
    hot = Sampling(temperature=0.8)
    for _ in range(2):
        r = await producer.wait(await producer.submit(model="m1", prompt="q", tenant="acme",
                                                      sampling=hot))
        assert r.cache == ""
    for _ in range(2):
        chain = await producer.wait_chain(await producer.submit(
            model="m1", prompt="q", tenant="acme", followups=[FollowUp(prompt="{output}")]))
        assert len(chain) == 2 and [r.cache for r in chain] == ["", ""]
    assert engine.submitted == 6
    seeded = Sampling(temperature=0.8, seed=7)
    first = await producer.wait(await producer.submit(model="m1", prompt="q", tenant="acme",
                                                      sampling=seeded))
    second = await producer.wait(await producer.submit(model="m1", prompt="q", tenant="acme",
                                                       sampling=seeded))
    assert (first.cache, second.cache) == ("", "hit") and engine.submitted == 7


async def test_a_cached_answer_expires_with_the_tenants_ttl(producer, start_worker, redis):
    await _opt_in(redis, ttl_s=1)
    engine = await _worker(start_worker)
    first = await producer.wait(await producer.submit(model="m1", prompt="t", tenant="acme"))
    hit = await producer.wait(await producer.submit(model="m1", prompt="t", tenant="acme"))
    assert (first.cache, hit.cache) == ("", "hit")
    await asyncio.sleep(1.2)
    late = await producer.wait(await producer.submit(model="m1", prompt="t", tenant="acme"))
    assert late.cache == "" and engine.submitted == 2


@pytest.mark.cluster_too
async def test_when_the_leader_fails_a_joiner_runs_and_nobody_hangs(producer, start_worker,
                                                                    redis):
    await _opt_in(redis)
    engine = await _worker(start_worker, delay_s=0.2)
    # Metadata is not part of the input: the leader's fake failure is its own.
    lead = await producer.submit(model="m1", prompt="f", tenant="acme",
                                 metadata={"fake_error": "invalid_task"})
    rest = await asyncio.gather(*(producer.submit(model="m1", prompt="f", tenant="acme")
                                  for _ in range(3)))
    failed = await producer.wait(lead, timeout_s=10)
    assert failed.status is Status.FAILED and failed.cache == ""
    results = await producer.wait_many(rest, timeout_s=10)
    assert all(r.ok for r in results)
    assert sorted(r.cache for r in results) == ["", "joined", "joined"]
    assert engine.submitted == 2
    stats = await redis.hgetall(keys.stats_key("m1"))
    assert int(stats[b"cache_requeued"]) == 1
    assert not await redis.exists(keys.result_cache_inflight(
        "m1", "acme", (await _digest(producer, "f"))))


async def _digest(producer, prompt: str) -> str:
    t = Task(model="m1", prompt=prompt, tenant="acme")
    return resultcache.digest(t, producer.settings.models["m1"].version)


async def test_a_leader_held_by_a_dead_worker_is_reclaimed_and_all_answered_once(
        producer, start_worker, redis, settings):
    await _opt_in(redis)
    ids = [await producer.submit(model="m1", prompt="k", tenant="acme") for _ in range(3)]
    stream = keys.task_stream("m1", "acme")
    # A worker read the leader and died: it stays pending on a consumer that never beats.
    got = await redis.xreadgroup(keys.GROUP, "ghost", {stream: ">"}, count=10)
    assert len(got[0][1]) == 1  # only the leader was queued
    engine = FakeEngine()
    await start_worker(engines={"m1": engine, "m2": FakeEngine()},
                       worker_settings=msgspec.structs.replace(settings, claim_idle_ms=200))
    results = await producer.wait_many(ids, timeout_s=15)
    assert [r.cache for r in results] == ["", "joined", "joined"] and engine.submitted == 1
    stats = await redis.hgetall(keys.stats_key("m1"))
    assert int(stats[b"written"]) == 1 and int(stats[b"cache_joins"]) == 2
    assert int(stats.get(b"duplicates", 0)) == 0 and int(stats.get(b"fenced", 0)) == 0


async def test_a_traced_task_says_in_its_trace_that_the_cache_answered(
        producer, start_worker, redis):
    await _opt_in(redis)
    await _worker(start_worker)
    await producer.wait(await producer.submit(model="m1", prompt="tr", tenant="acme"))
    task_id = await producer.submit(model="m1", prompt="tr", tenant="acme",
                                    correlation_id="flow-1")
    assert (await producer.wait(task_id)).cache == "hit"
    events = await load_trace(redis, producer.settings, "flow-1")
    assert len(events) == 1 and events[0].result.cache == "hit"
    assert events[0].result.task_id == task_id and events[0].result.text == ""
    shown = render("flow-1", events)
    assert "cache hit" in shown and "succeeded, the answer of" in shown


async def test_a_callers_digest_is_replaced_by_the_producers(producer, start_worker, redis):
    await _worker(start_worker)  # acme has not opted in: a forged digest is dropped
    forged = Task(model="m1", prompt="z", tenant="acme", cache_digest="0" * 32, cache_ttl_s=60)
    r = await producer.wait(await producer.submit(forged))
    assert r.cache == "" and not await redis.exists(keys.result_cache("m1", "acme", "0" * 32))


@pytest.mark.cluster_too
async def test_a_joined_task_cancelled_or_past_its_deadline_gets_that_end(
        producer, start_worker, redis):
    await _opt_in(redis)
    await _worker(start_worker, delay_s=0.6)
    lead = await producer.submit(model="m1", prompt="c", tenant="acme")
    gone = await producer.submit(model="m1", prompt="c", tenant="acme")
    late = await producer.submit(model="m1", prompt="c", tenant="acme",
                                 deadline=time.time() + 0.2)
    kept = await producer.submit(model="m1", prompt="c", tenant="acme")
    await producer.cancel(gone, "m1")
    results = await producer.wait_many([lead, gone, late, kept], timeout_s=10)
    assert [r.status for r in results] == [Status.SUCCEEDED, Status.CANCELLED, Status.EXPIRED,
                                           Status.SUCCEEDED]
    assert [r.cache for r in results] == ["", "joined", "joined", "joined"]
    assert results[1].error_code is ErrorCode.CANCELLED and results[1].text == ""
    assert results[2].error_code is ErrorCode.DEADLINE_EXCEEDED
    assert results[3].text == "echo: c" and results[3].cached_from == lead


async def test_a_cancelled_leader_hands_its_input_to_a_joined_task(producer, start_worker,
                                                                   redis):
    await _opt_in(redis)
    engine = await _worker(start_worker, delay_s=0.5)
    lead = await producer.submit(model="m1", prompt="lc", tenant="acme")
    rest = [await producer.submit(model="m1", prompt="lc", tenant="acme") for _ in range(2)]
    await asyncio.sleep(0.1)
    await producer.cancel(lead, "m1")
    assert (await producer.wait(lead, timeout_s=5)).status is Status.CANCELLED
    results = await producer.wait_many(rest, timeout_s=10)
    assert all(r.ok for r in results) and sorted(r.cache for r in results) == ["", "joined"]
    ran = next(r for r in results if not r.cache)
    assert ran.task_id in rest and {r.cached_from for r in results} == {"", ran.task_id}
    # the leader ran, or was cancelled before a worker started it
    assert engine.submitted in (1, 2)


async def test_the_exporter_and_status_count_hits_joins_and_requeues_by_model(server, redis):
    from prometheus_client import generate_latest

    from agentfleet.ops.exporter import exporter_registry
    from tests.test_metrics import samples, value

    await redis.hset(keys.stats_key("m1"), mapping={"cache_hits": 3, "cache_joins": 4,
                                                    "cache_requeued": 1})
    client = connect_sync(server.url)
    try:
        text = await asyncio.to_thread(
            lambda: generate_latest(exporter_registry(client, ["m1", "m2"])).decode())
    finally:
        client.close()
    found = samples(text)
    assert value(found, "agentfleet_result_cache_hits_total", model="m1") == 3
    assert value(found, "agentfleet_result_cache_joins_total", model="m1") == 4
    assert value(found, "agentfleet_result_cache_requeued_total", model="m1") == 1
    assert value(found, "agentfleet_result_cache_hits_total", model="m2") == 0
    from agentfleet.ops.status import render_table, snapshot

    client = connect_sync(server.url)
    try:
        views = await asyncio.to_thread(snapshot, client, ["m1", "m2"])
    finally:
        client.close()
    assert [v.answered_from_cache for v in views] == [7, 0]  # `agentfleet status` says so too
    assert "answered by the result cache, never run: m1 7" in render_table(views).caption


def test_the_cli_opts_a_tenant_in_and_out_audited(server):
    import os
    import subprocess
    import sys

    env = {**os.environ, "REDIS_URL": server.url, "AGENTFLEET_ACTOR": "alice"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "agentfleet", *args], env=env,
                              capture_output=True, text=True, timeout=60)

    made = cli("tenants", "set", "acme", "--result-cache-ttl-s", "600", "--why", "faq bot")
    assert made.returncode == 0, made.stderr
    assert "result_cache_ttl_s=600" in made.stdout
    bad = cli("tenants", "set", "acme", "--result-cache-ttl-s", "-1")
    assert bad.returncode == 2 and "result_cache_ttl_s" in bad.stderr
    assert cli("tenants", "set", "acme", "--result-cache-ttl-s", "0").returncode == 0
    audit = cli("audit", "--kind", "tenant").stdout
    assert "faq bot" in audit and "result_cache_ttl_s" in audit


async def test_a_structured_answer_is_copied_whole(producer, start_worker, redis):
    from agentfleet.schemas.wire import JsonSchema, ResponseFormat

    await _opt_in(redis)
    engine = await _worker(start_worker)
    fmt = ResponseFormat(type="json_schema", json_schema=JsonSchema(schema={
        "type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}},
                                         "n": {"type": "integer", "minimum": 3}},
        "required": ["tags", "n"]}))
    first, second = [await producer.wait(await producer.submit(
        model="m1", prompt="classify", tenant="acme", response_format=fmt)) for _ in range(2)]
    assert first.ok and isinstance(first.parsed, dict) and first.parsed["n"] == 3
    assert second.cache == "hit" and second.parsed == first.parsed
    assert second.text == first.text and engine.submitted == 1


async def test_each_model_version_keeps_its_own_answers(producer, start_worker, redis,
                                                        tmp_path):
    from agentfleet.producer.models import ModelRegistry
    from versions_fleet import fake_factory, model_directory

    await _opt_in(redis)
    reg = ModelRegistry(redis)
    for version in ("v1", "v2"):
        await reg.register("m1", version, path=str(model_directory(tmp_path)),
                           check_engine=False)
    await reg.set_weights("m1", {"v1": 50, "v2": 50})
    factory = fake_factory(v1={"delay_s": 0.3}, v2={"delay_s": 0.3})
    await start_worker(("m1",), engines={}, registry_models=["m1"], engine_factory=factory)
    results = []
    for version in ("v1", "v2", "v1", "v2"):
        ids = await asyncio.gather(*(producer.submit(model="m1", prompt="same", tenant="acme",
                                                     version=version) for _ in range(3)))
        results.append(await producer.wait_many(ids, timeout_s=10))
    assert {e: f.submitted for e, f in factory.made.items()} == {"v1": 1, "v2": 1}
    assert [sorted(r.cache for r in rs) for rs in results] == [
        ["", "joined", "joined"], ["", "joined", "joined"], ["hit"] * 3, ["hit"] * 3]
    assert [{r.model_version for r in rs} for rs in results] == [{"v1"}, {"v2"}, {"v1"}, {"v2"}]


from tests.test_acl import users  # noqa: E402,F401  (the ACL users fixture)


async def test_hits_and_joins_work_under_the_least_privilege_users(users, settings, redis):
    from agentfleet.producer.client import Producer
    from agentfleet.producer.connection import connect
    from agentfleet.workers.worker import Worker
    from redis.exceptions import NoPermissionError

    await _opt_in(redis)
    worker_redis = connect(users["worker"])
    engine = FakeEngine(delay_s=0.3)
    worker = Worker(settings, worker_redis, {"m1": engine, "m2": FakeEngine()}, worker_id="w")
    running = asyncio.create_task(worker.run(drain_timeout_s=5))
    await asyncio.wait_for(worker.ready.wait(), 10)
    producer = Producer(connect(users["producer"]), settings=settings)
    try:
        ids = await asyncio.gather(*(producer.submit(model="m1", prompt="acl", tenant="acme",
                                                     correlation_id=f"c{i}") for i in range(3)))
        results = await producer.wait_many(ids, timeout_s=10)
        assert sorted(r.cache for r in results) == ["", "joined", "joined"]
        hit = await producer.wait(await producer.submit(model="m1", prompt="acl", tenant="acme"))
        assert hit.cache == "hit" and engine.submitted == 1
    finally:
        await producer.close()
        worker.request_stop()
        await asyncio.wait_for(running, 10)
        await worker_redis.aclose()
    acme = connect(users["producer-acme"])
    try:
        with pytest.raises(NoPermissionError):  # another tenant's answers are not its own
            await acme.hgetall(keys.result_cache("m1", "bob", "0" * 32))
    finally:
        await acme.aclose()
