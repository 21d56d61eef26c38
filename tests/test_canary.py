"""Canaries: the guard's judgement (pure), its lease, the move of queued tasks, and the whole
rollout on the fake engine: a canary failing 30% of its tasks is rolled back by itself well
within 60 s, with nothing lost or done twice and its failed tasks retried on the stable
version; a healthy one is promoted step by step."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest

from agentfleet.ops.canary import Figures, Guard, judge, read_figures, wilson_lower
from agentfleet.producer.models import ModelRegistry
from agentfleet.producer.tenants import TenantRegistry
from agentfleet.schemas import keys
from agentfleet.schemas.wire import CanaryPlan, Task, VersionState
from agentfleet.workers.metrics import LATENCY_BUCKETS_S
from agentfleet.workers.scripts import move_args, move_lua
from versions_fleet import fake_factory, model_directory, wait_until


@pytest.fixture
def model_dir(tmp_path):
    return model_directory(tmp_path)


def _figures(attempts: int, errors: int = 0, latency_s: float = 0.1) -> Figures:
    f = Figures(attempts=attempts, errors=errors)
    f.buckets[next(i for i, b in enumerate(LATENCY_BUCKETS_S) if b >= latency_s)] = attempts
    return f


def _plan(**fields) -> CanaryPlan:
    now = time.time()
    base = dict(version="v2", guard="error_ratio<1%,p99<2x", steps=[5.0, 50.0, 100.0],
                step_s=60.0, min_tasks=50, started_at=now - 10, step_started_at=now - 10)
    return CanaryPlan(**{**base, **fields})


# ---- the guard's judgement ------------------------------------------------------------------

def test_sure_errors_roll_back_before_min_tasks_and_a_few_do_not():
    now = time.time()
    assert judge(_plan(), _figures(15, 5), _figures(500), now).action == "rollback"
    assert wilson_lower(5, 15) > 0.01
    # one error in ten: not sure yet, and too few attempts to judge the ratio
    assert judge(_plan(), _figures(10, 1), _figures(500), now).action == "wait"
    assert judge(_plan(), _figures(60, 1), _figures(500), now).action == "rollback"  # 1.7%


def test_latency_is_judged_against_the_stable_version():
    now = time.time()
    slow = judge(_plan(), _figures(60, 0, latency_s=2.0), _figures(500, 0, 0.25), now)
    assert slow.action == "rollback" and "p99" in slow.reason
    fine = judge(_plan(), _figures(60, 0, 0.25), _figures(500, 0, 0.25), now)
    assert fine.action == "wait"  # holds, but the step has not lasted step_s
    due = judge(_plan(step_started_at=now - 61), _figures(60), _figures(500), now)
    assert due.action == "step"
    unsure = judge(_plan(step_started_at=now - 61), _figures(60), _figures(3), now)
    assert unsure.action == "wait" and "stable" in unsure.reason


def test_a_canary_on_which_nothing_finishes_is_rolled_back():
    now = time.time()
    assert judge(_plan(started_at=now - 400), Figures(), _figures(500), now).action == \
        "rollback"
    assert judge(_plan(), Figures(), _figures(500), now).action == "wait"


# ---- the lease and the move -----------------------------------------------------------------

async def test_one_guard_holds_the_lease_and_another_takes_over(redis, settings):
    first = Guard(redis, settings, holder="a", every_s=0.05)
    second = Guard(redis, settings, holder="b", every_s=0.05)
    a = asyncio.create_task(first.run())
    await wait_until(lambda: first.holding)
    b = asyncio.create_task(second.run())
    await asyncio.sleep(0.3)
    assert first.holding and not second.holding and second.passes == 0
    a.cancel()
    await asyncio.gather(a, return_exceptions=True)  # released on the way out
    await wait_until(lambda: second.holding, 2)
    b.cancel()
    await asyncio.gather(b, return_exceptions=True)


async def test_move_takes_undelivered_and_silent_entries_and_fences_their_holder(redis):
    source, target = keys.task_stream("m", version="v2"), keys.task_stream("m", version="v1")
    await redis.xgroup_create(source, keys.GROUP, id="0", mkstream=True)
    for i in range(5):
        await redis.xadd(source, {"d": f"task {i}"})
    await redis.zadd(keys.tenant_lanes("m", "i", "v2"), {"default": 1})
    await redis.xreadgroup(keys.GROUP, "dead-worker", {source: ">"}, count=2)
    await redis.xreadgroup(keys.GROUP, "live-worker", {source: ">"}, count=1)
    await asyncio.sleep(0.15)
    await redis.xclaim(source, keys.GROUP, "live-worker", 0,
                       [(await redis.xpending_range(source, keys.GROUP, "-", "+", 10,
                                                    "live-worker"))[0]["message_id"]])
    move = redis.register_script(move_lua())

    def args(idle_ms: int):
        return move_args(source=source, target=target,
                         target_lanes=keys.tenant_lanes("m", "i", "v1"),
                         source_lanes=keys.tenant_lanes("m", "i", "v2"),
                         stats_key=keys.stats_key("m"), consumer="mover", count=100,
                         min_idle_ms=idle_ms, tenant="default")

    moved, claimed, drained = await move(*[], keys=args(100)[0], args=args(100)[1])
    assert (moved, claimed, drained) == (4, 2, 0)  # 2 undelivered + the dead one's 2
    assert [f[b"d"] for _, f in await redis.xrange(target)] == [
        b"task 3", b"task 4", b"task 0", b"task 1"]
    pending = await redis.xpending_range(source, keys.GROUP, "-", "+", 10)
    assert [p["consumer"] for p in pending] == [b"live-worker"]  # renewed: left alone
    assert await redis.zscore(keys.tenant_lanes("m", "i", "v1"), "default") == 1
    await redis.xack(source, keys.GROUP, pending[0]["message_id"])  # it commits
    moved, _, drained = await move(keys=args(100)[0], args=args(100)[1])
    assert (moved, drained) == (0, 1)
    assert await redis.xlen(source) == 0
    assert await redis.zscore(keys.tenant_lanes("m", "i", "v2"), "default") == 0
    assert await redis.hget(keys.stats_key("m"), "moved") == b"4"


# ---- the rollout ----------------------------------------------------------------------------

async def _load(producer, ids: list[str], stop: asyncio.Event, *, rate_per_s: float) -> None:
    i = 0
    while not stop.is_set():
        ids.extend(await producer.submit_many(
            [Task(model="m1", prompt=f"load {i}-{j}") for j in range(10)]))
        i += 1
        await asyncio.sleep(10 / rate_per_s)


async def test_a_canary_failing_30_percent_rolls_back_by_itself_losing_nothing(
        redis, producer, start_worker, model_dir, settings):
    reg = ModelRegistry(redis)
    await reg.register("m1", "v1", path=str(model_dir), check_engine=False)
    await reg.register("m1", "v2", path=str(model_dir), check_engine=False)
    # The canary fails 30% of its tasks (engine_error: transient) and is slow, so that
    # tasks queue up on it: a rollback has queued tasks to move.
    factory = fake_factory(v1={"delay_s": 0.01}, v2={"error_rate": 0.3, "delay_s": 0.2,
                                                     "slots": 1})
    s = msgspec.structs.replace(settings, max_inflight=4, read_count=4)
    guard = Guard(redis, s, holder="test-guard", every_s=0.25)
    await start_worker(("m1",), engines={}, registry_models=["m1"], engine_factory=factory,
                       worker_settings=s, side_loops=[("guard", guard.run)])
    ids: list[str] = []
    stop = asyncio.Event()
    loader = asyncio.create_task(_load(producer, ids, stop, rate_per_s=100))
    await asyncio.sleep(1.0)
    started = time.time()
    await reg.start_canary("m1", "v2", weight_pct=20, guard="error_ratio<1%,p99<5x",
                           min_tasks=40, step_s=30, who="ops")

    async def rolled_back():
        entry = await reg.get("m1")
        return entry.canary.status == "rolled_back" and entry

    entry = await wait_until(rolled_back, 60, "the guard to roll the canary back")
    took_s = time.time() - started
    assert took_s < 60, took_s
    assert entry.versions["v2"].state is VersionState.ROLLED_BACK
    assert entry.versions["v2"].weight == 0 and entry.versions["v1"].weight == 100
    assert "error_ratio" in entry.canary.reason
    await asyncio.sleep(1.2)  # the producer's registry cache refreshes within a second
    seen_rollback = len(ids)
    await asyncio.sleep(1.0)
    stop.set()
    await loader
    results = await producer.wait_many(ids, timeout_s=60)
    assert len({r.task_id for r in results}) == len(ids) > 200
    assert all(r.ok for r in results), [r for r in results if not r.ok][:3]
    retried = [r for r in results if r.attempts > 1]
    assert retried and all(r.model_version == "v1" for r in retried)  # on the stable one
    on_canary = [r for r in results if r.model_version == "v2"]
    assert on_canary and all(r.attempts == 1 for r in on_canary)
    late = results[seen_rollback:]  # routed after the producer saw the rollback
    assert late and {r.model_version for r in late} == {"v1"}
    stats = {k.decode(): int(v) for k, v in (await redis.hgetall(keys.stats_key("m1"))).items()}
    assert stats["written"] == len(ids) and stats.get("duplicates", 0) == 0
    assert stats.get("moved", 0) > 0  # the canary's queue went to v1
    assert int(await redis.hget(keys.queued_counts("m1"), "default")) == 0
    assert await redis.xlen(keys.task_stream("m1", version="v2")) == 0
    trail = [(e.kind, e.action) for e in await TenantRegistry(redis).audit(10, kind="canary")]
    assert trail == [("canary", "rollback"), ("canary", "start")]
    print(f"rolled back {took_s:.1f} s after the start; {stats.get('moved', 0)} queued tasks "
          f"moved; {len(retried)} retried on v1")


async def test_a_healthy_canary_is_promoted_step_by_step(redis, producer, start_worker,
                                                         model_dir, settings):
    reg = ModelRegistry(redis)
    await reg.register("m1", "v1", path=str(model_dir), check_engine=False)
    await reg.register("m1", "v2", path=str(model_dir), check_engine=False)
    guard = Guard(redis, settings, holder="test-guard", every_s=0.2)
    await start_worker(("m1",), engines={}, registry_models=["m1"],
                       engine_factory=fake_factory(v1={"delay_s": 0.01},
                                                   v2={"delay_s": 0.01}),
                       side_loops=[("guard", guard.run)])
    ids: list[str] = []
    stop = asyncio.Event()
    loader = asyncio.create_task(_load(producer, ids, stop, rate_per_s=200))
    await asyncio.sleep(0.5)
    await reg.start_canary("m1", "v2", weight_pct=20, steps=[20, 50], guard="error_ratio<1%",
                           min_tasks=20, step_s=1.0)

    async def promoted():
        entry = await reg.get("m1")
        return entry.canary.status == "promoted" and entry

    entry = await wait_until(promoted, 30, "the guard to promote the canary")
    stop.set()
    await loader
    assert entry.stable == "v2" and entry.versions["v2"].weight == 100
    assert entry.versions["v1"].weight == 0
    steps = [e.after for e in reversed(await TenantRegistry(redis).audit(10, kind="canary"))]
    assert steps[1:] == [{"step": 1, "share_pct": 50.0}, {"promoted": "v2"}]
    results = await producer.wait_many(ids, timeout_s=30)
    assert all(r.ok for r in results)
    figures = await read_figures(redis, "m1", ["v1", "v2"], time.time() - 120, time.time())
    assert figures["v2"].attempts > 20 and figures["v2"].errors == 0
