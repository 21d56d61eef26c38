"""A worker's runners of registered model versions, kept in step with the model registry.

The worker serves logical models (`Worker.served`).  For one without a registry entry it runs
one runner on the model's unversioned streams, as a fleet without a registry always has; for
a registered one, a runner per version that serves (active or canary, whatever its weight:
a version at weight 0 is a standby for a fast rollback and takes pinned tasks), each with its
own engine (`EngineFactory`, from the version's ModelSpec: schemas/registry.py) and streams.

Once a second `Versions.follow` reads the registry's version counter (one GET) and, when it
moved, reconciles:
  - a version that now serves: its engine starts in the background (minutes for vLLM; the
    worker serves on meanwhile), then its groups, its loops; an engine that cannot start is
    logged and tried again after `RETRY_START_S`, without stopping the worker;
  - a runner whose version stopped serving (retired, rolled back), or whose model got an entry
    (its unversioned runner): it stops reading, finishes and commits what it read, its loops
    and engine stop.  Its queued tasks are moved to the stable version by the canary guard's
    drain (ops/canary.py): nothing is lost, nothing runs twice.
  - every runner gets the new table (follow-ups' and retries' versions) and checks tasks
    against the registered models' limits.
It also reports each runner's load once a second (`keys.version_load`: completions per
second, engine slots, mean engine seconds per task), which producers divide a version's
backlog by to estimate its queue wait (producer/routing.py).  Engines of one `sleep_group` share a GPU and
take turns (workers/sleep.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec
from redis.exceptions import RedisError

from agentfleet.schemas import keys
from agentfleet.schemas.errors import BrokerError, FatalConfigError
from agentfleet.schemas.registry import SERVING, ModelTable, TableCache
from agentfleet.schemas.settings import ModelSpec
from agentfleet.workers.engine import Engine
from agentfleet.workers.runner import ModelRunner
from agentfleet.workers.sleep import GpuShare
from agentfleet.workers.transient import TRANSIENT, with_retries

if TYPE_CHECKING:
    from agentfleet.workers.worker import Worker

log = logging.getLogger("agentfleet.worker")

EngineFactory = Callable[[ModelSpec], Engine]
RETRY_START_S = 60.0  # an engine that failed to start is tried again after this long
RATE_SMOOTHING = 0.3  # weight of the last second in the rate and service time (about 3 s)


class _Load:
    """A runner's completion rate and mean service time, sampled once a second."""

    __slots__ = ("at", "committed", "rate", "busy_s", "ends", "service_s")

    def __init__(self, runner: ModelRunner):
        self.at = time.monotonic()
        self.committed = _ends(runner)
        self.rate = 0.0
        self.busy_s, self.ends = runner.engine_busy_s, runner.engine_ends
        self.service_s = 0.0  # kept while idle: the engine's speed, not the demand

    def sample(self, runner: ModelRunner) -> None:
        now = time.monotonic()
        dt = now - self.at
        if dt <= 0:
            return
        committed = _ends(runner)
        self.rate += RATE_SMOOTHING * ((committed - self.committed) / dt - self.rate)
        ends = runner.engine_ends - self.ends
        if ends > 0:
            service_s = (runner.engine_busy_s - self.busy_s) / ends
            self.service_s = service_s if not self.service_s else \
                self.service_s + RATE_SMOOTHING * (service_s - self.service_s)
        self.at, self.committed = now, committed
        self.busy_s, self.ends = runner.engine_busy_s, runner.engine_ends


def _ends(runner: ModelRunner) -> int:
    return runner.stats.committed + runner.stats.retried  # its engine's ends


