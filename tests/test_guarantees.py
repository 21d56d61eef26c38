"""Retries, dead letters, cancellation, server checks and the dlq CLI, on real servers."""

from __future__ import annotations

import asyncio

import pytest

from agentfleet.ops import dlq
from agentfleet.ops.trace import load_trace
from agentfleet.producer.connection import connect
from agentfleet.schemas import keys
from agentfleet.schemas.errors import ErrorCode, EvictingServerError, ServerOutOfMemoryError
from agentfleet.schemas.wire import Retried, Status, Task, decode_task
from agentfleet.workers.fake_engine import FakeEngine
from agentfleet.workers.worker import Worker


@pytest.mark.cluster_too
async def test_transient_errors_are_retried_with_backoff(producer, start_worker, redis, settings):
    await start_worker()
    task_id = await producer.submit(model="m1", prompt="flaky", correlation_id="flaky-1",
                                    metadata={"fake_fail_attempts": "2"})
    result = await producer.wait(task_id, timeout_s=10)
    assert result.status is Status.SUCCEEDED and result.attempts == 3
    retried = [e for e in await load_trace(redis, settings, "flaky-1") if isinstance(e, Retried)]
    assert [e.attempt for e in retried] == [1, 2]
    # Exponential: the second wait is about twice the first (jitter keeps it in 0.5..1 of it).
    first, second = (e.due - e.at for e in retried)
    assert 0.5 * 0.05 <= first <= 0.05 and 0.5 * 0.1 <= second <= 0.1
    assert await redis.zcard(keys.delayed_key("m1")) == 0


async def test_attempts_exhausted_goes_to_dead_letters_and_batch_completes(
        producer, start_worker, redis, settings):
    await start_worker()
    ids = await producer.submit_many([Task(model="m1", prompt=f"ok {i}") for i in range(20)]
                                     + [Task(model="m1", prompt="doomed", id="doomed",
                                             metadata={"fake_fail_attempts": "9"})])
    results = await producer.wait_many(ids, timeout_s=10)
    assert all(r.ok for r in results[:-1])
    dead = results[-1]
    assert dead.status is Status.DEAD_LETTERED
    assert dead.error_code is ErrorCode.ATTEMPTS_EXHAUSTED and dead.attempts == 3
    assert "3 attempts failed; last: engine_error" in dead.error_message
    rows = await dlq.entries(redis, "m1")
    assert [d.task_id for _, d in rows] == ["doomed"]
    assert len(rows[0][1].history) == 2 and rows[0][1].attempts == 3
    assert await redis.xpending(keys.task_stream("m1"), keys.GROUP) == {
        "pending": 0, "min": None, "max": None, "consumers": []}


async def test_non_retryable_errors_fail_at_once(producer, start_worker):
    await start_worker()
    task_id = await producer.submit(model="m1", prompt="x",
                                    metadata={"fake_error": "invalid_task"})
    result = await producer.wait(task_id, timeout_s=5)
    assert result.status is Status.FAILED and result.attempts == 1


@pytest.mark.cluster_too
async def test_dlq_replay_show_and_purge(producer, start_worker, redis):
    await start_worker()
    task_id = await producer.submit(model="m1", prompt="doomed", id="d1",
                                    metadata={"fake_fail_attempts": "3"})
    assert (await producer.wait(task_id, timeout_s=10)).status is Status.DEAD_LETTERED
    rows = await dlq.entries(redis, "m1")
    assert "d1" in dlq.render_list("m1", rows)
    shown = dlq.render_one(*rows[0])
    assert '"task_id": "d1"' in shown and '"fake_fail_attempts": "3"' in shown
    # Replayed with its attempts reset: it fails 3 more times... unless the cause is gone.
    assert await dlq.replay(redis, "m1", [rows[0][0]]) == 1
    assert await redis.xlen(keys.dead_stream("m1")) == 0
    replayed = await producer.wait(task_id, timeout_s=10)
    assert replayed.status is Status.DEAD_LETTERED  # the fake cause is in the task itself
    assert await dlq.purge(redis, "m1", None) == 1
    assert await redis.xlen(keys.dead_stream("m1")) == 0


@pytest.mark.cluster_too
async def test_cancel_a_queued_task_never_runs(producer, start_worker, redis):
    await producer.submit(model="m1", prompt="never", id="c1")
    await producer.cancel("c1", "m1")
    engine = FakeEngine()
    await start_worker(engines={"m1": engine, "m2": FakeEngine()})
    result = await producer.wait("c1", timeout_s=5)
    assert result.status is Status.CANCELLED and result.error_code is ErrorCode.CANCELLED
    assert engine.submitted == 0


