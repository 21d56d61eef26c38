"""The main path on real servers with the fake engine: submit, work, results, follow-ups."""

from __future__ import annotations

import asyncio
import gc

import pytest

from agentfleet.schemas import keys
from agentfleet.schemas.errors import ErrorCode, ResultTimeoutError, UnknownModelError, ValidationError
from agentfleet.schemas.wire import (
    FollowUp,
    Message,
    Sampling,
    Status,
    Task,
    decode_event,
    decode_result,
    encode,
)
from agentfleet.workers.fake_engine import FakeEngine
from agentfleet.workers.worker import GC_GEN0_THRESHOLD, quiet_gc


@pytest.mark.cluster_too
async def test_submit_and_wait_one(producer, start_worker):
    await start_worker()
    task_id = await producer.submit(model="m1", prompt="hello there", agent_id="a1")
    result = await producer.wait(task_id, timeout_s=5)
    assert result.status is Status.SUCCEEDED
    assert result.text == "echo: hello there"
    assert result.task_id == task_id
    assert result.correlation_id == task_id  # generated: the root's own id
    assert result.agent_id == "a1"
    assert result.worker_id == "w1"
    assert result.window_size >= 1 and result.window_id.startswith("w1/m1/")
    assert result.model_version == "fake-1"
    t = result.timings
    assert 0 < t.enqueued <= t.read <= t.engine_start <= t.finished <= t.written


@pytest.mark.cluster_too
async def test_many_tasks_two_models(producer, start_worker):
    await start_worker()
    tasks = [Task(model="m1" if i % 2 else "m2", prompt=f"task number {i}") for i in range(2000)]
    ids = await producer.submit_many(tasks)
    assert len(set(ids)) == 2000
    results = await producer.wait_many(ids, timeout_s=20)
    assert [r.task_id for r in results] == ids
    assert all(r.ok for r in results)
    assert {r.text for r in results[:4]} == {f"echo: task number {i}" for i in range(4)}


async def test_as_completed_yields_every_result_once(producer, start_worker):
    await start_worker(engines={"m1": FakeEngine(delay_s=0.01), "m2": FakeEngine()})
    ids = await producer.submit_many([Task(model="m1", prompt=f"p{i}") for i in range(300)])
    seen = [r.task_id async for r in producer.as_completed(ids, timeout_s=10)]
    assert sorted(seen) == sorted(ids)


async def test_wait_times_out_naming_missing(producer):
    task_id = await producer.submit(model="m1", prompt="nobody serves this")
    with pytest.raises(ResultTimeoutError) as err:
        await producer.wait(task_id, timeout_s=0.3)
    assert err.value.missing == [task_id]


@pytest.mark.cluster_too
async def test_result_from_another_producer_process(producer, start_worker, server, settings):
    from agentfleet.producer.client import Producer
    from agentfleet.producer.connection import connect

    await start_worker()
    task_id = await producer.submit(model="m1", prompt="shared")
    await producer.wait(task_id, timeout_s=5)
    other = Producer(connect(server.url), settings=settings)
    try:
        stored = await other.get_result(task_id)
        assert stored is not None and stored.text == "echo: shared"
        assert (await other.wait(task_id, timeout_s=5)).text == "echo: shared"
    finally:
        await other.close()


@pytest.mark.cluster_too
async def test_follow_up_chain_across_models(producer, start_worker, redis):
    await start_worker()
    root = Task(
        model="m1", prompt="step one", correlation_id="chain-1",
        followups=[FollowUp(model="m2", prompt="summarise: {output}",
                            followups=[FollowUp(messages=[Message(role="user",
                                                                  content="again {output}")])])],
    )
    root_id = await producer.submit(root)
    chain = await producer.wait_chain(root_id, timeout_s=5)
    assert [r.task_id for r in chain] == [root_id, f"{root_id}.1", f"{root_id}.1.1"]
    assert [r.model for r in chain] == ["m1", "m2", "m2"]
    assert {r.correlation_id for r in chain} == {"chain-1"}
    assert chain[1].parent_id == root_id and chain[2].parent_id == f"{root_id}.1"
    assert chain[1].text == "echo: summarise: echo: step one"
    assert chain[0].followup_ids == [f"{root_id}.1"]
    # The chain is in the traces of both models, every step accounted for.
    events = [decode_event(e) for m in ("m1", "m2")
              for e in await redis.lrange(keys.trace_key(m, "chain-1"), 0, -1)]
    kinds = sorted((type(e).__name__, getattr(e, "task_id", None) or e.result.task_id)
                   for e in events)
    # The root's enqueue time is in its result's timings; follow-ups get an event of their own.
    assert chain[0].timings.enqueued > 0
    assert kinds == sorted([("Finished", root_id),
                            ("Enqueued", f"{root_id}.1"), ("Finished", f"{root_id}.1"),
                            ("Enqueued", f"{root_id}.1.1"), ("Finished", f"{root_id}.1.1")])
    assert await redis.ttl(keys.trace_key("m1", "chain-1")) > 0