class Versions:
    """The registry-driven part of a worker (see the module docstring)."""

    def __init__(self, worker: Worker, factory: EngineFactory):
        self.worker = worker
        self.factory = factory
        self.cache = TableCache(worker.redis, refresh_s=0)
        self.table = ModelTable()
        self.shares: dict[str, GpuShare] = {}
        self.jobs: set[asyncio.Task] = set()  # starts and stops in progress
        self._busy: set[tuple[str, str]] = set()  # keys being started or stopped
        self._failed: dict[tuple[str, str], float] = {}  # key -> monotonic time to retry
        self._loads: dict[ModelRunner, _Load] = {}
        self._share_loops: list[asyncio.Task] = []

    # ---- start -----------------------------------------------------------------------------

    async def load(self) -> None:
        """Read the registry before anything starts; drop the unversioned runners of models
        it has entries for (never started)."""
        w = self.worker
        self.table = await with_retries(self.cache.current, "reading the model registry")
        for runner in [r for r in w.runners if r.model in self.table.entries]:
            w.runners.remove(runner)
            w.metrics.remove_runner(runner)
        self._apply_table(w.runners)

    async def start_all(self) -> None:
        """Start the engines of the versions the worker serves, one after another."""
        for key in sorted(self._wanted() - self._running()):
            runner = await self._make(*key)
            if runner is not None:
                self.worker.runners.append(runner)

    def serving(self) -> list[str]:
        return [r.model + (f"@{r.route_version}" if r.route_version else "")
                for r in self.worker.runners]

    def share_loops(self) -> list[asyncio.Task]:
        self._share_loops = [self.worker.spawn(f"sleep group {name}", share.idle_loop)
                             for name, share in self.shares.items()]
        return self._share_loops

    # ---- follow ----------------------------------------------------------------------------

    async def follow(self, every_s: float = 1.0) -> None:
        """Reconcile with the registry when it changes; report the runners' load."""
        w = self.worker
        # The first report at once: with affinity on, the other workers count this one live
        # from its report (worker._serving), and a report a second late let one of them
        # take this worker's partitions for that second (tests/test_affinity.py).
        await self._report_load()
        while not w.draining:
            await asyncio.sleep(every_s)
            try:
                table = await self.cache.current()
            except (*TRANSIENT, BrokerError) as exc:
                log.warning("worker %s: reading the model registry failed (%s)", w.worker_id,
                            exc)
                table = self.table
            if w.draining:
                return
            if table is not self.table:
                self.table = table
                self._apply_table(w.runners)
            self._reconcile()
            await self._report_load()

    def _wanted(self) -> set[tuple[str, str]]:
        if self.worker.all_models:
            for model in sorted(self.table.entries):
                if model not in self.worker.served:
                    self.worker.served.append(model)
        out = set()
        for model in self.worker.served:
            entry = self.table.entries.get(model)
            if entry is None:
                out.add((model, ""))
                continue
            out.update((model, v.version) for v in entry.versions.values()
                       if v.state in SERVING)
        return out

    def _running(self) -> set[tuple[str, str]]:
        return {(r.model, r.route_version) for r in self.worker.runners}

    def _reconcile(self) -> None:
        wanted, now = self._wanted(), time.monotonic()
        for runner in list(self.worker.runners):
            key = (runner.model, runner.route_version)
            if key not in wanted and key not in self._busy:
                self._busy.add(key)
                self._job(f"retire {key[0]}@{key[1]}", self._retire(runner, key))
        for key in sorted(wanted - self._running() - self._busy):
            if key[1] and now < self._failed.get(key, 0.0):
                continue
            if not key[1] and key[0] not in self.worker.settings.models:
                continue  # a model only the registry knew, whose entry went: nothing to run
            self._busy.add(key)
            self._job(f"start {key[0]}@{key[1]}", self._start(key))

    def _job(self, name: str, job) -> None:
        async def run() -> None:
            await job

        task = self.worker.spawn(name, run)
        self.jobs.add(task)
        task.add_done_callback(self.jobs.discard)

    async def _start(self, key: tuple[str, str]) -> None:
        try:
            runner = await self._make(*key)
            if runner is None or self.worker.draining:
                if runner is not None:
                    await runner.engine.stop()
                return
            await with_retries(lambda: self.worker._load_cancellations([runner]),
                               "loading cancellation marks")
            self.worker.runners.append(runner)
            self.worker.start_loops(runner)
            log.info("worker %s: serving %s@%s", self.worker.worker_id, *key)
        finally:
            self._busy.discard(key)

    async def _retire(self, runner: ModelRunner, key: tuple[str, str]) -> None:
        try:
            log.info("worker %s: %s@%s no longer serves: draining its runner",
                     self.worker.worker_id, *key)
            await self.worker.stop_runner(runner)
            self._loads.pop(runner, None)
            if runner.sleeper is not None:
                runner.sleeper.share.leave(runner.sleeper)
            try:
                await self.worker.redis.hdel(keys.version_load(runner.model),
                                             f"{runner.route_version}|{self.worker.worker_id}")
            except RedisError as exc:
                log.warning("worker %s: removing a load report failed (%s)",
                            self.worker.worker_id, exc)
            log.info("worker %s: %s@%s drained and stopped", self.worker.worker_id, *key)
        finally:
            self._busy.discard(key)

    async def _make(self, model: str, version: str) -> ModelRunner | None:
        """A started runner of one version (None if its engine cannot start: logged, tried
        again later); an unversioned one from the settings' model."""
        w = self.worker
        settings = w.settings
        try:
            if version:
                spec = self.table.spec(model, version, settings.models.get(model))
            else:
                spec = settings.models[model]
            engine = self.factory(spec)
        except (FatalConfigError, ValueError, KeyError) as exc:
            self._failed[(model, version)] = time.monotonic() + RETRY_START_S
            log.error("worker %s: cannot serve %s@%s: %s (tried again in %.0f s)",
                      w.worker_id, model, version, exc, RETRY_START_S)
            return None
        runner = ModelRunner(spec=spec, engine=engine, redis=w.redis, settings=settings,
                             worker_id=w.worker_id, route_version=version)
        runner.metrics = w.metrics.add_runner(runner, engine)
        if hasattr(engine, "partials"):  # streaming tasks publish deltas (workers/streaming.py)
            engine.partials = w.partials
        self._apply_table([runner])
        try:
            if spec.sleep_group and getattr(engine, "can_sleep", False):
                share = self.shares.get(spec.sleep_group)
                if share is None:
                    share = self.shares[spec.sleep_group] = GpuShare(
                        spec.sleep_group, turn_s=settings.sleep_turn_s,
                        idle_s=settings.sleep_idle_s)
                    if w._tg is not None:  # serving already: its idle loop starts now
                        self._share_loops.append(w.spawn(f"sleep group {share.name}",
                                                         share.idle_loop))
                await share.start(share.join(runner), engine.start)
            else:
                await engine.start()
        except FatalConfigError as exc:
            self._failed[(model, version)] = time.monotonic() + RETRY_START_S
            w.metrics.remove_runner(runner)
            if runner.sleeper is not None:
                runner.sleeper.share.leave(runner.sleeper)
            log.error("worker %s: the engine of %s@%s cannot start: %s (tried again in "
                      "%.0f s)", w.worker_id, model, version, exc, RETRY_START_S)
            return None
        self._failed.pop((model, version), None)
        await with_retries(runner.ensure_groups, f"creating the groups of {model}@{version}")
        return runner

    def _apply_table(self, runners: list[ModelRunner]) -> None:
        """The registry's routing and limits, for runners new or old."""
        settings = self.table.settings_with(self.worker.settings)
        for runner in runners:
            runner.registry = self.table
            mine = settings
            if runner.route_version and runner.model in self.table.entries:
                mine = msgspec.structs.replace(
                    settings, models={**settings.models, runner.model: runner.spec})
            if mine is not runner.settings:
                runner.settings = mine
                runner.outcomes.settings = mine
                runner.reader.use_settings(mine)

    # ---- load reports ----------------------------------------------------------------------

    async def _report_load(self) -> None:
        w = self.worker
        now = time.time()
        try:
            async with w.redis.pipeline(transaction=False) as pipe:
                for runner in w.runners:
                    load = self._loads.get(runner)
                    if load is None:
                        load = self._loads[runner] = _Load(runner)
                    load.sample(runner)
                    slots = runner.engine.slots or w.settings.max_inflight
                    state = "draining" if runner.stopping else "serving"
                    pipe.hset(keys.version_load(runner.model),
                              f"{runner.route_version}|{w.worker_id}",
                              f"{now:.3f} {load.rate:.3f} {slots} {load.service_s:.4f} "
                              f"{state}")
                await pipe.execute()
        except (*TRANSIENT, RedisError) as exc:
            log.warning("worker %s: reporting load failed (%s)", w.worker_id, exc)

    def forget_load(self, pipe) -> None:
        """Queue the removal of this worker's load reports (it is stopping)."""
        for runner in self.worker.runners:
            pipe.hdel(keys.version_load(runner.model),
                      f"{runner.route_version}|{self.worker.worker_id}")

    async def close(self) -> None:
        for share in self.shares.values():
            await share.close()
