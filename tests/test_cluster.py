"""Redis Cluster and Sentinel: the outbox and its mover, WAIT for replicas, failovers.

The outbox tests run on both servers and on the session's cluster (3 primaries, 3 replicas);
the failover tests start a cluster or a Sentinel group of their own, since they kill a
primary.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from agentfleet.ops.embedded import ServerCluster
from agentfleet.producer.client import Producer
from agentfleet.producer.connection import connect
from agentfleet.schemas import keys
from agentfleet.schemas.errors import BrokerError, NotReplicatedError
from agentfleet.schemas.wire import FollowUp, Sampling, Task, encode
from agentfleet.workers.fake_engine import FakeEngine
from agentfleet.workers.mover import Mover
from agentfleet.workers.runner import ModelRunner

pytestmark = pytest.mark.cluster_too


def _chain(i: int) -> Task:
    return Task(model="m1", id=f"c{i}", prompt=f"one {i}", tenant="acme",
                followups=[FollowUp(model="m2", prompt="two: {output}")])


async def _outbox(redis, model: str = "m1") -> list:
    return await redis.xrange(keys.outbox_stream(model))


async def test_a_follow_up_for_another_model_goes_through_the_outbox_and_is_moved_once(
        producer, start_worker, redis):
    await start_worker(models=("m1",))  # nobody serves m2: its follow-ups wait in its stream
    ids = await producer.submit_many([_chain(i) for i in range(20)])
    await producer.wait_many(ids, timeout_s=10)
    target = keys.task_stream("m2", "acme")
    for _ in range(100):
        if await redis.xlen(target) == 20 and not await _outbox(redis):
            break
        await asyncio.sleep(0.05)
    assert await redis.xlen(target) == 20 and await _outbox(redis) == []
    assert int(await redis.hget(keys.stats_key("m1"), "moved")) == 20
    assert int(await redis.hget(keys.queued_counts("m2"), "acme")) == 20
    assert await redis.zscore(keys.tenant_lanes("m2", "i"), "acme") == 1
    # The same follow-ups again (a parent run again after its commit was lost): nothing added.
    for i in range(20):
        await redis.xadd(keys.outbox_stream("m1"), {
            "s": target, "l": keys.tenant_lanes("m2", "i"), "q": keys.queued_counts("m2"),
            "t": "acme", "d": (await redis.xrange(target, count=20))[i][1][b"d"]})
    for _ in range(100):
        if not await _outbox(redis):
            break
        await asyncio.sleep(0.05)
    assert await _outbox(redis) == [] and await redis.xlen(target) == 20
    assert int(await redis.hget(keys.queued_counts("m2"), "acme")) == 20
    await start_worker(models=("m2",))
    kids = await producer.wait_many([f"{i}.1" for i in ids], timeout_s=10)
    assert all(k.ok and k.model == "m2" and k.text.startswith("echo: two: ") for k in kids)
    assert int(await redis.hget(keys.stats_key("m2"), "written")) == 20


async def test_a_mover_dying_between_move_and_settle_leaves_it_to_another_that_adds_nothing(
        redis, settings):
    settings.claim_idle_ms = 100

    def mover(worker_id: str) -> Mover:
        return ModelRunner(spec=settings.models["m1"], engine=FakeEngine(), redis=redis,
                           settings=settings, worker_id=worker_id).mover

    dying, survivor = mover("dies"), mover("survives")
    await dying._ensure_group()
    target = keys.task_stream("m2", "acme")
    for i in range(3):  # as commit.lua writes them
        await redis.xadd(keys.outbox_stream("m1"), {
            "s": target, "l": keys.tenant_lanes("m2", "i"), "q": keys.queued_counts("m2"),
            "t": "acme", "d": encode(Task(model="m2", id=f"p{i}.1", prompt="two",
                                          tenant="acme"))})
    got = await redis.xreadgroup(keys.MOVER_GROUP, "dies", {keys.outbox_stream("m1"): ">"})
    assert len(await dying.move(got[0][1])) == 3  # moved; then it dies before settling
    assert await redis.xlen(target) == 3
    assert await survivor.move_once() == 0  # not idle long enough yet: left alone
    await asyncio.sleep(0.15)
    assert await survivor.move_once() == 3  # claimed and moved again: a no-op
    assert await _outbox(redis) == [] and await redis.xlen(target) == 3
    assert int(await redis.hget(keys.queued_counts("m2"), "acme")) == 3
    stats = await redis.hgetall(keys.stats_key("m1"))
    assert int(stats[b"moved"]) == 3 and int(stats[b"moved_again"]) == 3


async def test_wait_replicas_refuses_to_confirm_what_no_replica_has(server, redis, settings):
    settings.wait_replicas, settings.wait_timeout_ms = 1, 50
    p = Producer(connect(server.url), settings=settings)
    try:
        if isinstance(server, ServerCluster):  # every primary has a replica: confirmed
            task_id = await p.submit(model="m1", prompt="kept twice", reply=False)
            assert await redis.xlen(keys.task_stream("m1")) == 1 and task_id
        else:  # one server, no replica: queued, but a failover could lose it
            with pytest.raises(NotReplicatedError) as err:
                await p.submit_many([Task(model="m1", prompt="on one server only")],
                                    reply=False)
            assert err.value.acked == 0 and err.value.wanted == 1
            assert "confirmed by 0 of 1 replicas within 50 ms" in str(err.value)
    finally:
        await p.close()


@pytest.mark.timeout(120)
async def test_a_sentinel_failover_loses_nothing_for_a_waiting_producer_and_a_serving_worker(
        tmp_path, settings):
    """Through Sentinel: tasks in the engine when the primary is killed, a producer waiting
    for them; the replica is promoted, the worker's commits and the producer's reads follow
    it, the old primary comes back as a replica.  WAIT 1: what was confirmed survives."""
    from agentfleet.ops.embedded import SentinelGroup
    from agentfleet.workers.worker import Worker

    settings.wait_replicas, settings.wait_timeout_ms = 1, 500
    group = SentinelGroup(tmp_path / "sentinel", down_after_ms=1000)
    group.start()
    worker_redis = connect(group.url)
    worker = Worker(settings, worker_redis, {"m1": FakeEngine(), "m2": FakeEngine()},
                    worker_id="w1")
    run = asyncio.create_task(worker.run(drain_timeout_s=5))
    producer = Producer(connect(group.url), settings=settings)
    try:
        await asyncio.wait_for(worker.ready.wait(), 20)
        slow = [Task(model="m1", id=f"s{i}", prompt=f"slow {i}", idempotency_key=f"s{i}",
                     metadata={"fake_delay_s": "1.5"},
                     followups=[FollowUp(model="m2", prompt="then: {output}")])
                for i in range(30)]
        ids = await producer.submit_many(slow)
        waiting = asyncio.ensure_future(producer.wait_many(ids + [f"{i}.1" for i in ids],
                                                           timeout_s=60))
        await asyncio.sleep(0.5)  # read, in the engine
        old = group.primary()
        old.kill()
        killed_at = time.monotonic()
        while (new := await asyncio.to_thread(_sentinel_primary, group)) in (old, None):
            assert time.monotonic() - killed_at < 30, "no failover"
            await asyncio.sleep(0.2)
        failover_s = time.monotonic() - killed_at
        old.start()  # back (from this thread: it dies with its starter), made a replica
        later = [Task(model="m1", id=f"l{i}", prompt=f"later {i}", idempotency_key=f"l{i}")
                 for i in range(30)]
        for _ in range(100):  # refused (NotReplicatedError) until the replica has synced
            try:
                ids_later = await producer.submit_many(later)
                break
            except BrokerError:
                await asyncio.sleep(0.2)
        results = await waiting
        results += await producer.wait_many(ids_later, timeout_s=30)
        assert all(r.ok for r in results) and len(results) == 90
        stats = await producer.redis.hgetall(keys.stats_key("m1"))
        assert int(stats[b"written"]) == 60  # each once, on the promoted primary
        assert new is not old
        print(f"sentinel failover in {failover_s:.1f}s; 90 results, each once")
    finally:
        worker.request_stop()
        await asyncio.wait_for(run, 20)
        await producer.close()
        await worker_redis.aclose()
        group.stop()


async def test_a_primary_short_of_replicas_refuses_writes_and_the_worker_waits_it_out(
        tmp_path, settings):
    """min-replicas-to-write (what the Sentinel group runs with) and no replica in sync: every
    write is refused with NOREPLICAS.  A submit says so in a BrokerError; the worker's reads,
    claims and commits wait it out (NoReplicasError is transient) instead of crashing, and
    serve once a replica is back (here: the setting lifted)."""
    from agentfleet.ops.embedded import ServerProcess
    from agentfleet.producer.connection import NoReplicasError
    from agentfleet.workers.worker import Worker

    server = ServerProcess(tmp_path / "lonely", appendonly=False,
                           extra_args=["--min-replicas-to-write", "1"])
    server.start()
    admin, worker_redis = connect(server.url), connect(server.url)
    worker = Worker(settings, worker_redis, {"m1": FakeEngine()}, worker_id="w1")
    run = asyncio.create_task(worker.run(drain_timeout_s=5))
    producer = Producer(connect(server.url), settings=settings)
    try:
        with pytest.raises(NoReplicasError):
            await admin.set("k", "v")
        with pytest.raises(BrokerError, match="good replicas"):
            await producer.submit(model="m1", prompt="refused", idempotency_key="r")
        await asyncio.sleep(2)  # the worker's loops meet NOREPLICAS meanwhile
        assert not run.done()
        await admin.config_set("min-replicas-to-write", 0)
        await asyncio.wait_for(worker.ready.wait(), 20)
        result = await producer.wait(await producer.submit(model="m1", prompt="served"),
                                     timeout_s=20)
        assert result.ok
    finally:
        worker.request_stop()
        await asyncio.wait_for(run, 20)
        await producer.close()
        await admin.aclose()
        await worker_redis.aclose()
        server.stop()


def _sentinel_primary(group):
    try:
        return group.primary()
    except Exception:  # noqa: BLE001 - Sentinels still electing
        return None


# ---- agent steps: fan-outs and joins across models, every script on one slot ---------------

def _fanout(i: int, kids: str, join: str, n: int = 4) -> Task:
    return Task(model="m1", id=f"f{i}", prompt=f"split {i}", tenant="acme", correlation_id=f"f{i}",
                followups=[FollowUp(items=list(range(n)), model=kids, prompt="part {item}",
                                    sampling=Sampling(max_tokens=8))],
                join=FollowUp(model=join, prompt="merge {results}", sampling=Sampling(max_tokens=8),
                              metadata={"fake_output": f"joined {i}"}))


async def _joined(producer, redis, roots: list[str], n: int) -> None:
    """Each fan-out joined once with all its children's results, every outbox empty."""
    joins = await producer.wait_many([r + ".join" for r in roots], timeout_s=15)
    assert [j.text for j in joins] == [f"joined {r[1:]}" for r in roots]
    for r in roots:
        state = await redis.hgetall(keys.join_state("m1", r))
        assert (state[b"n"], state[b"ended"], state[b"fired"]) == (b"%d" % n, b"%d" % n, b"1")
        assert all(state[b"r:%s.1-%d" % (r.encode(), k)] for k in range(1, n + 1))
    for _ in range(100):
        if not await _outbox(redis, "m1") and not await _outbox(redis, "m2"):
            break
        await asyncio.sleep(0.05)
    assert await _outbox(redis, "m1") == [] and await _outbox(redis, "m2") == []
    for model in ("m1", "m2"):
        stats = await redis.hgetall(keys.stats_key(model))
        assert b"duplicates" not in stats and b"join_missed" not in stats, (model, stats)
        queued = await redis.hgetall(keys.queued_counts(model))
        assert all(int(v) == 0 for v in queued.values()), (model, queued)