async def test_failed_parent_enqueues_no_follow_up(producer, start_worker, redis):
    await start_worker()
    root_id = await producer.submit(Task(model="m1", prompt="x",
                                         metadata={"fake_error": "prompt_too_long"},
                                         followups=[FollowUp(prompt="never")]))
    result = await producer.wait(root_id, timeout_s=5)
    assert result.status is Status.FAILED and result.error_code is ErrorCode.PROMPT_TOO_LONG
    assert result.followup_ids == []
    assert await redis.xlen(keys.task_stream("m1")) == 1


@pytest.mark.parametrize(
    ("fields", "field", "limit"),
    [
        ({"model": "nope", "prompt": "x"}, "model", None),
        ({"model": "m1", "prompt": "   "}, "prompt", 1),
        ({"model": "m1", "prompt": "x" * 5000}, "prompt", 4096),
        ({"model": "m1", "prompt": "x", "sampling": Sampling(max_tokens=513)}, "sampling.max_tokens",
         "1..512 (max_model_len of m1)"),
        ({"model": "m1", "prompt": "x", "sampling": Sampling(temperature=3.0)},
         "sampling.temperature", "0.0..2.0"),
        ({"model": "m1", "prompt": "x", "priority": 10}, "priority", (0, 9)),
        ({"model": "m1", "messages": []}, "messages", 1),
        ({"model": "m1", "prompt": "x", "followups": [FollowUp(prompt="y")] * 9}, "followups", 8),
    ],
)
async def test_bad_input_refused_before_queueing(producer, redis, fields, field, limit):
    with pytest.raises(ValidationError) as err:
        await producer.submit(**fields)
    assert err.value.field == field
    if limit is not None:
        assert err.value.limit == limit
    assert field in str(err.value)
    assert await redis.keys("*") == []


async def test_unknown_model_is_typed(producer):
    with pytest.raises(UnknownModelError, match="unknown model 'gpt-9'"):
        await producer.submit(model="gpt-9", prompt="hi")


async def test_one_bad_task_in_many_queues_nothing(producer, redis):
    tasks = [Task(model="m1", prompt="ok")] * 3 + [Task(model="m1", prompt="")]
    with pytest.raises(ValidationError, match=r"tasks\[3\]\.prompt"):
        await producer.submit_many(tasks)
    assert await redis.keys("*") == []


@pytest.mark.cluster_too
async def test_worker_survives_garbage_in_the_stream(producer, start_worker, redis):
    await start_worker()
    stream = keys.task_stream("m1")
    await redis.xadd(stream, {"d": b"\xc1 not msgpack"})
    await redis.xadd(stream, {"other": b"x"})
    await redis.xadd(stream, {"d": encode(Task(model="m1", prompt="x", id="bad-temp",
                                               sampling=Sampling(temperature=9.0)))})
    await redis.xadd(stream, {"d": encode(Task(model="m2", prompt="x", id="wrong-stream"))})
    good = await producer.submit(model="m1", prompt="still alive")
    assert (await producer.wait(good, timeout_s=5)).text == "echo: still alive"
    for _ in range(100):
        if await redis.xpending(stream, "workers") == {"pending": 0, "min": None, "max": None,
                                                        "consumers": []}:
            break
        await asyncio.sleep(0.02)
    bad = await producer.get_result("bad-temp")
    assert bad.status is Status.FAILED and bad.error_code is ErrorCode.INVALID_TASK
    assert "sampling.temperature" in bad.error_message
    wrong = await producer.get_result("wrong-stream", model="m1")
    assert wrong.error_code is ErrorCode.INVALID_TASK
    # SCAN, not KEYS: on a cluster it walks every primary
    assert len([k async for k in redis.scan_iter(match=keys.result_key("m1", "entry-*"))]) == 2


