"""The worker process's core: one model runner per served model (per served version of a
registered model), supervised until stopped.

`Worker.run` checks the server, starts the engines, creates the consumer groups and serves:
each runner's loops (workers/runner.py) plus the process's own (heartbeats, cancellations,
per-minute aggregates, the registries it follows, and the side loops it was given: the
canary guard).  Registered model versions come and go while it serves (workers/versions.py:
a new version's engine starts, a retired one's runner drains and stops).  It ends in order
(docs/operations.md):
  - `request_stop` (SIGTERM): stop reading, let what is in the engine finish and commit
    within the drain deadline, stop; what is left stays pending for another worker;
  - a loop that fails, or an engine that dies: the failure is logged with its traceback,
    then the same drain, then `WorkerCrashedError`, so the process exits non-zero and its
    supervisor restarts it.  No loop ends silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Iterator

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from agentfleet.producer.connection import server_infos
from agentfleet.schemas import keys
from agentfleet.schemas.errors import (
    BrokerError,
    EvictingServerError,
    FatalConfigError,
    ServerUnreachableError,
    WorkerCrashedError,
)
from agentfleet.schemas.settings import ModelSpec, Settings
from agentfleet.schemas.tenants import TableCache
from agentfleet.workers.engine import Engine
from agentfleet.workers.housekeeping import trim_stream
from agentfleet.workers.metrics import WorkerMetrics
from agentfleet.workers.runner import ModelRunner
from agentfleet.workers.streaming import attach as attach_partials  # streaming (gateway)
from agentfleet.workers.transient import TRANSIENT, with_retries
from agentfleet.workers.versions import EngineFactory, Versions

__all__ = ["Worker", "check_server", "make_engine", "quiet_gc", "trim_stream"]

log = logging.getLogger("agentfleet.worker")

HEARTBEAT_S = keys.HEARTBEAT_S  # how often a worker says it is alive; three missed: gone
DRAINED = 2  # a runner's first loops (commit, move) are waited for at a drain, not cancelled


class Worker:
    """A worker process's core: one runner per model, run until asked to stop."""

    def __init__(self, settings: Settings, redis: aioredis.Redis, engines: dict[str, Engine],
                 *, worker_id: str | None = None, models: list[str] | None = None,
                 engine_factory: EngineFactory | None = None,
                 side_loops: list[tuple[str, Callable[[], Awaitable[None]]]] | None = None,
                 all_models: bool = False):
        """`engines`: one per model of the settings it serves, for their unversioned
        streams; `models`: further models it serves that only the model registry knows;
        `all_models`: also every model registered, now or later.
        A registered model's versions get engines from `engine_factory` (`make_engine` by
        default).  `side_loops` run supervised beside the worker's own (the canary guard)."""
        self.settings = settings
        self.redis = redis
        self.worker_id = worker_id or settings.resolved_worker_id()
        self.served = list(dict.fromkeys([*engines, *(models or ())]))  # logical models
        self.all_models = all_models  # Versions adds registered models to `served`
        self.runners = [
            ModelRunner(spec=settings.models[name], engine=engine, redis=redis,
                        settings=settings, worker_id=self.worker_id)
            for name, engine in engines.items()
        ]
        self.side_loops = list(side_loops or ())
        self.versions = Versions(self, engine_factory or (lambda spec: make_engine(spec,
                                                                                   settings)))
        self._loops: dict[ModelRunner, list[asyncio.Task]] = {}  # commit first
        self._tg: asyncio.TaskGroup | None = None
        self.partials = attach_partials(self)  # streaming (gateway): engines publish deltas
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()  # serving: engines started, groups made, loops running
        self.draining = False
        self.failure: str | None = None  # why a crash stopped the worker
        self.metrics = WorkerMetrics.attach(self)
        self.metrics.health = self._health
        self.metrics.readiness = self._readiness
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None

    def request_stop(self) -> None:
        self._stop.set()

    def _health(self) -> tuple[bool, str]:
        """For /healthz (a thread of its own): does the event loop still turn?"""
        loop = self._loop
        if loop is None or loop.is_closed():
            return False, "the event loop is not running"
        turned = threading.Event()
        loop.call_soon_threadsafe(turned.set)
        if not turned.wait(5.0):
            return False, "the event loop has not turned for 5 s"
        return True, "ok"

    def _readiness(self) -> tuple[bool, str]:
        """For /readyz: take traffic only while serving (not while starting or draining)."""
        if self.draining:
            return False, "draining"
        if not self.ready.is_set():
            return False, "starting (engines loading)"
        return True, "serving"

    def crash(self, why: str) -> None:
        """Stop because something broke: drain, then `run` raises WorkerCrashedError."""
        if self.failure is None:
            self.failure = why
        self._stop.set()

    async def run(self, drain_timeout_s: float = 30.0) -> None:
        """Serve until `request_stop` or a crash; then stop reading and finish what is in
        flight.  What does not finish within `drain_timeout_s` stays pending in Redis, where
        another worker reclaims it after claim_idle_ms.

        Raises `ServerUnreachableError` when the server cannot be reached at start within
        `server_wait_s`, `FatalConfigError` for an engine that cannot start, and
        `WorkerCrashedError` after a crash.
        """
        self._loop = asyncio.get_running_loop()
        await self._wait_for_server()
        # Registered models run their versions' runners; a settings model that has an entry
        # in the model registry has no unversioned runner (the canary guard moves what its
        # old streams hold to the stable version).
        await self.versions.load()
        for runner in self.runners:
            await runner.engine.start()
            await with_retries(runner.ensure_groups, f"creating the groups of {runner.model}")
        await self.versions.start_all()
        await with_retries(self._load_cancellations, "loading cancellation marks")
        self._tenants = TableCache(self.redis, refresh_s=0)
        await with_retries(self._refresh_tenants, "reading the tenant registry")
        try:
            with quiet_gc():
                await self._serve(drain_timeout_s)
        finally:
            await self.versions.close()
            for runner in self.runners:
                await runner.engine.stop()
            await self._beat(alive=False)
        if self.failure is not None:
            raise WorkerCrashedError(f"worker {self.worker_id} stopped: {self.failure}")

    async def _wait_for_server(self) -> None:
        wait_s = self.settings.server_wait_s
        deadline = time.monotonic() + wait_s
        backoff_s = 0.1
        while True:
            try:
                return await check_server(self.redis)
            except TRANSIENT as exc:
                if time.monotonic() + backoff_s > deadline:
                    raise ServerUnreachableError(
                        f"the server is unreachable after {wait_s:g}s "
                        f"(AGENTFLEET_SERVER_WAIT_S): {exc}") from exc
                log.warning("checking the server failed (%s); retrying in %.1fs", exc,
                            backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)

    def spawn(self, name: str, loop: Callable[[], Awaitable[None]]) -> asyncio.Task:
        """Run a loop (or a one-off job) supervised in the serving task group."""
        return self._tg.create_task(self._guard(name, loop), name=name)

    def start_loops(self, runner: ModelRunner) -> None:
        """A runner's loops: commit and move (drained apart: what the commits put in the
        outbox is moved before exit), renew, its side loops, its engine's watch."""
        name = runner.model + (f"@{runner.route_version}" if runner.route_version else "")
        self._loops[runner] = [
            self.spawn(f"commit {name}", runner.committer.commit_loop),
            self.spawn(f"move {name}", runner.mover.move_loop),
            self.spawn(f"renew {name}", runner.housekeeping.renew_loop),
            *(self.spawn(f"{loop.__name__} {name}", loop) for loop in runner.loops()),
            self.spawn(f"engine watch {name}", self._watch_engine(runner))]

    async def stop_runner(self, runner: ModelRunner) -> None:
        """Retire one runner while the worker serves on: stop reading, let what it read
        finish and commit, stop its loops and its engine."""
        runner.stop_reading()
        loops = self._loops.pop(runner, [])
        drained, others = loops[:DRAINED], loops[DRAINED:]
        if drained:
            await asyncio.wait(drained)
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        if runner in self.runners:
            self.runners.remove(runner)
        self.metrics.remove_runner(runner)
        await runner.engine.stop()

    async def _serve(self, drain_timeout_s: float) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            for runner in self.runners:
                self.start_loops(runner)
            side = [self.spawn("heartbeat", self._heartbeat),
                    self.spawn("tenants", self._follow_tenants),
                    self.spawn("models", self.versions.follow),
                    self.spawn("kpi", lambda: self.metrics.kpi_loop(self.redis)),
                    self.spawn("cancellations", self._listen_cancellations)]
            side += [self.spawn(name, loop) for name, loop in self.side_loops]
            side += self.versions.share_loops()
            self.ready.set()
            log.info("worker %s serving %s", self.worker_id, self.versions.serving())
            await self._stop.wait()
            self.draining = True
            log.info("worker %s draining", self.worker_id)
            for runner in self.runners:
                runner.stop_reading()
            commits = [t for loops in self._loops.values() for t in loops[:DRAINED]]
            pending: set[asyncio.Task] = set()
            if commits:
                _, pending = await asyncio.wait(commits, timeout=drain_timeout_s)
            if pending:  # what is left stays pending in Redis, claimable by another worker
                log.warning("worker %s: drain deadline passed with %d tasks in flight",
                            self.worker_id, sum(r.busy for r in self.runners))
            others = [t for loops in self._loops.values() for t in loops[DRAINED:]]
            for task in [*pending, *others, *side, *self.versions.jobs]:
                task.cancel()

    async def _guard(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run one loop; an error it did not handle is logged with its traceback (and sent
        to Sentry by the log handler) and stops the worker, never ending the loop silently."""
        try:
            await loop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("worker %s: loop %r failed; draining and exiting", self.worker_id,
                          name)
            self.crash(f"loop {name!r} failed: {type(exc).__name__}: {exc}")

    def _watch_engine(self, runner: ModelRunner) -> Callable[[], Awaitable[None]]:
        async def watch() -> None:
            await runner.engine_dead.wait()
            name = runner.model + (f"@{runner.route_version}" if runner.route_version else "")
            log.error("worker %s: the engine of %s died; stopping (its tasks will be retried)",
                      self.worker_id, name)
            self.crash(f"the engine of {name} died")

        watch.__name__ = "engine_watch"
        return watch

    async def _listen_cancellations(self) -> None:
        """Cancellation marks: loaded at (re)connect, then pushed over pub/sub."""
        backoff_s = 0.1
        while not self.draining:
            served = list(self.served)  # a model registered later: subscribed again below
            by_channel = {keys.cancel_channel(model).encode(): model for model in served}
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(*by_channel)
                await self._load_cancellations()  # again: no mark falls between the two
                backoff_s = 0.1
                while not self.draining and served == self.served:
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is not None and msg["channel"] in by_channel:
                        model = by_channel[msg["channel"]]
                        for runner in self.runners:  # every version of the model
                            if runner.model == model:
                                runner.cancel(msg["data"].decode(),
                                              time.time() + self.settings.cancel_ttl_s)
            except TRANSIENT as exc:
                log.warning("worker %s: cancellation listener lost its connection (%s)",
                            self.worker_id, exc)
            finally:
                await pubsub.aclose()
            if served != self.served:
                continue
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 5.0)

    async def _load_cancellations(self, runners: list[ModelRunner] | None = None) -> None:
        for runner in self.runners if runners is None else runners:
            marks = await self.redis.zrangebyscore(keys.cancelled_key(runner.model),
                                                   time.time(), "+inf", withscores=True)
            for task_id, until in marks:
                runner.cancel(task_id.decode(), until)

    async def _follow_tenants(self, every_s: float = 1.0) -> None:
        """Registry changes reach the runners within a second, without a restart."""
        while not self.draining:
            await asyncio.sleep(every_s)
            try:
                await self._refresh_tenants()
            except (*TRANSIENT, BrokerError) as exc:
                log.warning("worker %s: reading the tenant registry failed (%s)",
                            self.worker_id, exc)

    async def _refresh_tenants(self) -> None:
        table = await self._tenants.current()
        async with self.redis.pipeline(transaction=False) as pipe:
            for runner in self.runners:
                pipe.hvals(keys.workers_key(runner.model))
            beats = await pipe.execute()
        now = time.time()
        for runner, seen in zip(self.runners, beats):
            live = keys.live_workers(seen, now, 3 * HEARTBEAT_S) or 1
            if table is not runner.tenants or live != runner.live_workers:
                runner.set_tenants(table, live)

    async def _heartbeat(self, every_s: float = HEARTBEAT_S) -> None:
        """Tell SREs, producers and `agentfleet status` which workers serve which model."""
        while not self.draining:
            await self._beat(alive=True)
            await asyncio.sleep(every_s)

    async def _beat(self, *, alive: bool) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for model in self.served:
                    if alive:
                        pipe.hset(keys.workers_key(model), self.worker_id, time.time())
                    else:
                        pipe.hdel(keys.workers_key(model), self.worker_id)
                if not alive:
                    self.versions.forget_load(pipe)
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


async def check_server(redis: aioredis.Redis) -> None:
    """Refuse a server (any primary of a cluster) that may evict keys: an evicted task or
    result is a lost one."""
    for info in await server_infos(redis, "memory"):
        policy = info.get("maxmemory_policy", "noeviction")
        if policy != "noeviction":
            raise EvictingServerError(
                f"the server's maxmemory-policy is {policy!r}: it may evict queued tasks and "
                f"results; set it to 'noeviction'")


def make_engine(spec: ModelSpec, settings: Settings) -> Engine:
    """The engine named by `settings.engine` for one model (or model version: `spec.version`
    is then its registered name, which its results carry)."""
    if settings.engine == "fake":
        from agentfleet.workers.fake_engine import FakeEngine

        # The test double's knobs ride in engine_args (fake_delay_s, fake_slots,
        # fake_error_rate, fake_sleep_mode, fake_wake_s), else the settings' (bench.headroom):
        # fleets on it need no vLLM.
        args = spec.engine_args
        slots = args.get("fake_slots", settings.fake_slots)
        return FakeEngine(model_version=spec.version or "fake-1",
                          delay_s=float(args.get("fake_delay_s", settings.fake_delay_s)),
                          slots=int(slots) if slots else None,
                          spare_slots=math.ceil(int(slots) * spec.spare_share) if slots else 0,
                          error_rate=float(args.get("fake_error_rate", 0.0)),
                          sleep_mode=bool(args.get("fake_sleep_mode", False)) and
                          bool(spec.sleep_group),
                          wake_s=float(args.get("fake_wake_s", 0.0)))
    from agentfleet.workers.models import resolve_model_path

    path = resolve_model_path(spec, settings.home_path)  # before vLLM's slow import
    try:
        from agentfleet.workers.vllm_engine import VllmEngine
    except ImportError as exc:
        raise FatalConfigError(f"AGENTFLEET_ENGINE=vllm needs vLLM ({exc}): install the "
                               f"`worker` (GPU) or `cpu` extra") from exc
    return VllmEngine(spec, path)