async def test_children_on_another_model_fill_their_join_through_the_outbox_and_it_fires_once(
        producer, start_worker, redis):
    """Parent on m1, children and join on m2: each child's place goes through m2's outbox
    to m1's slot (join.lua); the last one's fires the join step into m1's outbox, moved to
    m2 like a follow-up."""
    await start_worker()
    roots = await producer.submit_many([_fanout(i, kids="m2", join="m2") for i in range(10)])
    await _joined(producer, redis, roots, 4)
    m1 = await redis.hgetall(keys.stats_key("m1"))
    # the joins fired on m1's slot; 40 children and 10 join steps moved out of its outbox
    assert int(m1[b"joins"]) == 10 and int(m1[b"moved"]) == 50, m1
    assert int((await redis.hgetall(keys.stats_key("m2")))[b"moved"]) == 40  # the places
    assert all(j.model == "m2" for j in await producer.wait_many(
        [r + ".join" for r in roots], timeout_s=1))


async def test_a_join_step_for_another_model_fires_through_the_parents_outbox(
        producer, start_worker, redis):
    """Parent and children on m1, join on m2: the last child's commit fires the join into
    m1's outbox, moved to m2 like a follow-up."""
    await start_worker()
    roots = await producer.submit_many([_fanout(i, kids="m1", join="m2") for i in range(5)])
    await _joined(producer, redis, roots, 4)
    assert int(await redis.hget(keys.stats_key("m1"), "joins")) == 5