@pytest.mark.cluster_too
async def test_expired_task_never_reaches_engine(producer, start_worker):
    engine = FakeEngine()
    await start_worker(engines={"m1": engine})
    task_id = await producer.submit(model="m1", prompt="late", deadline=1.0)
    result = await producer.wait(task_id, timeout_s=5)
    assert result.status is Status.EXPIRED
    assert result.error_code is ErrorCode.DEADLINE_EXCEEDED
    assert engine.submitted == 0


@pytest.mark.cluster_too
async def test_idempotency_key_enqueues_once(producer, redis):
    first = await producer.submit(model="m1", prompt="x", idempotency_key="order-7")
    again = await producer.submit(model="m1", prompt="x", idempotency_key="order-7")
    assert again == first
    assert await redis.xlen(keys.task_stream("m1")) == 1


@pytest.mark.cluster_too
async def test_duplicate_result_is_dropped(producer, start_worker, redis):
    """A task delivered twice writes its effects once; the second is only counted."""
    await start_worker()
    task = Task(model="m1", prompt="once", id="dup-1", followups=[FollowUp(prompt="next")])
    await producer.submit(task)
    await producer.wait_chain("dup-1", timeout_s=5)
    await redis.xadd(keys.task_stream("m1"), {"d": encode(task)})  # the same task again
    for _ in range(100):
        if await redis.hget(keys.stats_key("m1"), "duplicates") == b"1":
            break
        await asyncio.sleep(0.02)
    assert await redis.hget(keys.stats_key("m1"), "duplicates") == b"1"
    assert await redis.xlen(keys.task_stream("m1")) == 3  # root, its follow-up, the redelivery


async def test_inflight_limit_bounds_reads(producer, start_worker, redis, settings):
    """A worker holding many queued tasks reads no more than max_inflight of them."""
    import msgspec

    s = msgspec.structs.replace(settings, max_inflight=10, read_count=4)
    engine = FakeEngine(delay_s=0.2)
    worker = await start_worker(engines={"m1": engine}, worker_settings=s)
    ids = await producer.submit_many([Task(model="m1", prompt=f"p{i}") for i in range(100)])
    await asyncio.sleep(0.1)
    assert worker.runners[0].busy <= 10
    info = await redis.xpending(keys.task_stream("m1"), "workers")
    assert info["pending"] <= 10
    results = await producer.wait_many(ids, timeout_s=20)
    assert all(r.ok for r in results)
    assert max(r.window_size for r in results) <= 4


@pytest.mark.cluster_too
async def test_bulk_lane_is_served_after_interactive_work(producer, start_worker, redis):
    """Bulk-job tasks wait in their own lane; interactive tasks read later still go first."""
    bulk = await producer.submit_many(
        [Task(model="m1", prompt=f"bulk {i}", batch_id="job-1") for i in range(300)],
        reply=False)
    interactive = await producer.submit_many([Task(model="m1", prompt=f"now {i}")
                                              for i in range(20)])
    assert await redis.xlen(keys.bulk_stream("m1")) == 300
    assert await redis.xlen(keys.task_stream("m1")) == 20
    worker = await start_worker(engines={"m1": FakeEngine(delay_s=0.01), "m2": FakeEngine()})
    done = await producer.wait_many(interactive, timeout_s=10)
    assert all(r.ok for r in done)
    for _ in range(200):
        counts = await redis.hgetall(keys.batch_counts("m1", "job-1"))
        if counts.get(b"succeeded") == b"300":
            break
        await asyncio.sleep(0.05)
    assert counts == {b"succeeded": b"300"}
    out = await redis.xrange(keys.batch_output("m1", "job-1"))
    results = [decode_result(f[b"r"]) for _, f in out]
    assert sorted(r.task_id for r in results) == sorted(bulk)
    first_bulk_read = min(r.timings.read for r in results)
    assert max(r.timings.read for r in done) <= first_bulk_read
    assert worker.runners[0].stats.read == 320


def test_quiet_gc_holds_while_any_worker_serves_and_restores_after():
    before = gc.get_threshold()
    with quiet_gc():
        assert gc.get_threshold()[0] >= GC_GEN0_THRESHOLD
        assert gc.get_freeze_count() > 0
        with quiet_gc():  # a second worker in the same process (tests do this)
            pass
        assert gc.get_threshold()[0] >= GC_GEN0_THRESHOLD  # the first still serves
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
