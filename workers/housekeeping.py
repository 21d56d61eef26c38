"""The bookkeeping beside a model runner's hot path, each a loop of its own:

  reclaim   take over tasks idle longer than claim_idle_ms on a silent consumer (a dead
            worker); suspects (delivered twice already) one at a time
  renew     keep our claim on tasks still in the engine, so that a slow worker is not taken
            for a dead one
  promote   move retries that are due from the delayed set back into their tenant's lane (of
            the version they ran on, or the stable version for a canary's: docs/versions.md)
  trim      drop acknowledged stream entries, never one pending or undelivered; forget
            expired cancellation marks
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from agentfleet.producer.connection import is_cluster
from agentfleet.schemas import keys
from agentfleet.schemas.errors import AgentFleetError, ErrorCode
from agentfleet.schemas.wire import DeadLetter, decode_task, encode
from agentfleet.workers.scripts import id_key, promote_lua, reclaim_lua, renew_lua
from agentfleet.workers.transient import TRANSIENT

if TYPE_CHECKING:
    from agentfleet.workers.runner import ModelRunner

log = logging.getLogger("agentfleet.worker")

RECLAIM_BATCH = 100  # most stalled tasks one reclaim call takes
RECLAIM_STREAMS = 64  # tenant streams one reclaim pass looks at (the rest in later passes)
PROMOTE_BATCH = 500  # most due retries one promote pass moves


class Housekeeping:
    """The side loops of one model runner."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        redis = runner.redis
        self._reclaim = redis.register_script(reclaim_lua())
        self._renew = redis.register_script(renew_lua())
        self._promote = redis.register_script(promote_lua())
        self._reclaim_turn = 0

    async def reclaim_loop(self) -> None:
        """Take over tasks idle longer than claim_idle_ms on any consumer (dead workers)."""
        r = self.runner
        every_s = min(r.settings.claim_idle_ms / 4000, 1.0)
        while not r.stopping:
            try:  # woken early when a suspect finished: the next one need not wait
                await asyncio.wait_for(r.suspect_done.wait(), every_s)
            except TimeoutError:
                pass
            r.suspect_done.clear()
            if r.slots.free <= 0 or r.stopping:
                continue
            try:
                streams = await self._next_streams()
            except TRANSIENT as exc:
                log.warning("model %s: listing streams to reclaim failed (%s)", r.model, exc)
                continue
            for lane, _, source in streams:
                # The bulk lane's reclaims count against its cap like its reads do.
                room = r.slots.bulk_room if lane == "b" else r.slots.free
                if room <= 0:
                    continue
                try:
                    await self._reclaim_from(source, min(room, RECLAIM_BATCH))
                except TRANSIENT as exc:
                    log.warning("model %s: reclaim failed (%s)", r.model, exc)
                except ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    # A tenant's stream listed before its group was made (its first task
                    # just arrived), or one flushed by hand: make it, as the reader does.
                    try:
                        await r.ensure_groups([source])
                    except TRANSIENT as exc2:
                        log.warning("model %s: making the group of %s failed (%s)", r.model,
                                    source, exc2)

    async def _next_streams(self) -> list[tuple[str, str, str]]:
        """The next RECLAIM_STREAMS tenant streams in turn (all of them in a few passes)."""
        streams = await self.runner.streams.all_streams()
        if len(streams) <= RECLAIM_STREAMS:
            return streams
        start = self._reclaim_turn % len(streams)
        self._reclaim_turn += RECLAIM_STREAMS
        return (streams + streams)[start:start + RECLAIM_STREAMS]

    async def _reclaim_from(self, source: str, count: int) -> None:
        r = self.runner
        suspect_running = any(rec.deliveries > 2 for rec in r.inflight.values())
        claimed, lost = await self._reclaim(
            keys=[source, keys.stats_key(r.model)],
            args=[keys.GROUP, r.worker_id, r.settings.claim_idle_ms, count,
                  0 if suspect_running else 1])
        if lost:
            await self._report_lost(lost)
        if claimed and not r.stopping:
            mine = {rec.entry_id for rec in r.inflight.values() if rec.source == source}
            fresh = [(eid, fields) for eid, fields, _ in claimed if eid not in mine]
            r.stats.reclaimed += len(fresh)
            log.info("model %s: reclaimed %d stalled tasks", r.model, len(fresh))
            if fresh:
                r.reader.dispatch(fresh, source, {eid: n + 1 for eid, _, n in claimed})

    async def _report_lost(self, lost: list[bytes]) -> None:
        """An entry that vanished while pending is dead-lettered as lost, never skipped."""
        r = self.runner
        r.stats.lost += len(lost)
        log.error("model %s: %d pending tasks vanished from the stream before they finished "
                  "(trimmed or deleted by hand): %s", r.model, len(lost),
                  [i.decode() for i in lost[:10]])
        now = time.time()
        async with r.redis.pipeline(transaction=False) as pipe:
            for entry_id in lost:
                pipe.xadd(keys.dead_stream(r.model), {"d": encode(DeadLetter(
                    task_id="entry-" + entry_id.decode(), model=r.model,
                    reason="its stream entry vanished while pending: the task is unknown",
                    error_code=ErrorCode.LOST, payload=b"", worker_id=r.worker_id,
                    at=now))}, maxlen=r.settings.dead_maxlen, approximate=True)
            await pipe.execute()

    async def renew_loop(self) -> None:
        """Keep our claim on tasks still running, so a slow worker is not mistaken for dead."""
        r = self.runner
        every_s = r.settings.claim_idle_ms / 3000
        while True:
            await asyncio.sleep(every_s)
            by_source: dict[str, list[bytes]] = {}
            for rec in [*r.inflight.values(), *r.outbox.items]:
                by_source.setdefault(rec.source, []).append(rec.entry_id)
            if not by_source and r.stopping:
                return
            if not by_source:
                continue
            try:
                if is_cluster(r.redis):  # a cluster pipeline runs no scripts: one at a time
                    for source, ids in by_source.items():
                        await self._renew(keys=[source], args=[keys.GROUP, r.worker_id, *ids])
                    continue
                # One round trip for every stream (a tenant's lane has its partitions too).
                async with r.redis.pipeline(transaction=False) as pipe:
                    for source, ids in by_source.items():
                        await self._renew(keys=[source], args=[keys.GROUP, r.worker_id, *ids],
                                          client=pipe)
                    await pipe.execute()
            except TRANSIENT as exc:
                log.warning("model %s: renewing claims failed (%s)", r.model, exc)

    async def promote_loop(self, every_s: float = 0.25) -> None:
        """Move retries that are due back into their tenant's stream (a timer, not a busy
        loop): read the due members, then move them with one script per lane and tenant."""
        r = self.runner
        delayed = keys.delayed_key(r.model)
        while not r.stopping:
            await asyncio.sleep(every_s)
            try:
                due = await r.redis.zrangebyscore(delayed, "-inf", time.time(), start=0,
                                                  num=PROMOTE_BATCH)
                groups: dict[tuple[str, str, str, int | None], list[bytes]] = {}
                registry = r.registry
                partitions = r.settings.affinity_partitions
                for member in due:
                    lane = "b" if member[:1] == b"b" else "i"
                    version = r.route_version
                    try:
                        task = decode_task(member[1:])
                        tenant = task.tenant
                        if registry.entries:
                            version = registry.retry_version(r.model, task.version)
                        part = keys.affinity_partition(task.affinity_key, partitions)
                    except AgentFleetError:  # not a task: its own stream's worker dead-letters it
                        tenant, part = keys.DEFAULT_TENANT, None
                    groups.setdefault((lane, tenant, version, part), []).append(member)
                for (lane, tenant, version, part), members in groups.items():
                    await self._promote(
                        keys=[delayed, keys.lane_stream(r.model, lane, tenant, version, part),
                              keys.tenant_lanes(r.model, lane, version)],
                        args=[tenant, keys.GROUP, *members])
            except TRANSIENT as exc:
                log.warning("model %s: moving due retries failed (%s)", r.model, exc)

    async def trim_loop(self) -> None:
        """Drop acknowledged entries, never one that is pending or not yet delivered."""
        r = self.runner
        while not r.stopping:
            await asyncio.sleep(r.settings.trim_interval_s)
            try:
                for _, _, stream in await r.streams.all_streams():
                    await trim_stream(r.redis, stream)
            except TRANSIENT as exc:
                log.warning("model %s: trimming failed (%s)", r.model, exc)
            r.forget_expired_cancellations()


async def trim_stream(redis: aioredis.Redis, stream: str) -> int:
    """XTRIM below the oldest entry still pending or undelivered in the stream's group."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xinfo_groups(stream)
        pipe.xpending(stream, keys.GROUP)
        groups, pending = await pipe.execute(raise_on_error=False)
    if isinstance(groups, Exception) or isinstance(pending, Exception):
        return 0
    group = next((g for g in groups if g["name"] in (keys.GROUP, keys.GROUP.encode())), None)
    if group is None:
        return 0
    last = group["last-delivered-id"]
    last = last.decode() if isinstance(last, bytes) else last
    ms, seq = last.split("-")
    floor = f"{ms}-{int(seq) + 1}"  # everything after the last delivery is still unread
    if pending["pending"]:
        oldest = pending["min"].decode() if isinstance(pending["min"], bytes) else pending["min"]
        floor = min(floor, oldest, key=id_key)
    # Approximate: whole macro nodes only, so a large trim does not stall the server.
    return await redis.xtrim(stream, minid=floor, approximate=True)
