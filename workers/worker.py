"""The worker: read a window, hand it to the engine, write results, acknowledge.

One `ModelLane` per served model runs two loops:
  read loop    XREADGROUP up to `read_count` tasks (never more than the free in-flight slots),
               decode and check them, hand the valid ones to the engine at once.  It does not
               wait for a window to finish: slots free up as commits land.
  commit loop  takes every completion gathered since its last write and commits them with
               one script call (results, follow-ups, traces, XACK), then frees their slots.
The engine batches continuously; the lane only keeps it fed and writes behind it.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from schemas import keys
from schemas.errors import AgentFleetError, DecodeError, ErrorCode, ValidationError
from schemas.settings import ModelSpec, Settings
from schemas.validate import validate_task
from schemas.wire import (
    Enqueued,
    Finished,
    FollowUp,
    Message,
    Result,
    Status,
    Task,
    Timings,
    decode_task,
    encode,
)
from workers.commit import COMMIT_LUA, CommitRecord, commit_args
from workers.engine import Engine, EngineOutput

log = logging.getLogger("agentfleet.worker")

_STATUS_BY_CODE = {ErrorCode.DEADLINE_EXCEEDED: Status.EXPIRED}
_TRANSIENT = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


class _InFlight:
    """A task between its read and its commit."""

    __slots__ = ("entry_id", "task", "read_at", "batch_id", "batch_size", "output")

    def __init__(self, entry_id: bytes, read_at: float, batch_id: str, batch_size: int):
        self.entry_id = entry_id
        self.task: Task | None = None
        self.read_at = read_at
        self.batch_id = batch_id
        self.batch_size = batch_size
        self.output: EngineOutput | None = None


class LaneStats(msgspec.Struct):
    read: int = 0
    committed: int = 0
    failed: int = 0
    duplicates: int = 0
    batches: int = 0
    commits: int = 0


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
        self.stats = LaneStats()
        self.stopping = False
        self._stats_key = keys.stats_key(self.model)
        self._commit = redis.register_script(COMMIT_LUA)
        self._inflight: dict[str, _InFlight] = {}  # request id -> task, while in the engine
        self._outbox: list[_InFlight] = []  # finished, waiting for the next commit
        self._uncommitted = 0  # read and not yet committed: what max_inflight bounds
        self._outbox_ready = asyncio.Event()
        self._slot_free = asyncio.Event()
        self._batch_seq = 0
        self._reply_keys: dict[str, str] = {}

    async def ensure_group(self) -> None:
        """Create the model's consumer group, reading from the start of the stream."""
        try:
            await self.redis.xgroup_create(self.stream, keys.GROUP, id="0", mkstream=True)
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
        streams = {self.stream: ">"}
        backoff_s = 0.05
        while not self.stopping:
            free = s.max_inflight - self._uncommitted
            if free <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            want = min(free, s.read_count)
            try:
                reply = await self._reader.xreadgroup(keys.GROUP, self.worker_id, streams,
                                                      count=want, block=s.block_ms)
                if reply and s.window_ms and len(reply[0][1]) < want:
                    # Gather a fuller window: the latency/throughput knob.
                    await asyncio.sleep(s.window_ms / 1000)
                    more = await self._reader.xreadgroup(
                        keys.GROUP, self.worker_id, streams, count=want - len(reply[0][1]))
                    if more:
                        reply[0][1].extend(more[0][1])
            except _TRANSIENT as exc:
                log.warning("model %s: read failed (%s); retrying in %.2fs", self.model, exc,
                            backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
                continue
            backoff_s = 0.05
            if reply:
                self.dispatch(reply[0][1])

    def dispatch(self, entries: list) -> None:
        """Decode and check a window of stream entries and start the valid ones."""
        now = time.time()
        self._batch_seq += 1
        batch_id = f"{self.worker_id}/{self.model}/{self._batch_seq}"
        size = len(entries)
        self.stats.read += size
        self.stats.batches += 1
        self._uncommitted += size
        start: list[tuple[str, Task]] = []
        for entry_id, fields in entries:
            rec = _InFlight(entry_id, now, batch_id, size)
            try:
                rec.task = task = _decode(fields)
                self._check(task)
            except AgentFleetError as exc:
                self._finish_now(rec, exc.code, str(exc), now)
                continue
            if task.deadline is not None and task.deadline < now:
                self._finish_now(rec, ErrorCode.DEADLINE_EXCEEDED,
                                 f"deadline {task.deadline:.3f} passed before the task ran", now)
                continue
            request_id = entry_id.decode()
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
        validate_task(task, self.settings)

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
        self._queue_commit(rec)

    def _queue_commit(self, rec: _InFlight) -> None:
        self._outbox.append(rec)
        self._outbox_ready.set()

    # ---- write side ------------------------------------------------------------------

    async def commit_loop(self) -> None:
        while True:
            if not self._outbox:
                if self.stopping and not self._inflight:
                    return
                self._outbox_ready.clear()
                await self._outbox_ready.wait()
                continue
            done, self._outbox = self._outbox, []
            records = [self._record(rec) for rec in done]
            # Shielded: a cancelled worker still finishes the write it started.
            await asyncio.shield(self._write(records))
            self._uncommitted -= len(done)
            self._slot_free.set()

    def _record(self, rec: _InFlight) -> CommitRecord:
        out = rec.output
        task = rec.task
        now = time.time()
        if task is None:  # undecodable: keyed by its entry id, nobody to reply to
            task = Task(id="entry-" + rec.entry_id.decode(), model=self.model)
        code = out.error_code
        status = Status.SUCCEEDED if code is None else _STATUS_BY_CODE.get(code, Status.FAILED)
        followups: list[tuple[str, bytes, bytes]] = []
        # A lone task's result is its whole trace; chains also get a list per correlation id.
        trace_on = self.settings.trace_enabled and bool(
            task.followups or task.parent_id or task.correlation_id != task.id)
        if status is Status.SUCCEEDED and task.followups:
            for i, spec in enumerate(task.followups, 1):
                child = _child(task, i, spec, out.text, now)
                event = encode(Enqueued(task_id=child.id, parent_id=task.id, model=child.model,
                                        agent_id=child.agent_id, at=now)) if trace_on else b""
                followups.append((keys.task_stream(child.model), encode(child), event))
        else:
            self.stats.failed += status is not Status.SUCCEEDED
        result = Result(
            task_id=task.id, correlation_id=task.correlation_id, parent_id=task.parent_id,
            model=self.model, agent_id=task.agent_id, tenant=task.tenant, status=status,
            text=out.text, finish_reason=out.finish_reason, prompt_tokens=out.prompt_tokens,
            output_tokens=out.output_tokens,
            timings=Timings(enqueued=task.enqueued_at, read=rec.read_at,
                            engine_start=out.engine_start, first_token=out.first_token,
                            finished=out.finished, written=now),
            worker_id=self.worker_id, batch_id=rec.batch_id, batch_size=rec.batch_size,
            model_version=self.engine.model_version, error_code=code,
            error_message=out.error_message,
            followup_ids=[f"{task.id}.{i}" for i in range(1, len(followups) + 1)],
        )
        trace = b""
        if trace_on:
            trace = encode(Finished(result=msgspec.structs.replace(result, text="")))
        return CommitRecord(
            entry_id=rec.entry_id,
            result_key=keys.result_key(self.model, task.id),
            reply_key=self._reply_key(task.reply_to),
            trace_key=keys.trace_key(self.model, task.correlation_id or task.id),
            result=encode(result),
            trace=trace,
            followups=followups,
        )

    def _reply_key(self, producer_id: str) -> str:
        if not producer_id:
            return self.stream
        key = self._reply_keys.get(producer_id)
        if key is None:
            if len(self._reply_keys) > 10_000:
                self._reply_keys.clear()
            key = self._reply_keys[producer_id] = keys.reply_stream(self.model, producer_id)
        return key

    async def _write(self, records: list[CommitRecord]) -> None:
        s = self.settings
        keys_, args = commit_args(self.stream, self._stats_key, keys.GROUP, s.result_ttl_s,
                                  s.trace_ttl_s, s.reply_maxlen, records)
        backoff_s = 0.05
        while True:
            try:
                written, dups = await self._commit(keys=keys_, args=args)
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
        self.stats.commits += 1


def _raw(response, **options):
    return response


def _decode(fields: list[bytes]) -> Task:
    """A raw entry's fields are [name, value, ...]; the task is the value of 'd'."""
    if len(fields) != 2 or fields[0] != b"d":
        raise DecodeError("stream entry is not a single 'd' field")
    return decode_task(fields[1])


def _child(task: Task, index: int, spec: FollowUp, output: str, now: float) -> Task:
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
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, drain_timeout_s: float = 30.0) -> None:
        """Serve until `request_stop`; then stop reading and finish what is in flight."""
        for lane in self.lanes:
            await lane.engine.start()
            await lane.ensure_group()
        async with asyncio.TaskGroup() as tg:
            commits = [tg.create_task(lane.commit_loop()) for lane in self.lanes]
            reads = [tg.create_task(lane.read_loop()) for lane in self.lanes]
            beat = tg.create_task(self._heartbeat())
            self.ready.set()
            log.info("worker %s serving %s", self.worker_id, [lane.model for lane in self.lanes])
            await self._stop.wait()
            log.info("worker %s draining", self.worker_id)
            for lane in self.lanes:
                lane.stop_reading()
            await asyncio.gather(*reads)
            beat.cancel()
            _, pending = await asyncio.wait(commits, timeout=drain_timeout_s)
            if pending:  # what is left stays pending in Redis, claimable by another worker
                log.warning("worker %s: drain deadline passed with %d tasks in flight",
                            self.worker_id, sum(lane.busy for lane in self.lanes))
                for task in pending:
                    task.cancel()
        for lane in self.lanes:
            await lane.engine.stop()
        await self._beat(alive=False)

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


def make_engine(spec: ModelSpec, settings: Settings) -> Engine:
    """The engine named by `settings.engine` for one model."""
    if settings.engine == "fake":
        from workers.fake_engine import FakeEngine

        return FakeEngine()
    if settings.engine == "vllm":
        from workers.models import resolve_model_path
        from workers.vllm_engine import VllmEngine

        return VllmEngine(spec, resolve_model_path(spec, settings.home_path))
    raise ValueError(f"AGENTFLEET_ENGINE={settings.engine!r}: use 'vllm' or 'fake'")
