"""A model runner: one worker's service of one model, as a visible pipeline.

    Reader  (workers/reader.py)        read a window from the model's lanes, check it,
                                       hand the valid tasks to the engine
    engine  (workers/engine.py)        runs them; calls `on_done` per finished task
    Outbox                             finished tasks waiting for the next commit
    Committer (workers/committer.py)   outcomes (workers/outcomes.py) written with one
                                       script call per group, with the XACK
    Housekeeping (workers/housekeeping.py)  reclaim, renew, promote, trim

"Lane" means one of a model's two streams: interactive (`af:{m}:tasks`) and bulk
(`af:{m}:bulk`, tasks of bulk jobs, read only when interactive work leaves room).  The runner
holds the state the rooms share: the in-flight records, the slot accounting, the outbox,
cancellation marks and counters.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from agentfleet.schemas import keys
from agentfleet.schemas.errors import ErrorCode
from agentfleet.schemas.settings import ModelSpec, Settings
from agentfleet.schemas.wire import Task
from agentfleet.workers.committer import Committer
from agentfleet.workers.engine import Engine, EngineOutput
from agentfleet.workers.housekeeping import Housekeeping
from agentfleet.workers.inflight import InFlight, RunnerStats, Slots
from agentfleet.workers.metrics import NULL_LANE_METRICS
from agentfleet.workers.outcomes import Outcomes
from agentfleet.workers.reader import Reader
from agentfleet.workers.scripts import CommitHead

log = logging.getLogger("agentfleet.worker")


class Outbox:
    """Finished tasks waiting for the commit loop."""

    __slots__ = ("items", "ready")

    def __init__(self) -> None:
        self.items: list[InFlight] = []
        self.ready = asyncio.Event()

    def put(self, rec: InFlight) -> None:
        self.items.append(rec)
        self.ready.set()

    def take(self) -> list[InFlight]:
        items, self.items = self.items, []
        return items


def engine_slots(engine: Engine, spec: ModelSpec, settings: Settings) -> int:
    """How many requests the engine runs at once (its batch size), for the bulk cap."""
    slots = getattr(engine, "slots", None)
    return min(slots or settings.max_inflight, settings.max_inflight)


class ModelRunner:
    """Serves one model's lanes for one worker."""

    def __init__(self, *, spec: ModelSpec, engine: Engine, redis: aioredis.Redis,
                 settings: Settings, worker_id: str):
        self.model = spec.name
        self.spec = spec
        self.engine = engine
        self.redis = redis
        self.settings = settings
        self.worker_id = worker_id
        self.interactive = keys.task_stream(self.model)
        self.bulk = keys.bulk_stream(self.model)
        self.stats = RunnerStats()
        # Bulk-job tasks hold at most their share of the engine's slots: the rest is kept for
        # interactive tasks, which then start within an engine step or two.
        self.slots = Slots(settings.max_inflight, max(1, int(
            engine_slots(engine, spec, settings) * settings.bulk_max_share)))
        self.inflight: dict[str, InFlight] = {}  # request id -> task, while in the engine
        self.outbox = Outbox()
        self.cancelled: dict[str, float] = {}  # task id -> when the mark expires
        self.stopping = False
        self.engine_dead = asyncio.Event()
        self.slot_free = asyncio.Event()  # a commit released slots
        self.suspect_done = asyncio.Event()  # a task delivered 3+ times was committed
        self.metrics = NULL_LANE_METRICS  # the Worker attaches real ones (workers/metrics.py)
        spans = None
        if settings.otel_enabled:
            from agentfleet.workers.otel import TaskSpans

            spans = TaskSpans()
        self.outcomes = Outcomes(model=self.model, worker_id=worker_id, settings=settings,
                                 model_version=lambda: engine.model_version, spans=spans)
        self.reader = Reader(self)
        self.committer = Committer(self, CommitHead(
            stats_key=keys.stats_key(self.model), delayed_key=keys.delayed_key(self.model),
            dead_stream=keys.dead_stream(self.model), group=keys.GROUP, consumer=worker_id,
            result_ttl_s=settings.result_ttl_s, trace_ttl_s=settings.trace_ttl_s,
            reply_maxlen=settings.reply_maxlen, dead_maxlen=settings.dead_maxlen))
        self.housekeeping = Housekeeping(self)

    @property
    def busy(self) -> int:
        """Tasks read and not yet committed."""
        return self.slots.held

    @property
    def version(self) -> str:
        return self.engine.model_version

    def loops(self) -> list[Callable[[], Awaitable[None]]]:
        """The long-lived loops besides the commit loop, which the worker drains apart."""
        h = self.housekeeping
        return [self.reader.read_loop, h.reclaim_loop, h.promote_loop, h.trim_loop]

    async def ensure_groups(self) -> None:
        """Create each lane's consumer group, reading from the start of the stream."""
        for stream in (self.interactive, self.bulk):
            try:
                await self.redis.xgroup_create(stream, keys.GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def stop_reading(self) -> None:
        self.stopping = True
        self.slot_free.set()
        self.outbox.ready.set()

    def start(self, requests: Sequence[tuple[str, Task]], now: float) -> None:
        """Hand checked tasks to the engine; an engine bug fails them, not the worker."""
        try:
            self.engine.submit(requests, self.on_done)
        except Exception as exc:
            log.exception("model %s: engine.submit failed", self.model)
            for request_id, _ in requests:
                rec = self.inflight.pop(request_id, None)
                if rec is not None:
                    self.finish_now(rec, ErrorCode.ENGINE_ERROR, f"engine.submit: {exc}", now)

    def finish_now(self, rec: InFlight, code: ErrorCode, message: str, now: float) -> None:
        """A task that ends without running (invalid, expired, cancelled, ...)."""
        rec.output = EngineOutput(request_id="", error_code=code, error_message=message,
                                  finished=now)
        self.outbox.put(rec)

    def on_done(self, out: EngineOutput) -> None:
        """Engine callback: a request finished (or failed)."""
        rec = self.inflight.pop(out.request_id, None)
        if rec is None:
            return
        rec.output = out
        if out.error_code is ErrorCode.ENGINE_DEAD:
            self.engine_dead.set()
        self.outbox.put(rec)

    def cancel(self, task_id: str, until: float) -> None:
        """Mark a task cancelled: never started if queued, aborted if running here."""
        self.cancelled[task_id] = until
        for request_id, rec in self.inflight.items():
            if rec.task is not None and rec.task.id == task_id:
                rec.cancelled = True
                self.engine.abort([request_id])
                break

    def forget_expired_cancellations(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for task_id in [t for t, until in self.cancelled.items() if until < now]:
            del self.cancelled[task_id]
