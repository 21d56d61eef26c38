"""What a model runner holds between a read and a commit, and how much it may hold.

`InFlight` is one task's record from its read to its commit.  `Slots` is the read side's
accounting: tasks read and not yet committed, in all and from the bulk lane, against
`max_inflight` and the bulk cap.  It is plain arithmetic with no I/O, so its invariants are
property-tested (tests/test_slots.py): every read asks for at least one entry, bulk tasks
never pass their cap, and the counts return to zero when the queue drains.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from agentfleet.schemas.wire import Task
from agentfleet.workers.engine import EngineOutput


class InFlight:
    """A task between its read and its commit."""

    __slots__ = ("source", "bulk", "tenant", "entry_id", "task", "read_at", "window_id",
                 "window_size", "output", "payload", "deliveries", "cancelled")

    def __init__(self, source: str, bulk: bool, entry_id: bytes, read_at: float,
                 window_id: str, window_size: int, tenant: str = "default"):
        self.source = source  # the tenant's lane stream it was read from
        self.bulk = bulk  # read from the bulk lane
        self.tenant = tenant  # whose stream it is (its task says the same, when it decodes)
        self.entry_id = entry_id
        self.task: Task | None = None
        self.read_at = read_at
        self.window_id = window_id  # the read window it came in: "<worker>/<model>/<seq>"
        self.window_size = window_size
        self.output: EngineOutput | None = None
        self.payload = b""  # kept only where a dead letter may need it
        self.deliveries = 1
        self.cancelled = False


class RunnerStats(msgspec.Struct):
    """Counters of one model runner since it started (read at scrape time)."""

    read: int = 0
    committed: int = 0
    failed: int = 0
    duplicates: int = 0
    windows: int = 0
    commits: int = 0
    fenced: int = 0
    retried: int = 0
    dead_lettered: int = 0
    reclaimed: int = 0
    lost: int = 0
    cancelled: int = 0
    moved: int = 0  # follow-ups this worker moved from the model's outbox (workers/mover.py)
    unreplicated: int = 0  # commits and moves WAIT did not see on wait_replicas replicas
    # affinity partitions (docs/affinity.md): tasks read from partitions this worker owns,
    # taken from others' (stealing), and taken over from a stalled or dead worker (reclaim)
    affinity_hits: int = 0
    affinity_steals: int = 0
    affinity_misses: int = 0
    affinity_rebalances: int = 0  # times the partitions it owns changed


class Slots:
    """Tasks read and not yet committed, against the limits of the read side.

    `max_inflight` bounds them all; `bulk_cap` bounds those of the bulk lane, so that bulk-job
    tasks never hold more of the engine's slots than their share and an interactive task
    starts within an engine step or two.
    """

    __slots__ = ("max_inflight", "bulk_cap", "held", "bulk", "by_tenant")

    def __init__(self, max_inflight: int, bulk_cap: int, *, per_tenant: bool = False):
        if max_inflight < 1 or bulk_cap < 1:
            raise ValueError(f"max_inflight {max_inflight} and bulk_cap {bulk_cap} must be >= 1")
        self.max_inflight = max_inflight
        self.bulk_cap = min(bulk_cap, max_inflight)
        self.held = 0  # read and not yet committed, both lanes
        self.bulk = 0  # the part of `held` read from the bulk lane
        # `held` per tenant, kept only where the reader needs it (a read-ahead reserve):
        # admission's counts miss the tasks that ended and wait for their commit.
        self.by_tenant: dict[str, int] | None = {} if per_tenant else None

    @property
    def free(self) -> int:
        return max(0, self.max_inflight - self.held)

    @property
    def bulk_room(self) -> int:
        """How many more bulk tasks may be read now."""
        return max(0, min(self.bulk_cap - self.bulk, self.max_inflight - self.held))

    def take(self, count: int, *, bulk: bool, tenant: str = "") -> None:
        self.held += count
        if bulk:
            self.bulk += count
        if self.by_tenant is not None:
            self.by_tenant[tenant] = self.by_tenant.get(tenant, 0) + count

    def release(self, count: int, bulk_count: int, done: Iterable[InFlight] = ()) -> None:
        """`count` tasks committed, `bulk_count` of them from the bulk lane (`done`: them)."""
        self.held -= count
        self.bulk -= bulk_count
        if self.by_tenant is not None:
            by_tenant = self.by_tenant
            for rec in done:
                left = by_tenant[rec.tenant] - 1
                if left:
                    by_tenant[rec.tenant] = left
                else:
                    del by_tenant[rec.tenant]
        if self.held < 0 or self.bulk < 0 or self.bulk > self.held:
            raise AssertionError(f"slot accounting broke: held {self.held}, bulk {self.bulk}")

    def plan(self, want: int, backlog: bool) -> ReadPlan:
        """How many entries to ask each lane for in the next read.

        `want` is what the caller would take (free slots, at most read_count).  With a backlog,
        interactive entries are read first and the bulk lane fills the room they leave; idle,
        one blocking read covers both lanes, with one COUNT that XREADGROUP applies to each
        stream: never more than the bulk room, never below one.
        """
        want = max(1, min(want, self.free or 1))
        room = min(self.bulk_room, want)
        if backlog:
            return ReadPlan(interactive=want, bulk=room, blocking=False)
        each = max(1, want // 2)
        if room:
            each = min(each, room)
        return ReadPlan(interactive=each, bulk=each if room else 0, blocking=True)


class ReadPlan(msgspec.Struct, frozen=True):
    """Counts of one read: `bulk` 0 leaves the bulk lane out."""

    interactive: int
    bulk: int
    blocking: bool