async def test_a_childs_place_moved_twice_is_filled_once(producer, start_worker, redis,
                                                        settings):
    """A mover that died after join.lua and before its XACK: the entry is moved again and
    changes nothing (join_missed), the join step is not enqueued twice."""
    await start_worker(models=("m1",))  # nobody serves m2 yet: its children wait
    root = await producer.submit(_fanout(0, kids="m2", join="m1", n=2))
    kids = [f"{root}.1-1", f"{root}.1-2"]
    for _ in range(100):
        if await redis.xlen(keys.task_stream("m2", "acme")) == 2:
            break
        await asyncio.sleep(0.05)
    await start_worker(models=("m2",))
    await producer.wait_many(kids, timeout_s=10)
    join = await producer.wait(root + ".join", timeout_s=10)
    assert join.ok
    state = await redis.hgetall(keys.join_state("m1", root))
    place = {"j": keys.join_state("m1", root), "m": kids[0], "r": b"other", "t": "acme",
             "s": keys.task_stream("m1", "acme"), "l": keys.tenant_lanes("m1", "i"),
             "q": keys.queued_counts("m1"), "e": b"", "k": "", "x": 60}
    await redis.xadd(keys.outbox_stream("m2"), place)
    for _ in range(100):
        if await redis.hget(keys.stats_key("m1"), "join_missed"):
            break
        await asyncio.sleep(0.05)
    assert int(await redis.hget(keys.stats_key("m1"), "join_missed")) == 1
    assert await redis.hgetall(keys.join_state("m1", root)) == state  # unchanged
    assert int(await redis.hget(keys.stats_key("m1"), "joins")) == 1
    assert await _outbox(redis, "m2") == []


