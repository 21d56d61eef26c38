"""A model runner: one worker's service of one model, as a visible pipeline.

    Reader  (workers/reader.py)        read a window from the model's lanes, check it,
                                       hand the valid tasks to the engine
    engine  (workers/engine.py)        runs them; calls `on_done` per finished task
    Outbox                             finished tasks waiting for the next commit
    Committer (workers/committer.py)   outcomes (workers/outcomes.py) written with one
                                       script call per group, with the XACK
    Housekeeping (workers/housekeeping.py)  reclaim, renew, promote, trim
    Mover (workers/mover.py)           follow-ups for other models, outbox -> their streams

"Lane" means one of a model's two kinds of stream: interactive and bulk (tasks of bulk jobs,
run when interactive work leaves room); every tenant has its own stream in each lane
(workers/streams.py).  Between the reader and the engine, tasks wait in `Admission`
(workers/admission.py) for an engine slot and leave in fair order.  The runner holds the
state the rooms share: the in-flight records, the slot accounting, the outbox, cancellation
marks and counters.  A runner serves one model, or one registered version of it (its own
streams, its own engine: docs/versions.md); an engine that shares a GPU with others sleeps
between its turns (`sleeper`, workers/sleep.py): what it should start meanwhile is held.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from agentfleet.schemas import keys
from agentfleet.schemas.errors import ErrorCode
from agentfleet.schemas.registry import ModelTable
from agentfleet.schemas.settings import ModelSpec, Settings
from agentfleet.schemas.tenants import TenantTable
from agentfleet.schemas.wire import Task
from agentfleet.workers.admission import Admission
from agentfleet.workers.affinity import Ownership
from agentfleet.workers.committer import Committer
from agentfleet.workers.engine import Engine, EngineOutput
from agentfleet.workers.housekeeping import Housekeeping
from agentfleet.workers.inflight import InFlight, RunnerStats, Slots
from agentfleet.workers.metrics import NULL_LANE_METRICS
from agentfleet.workers.mover import Mover
from agentfleet.workers.outcomes import Outcomes
from agentfleet.workers.reader import Reader
from agentfleet.workers.scripts import CommitHead
from agentfleet.workers.streams import TenantStreams

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




class ModelRunner:
    """Serves one model's lanes for one worker."""

    def __init__(self, *, spec: ModelSpec, engine: Engine, redis: aioredis.Redis,
                 settings: Settings, worker_id: str, route_version: str = ""):
        self.model = spec.name
        self.spec = spec
        self.engine = engine
        self.redis = redis
        self.settings = settings
        self.worker_id = worker_id
        # The registered version whose streams it reads ("" for the unversioned ones); its
        # engine's model_version is that name too, so results and aggregates carry it.
        self.route_version = route_version
        self.registry = ModelTable()  # the model registry; the Worker keeps it current
        ownership = Ownership(settings.affinity_partitions, settings.affinity_load_factor,
                              worker_id) if settings.affinity_partitions else None
        self.streams = TenantStreams(redis, self.model, route_version, ownership)
        self.stats = RunnerStats()
        share = settings.bulk_max_share
        # Reads: bulk-job tasks hold at most their share of what is read ahead, so that
        # interactive tasks always find room to be read.
        # With spare engine slots (workers/admission.py) as many read-ahead slots again are
        # kept for tenants holding less than max_inflight (workers/reader.py): a flood that
        # filled max_inflight before another tenant came does not keep that tenant's next
        # task unread until a wave of its tasks ends.
        self.read_reserve = getattr(engine, "spare_slots", 0) if settings.fairness else 0
        self.slots = Slots(settings.max_inflight + self.read_reserve,
                           max(1, int(settings.max_inflight * share)),
                           per_tenant=bool(self.read_reserve))
        # The engine: bulk-job tasks hold at most their share of its slots; the rest is kept
        # for interactive tasks, which then start within an engine step or two.
        engine_slots = getattr(engine, "slots", None)
        self.admission = Admission(
            slots=engine_slots, bulk_cap=max(1, int((engine_slots or 1) * share)),
            spare=getattr(engine, "spare_slots", 0),
            fair=settings.fairness, policy=self._policy)
        self.tenants = TenantTable()  # the registry; the Worker keeps it current
        self.live_workers = 1  # of this model, from the heartbeats: splits max_running
        self._dispatch_soon = False
        self.inflight: dict[str, InFlight] = {}  # request id -> task, while in the engine
        self.outbox = Outbox()
        self.cancelled: dict[str, float] = {}  # task id -> when the mark expires
        self.stopping = False
        self.reading = False  # a read is in flight: what it returns must be committed
        self.engine_dead = asyncio.Event()
        self.slot_free = asyncio.Event()  # a commit released slots
        self.suspect_done = asyncio.Event()  # a task delivered 3+ times was committed
        self.metrics = NULL_LANE_METRICS  # the Worker attaches real ones (workers/metrics.py)
        self.sleeper = None  # workers/sleep.py, for an engine sharing a GPU; None: always awake
        self.held: list[tuple[str, Task]] = []  # dispatched while the engine sleeps
        self.in_engine = 0  # requests submitted to the engine and not yet done
        self.engine_busy_s = 0.0  # engine seconds of the requests that ended (load reports)
        self.engine_ends = 0
        spans = None
        if settings.otel_enabled:
            from agentfleet.workers.otel import TaskSpans

            spans = TaskSpans()
        self.outcomes = Outcomes(model=self.model, worker_id=worker_id, settings=settings,
                                 model_version=lambda: engine.model_version, spans=spans,
                                 retention=self._retention, registry=lambda: self.registry)
        self.reader = Reader(self)
        self.committer = Committer(self, CommitHead(
            stats_key=keys.stats_key(self.model), delayed_key=keys.delayed_key(self.model),
            dead_stream=keys.dead_stream(self.model), queued_key=keys.queued_counts(self.model),
            group=keys.GROUP, consumer=worker_id, reply_maxlen=settings.reply_maxlen,
            dead_maxlen=settings.dead_maxlen, outbox_key=keys.outbox_stream(self.model)))
        self.housekeeping = Housekeeping(self)
        self.mover = Mover(self)  # follow-ups for other models: outbox -> their streams

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

    def set_tenants(self, table: TenantTable, live_workers: int) -> None:
        """A new registry version, or another count of live workers: weights and limits
        apply from the next dispatch, retention and salts from the next task."""
        self.tenants = table
        self.live_workers = max(1, live_workers)
        self.admission.set_policy(self._policy)

    def set_live(self, workers: Sequence[str]) -> None:
        """The model's live workers (from the heartbeats): with affinity on, the partitions
        this runner owns follow them (workers/affinity.py)."""
        own = self.streams.ownership
        if own is not None and own.update(workers):
            self.stats.affinity_rebalances += 1
            log.info("model %s: worker %s now owns %d of %d affinity partitions (%d live "
                     "workers)", self.model, self.worker_id, len(own.owned), own.partitions,
                     len(own.live))

    def _policy(self, tenant: str) -> tuple[float, int]:
        config = self.tenants.get(tenant)
        limit = math.ceil(config.max_running / self.live_workers) if config.max_running else 0
        return config.weight, limit

    def _retention(self, tenant: str) -> tuple[int, int]:
        config = self.tenants.get(tenant)
        s = self.settings
        return config.result_ttl_s or s.result_ttl_s, config.trace_ttl_s or s.trace_ttl_s

    async def ensure_groups(self, streams: Sequence[str] = ()) -> None:
        """Create the consumer group of the given streams (the default tenant's two, and
        their affinity partitions, when none are given), reading from the start of each."""
        for stream in streams or (*self.streams.tenant_streams("i", keys.DEFAULT_TENANT),
                                  *self.streams.tenant_streams("b", keys.DEFAULT_TENANT)):
            try:
                await self.redis.xgroup_create(stream, keys.GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def stop_reading(self) -> None:
        self.stopping = True
        self.slot_free.set()
        self.outbox.ready.set()

    def start(self, requests: list[tuple[str, Task, bool]], now: float) -> None:
        """Checked tasks (request id, task, bulk?): to the engine now, or to wait in
        admission for a slot."""
        ready = self.admission.offer(requests)
        if ready:
            self._submit(ready)

    def _submit(self, ready: Sequence[tuple[str, Task]]) -> None:
        """Hand tasks to the engine; an engine bug fails them, not the worker."""
        sleeper = self.sleeper
        if sleeper is not None and not sleeper.available:  # asleep: wait for its turn
            self.held += ready
            sleeper.want_turn()
            return
        table = self.tenants
        salts = [table.cache_salt(task.tenant) for _, task in ready]
        self.in_engine += len(ready)
        try:
            self.engine.submit(ready, self.on_done, salts=salts)
        except Exception as exc:
            log.exception("model %s: engine.submit failed", self.model)
            self.in_engine = max(0, self.in_engine - len(ready))
            now = time.time()
            for request_id, _ in ready:
                rec = self.inflight.pop(request_id, None)
                self.admission.done(request_id, 0, 0)
                if rec is not None:
                    self.finish_now(rec, ErrorCode.ENGINE_ERROR, f"engine.submit: {exc}", now)
            self._schedule_dispatch()

    def _schedule_dispatch(self) -> None:
        # Slots freed inside the engine's callback: start more on the next loop pass, so a
        # synchronous engine (the fake one) does not recurse through submit and on_done.
        if not self._dispatch_soon and self.admission.waiting:
            self._dispatch_soon = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def release_held(self) -> None:
        """The engine is awake again: start what waited for it."""
        held, self.held = self.held, []
        if held:
            self._submit(held)

    def _dispatch(self) -> None:
        self._dispatch_soon = False
        ready = self.admission.dispatch()
        if ready:
            self._submit(ready)

    def finish_now(self, rec: InFlight, code: ErrorCode, message: str, now: float) -> None:
        """A task that ends without running (invalid, expired, cancelled, ...)."""
        rec.output = EngineOutput(request_id="", error_code=code, error_message=message,
                                  finished=now)
        self.outbox.put(rec)

    def on_done(self, out: EngineOutput) -> None:
        """Engine callback: a request finished (or failed)."""
        rec = self.inflight.pop(out.request_id, None)
        self.in_engine -= 1
        if out.engine_start:
            self.engine_busy_s += out.finished - out.engine_start
            self.engine_ends += 1
        self.admission.done(out.request_id, out.prompt_tokens, out.output_tokens)
        if self.admission.waiting:
            self._schedule_dispatch()
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
                held = [i for i, (rid, _) in enumerate(self.held) if rid == request_id]
                if self.admission.drop(request_id) is not None or held:  # never starts
                    if held:  # dispatched while the engine slept: its slot is freed here
                        del self.held[held[0]]
                        self.admission.done(request_id, 0, 0)
                    del self.inflight[request_id]
                    self.finish_now(rec, ErrorCode.CANCELLED, "cancelled before it ran",
                                    time.time())
                else:
                    rec.cancelled = True
                    self.engine.abort([request_id])
                break

    def forget_expired_cancellations(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for task_id in [t for t, until in self.cancelled.items() if until < now]:
            del self.cancelled[task_id]
