"""Which streams a model runner reads: every tenant has its own stream in each lane.

Producers mark a tenant in the lane's tenant set (`keys.tenant_lanes`, score 1) with every
enqueue; a runner refreshes the marked tenants every `REFRESH_S` and reads their streams,
plus those it found work in recently (a steady tenant is never dropped between two tasks).
When a read finds a marked stream empty, `deactivate.lua` sets its mark to 0, atomically
against enqueue.lua, so no task is left unread.  The default tenant's streams keep the
short names `af:{m}:tasks` and `af:{m}:bulk` and are always read.  A runner of a registered
model version reads that version's streams and tenant sets (`af:{m}:v:<version>:...`).
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from agentfleet.schemas import keys
from agentfleet.schemas.keys import DEFAULT_TENANT
from agentfleet.workers.scripts import deactivate_lua

REFRESH_S = 0.1  # how often the marked tenants are read again (a new tenant waits this long)
RECENT_S = 10.0  # a tenant whose stream held work this recently is read without its mark
DEACTIVATE_EVERY_S = 1.0  # empty marked streams are checked for draining at most this often
MAX_STREAMS_PER_READ = 32  # streams one XREADGROUP names, at most, per lane
MIN_PART = 16  # a tenant may always hold this many read tasks waiting for the engine


class LaneStreams:
    """One lane's tenants and their streams, for one runner."""

    def __init__(self, model: str, lane: str, version: str = ""):
        self.model = model
        self.lane = lane
        self.version = version
        self.key = keys.tenant_lanes(model, lane, version)
        self.marked: set[str] = {DEFAULT_TENANT}  # tenants at 1 in the tenant set
        self.recent: dict[str, float] = {}  # tenant -> monotonic time its stream had work
        self.empty: set[str] = set()  # marked tenants a read found empty: drain candidates
        self._names: dict[str, str] = {}
        self._turn = 0

    def stream(self, tenant: str) -> str:
        name = self._names.get(tenant)
        if name is None:
            name = self._names[tenant] = keys.lane_stream(self.model, self.lane, tenant,
                                                          self.version)
        return name

    def pick(self, limit: int, waiting: dict[str, int], read_ahead: int,
             full: set[str] = frozenset()) -> list[str]:
        """The tenants to read now, at most `limit`: those with the fewest tasks already
        waiting in admission first, the rest in turn.  A tenant already holding its part
        of the read-ahead (`read_ahead` over the tenants read) waits: else a tenant that
        admission serves slowly (a low weight) would fill the read-ahead, and the others
        could only be read a few at a time.  Tenants in `full` (holding all of
        `read_ahead`) are not read at all."""
        now = time.monotonic()
        for tenant, seen in list(self.recent.items()):
            if now - seen > RECENT_S:
                del self.recent[tenant]
        tenants = [t for t in self.marked | self.recent.keys() | {DEFAULT_TENANT}
                   if t not in full]
        if not tenants:
            return []
        if len(tenants) > 1:
            part = max(MIN_PART, read_ahead // len(tenants))
            below = [t for t in tenants if waiting.get(t, 0) < part]
            tenants = below or tenants
        # In turn even when all fit: the reader may keep only the first few of them (a bulk
        # read within its room), and a set's order never changes, so without a turn the
        # same tenant came first every time and another tenant's bulk lane was never read.
        self._turn += 1
        turn = self._turn
        tenants.sort(key=lambda t: (waiting.get(t, 0), hash((t, turn))))
        return tenants[:limit]

    def saw(self, tenant: str, entries: int) -> None:
        if entries:
            self.recent[tenant] = time.monotonic()
            self.empty.discard(tenant)
        elif tenant in self.marked:
            self.empty.add(tenant)


class TenantStreams:
    """Both lanes of one model: refreshing the marks, draining empty ones, listing streams."""

    def __init__(self, redis: aioredis.Redis, model: str, version: str = ""):
        self.redis = redis
        self.lanes = {"i": LaneStreams(model, "i", version), "b": LaneStreams(model, "b", version)}
        self._deactivate = redis.register_script(deactivate_lua())
        self._refreshed_at = 0.0
        self._deactivated_at = 0.0
        # stream name -> (lane, tenant), for what a read returns
        self.source: dict[str, tuple[str, str]] = {}

    def stream(self, lane: str, tenant: str) -> str:
        name = self.lanes[lane].stream(tenant)
        if name not in self.source:
            self.source[name] = (lane, tenant)
        return name

    async def refresh(self, force: bool = False) -> None:
        """Read the marked tenants of both lanes (one round trip), at most every REFRESH_S."""
        now = time.monotonic()
        if not force and now - self._refreshed_at < REFRESH_S:
            return
        self._refreshed_at = now
        async with self.redis.pipeline(transaction=False) as pipe:
            for lane in self.lanes.values():
                pipe.zrangebyscore(lane.key, 1, 1)
            got = await pipe.execute()
        for lane, marked in zip(self.lanes.values(), got):
            lane.marked = {t.decode() for t in marked} | {DEFAULT_TENANT}
        if now - self._deactivated_at >= DEACTIVATE_EVERY_S:
            self._deactivated_at = now
            await self._drain_marks()

    async def _drain_marks(self) -> None:
        for lane in self.lanes.values():
            candidates = sorted(lane.empty & lane.marked)
            lane.empty.clear()
            if not candidates:
                continue
            await self._deactivate(keys=[lane.key, *[lane.stream(t) for t in candidates]],
                                   args=[keys.GROUP, *candidates])

    async def all_streams(self) -> list[tuple[str, str, str]]:
        """(lane, tenant, stream) of every tenant stream of the model, drained ones too (for
        reclaim and trim)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for lane in self.lanes.values():
                pipe.zrange(lane.key, 0, -1)
            got = await pipe.execute()
        out = []
        for (name, lane), tenants in zip(self.lanes.items(), got):
            names = {t.decode() for t in tenants} | {DEFAULT_TENANT}
            out += [(name, t, self.stream(name, t)) for t in sorted(names)]
        return out
