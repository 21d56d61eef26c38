"""The read side's accounting (workers/inflight.py), property-tested over random sequences of
reads from both lanes, commits, reclaims, retries, cancels and expiries against a model of the
two streams; and the mixed load that once killed a worker, on real servers."""

from __future__ import annotations

import asyncio
import time

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from agentfleet.schemas.wire import Sampling, Task
from agentfleet.workers.fake_engine import FakeEngine
from agentfleet.workers.inflight import Slots

# One step of the model: (kind, lane or count, amount)
STEPS = st.lists(st.tuples(
    st.sampled_from(["arrive", "read", "commit", "reclaim", "retry", "finish_now"]),
    st.booleans(), st.integers(min_value=0, max_value=600)), max_size=120)


class _Streams:
    """What XREADGROUP would hand out: COUNT per stream, never more than is there."""

    def __init__(self) -> None:
        self.waiting = {False: 0, True: 0}  # bulk? -> undelivered entries

    def read(self, lane_bulk: bool, count: int) -> int:
        assert count >= 1, "XREADGROUP count must be a positive integer"
        got = min(count, self.waiting[lane_bulk])
        self.waiting[lane_bulk] -= got
        return got


@settings(max_examples=400, deadline=None)
@given(max_inflight=st.integers(1, 2048), share=st.floats(0.01, 1.0),
       engine_slots=st.integers(1, 1024), read_count=st.integers(1, 1024), steps=STEPS)
def test_reads_ask_for_one_or_more_and_bulk_stays_under_its_cap(max_inflight, share,
                                                                 engine_slots, read_count,
                                                                 steps):
    cap = max(1, int(min(engine_slots, max_inflight) * share))
    slots = Slots(max_inflight, cap)
    streams = _Streams()
    held = {False: 0, True: 0}  # our own count of what is read and not committed
    backlog = True
    for kind, lane_bulk, amount in steps:
        if kind == "arrive":
            streams.waiting[lane_bulk] += amount
        elif kind == "read" and slots.free:
            plan = slots.plan(min(slots.free, read_count), backlog)
            assert plan.interactive >= 1 and plan.bulk >= 0
            got_i = streams.read(False, plan.interactive)
            got_b = 0
            if plan.blocking:
                if plan.bulk:
                    got_b = streams.read(True, plan.bulk)
            else:
                room = min(plan.interactive - got_i, plan.bulk)
                if room > 0:
                    got_b = streams.read(True, room)
            slots.take(got_i, bulk=False)
            slots.take(got_b, bulk=True)
            held[False] += got_i
            held[True] += got_b
            backlog = got_i + got_b >= max(1, min(slots.free, read_count) // 2)
        elif kind == "reclaim":  # stalled entries of a dead worker, bounded like a read
            room = slots.bulk_room if lane_bulk else slots.free
            got = min(room, 100, amount)
            slots.take(got, bulk=lane_bulk)
            held[lane_bulk] += got
        elif kind in ("commit", "retry", "finish_now"):  # a retry is committed, then due again
            n_i = min(held[False], amount)
            n_b = min(held[True], amount // 2)
            slots.release(n_i + n_b, n_b)
            held[False] -= n_i
            held[True] -= n_b
            if kind == "retry":
                streams.waiting[False] += n_i
                streams.waiting[True] += n_b
        assert slots.bulk <= cap, (slots.bulk, cap)
        assert slots.held <= max_inflight
        assert (slots.held, slots.bulk) == (held[False] + held[True], held[True])
    slots.release(slots.held, slots.bulk)  # the queue drained: everything committed
    assert (slots.held, slots.bulk, slots.free) == (0, 0, max_inflight)


async def test_long_bulk_prompts_under_interactive_arrivals_never_break_the_read(
        producer, start_worker, settings):
    """The shape that killed a worker on the GPU (bulk backlog of long prompts, interactive
    tasks arriving): the bulk cap below the blocking read's count per stream."""
    s = msgspec.structs.replace(settings, max_inflight=40, read_count=40, bulk_max_share=0.1)
    engine = FakeEngine(delay_s=0.01, slots=30)
    worker = await start_worker(("m1",), engines={"m1": engine}, worker_settings=s)
    runner = worker.runners[0]
    long_prompt = " ".join(["word"] * 600)
    bulk = [Task(model="m1", prompt=long_prompt, batch_id="job-long",
                 sampling=Sampling(max_tokens=8)) for _ in range(300)]
    bulk_ids = await producer.submit_many(bulk)
    peak = peak_engine = 0

    async def watch() -> None:
        nonlocal peak, peak_engine
        while True:
            peak = max(peak, runner.slots.bulk)
            peak_engine = max(peak_engine, runner.admission.running_bulk)
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    try:
        interactive = []
        for _ in range(30):
            interactive.append(await producer.submit(model="m1", prompt="quick"))
            await asyncio.sleep(0.01)
        results = await producer.wait_many(interactive + bulk_ids, timeout_s=60)
    finally:
        watcher.cancel()
    assert all(r.ok for r in results)
    assert peak <= runner.slots.bulk_cap == 4  # read ahead: 10% of max_inflight 40
    assert 0 < peak_engine <= runner.admission.bulk_cap == 3  # 10% of the engine's 30 slots
    assert engine.peak_running <= 30
    assert worker.failure is None
    # The producer can see results before the worker's commit returns and frees its slots.
    deadline = time.monotonic() + 5
    while runner.slots.held and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert (runner.slots.held, runner.slots.bulk) == (0, 0)


def test_per_tenant_counts_hold_tasks_until_their_commit():
    """The reader keeps the read-ahead reserve for other tenants by these counts: a task
    that ended in the engine still holds its slot until its commit (admission's counts had
    already let it go, and a flood's uncommitted tasks took the reserve)."""
    from agentfleet.workers.inflight import InFlight

    slots = Slots(10, 5, per_tenant=True)
    slots.take(3, bulk=False, tenant="a")
    slots.take(2, bulk=True, tenant="b")
    assert slots.by_tenant == {"a": 3, "b": 2} and slots.free == 5

    def rec(tenant: str, bulk: bool) -> InFlight:
        return InFlight("s", bulk, b"1-0", 0.0, "w", 1, tenant)

    slots.release(2, 0, [rec("a", False), rec("a", False)])
    assert slots.by_tenant == {"a": 1, "b": 2}
    slots.release(3, 2, [rec("a", False), rec("b", True), rec("b", True)])
    assert slots.by_tenant == {} and slots.held == 0 and slots.bulk == 0
    assert Slots(10, 5).by_tenant is None  # kept only where a reserve needs it