# ---- what a failover loses: bench.failover's quick run ------------------------------------

@pytest.mark.timeout(60)
def test_a_failover_under_steady_submits_with_wait_1_loses_nothing_acknowledged(tmp_path):
    """bench.failover --quick, WAIT 1 only (the full run, with WAIT 0 beside it and three
    repetitions each, is in docs/benchmarks.md): a primary killed under 4 s of steady submits
    and commits, its replica promoted; every acknowledged task has its result afterwards."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "failover.json"
    proc = subprocess.run([sys.executable, "-m", "bench.failover", "--quick", "--modes", "1",
                           "--json", str(out)], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, timeout=55)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    [run] = json.loads(out.read_text())["runs"]["1"]
    assert run["acked"] > 500 and run["lost_tasks"] == run["lost_results"] == 0, run


def test_the_sentinels_newest_failover_names_the_primary():
    """A Sentinel that has not heard of a failover yet still names the old primary; once the
    old one is back it looks valid (and is a primary until the Sentinels make it a replica),
    so taking the first answer sent clients to it and the resync dropped their writes (a
    flaky `written == 60` in the failover test above).  The highest config epoch wins."""
    from redis.sentinel import MasterNotFoundError

    from agentfleet.producer.connection import _newest

    def state(port: int, epoch: int, **flags) -> dict:
        return {"ip": "127.0.0.1", "port": port, "config-epoch": epoch, "is_master": True,
                "is_sdown": False, "is_odown": False, "num-other-sentinels": 2, **flags}

    def check(s: dict, _name: str) -> bool:
        return s["is_master"] and not s["is_sdown"] and not s["is_odown"]

    lagging, informed = {"agentfleet": state(6000, 0)}, {"agentfleet": state(6001, 1)}
    for answers in ([lagging, informed], [informed, lagging]):
        got = _newest([(i, a) for i, a in enumerate(answers)], "agentfleet", check)
        assert got["port"] == 6001
    down = {"agentfleet": state(6002, 2, is_sdown=True)}
    unreachable = ConnectionError("refused")
    got = _newest([(0, down), (1, unreachable), (2, lagging)], "agentfleet", check)
    assert got["port"] == 6000  # the only valid view
    with pytest.raises(MasterNotFoundError, match="No master found for 'agentfleet' : 0 - "):
        _newest([(0, unreachable), (1, {})], "agentfleet", check)
