"""The read side of a model runner: read a window, check it, hand it to the engine.

The read loop keeps up to `max_inflight` tasks between read and commit (it refills as
commits land, never waiting for a whole window): XREADGROUP up to `read_count` entries of
the interactive lane, the bulk lane filling the room they leave (within the bulk cap), one
blocking read of both when idle.  Each window is decoded and checked; tasks that cannot run
(undecodable, invalid, delivered too often, past their deadline, cancelled) go straight to
the commit side with their error code, the rest go to the engine in one `submit`.  A join
step (docs/agent-steps.md) first has its input filled in from its join's state: one
HGETALL per window's joins, off the read loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from redis.exceptions import ResponseError

from agentfleet.producer.connection import sibling
from agentfleet.schemas import keys
from agentfleet.schemas.errors import AgentFleetError, DecodeError, ErrorCode, ValidationError
from agentfleet.schemas.validate import TaskChecker
from agentfleet.schemas.wire import Task, decode_task
from agentfleet.workers.inflight import InFlight
from agentfleet.workers.outcomes import render_join
from agentfleet.workers.streams import MAX_STREAMS_PER_READ
from agentfleet.workers.transient import TRANSIENT

if TYPE_CHECKING:
    from agentfleet.workers.runner import ModelRunner

log = logging.getLogger("agentfleet.worker")

CAPPED_BLOCK_MS = 5  # longest blocking read while the bulk lane waits for room
STEAL_CHECK_S = 0.05  # an under-used worker looks at others' affinity partitions this often


class Reader:
    """Reads one model's lanes for its runner and starts what it reads."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        r = runner
        # A client of our own (on the same pool, but for a cluster's): stream replies stay
        # raw lists, not dicts.
        self._redis = sibling(r.redis)
        self._redis.set_response_callback("XREADGROUP", _raw)
        self._check_task = TaskChecker(r.settings, internal=True)
        self._joins: set[asyncio.Task] = set()  # join steps having their input filled in
        self._window_seq = 0
        self._bulk_check_at = 0.0  # monotonic time the bulk lane is worth reading again
        self._backlog = True  # the last read found a backlog: poll lanes before blocking
        self._last_streams: list[str] = []
        self._steal_check_at = 0.0  # monotonic time others' partitions are looked at again

    def use_settings(self, settings) -> None:
        """Check tasks against other settings from now on (the model registry changed)."""
        self._check_task = TaskChecker(settings)

    async def read_loop(self) -> None:
        r = self.runner
        s = r.settings
        backoff_s = 0.05
        while not r.stopping:
            free = r.slots.free
            if free <= 0:
                r.slot_free.clear()
                await r.slot_free.wait()
                continue
            r.reading = True  # a drain waits for what this read returns (committer.py)
            try:
                windows = await self.read_window(min(free, s.read_count))
            except TRANSIENT as exc:
                r.reading = False
                log.warning("model %s: read failed (%s); retrying in %.2fs", r.model, exc,
                            backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
                continue
            except ResponseError as exc:
                r.reading = False
                if "NOGROUP" not in str(exc) and "UNBLOCKED" not in str(exc):
                    raise
                # A stream without the group (deleted, or made by hand; deleted while a read
                # blocked on it: UNBLOCKED): make it again.
                await r.ensure_groups(self._last_streams)
                continue
            backoff_s = 0.05
            for source, entries in windows:
                self.dispatch(entries, source)
            r.reading = False
            if r.stopping:  # what the last read returned is in flight: the drain waits for it
                r.outbox.ready.set()

    async def read_window(self, want: int) -> list[tuple[str, list]]:
        """Interactive tasks first; the bulk lane fills what they leave; block when idle."""
        r = self.runner
        await r.streams.refresh()
        windows = await self._read_lanes(want)
        if r.streams.ownership is not None:
            # Room left after our own partitions: take what saturated owners leave waiting.
            got = sum(len(entries) for _, entries in windows)
            now = time.monotonic()
            if got < want // 2 and now >= self._steal_check_at:
                self._steal_check_at = now + STEAL_CHECK_S
                windows += await self._steal(want - got)
        # A backlog: poll the lanes in priority order next time.  Otherwise go straight to
        # one blocking read of both, rather than two empty polls (round trips) before it.
        self._backlog = sum(len(entries) for _, entries in windows) >= max(1, want // 2)
        return windows

    async def _read_lanes(self, want: int) -> list[tuple[str, list]]:
        r = self.runner
        s = r.settings
        plan = r.slots.plan(want, self._backlog or bool(s.window_ms))
        if not plan.blocking:
            windows = await self._read({"i": plan.interactive})
            got = sum(len(entries) for _, entries in windows)
            if windows and s.window_ms and got < plan.interactive:
                # Gather a fuller window: the latency/throughput knob.
                await asyncio.sleep(s.window_ms / 1000)
                windows += await self._read({"i": plan.interactive - got})
                got = sum(len(entries) for _, entries in windows)
            room = min(plan.interactive - got, plan.bulk)
            now = time.monotonic()
            if room > 0 and (now >= self._bulk_check_at or not windows):
                bulk = await self._read({"b": room})
                if bulk:
                    windows += bulk
                else:  # an idle bulk lane is looked at again in 50 ms, or when all is idle
                    self._bulk_check_at = now + 0.05
            if windows:
                return windows
            plan = r.slots.plan(want, False)
        counts = {"i": plan.interactive, "b": plan.bulk} if plan.bulk else {"i": plan.interactive}
        block_ms = s.block_ms
        if not plan.bulk and r.slots.bulk:
            # The bulk lane is at its cap: its room comes back with the next commit, which a
            # read blocked on the interactive lane would not see for block_ms (bulk alone
            # then ran at a third of the engine's speed: bench/headroom.py).
            block_ms = min(block_ms, CAPPED_BLOCK_MS)
        return await self._read(counts, block_ms=block_ms)

    async def _read(self, counts: dict[str, int], block_ms: int | None = None
                    ) -> list[tuple[str, list]]:
        """One XREADGROUP over the picked tenants' streams of the given lanes, `counts[lane]`
        entries at most per lane (COUNT applies to each stream: split between them)."""
        r = self.runner
        streams = r.streams
        # Where the read-ahead beyond max_inflight is kept for the other tenants (runner.py),
        # a tenant holding max_inflight (read and not yet committed) is not read, and no
        # read takes a tenant past it.
        waiting = r.admission.waiting_by_tenant()
        held = r.slots.by_tenant or {}
        total = sum(counts.values())
        read_ahead = r.settings.max_inflight
        full = {t for t, n in held.items() if n >= read_ahead}
        picked = {lane: streams.lanes[lane].pick(max(1, min(count, MAX_STREAMS_PER_READ)),
                                                 waiting, read_ahead, full)
                  for lane, count in counts.items()}
        picked = {lane: tenants for lane, tenants in picked.items() if tenants}
        if not picked:  # every tenant with work holds its most: wait for a commit (or a mark)
            r.slot_free.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(r.slot_free.wait(), (block_ms or r.settings.block_ms)
                                       / 1000)
            return []
        per_stream = max(1, total // sum(len(t) for t in picked.values()))
        if held:  # COUNT applies to every stream read: within the room of the fullest
            per_stream = min(per_stream, *(read_ahead - held.get(t, 0)
                                           for ts in picked.values() for t in ts))
        if "b" in picked and per_stream * len(picked["b"]) > counts["b"]:
            # within the bulk room: fewer bulk streams this time (they take turns)
            picked["b"] = picked["b"][:max(1, counts["b"] // per_stream)]
            if per_stream > counts["b"]:
                del picked["b"]
        names = {name: ">" for lane, ts in picked.items() for t in ts
                 for name in streams.own_streams(lane, t)}
        if streams.ownership is not None:  # COUNT applies to each of a tenant's partitions
            per_stream = max(1, per_stream // (1 + len(streams.ownership.owned)))
        self._last_streams = list(names)
        try:
            got = await self._redis.xreadgroup(keys.GROUP, r.worker_id, names,
                                               count=per_stream, block=block_ms)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # A stream not made yet (a partition nobody enqueued to) or made without the
            # group: make them, and keep what this window's earlier reads took.
            await r.ensure_groups(list(names))
            return []
        windows = [(stream.decode(), entries) for stream, entries in got or ()]
        seen: dict[tuple[str, str], int] = {}
        for stream, entries in windows:
            lane, tenant, _ = streams.source[stream]
            seen[lane, tenant] = seen.get((lane, tenant), 0) + len(entries)
        for lane, ts in picked.items():
            for tenant in ts:
                streams.lanes[lane].saw(tenant, seen.get((lane, tenant), 0))
        return windows

    async def _steal(self, want: int) -> list[tuple[str, list]]:
        """Take tasks from other workers' partitions whose oldest unread task has waited
        `affinity_steal_after_ms` (their owner is saturated, or gone): three round trips,
        only when this worker has room that its own partitions left (docs/affinity.md)."""
        r = self.runner
        streams = r.streams
        own = streams.ownership
        if own is None or not own.others:
            return []
        plan = r.slots.plan(want, True)
        counts = {"i": plan.interactive, "b": plan.bulk}
        candidates = [(lane, streams.stream(lane, t, p))
                      for lane, count in counts.items() if count > 0
                      for t in sorted(streams.lanes[lane].marked
                                      | streams.lanes[lane].recent.keys())
                      for p in own.others]
        if not candidates:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for _, name in candidates:
                pipe.xinfo_groups(name)
            infos = await pipe.execute(raise_on_error=False)
        behind: list[tuple[str, str, str]] = []  # (lane, stream, last delivered id)
        for (lane, name), groups in zip(candidates, infos):
            if isinstance(groups, Exception):
                continue  # never written to: no stream yet
            for g in groups:
                if _text(g.get("name")) == keys.GROUP and g.get("lag") != 0:
                    behind.append((lane, name, _text(g.get("last-delivered-id")) or "0-0"))
        if not behind:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for _, name, last in behind:
                pipe.xrange(name, min="(" + last, count=1)
            heads = await pipe.execute(raise_on_error=False)
        due_ms = time.time() * 1000 - r.settings.affinity_steal_after_ms
        ripe: dict[str, list[str]] = {}
        for (lane, name, _), head in zip(behind, heads):
            if isinstance(head, Exception) or not head:
                continue
            entry_id = head[0][0]
            entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            if int(entry_id.split("-")[0]) <= due_ms:
                ripe.setdefault(lane, []).append(name)
        windows: list[tuple[str, list]] = []
        for lane, names in ripe.items():
            count = max(1, counts[lane] // len(names))
            try:
                got = await self._redis.xreadgroup(keys.GROUP, r.worker_id,
                                                   {name: ">" for name in names}, count=count)
            except ResponseError as exc:  # deleted meanwhile: keep what was read before
                if "NOGROUP" not in str(exc):
                    raise
                continue
            windows += [(stream.decode(), entries) for stream, entries in got or ()]
        return windows

    def dispatch(self, entries: list, source: str,
                 deliveries: dict[bytes, int] | None = None) -> None:
        """Decode and check a window of stream entries and start the valid ones."""
        r = self.runner
        now = time.time()
        self._window_seq += 1
        window_id = f"{r.worker_id}/{r.model}/{self._window_seq}"
        size = len(entries)
        r.stats.read += size
        r.stats.windows += 1
        lane, tenant, part = r.streams.source[source]  # named by this runner before it read
        bulk = lane == "b"
        if part is not None:  # an affinity partition's tasks: ours, stolen, or taken over
            own = r.streams.ownership
            if deliveries is not None:
                r.stats.affinity_misses += size
            elif own is not None and part in own.owned:
                r.stats.affinity_hits += size
            else:
                r.stats.affinity_steals += size
        r.slots.take(size, bulk=bulk, tenant=tenant)
        r.metrics.observe_read(size)
        start: list[tuple[str, Task, bool]] = []
        joins: list[tuple[str, InFlight]] = []
        # Entry ids repeat across streams: a request id names its stream's lane, tenant and
        # partition.
        prefix = f"{lane}{tenant}/" if part is None else f"{lane}{tenant}#{part}/"
        max_deliveries = r.settings.max_deliveries
        cancelled = r.cancelled
        version = r.route_version
        for entry_id, fields in entries:
            rec = InFlight(source, bulk, entry_id, now, window_id, size, tenant)
            if deliveries is not None:
                rec.deliveries = deliveries[entry_id]
            try:
                rec.task = task = _decode(fields)
                self._check(task)
            except AgentFleetError as exc:
                rec.payload = fields[1] if len(fields) > 1 else b""
                r.finish_now(rec, exc.code, str(exc), now)
                continue
            if rec.deliveries > max_deliveries:
                rec.payload = fields[1]
                r.finish_now(rec, ErrorCode.DELIVERY_LIMIT,
                             f"delivered {rec.deliveries - 1} times without finishing: "
                             f"it may be killing workers", now)
                continue
            if task.deadline is not None and task.deadline < now:
                r.finish_now(rec, ErrorCode.DEADLINE_EXCEEDED,
                             f"deadline {task.deadline:.3f} passed before the task ran", now)
                continue
            if cancelled and (task.id in cancelled or (
                    task.batch_id and "batch:" + task.batch_id in cancelled)):
                r.finish_now(rec, ErrorCode.CANCELLED, "cancelled before it ran", now)
                continue
            if task.tenant != tenant:
                r.finish_now(rec, ErrorCode.INVALID_TASK, f"tenant: a task of {task.tenant!r} "
                             f"in the stream of {tenant!r}", now)
                continue
            if task.version != version:  # moved here from a version rolled back: runs here
                task.version = version
            request_id = prefix + entry_id.decode()
            r.inflight[request_id] = rec
            if task.join_of is not None:
                joins.append((request_id, rec))
                continue
            start.append((request_id, task, bulk))
        if start:
            r.start(start, now)
        if joins:
            filling = asyncio.get_running_loop().create_task(self._fill_joins(joins, bulk))
            self._joins.add(filling)
            filling.add_done_callback(self._joins.discard)

    async def _fill_joins(self, joins: list[tuple[str, InFlight]], bulk: bool) -> None:
        """Fill in the join steps' inputs, then start them; a step whose input is gone ends
        as join_input_lost.  Held in `inflight` meanwhile, so that a drain waits for them."""
        r = self.runner
        try:
            states = await self._join_states([rec.task for _, rec in joins])
            now = time.time()
            start: list[tuple[str, Task, bool]] = []
            for (request_id, rec), state in zip(joins, states):
                try:
                    enqueued_s = int(rec.entry_id.split(b"-")[0]) / 1000
                    rec.task = render_join(rec.task, state, enqueued_s)
                    self._check(rec.task)
                except AgentFleetError as exc:
                    del r.inflight[request_id]
                    r.finish_now(rec, exc.code, str(exc), now)
                else:
                    start.append((request_id, rec.task, bulk))
            if start:
                r.start(start, now)
        except Exception as exc:  # a bug: fail these steps, never strand them in inflight
            log.exception("model %s: filling in %d join steps failed", r.model, len(joins))
            for request_id, rec in joins:
                if r.inflight.pop(request_id, None) is not None:
                    r.finish_now(rec, ErrorCode.INTERNAL, f"join input: {exc!r}", time.time())

    async def _join_states(self, tasks: list[Task]) -> list[dict]:
        backoff_s = 0.05
        while True:
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for task in tasks:
                        pipe.hgetall(keys.join_state(task.join_of.model, task.join_of.parent))
                    return await pipe.execute()
            except TRANSIENT as exc:
                log.warning("model %s: reading join states failed (%s); retrying in %.2fs",
                            self.runner.model, exc, backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)

    def _check(self, task: Task) -> None:
        model = self.runner.model
        if task.model != model:
            raise ValidationError("model", f"task for model {task.model!r} sits in the stream "
                                  f"of {model!r}", value=task.model)
        self._check_task(task)  # decoded here, never mutated: a repeated sampling is not rechecked


def _raw(response, **options):
    return response


def _text(value: object) -> str | None:
    return value.decode() if isinstance(value, bytes) else value  # type: ignore[return-value]


def _decode(fields: list[bytes]) -> Task:
    """A raw entry's fields are [name, value, ...]; the task is the value of 'd'."""
    if len(fields) != 2 or fields[0] != b"d":
        raise DecodeError("stream entry is not a single 'd' field")
    return decode_task(fields[1])
