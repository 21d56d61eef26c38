"""The worker: read a window, hand it to the engine, write results, acknowledge.

One `ModelLane` per served model runs these loops:
  read loop     XREADGROUP up to `read_count` tasks (never more than the free in-flight
                slots), decode and check them, hand the valid ones to the engine at once.  It
                does not wait for a window to finish: slots free up as commits land.
  commit loop   takes every completion gathered since its last write and commits them with
                one script call (results, follow-ups, retries, dead letters, traces, XACK).
and the bookkeeping beside the hot path: reclaiming tasks stalled on dead workers, renewing
our claim on tasks still in the engine, moving due retries back into the stream, trimming
acknowledged entries, and listening for cancellations.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import random
import time
from collections.abc import Iterator

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from agentfleet.schemas import keys
from agentfleet.schemas.errors import (
    AgentFleetError,
    DecodeError,
    ErrorCode,
    EvictingServerError,
    ValidationError,
)
from agentfleet.schemas.settings import ModelSpec, Settings
from agentfleet.schemas.validate import TaskChecker
from agentfleet.schemas.wire import (
    DeadLetter,
    Enqueued,
    Finished,
    FollowUp,
    Message,
    Result,
    Retried,
    Status,
    Task,
    Timings,
    decode_task,
    encode,
)
from agentfleet.workers.commit import (
    COMMIT_LUA,
    PROMOTE_LUA,
    RECLAIM_LUA,
    RENEW_LUA,
    CommitRecord,
    commit_args,
    id_key,
)
from agentfleet.workers.engine import Engine, EngineOutput
from agentfleet.workers.metrics import NULL_LANE_METRICS, WorkerMetrics
from agentfleet.workers.streaming import attach as attach_partials  # streaming (gateway)

log = logging.getLogger("agentfleet.worker")

_STATUS_BY_CODE = {
    ErrorCode.DEADLINE_EXCEEDED: Status.EXPIRED,
    ErrorCode.CANCELLED: Status.CANCELLED,
    ErrorCode.ATTEMPTS_EXHAUSTED: Status.DEAD_LETTERED,
    ErrorCode.DELIVERY_LIMIT: Status.DEAD_LETTERED,
    ErrorCode.DECODE_ERROR: Status.DEAD_LETTERED,
    ErrorCode.UNSUPPORTED_VERSION: Status.DEAD_LETTERED,
}
_RETRYABLE = frozenset((ErrorCode.ENGINE_ERROR, ErrorCode.ENGINE_DEAD))
_TRANSIENT = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


class _InFlight:
    """A task between its read and its commit."""

    __slots__ = ("source", "entry_id", "task", "read_at", "batch_id", "batch_size", "output",
                 "payload", "deliveries", "cancelled")

    def __init__(self, source: str, entry_id: bytes, read_at: float, batch_id: str,
                 batch_size: int):
        self.source = source  # the lane's stream it was read from
        self.entry_id = entry_id
        self.task: Task | None = None
        self.read_at = read_at
        self.batch_id = batch_id
        self.batch_size = batch_size
        self.output: EngineOutput | None = None
        self.payload = b""  # kept only where a dead letter may need it
        self.deliveries = 1
        self.cancelled = False


class LaneStats(msgspec.Struct):
    read: int = 0
    committed: int = 0
    failed: int = 0
    duplicates: int = 0
    batches: int = 0
    commits: int = 0
    fenced: int = 0
    retried: int = 0
    dead_lettered: int = 0
    reclaimed: int = 0
    lost: int = 0
    cancelled: int = 0


class ModelLane:
    """Serves one model's stream for one worker."""

    def __init__(self, *, spec: ModelSpec, engine: Engine, redis: aioredis.Redis,
                 settings: Settings, worker_id: str):
        self.model = spec.name
        self.engine = engine
        self.redis = redis
        # A client of our own on the same pool: stream replies stay raw lists, not dicts.
        self._reader = aioredis.Redis(connection_pool=redis.connection_pool)
        self._reader.set_response_callback("XREADGROUP", _raw)
        self.settings = settings
        self.worker_id = worker_id
        self.stream = keys.task_stream(self.model)
        self.bulk = keys.bulk_stream(self.model)  # read only when interactive work leaves room
        self.stats = LaneStats()
        self.stopping = False
        self.engine_dead = asyncio.Event()
        s = settings
        self._commit_head = [keys.stats_key(self.model), keys.delayed_key(self.model),
                             keys.dead_stream(self.model), keys.GROUP, worker_id,
                             s.result_ttl_s, s.trace_ttl_s, s.reply_maxlen, s.dead_maxlen]
        self._commit = redis.register_script(COMMIT_LUA)
        self._reclaim = redis.register_script(RECLAIM_LUA)
        self._renew = redis.register_script(RENEW_LUA)
        self._promote = redis.register_script(PROMOTE_LUA)
        self._inflight: dict[str, _InFlight] = {}  # request id -> task, while in the engine
        self._outbox: list[_InFlight] = []  # finished, waiting for the next commit
        self._uncommitted = 0  # read and not yet committed: what max_inflight bounds
        self._outbox_ready = asyncio.Event()
        self._slot_free = asyncio.Event()
        self._batch_seq = 0
        self._reply_keys: dict[str, str] = {}
        self._cancelled: dict[str, float] = {}  # task id -> when the mark expires
        self._bulk_check_at = 0.0  # monotonic time the bulk lane is worth reading again
        self._bulk_uncommitted = 0  # the part of _uncommitted read from the bulk lane
        self._backlog = True  # the last read found a backlog: poll lanes before blocking
        self._suspect_done = asyncio.Event()  # a task delivered 3+ times was committed
        self._spans = None
        if settings.otel_enabled:
            from agentfleet.workers.otel import TaskSpans

            self._spans = TaskSpans()
        self._bulk_cap = max(1, int(settings.max_inflight * settings.bulk_max_share))
        self._validate = TaskChecker(settings)
        self._result_prefix = keys.result_prefix(self.model)
        self.metrics = NULL_LANE_METRICS  # the Worker attaches real ones (workers/metrics.py)

    async def ensure_group(self) -> None:
        """Create the model's consumer group, reading from the start of the stream."""
        try:
            await self.redis.xgroup_create(self.stream, keys.GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        try:
            await self.redis.xgroup_create(self.bulk, keys.GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def stop_reading(self) -> None:
        self.stopping = True
        self._slot_free.set()
        self._outbox_ready.set()

    @property
    def busy(self) -> int:
        return self._uncommitted

    # ---- read side -------------------------------------------------------------------

    async def read_loop(self) -> None:
        s = self.settings
        backoff_s = 0.05
        while not self.stopping:
            free = s.max_inflight - self._uncommitted
            if free <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            try:
                windows = await self._read_window(min(free, s.read_count))
            except _TRANSIENT as exc:
                log.warning("model %s: read failed (%s); retrying in %.2fs", self.model, exc,
                            backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
                continue
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):  # the stream was deleted: make it again
                    raise
                await self.ensure_group()
                continue
            backoff_s = 0.05
            for source, entries in windows:
                self.dispatch(entries, source=source)

    async def _read_window(self, want: int) -> list:
        """Interactive tasks first; the bulk lane fills what they leave; block when idle."""
        windows = await self._read_lanes(want)
        # A backlog: poll the lanes in priority order next time.  Otherwise go straight to
        # one blocking read of both, rather than two empty polls (round trips) before it.
        self._backlog = sum(len(entries) for _, entries in windows) >= max(1, want // 2)
        return windows

    async def _read_lanes(self, want: int) -> list:
        s = self.settings
        read = self._reader.xreadgroup
        me = self.worker_id
        room = min(want, self._bulk_cap - self._bulk_uncommitted)
        if self._backlog or s.window_ms:
            got = await read(keys.GROUP, me, {self.stream: ">"}, count=want)
            if got and s.window_ms and len(got[0][1]) < want:
                # Gather a fuller window: the latency/throughput knob.
                await asyncio.sleep(s.window_ms / 1000)
                more = await read(keys.GROUP, me, {self.stream: ">"},
                                  count=want - len(got[0][1]))
                if more:
                    got[0][1].extend(more[0][1])
            windows = [(self.stream, got[0][1])] if got else []
            room = min(want - (len(got[0][1]) if got else 0), room)
            now = time.monotonic()
            if room and (now >= self._bulk_check_at or not got):
                bulk = await read(keys.GROUP, me, {self.bulk: ">"}, count=room)
                if bulk:
                    windows.append((self.bulk, bulk[0][1]))
                else:  # an idle bulk lane is looked at again in 50 ms, or when all is idle
                    self._bulk_check_at = now + 0.05
            if windows:
                return windows
        lanes = {self.stream: ">", self.bulk: ">"} if room > 0 else {self.stream: ">"}
        got = await read(keys.GROUP, me, lanes, count=max(1, want // 2), block=s.block_ms)
        return [(stream.decode(), entries) for stream, entries in got or ()]

    def dispatch(self, entries: list, deliveries: dict[bytes, int] | None = None,
                 source: str = "") -> None:
        """Decode and check a window of stream entries and start the valid ones."""
        now = time.time()
        self._batch_seq += 1
        batch_id = f"{self.worker_id}/{self.model}/{self._batch_seq}"
        size = len(entries)
        self.stats.read += size
        self.stats.batches += 1
        self._uncommitted += size
        self.metrics.observe_read(size)
        start: list[tuple[str, Task]] = []
        source = source or self.stream
        prefix = "" if source == self.stream else "b"  # entry ids repeat across streams
        if prefix:
            self._bulk_uncommitted += size
        for entry_id, fields in entries:
            rec = _InFlight(source, entry_id, now, batch_id, size)
            if deliveries is not None:
                rec.deliveries = deliveries[entry_id]
            try:
                rec.task = task = _decode(fields)
                self._check(task)
            except AgentFleetError as exc:
                rec.payload = fields[1] if len(fields) > 1 else b""
                self._finish_now(rec, exc.code, str(exc), now)
                continue
            if rec.deliveries > self.settings.max_deliveries:
                rec.payload = fields[1]
                self._finish_now(rec, ErrorCode.DELIVERY_LIMIT,
                                 f"delivered {rec.deliveries - 1} times without finishing: "
                                 f"it may be killing workers", now)
                continue
            if task.deadline is not None and task.deadline < now:
                self._finish_now(rec, ErrorCode.DEADLINE_EXCEEDED,
                                 f"deadline {task.deadline:.3f} passed before the task ran", now)
                continue
            if self._cancelled and (task.id in self._cancelled or (
                    task.batch_id and "batch:" + task.batch_id in self._cancelled)):
                self._finish_now(rec, ErrorCode.CANCELLED, "cancelled before it ran", now)
                continue
            request_id = prefix + entry_id.decode()
            self._inflight[request_id] = rec
            start.append((request_id, task))
        if not start:
            return
        try:
            self.engine.submit(start, self.on_done)
        except Exception as exc:  # an engine bug must not take the worker down
            log.exception("model %s: engine.submit failed", self.model)
            for request_id, _ in start:
                rec = self._inflight.pop(request_id, None)
                if rec is not None:
                    self._finish_now(rec, ErrorCode.ENGINE_ERROR, f"engine.submit: {exc}", now)

    def _check(self, task: Task) -> None:
        if task.model != self.model:
            raise ValidationError("model", f"task for model {task.model!r} sits in the stream "
                                  f"of {self.model!r}", value=task.model)
        self._validate(task)  # decoded here, never mutated: a repeated sampling is not rechecked

    def _finish_now(self, rec: _InFlight, code: ErrorCode, message: str, now: float) -> None:
        rec.output = EngineOutput(request_id="", error_code=code, error_message=message,
                                  finished=now)
        self._queue_commit(rec)

    def on_done(self, out: EngineOutput) -> None:
        """Engine callback: a request finished (or failed)."""
        rec = self._inflight.pop(out.request_id, None)
        if rec is None:
            return
        rec.output = out
        if out.error_code is ErrorCode.ENGINE_DEAD:
            self.engine_dead.set()
        self._queue_commit(rec)

    def _queue_commit(self, rec: _InFlight) -> None:
        self._outbox.append(rec)
        self._outbox_ready.set()

    def cancel(self, task_id: str, until: float) -> None:
        """Mark a task cancelled: never started if queued, aborted if running here."""
        self._cancelled[task_id] = until
        for request_id, rec in self._inflight.items():
            if rec.task is not None and rec.task.id == task_id:
                rec.cancelled = True
                self.engine.abort([request_id])
                break

    # ---- write side ------------------------------------------------------------------

    async def commit_loop(self, max_writes: int = 2) -> None:
        """Commit what finished; up to `max_writes` commits in flight, so that building the
        next group's records overlaps the server running the previous script."""
        writes: set[asyncio.Task] = set()
        while True:
            if not self._outbox:
                if self.stopping and not self._inflight:
                    if writes:
                        await asyncio.wait(writes)
                    if not self._outbox:
                        return
                    continue
                self._outbox_ready.clear()
                await self._outbox_ready.wait()
                continue
            if len(writes) >= max_writes:
                await asyncio.wait(writes, return_when=asyncio.FIRST_COMPLETED)
                continue  # more finished meanwhile: a bigger group
            done, self._outbox = self._outbox, []
            records = [self._record(rec) for rec in done]
            if self.settings.crash_at == "before_commit":
                os._exit(137)  # fault suite: the engine ran, the results were never written
            # A task of its own: a cancelled worker still finishes the write it started.
            write = asyncio.ensure_future(self._commit_group(done, records))
            writes.add(write)
            write.add_done_callback(writes.discard)
            await asyncio.sleep(0)  # let it go out before the next group is built

    async def _commit_group(self, done: list[_InFlight], records: list[CommitRecord]) -> None:
        await self._write(records)
        self.metrics.observe_commit(done, records)
        if self.settings.crash_at == "after_commit":
            os._exit(137)  # fault suite: written and acknowledged, then gone
        self._uncommitted -= len(done)
        self._bulk_uncommitted -= sum(rec.source == self.bulk for rec in done)
        self._slot_free.set()
        if any(rec.deliveries > 2 for rec in done):
            self._suspect_done.set()

    def _record(self, rec: _InFlight) -> CommitRecord:
        out = rec.output
        task = rec.task
        now = time.time()
        if task is None:  # undecodable: keyed by its entry id, nobody to reply to
            task = Task(id="entry-" + rec.entry_id.decode(), model=self.model)
        code = out.error_code
        if rec.cancelled and code is None:
            code = ErrorCode.CANCELLED
            out.error_message = "cancelled while running"
        if code in _RETRYABLE:
            if task.attempt + 1 < self.settings.max_attempts:
                return self._retry_record(rec, task, code, out.error_message, now)
            out.error_message = (f"{task.attempt + 1} attempts failed; last: {code.value}: "
                                 f"{out.error_message}")
            code = ErrorCode.ATTEMPTS_EXHAUSTED
        status = Status.SUCCEEDED if code is None else _STATUS_BY_CODE.get(code, Status.FAILED)
        followups: list[tuple[str, bytes, bytes]] = []
        trace_on = self._traced(task)
        traceparent = task.traceparent
        if self._spans is not None:
            traceparent = self._spans.record(
                task, status, worker_id=self.worker_id, batch_id=rec.batch_id, read=rec.read_at,
                engine_start=out.engine_start, first_token=out.first_token,
                finished=out.finished, written=now, prompt_tokens=out.prompt_tokens,
                output_tokens=out.output_tokens, error=out.error_message)
        if status is Status.SUCCEEDED and task.followups:
            for i, spec in enumerate(task.followups, 1):
                child = _child(task, i, spec, out.text, now, traceparent)
                event = encode(Enqueued(task_id=child.id, parent_id=task.id, model=child.model,
                                        agent_id=child.agent_id, at=now)) if trace_on else b""
                followups.append((keys.task_stream(child.model), encode(child), event))
        elif status is not Status.SUCCEEDED:
            self.stats.failed += 1
        # Only the fields that differ from their defaults go through the constructor:
        # msgspec matches keyword arguments one by one, and most tasks leave these empty.
        result = Result(
            task_id=task.id, correlation_id=task.correlation_id, model=self.model,
            status=status, text=out.text, finish_reason=out.finish_reason,
            prompt_tokens=out.prompt_tokens, output_tokens=out.output_tokens,
            timings=Timings(enqueued=task.enqueued_at, read=rec.read_at,
                            engine_start=out.engine_start, first_token=out.first_token,
                            finished=out.finished, written=now),
            worker_id=self.worker_id, batch_id=rec.batch_id, batch_size=rec.batch_size,
            model_version=self.engine.model_version,
        )
        if task.parent_id:
            result.parent_id = task.parent_id
        if task.agent_id:
            result.agent_id = task.agent_id
        result.tenant = task.tenant
        if code is not None:
            result.error_code = code
        if out.error_message:
            result.error_message = out.error_message
        if followups:
            result.followup_ids = [f"{task.id}.{i}" for i in range(1, len(followups) + 1)]
        if task.attempt:
            result.attempts = task.attempt + 1
        trace = b""
        if trace_on:
            trace = encode(Finished(result=msgspec.structs.replace(result, text="")))
        outcome, dead = b"r", b""
        if status is Status.DEAD_LETTERED:
            outcome = b"d"
            dead = encode(DeadLetter(
                task_id=task.id, model=self.model, reason=out.error_message, error_code=code,
                payload=rec.payload or encode(task), attempts=task.attempt + 1,
                deliveries=rec.deliveries, history=task.history, worker_id=self.worker_id,
                at=now))
        record = CommitRecord(
            source=rec.source, entry_id=rec.entry_id, outcome=outcome, v1=encode(result),
            v2=dead, result_key=self._result_prefix + task.id,
            reply_key=self._reply_key(task.reply_to),
            trace_key=keys.trace_key(self.model, task.correlation_id) if trace else "",
            trace=trace, followups=followups,
        )
        if task.batch_id:
            record.batch_out = keys.batch_output(self.model, task.batch_id)
            record.batch_counts = keys.batch_counts(self.model, task.batch_id)
            record.batch_status = status.value
        return record

    def _traced(self, task: Task) -> bool:
        """A lone task's result is its whole trace; chains also get a list per correlation id."""
        return self.settings.trace_enabled and bool(
            task.followups or task.parent_id or task.correlation_id != task.id)

    def _retry_record(self, rec: _InFlight, task: Task, code: ErrorCode, message: str,
                      now: float) -> CommitRecord:
        """The task again, one attempt further, due after exponential backoff with jitter."""
        s = self.settings
        delay_s = min(s.retry_max_s, s.retry_base_s * 2 ** task.attempt)
        due = now + delay_s * (0.5 + random.random() / 2)
        line = f"attempt {task.attempt + 1} on {self.worker_id}: {code.value}: {message}"
        again = msgspec.structs.replace(task, attempt=task.attempt + 1,
                                        history=[*task.history, line][-10:])
        traced = self._traced(task)
        self.stats.retried += 1
        lane = b"b" if rec.source == self.bulk else b"i"
        return CommitRecord(
            source=rec.source, entry_id=rec.entry_id, outcome=b"y", v1=lane + encode(again),
            v2=repr(due), result_key=rec.source, reply_key="",
            trace_key=keys.trace_key(self.model, task.correlation_id or task.id),
            trace=encode(Retried(task_id=task.id, attempt=task.attempt + 1, error=line,
                                 at=now, due=due)) if traced else b"",
            followups=(),
        )

    def _reply_key(self, producer_id: str) -> str:
        if not producer_id:
            return ""
        key = self._reply_keys.get(producer_id)
        if key is None:
            if len(self._reply_keys) > 10_000:
                self._reply_keys.clear()
            key = self._reply_keys[producer_id] = keys.reply_stream(self.model, producer_id)
        return key

    async def _write(self, records: list[CommitRecord]) -> None:
        keys_, args = commit_args(self._commit_head, records)
        backoff_s = 0.05
        while True:
            try:
                written, dups, fenced, _, dead = await self._commit(keys=keys_, args=args)
                break
            except _TRANSIENT as exc:
                log.warning("model %s: commit of %d failed (%s); retrying in %.2fs",
                            self.model, len(records), exc, backoff_s)
            except RedisError as exc:  # e.g. OOM: keep the results, retry rather than lose
                log.error("model %s: commit of %d refused (%s); retrying in %.2fs",
                          self.model, len(records), exc, backoff_s)
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 5.0)
        self.stats.committed += written
        self.stats.duplicates += dups
        self.stats.fenced += fenced
        self.stats.dead_lettered += dead
        self.stats.commits += 1
        if fenced:
            log.warning("model %s: %d results dropped: their tasks were reclaimed by another "
                        "worker while this one stalled", self.model, fenced)

    # ---- bookkeeping -----------------------------------------------------------------

    async def reclaim_loop(self) -> None:
        """Take over tasks idle longer than claim_idle_ms on any consumer (dead workers)."""
        s = self.settings
        every_s = min(s.claim_idle_ms / 4000, 1.0)
        while not self.stopping:
            try:  # woken early when a suspect finished: the next one need not wait
                await asyncio.wait_for(self._suspect_done.wait(), every_s)
            except TimeoutError:
                pass
            self._suspect_done.clear()
            free = s.max_inflight - self._uncommitted
            if free <= 0 or self.stopping:
                continue
            for source in (self.stream, self.bulk):
                try:
                    await self._reclaim_from(source, free)
                except _TRANSIENT as exc:
                    log.warning("model %s: reclaim failed (%s)", self.model, exc)

    async def _reclaim_from(self, source: str, free: int) -> None:
        suspect_running = any(rec.deliveries > 2 for rec in self._inflight.values())
        claimed, lost = await self._reclaim(
            keys=[source, self._commit_head[0]],
            args=[keys.GROUP, self.worker_id, self.settings.claim_idle_ms, min(free, 100),
                  0 if suspect_running else 1])
        if lost:
            await self._report_lost(lost)
        if claimed and not self.stopping:
            mine = {rec.entry_id for rec in self._inflight.values() if rec.source == source}
            fresh = [(eid, fields) for eid, fields, _ in claimed if eid not in mine]
            self.stats.reclaimed += len(fresh)
            log.info("model %s: reclaimed %d stalled tasks", self.model, len(fresh))
            if fresh:
                self.dispatch(fresh, {eid: n + 1 for eid, _, n in claimed}, source=source)

    async def _report_lost(self, lost: list[bytes]) -> None:
        """An entry that vanished while pending is dead-lettered as lost, never skipped."""
        self.stats.lost += len(lost)
        log.error("model %s: %d pending tasks vanished from the stream before they finished "
                  "(trimmed or deleted by hand): %s", self.model, len(lost),
                  [i.decode() for i in lost[:10]])
        now = time.time()
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id in lost:
                pipe.xadd(keys.dead_stream(self.model), {"d": encode(DeadLetter(
                    task_id="entry-" + entry_id.decode(), model=self.model,
                    reason="its stream entry vanished while pending: the task is unknown",
                    error_code=ErrorCode.LOST, payload=b"", worker_id=self.worker_id,
                    at=now))}, maxlen=self.settings.dead_maxlen, approximate=True)
            await pipe.execute()

    async def renew_loop(self) -> None:
        """Keep our claim on tasks still running, so a slow worker is not mistaken for dead."""
        every_s = self.settings.claim_idle_ms / 3000
        while True:
            await asyncio.sleep(every_s)
            by_source: dict[str, list[bytes]] = {}
            for rec in [*self._inflight.values(), *self._outbox]:
                by_source.setdefault(rec.source, []).append(rec.entry_id)
            if not by_source and self.stopping:
                return
            for source, ids in by_source.items():
                try:
                    await self._renew(keys=[source], args=[keys.GROUP, self.worker_id, *ids])
                except _TRANSIENT as exc:
                    log.warning("model %s: renewing claims failed (%s)", self.model, exc)

    async def promote_loop(self, every_s: float = 0.25) -> None:
        """Move retries that are due back into the stream (a timer, not a busy loop)."""
        keys_ = [self.stream, keys.delayed_key(self.model), self.bulk]
        while not self.stopping:
            await asyncio.sleep(every_s)
            try:
                await self._promote(keys=keys_, args=[time.time(), 500])
            except _TRANSIENT as exc:
                log.warning("model %s: moving due retries failed (%s)", self.model, exc)

    async def trim_loop(self) -> None:
        """Drop acknowledged entries, never one that is pending or not yet delivered."""
        while not self.stopping:
            await asyncio.sleep(self.settings.trim_interval_s)
            try:
                await trim_stream(self.redis, self.stream)
                await trim_stream(self.redis, self.bulk)
            except _TRANSIENT as exc:
                log.warning("model %s: trimming failed (%s)", self.model, exc)
            now = time.time()
            for task_id in [t for t, until in self._cancelled.items() if until < now]:
                del self._cancelled[task_id]


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


def _raw(response, **options):
    return response


def _decode(fields: list[bytes]) -> Task:
    """A raw entry's fields are [name, value, ...]; the task is the value of 'd'."""
    if len(fields) != 2 or fields[0] != b"d":
        raise DecodeError("stream entry is not a single 'd' field")
    return decode_task(fields[1])


def _child(task: Task, index: int, spec: FollowUp, output: str, now: float,
           traceparent: str) -> Task:
    """The follow-up task `index` of `task`: same correlation id, parent's id, deterministic id."""
    def fill(text: str) -> str:
        return text.replace("{output}", output)

    return Task(
        id=f"{task.id}.{index}",
        correlation_id=task.correlation_id,
        parent_id=task.id,
        tenant=task.tenant,
        agent_id=spec.agent_id or task.agent_id,
        model=spec.model or task.model,
        prompt=fill(spec.prompt) if spec.prompt is not None else None,
        messages=[Message(role=m.role, content=fill(m.content)) for m in spec.messages]
        if spec.messages is not None else None,
        sampling=spec.sampling or task.sampling,
        priority=task.priority,
        deadline=task.deadline,
        metadata={**task.metadata, **spec.metadata} if spec.metadata else task.metadata,
        followups=spec.followups,
        depth=task.depth + 1,
        reply_to=task.reply_to,
        enqueued_at=now,
        traceparent=traceparent,  # the parent task's span: a chain is one trace
    )


class Worker:
    """A worker process's core: one lane per model, run until asked to stop."""

    def __init__(self, settings: Settings, redis: aioredis.Redis, engines: dict[str, Engine],
                 *, worker_id: str | None = None):
        self.settings = settings
        self.redis = redis
        self.worker_id = worker_id or settings.resolved_worker_id()
        self.lanes = [
            ModelLane(spec=settings.models[name], engine=engine, redis=redis, settings=settings,
                      worker_id=self.worker_id)
            for name, engine in engines.items()
        ]
        self.partials = attach_partials(self)  # streaming (gateway): engines publish deltas
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()
        self.metrics = WorkerMetrics.attach(self)

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, drain_timeout_s: float = 30.0) -> None:
        """Serve until `request_stop`; then stop reading and finish what is in flight.

        What does not finish within `drain_timeout_s` stays pending in Redis, where another
        worker reclaims it after claim_idle_ms.
        """
        await _with_retries(lambda: check_server(self.redis), "checking the server")
        for lane in self.lanes:
            await lane.engine.start()
            await _with_retries(lane.ensure_group, f"creating the group of {lane.model}")
        await _with_retries(self._load_cancellations, "loading cancellation marks")
        with quiet_gc():
            await self._serve(drain_timeout_s)
        for lane in self.lanes:
            await lane.engine.stop()
        await self._beat(alive=False)

    async def _serve(self, drain_timeout_s: float) -> None:
        async with asyncio.TaskGroup() as tg:
            commits = [tg.create_task(lane.commit_loop()) for lane in self.lanes]
            renews = [tg.create_task(lane.renew_loop()) for lane in self.lanes]
            side = [tg.create_task(loop()) for lane in self.lanes
                    for loop in (lane.read_loop, lane.reclaim_loop, lane.promote_loop,
                                 lane.trim_loop)]
            side.append(tg.create_task(self._heartbeat()))
            side.append(tg.create_task(self.metrics.kpi_loop(self.redis)))
            side.append(tg.create_task(self._listen_cancellations()))
            for lane in self.lanes:
                side.append(tg.create_task(self._stop_when_dead(lane)))
            self.ready.set()
            log.info("worker %s serving %s", self.worker_id, [lane.model for lane in self.lanes])
            await self._stop.wait()
            log.info("worker %s draining", self.worker_id)
            for lane in self.lanes:
                lane.stop_reading()
            _, pending = await asyncio.wait(commits, timeout=drain_timeout_s)
            if pending:  # what is left stays pending in Redis, claimable by another worker
                log.warning("worker %s: drain deadline passed with %d tasks in flight",
                            self.worker_id, sum(lane.busy for lane in self.lanes))
            for task in [*pending, *renews, *side]:
                task.cancel()

    async def _stop_when_dead(self, lane: ModelLane) -> None:
        await lane.engine_dead.wait()
        log.error("worker %s: the engine of %s died; stopping (its tasks will be retried)",
                  self.worker_id, lane.model)
        self.request_stop()

    async def _listen_cancellations(self) -> None:
        """Cancellation marks: loaded at (re)connect, then pushed over pub/sub."""
        lanes = {keys.cancel_channel(lane.model).encode(): lane for lane in self.lanes}
        backoff_s = 0.1
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(*lanes)
                await self._load_cancellations()  # again: no mark falls between the two
                backoff_s = 0.1
                while True:
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is not None and msg["channel"] in lanes:
                        lanes[msg["channel"]].cancel(
                            msg["data"].decode(), time.time() + self.settings.cancel_ttl_s)
            except _TRANSIENT as exc:
                log.warning("worker %s: cancellation listener lost its connection (%s)",
                            self.worker_id, exc)
            finally:
                await pubsub.aclose()
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 5.0)

    async def _load_cancellations(self) -> None:
        for lane in self.lanes:
            marks = await self.redis.zrangebyscore(keys.cancelled_key(lane.model), time.time(),
                                                   "+inf", withscores=True)
            for task_id, until in marks:
                lane.cancel(task_id.decode(), until)

    async def _heartbeat(self, every_s: float = 2.0) -> None:
        """Tell SREs and `agentfleet status` which workers serve which model."""
        while True:
            await self._beat(alive=True)
            await asyncio.sleep(every_s)

    async def _beat(self, *, alive: bool) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for lane in self.lanes:
                    if alive:
                        pipe.hset(keys.workers_key(lane.model), self.worker_id, time.time())
                    else:
                        pipe.hdel(keys.workers_key(lane.model), self.worker_id)
                await pipe.execute()
        except RedisError as exc:
            log.warning("worker %s: heartbeat failed (%s)", self.worker_id, exc)


GC_GEN0_THRESHOLD = 20_000
_gc_users = 0  # Worker.run calls inside quiet_gc (tests run several workers in one process)
_gc_saved: tuple[int, int, int] = (700, 10, 10)


@contextlib.contextmanager
def quiet_gc() -> Iterator[None]:
    """Keep the cyclic collector off the hot path of a serving process.

    Start-up leaves a large heap (vLLM, torch, transformers: millions of objects) that every
    full collection would walk again: freeze it.  A read window creates thousands of tracked
    objects that live until their commit; at CPython's gen0 threshold of 700 each window set
    off collections that only promoted them (fake engine, 100,000 tasks: 957 collections,
    3.6 us per task; none at 20,000).  The wire Structs are not tracked at all (gc=False).
    On the way out the heap is unfrozen, so that what the worker held can be collected.
    """
    global _gc_users, _gc_saved
    if _gc_users == 0:
        _gc_saved = gc.get_threshold()
        gc.collect()
        gc.freeze()
        gen0, gen1, gen2 = _gc_saved
        gc.set_threshold(max(GC_GEN0_THRESHOLD, gen0), gen1, gen2)
    _gc_users += 1
    try:
        yield
    finally:
        _gc_users -= 1
        if _gc_users == 0:
            gc.set_threshold(*_gc_saved)
            gc.unfreeze()


async def _with_retries(step, what: str) -> None:
    """Start-up steps wait out a server that is down or still loading, with backoff."""
    backoff_s = 0.1
    while True:
        try:
            return await step()
        except _TRANSIENT as exc:
            log.warning("%s failed (%s); retrying in %.1fs", what, exc, backoff_s)
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 5.0)


async def check_server(redis: aioredis.Redis) -> None:
    """Refuse a server that may evict keys: an evicted task or result is a lost one."""
    info = await redis.info("memory")
    policy = info.get("maxmemory_policy", "noeviction")
    if policy != "noeviction":
        raise EvictingServerError(
            f"the server's maxmemory-policy is {policy!r}: it may evict queued tasks and "
            f"results; set it to 'noeviction'")


def make_engine(spec: ModelSpec, settings: Settings) -> Engine:
    """The engine named by `settings.engine` for one model."""
    if settings.engine == "fake":
        from agentfleet.workers.fake_engine import FakeEngine

        return FakeEngine()
    if settings.engine == "vllm":
        from agentfleet.workers.models import resolve_model_path
        from agentfleet.workers.vllm_engine import VllmEngine

        return VllmEngine(spec, resolve_model_path(spec, settings.home_path))
    raise ValueError(f"AGENTFLEET_ENGINE={settings.engine!r}: use 'vllm' or 'fake'")