@pytest.mark.cluster_too
async def test_cancel_a_running_task_aborts_it(producer, start_worker):
    engine = FakeEngine()
    worker = await start_worker(engines={"m1": engine, "m2": FakeEngine()})
    await producer.submit(model="m1", prompt="long", id="c2", metadata={"fake_delay_s": "30"})
    for _ in range(100):
        if worker.runners[0].inflight:
            break
        await asyncio.sleep(0.02)
    await producer.cancel("c2", "m1")
    result = await producer.wait("c2", timeout_s=5)
    assert result.status is Status.CANCELLED and result.finish_reason == "abort"


@pytest.mark.cluster_too
async def test_refuses_a_server_that_evicts(redis, settings):
    await redis.config_set("maxmemory-policy", "allkeys-lru")
    try:
        worker = Worker(settings, redis, {"m1": FakeEngine()})
        with pytest.raises(EvictingServerError, match="allkeys-lru"):
            await worker.run()
    finally:
        await redis.config_set("maxmemory-policy", "noeviction")


async def test_out_of_memory_on_enqueue_is_a_clear_error(producer, redis):
    used = (await redis.info("memory"))["used_memory"]
    await redis.config_set("maxmemory", used + 200_000)
    try:
        with pytest.raises(ServerOutOfMemoryError, match="out of memory"):
            for _ in range(50):
                await producer.submit_many([Task(model="m1", prompt="x" * 4000)
                                            for _ in range(200)])
    finally:
        await redis.config_set("maxmemory", 0)


async def test_task_in_wrong_version_is_dead_lettered(start_worker, redis, producer):
    import msgspec

    await start_worker()
    await redis.xadd(keys.task_stream("m1"),
                     {"d": msgspec.msgpack.encode({"v": 99, "id": [1, 2]})})
    for _ in range(100):
        if await redis.xlen(keys.dead_stream("m1")):
            break
        await asyncio.sleep(0.02)
    [(_, letter)] = await dlq.entries(redis, "m1")
    assert letter.error_code is ErrorCode.UNSUPPORTED_VERSION
    with pytest.raises(Exception):
        decode_task(letter.payload)


async def test_commit_replies_carry_exactly_the_results_it_wrote(redis):
    """The commit script on a real server: a reply entry is the worker's own payload when
    every result was written, and only the written ones when a result existed already or a
    task was no longer this consumer's."""
    import msgspec

    from agentfleet.workers.scripts import CommitHead, CommitRecord, commit_args, commit_lua

    stream, reply = keys.task_stream("m1"), keys.reply_stream("m1", "p1")
    await redis.xgroup_create(stream, keys.GROUP, id="0", mkstream=True)
    commit = redis.register_script(commit_lua())
    head = CommitHead(stats_key=keys.stats_key("m1"), delayed_key=keys.delayed_key("m1"),
                      dead_stream=keys.dead_stream("m1"), queued_key=keys.queued_counts("m1"),
                      group=keys.GROUP, consumer="me", reply_maxlen=1000, dead_maxlen=1000)

    async def read(n: int, consumer: str = "me") -> list[bytes]:
        for i in range(n):
            await redis.xadd(stream, {"d": b"task %d" % i})
        got = await redis.xreadgroup(keys.GROUP, consumer, {stream: ">"}, count=n)
        return [entry_id for entry_id, _ in got[0][1]]

    def record(entry_id: bytes, name: str) -> CommitRecord:
        return CommitRecord(source=stream, entry_id=entry_id, outcome=b"r",
                            v1=msgspec.msgpack.encode(name), v2=b"",
                            result_key=keys.result_key("m1", name), reply_key=reply,
                            trace_key="", trace=b"", followups=(), result_ttl_s=60,
                            trace_ttl_s=60)

    async def run(records: list[CommitRecord]) -> tuple[list, list[str]]:
        keys_, args = commit_args(head, records)
        out = await commit(keys=keys_, args=args)
        last = (await redis.xrevrange(reply, count=1))[0][1][b"rs"]
        return out, msgspec.msgpack.decode(last)

    ids = await read(3)
    out, replied = await run([record(ids[0], "a"), record(ids[1], "b"), record(ids[2], "c")])
    assert out[:3] == [3, 0, 0] and replied == ["a", "b", "c"]

    await redis.set(keys.result_key("m1", "e"), msgspec.msgpack.encode("earlier"))
    ids = await read(3)
    stolen = (await read(1, consumer="other"))[0]
    out, replied = await run([record(ids[0], "d"), record(ids[1], "e"), record(stolen, "s"),
                              record(ids[2], "f")])
    assert out[:3] == [2, 1, 1]  # written, duplicates, fenced
    assert replied == ["d", "f"]
    assert await redis.get(keys.result_key("m1", "e")) == msgspec.msgpack.encode("earlier")
    assert await redis.exists(keys.result_key("m1", "s")) == 0
