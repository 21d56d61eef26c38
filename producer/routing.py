"""Routing at submit: which version of a logical model a task runs on, within its SLA class.

The producer asks `Router.route` only for tasks that need it (their model is registered, or
they pin a version, name an SLA class or a template); a fleet without a model registry keeps
the plain path.  For a routed task:

  1. the version: the one it pins (refused with `UnknownVersionError`, or
     `RetiredVersionError` when it serves nothing any more), else by weight, sticky per
     correlation id (schemas/registry.py); a follow-up carries its parent's;
  2. its template rendered with its variables (the version the model version names);
  3. its bounds checked against the model (the tightest of its serving versions);
  4. its SLA class: when the version's estimated queue wait would pass the class's budget,
     the task goes to the model's declared fallback (another version or model, if that one
     is within the budget), else it is refused with `SlaExceededError`: never silently late.

The estimate (docs/versions.md says how good it is): the tasks ahead of a new one are the
lag and pending entries of the version's streams (the interactive lane; both lanes for a
bulk-job task), read at most every `sla_refresh_s` (two round trips), plus what this producer
routed there since, less what the version completed meanwhile; the version runs `slots`
tasks at once and completes `rate` a second (both reported by its workers each second,
keys.version_load: the engine slots over the mean engine seconds per task, Little's law for a
full engine, so that an idle version's capacity is not taken for zero; the measured
completions per second until a task has finished).
wait = (ahead - slots + 1) / rate, 0 when a slot is free, unknown (refused) when nothing
serves the version or none of its tasks has finished yet and its slots are full.  A task is
routed to a version when wait + one service time (a task starts when a running one ends) is
within 90% of its budget (the inputs are up to sla_refresh_s old and noisy).
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import NamedTuple

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from agentfleet.producer.enqueue import Lane
from agentfleet.producer.templates import render
from agentfleet.schemas import keys
from agentfleet.schemas.errors import (
    BrokerError,
    RetiredVersionError,
    SlaExceededError,
    UnknownVersionError,
    ValidationError,
)
from agentfleet.schemas.registry import (
    SERVING,
    SLA_CLASSES,
    ModelTable,
    parse_target,
    route_point,
)
from agentfleet.schemas.settings import Settings
from agentfleet.schemas.validate import TaskChecker
from agentfleet.schemas.wire import ModelEntry, Task

LOAD_FRESH_S = 5.0  # a worker's load report older than this is from a worker gone
# Share of a budget the estimate may fill: its inputs are up to sla_refresh_s old and the
# measured speeds are noisy; bench.routing's p99 stays within the budget with this margin.
BUDGET_SHARE = 0.9
SHADOW_TENANT = "shadow"  # shadow copies run in a tenant of their own (its weight, its quota)


class VersionLoad(NamedTuple):
    """A version's serving workers together, from their load reports."""

    rate: float  # completions per second it sustains full: slots / service time
    slots: int  # requests its engines run at once
    workers: int
    service_s: float  # mean engine seconds per task lately (0: none finished yet)


def parse_load(raw: dict) -> dict[str, VersionLoad]:
    """version -> its VersionLoad from `keys.version_load`'s fresh reports.  Each worker's
    rate is its engine slots over its mean service time (what it completes per second when
    full), so that an idle version's capacity is not taken for zero; its measured completions
    per second until one of its tasks has finished."""
    now = time.time()
    out: dict[str, list] = {}
    for field, value in raw.items():
        version, _, _ = field.decode().rpartition("|")
        at, rate, slots, service_s, state = value.decode().split(" ", 4)
        if now - float(at) > LOAD_FRESH_S or state != "serving":
            continue
        service, n = float(service_s), int(slots)
        got = out.setdefault(version, [0.0, 0, 0, 0.0])
        # Little's law for a full engine: its slots over the time each task spends in it
        # (which includes vLLM's own waiting when the KV cache bounds the batch below its
        # slots); the measured rate only until a task has finished.
        got[0] += n / service if service > 0 else float(rate)
        got[1] += n
        got[2] += 1
        got[3] = max(got[3], service)
    return {v: VersionLoad(*got) for v, got in out.items()}


class _Estimate:
    __slots__ = ("at", "ahead", "added", "rate", "slots", "workers", "service_s", "lock")

    def __init__(self) -> None:
        self.at = -math.inf  # monotonic time of the last read
        self.ahead = 0
        self.added = 0  # routed here by this producer since the read
        self.rate = 0.0
        self.slots = 0
        self.workers = 0
        self.service_s = 0.0
        self.lock = asyncio.Lock()

    def wait_s(self, now: float) -> float:
        ahead = max(0.0, self.ahead + self.added - self.rate * (now - self.at))
        if ahead < self.slots:
            return 0.0
        if self.rate <= 0:
            return math.inf
        return (ahead - self.slots + 1) / self.rate


class Router:
    """Versions, templates and SLA classes at submit (see the module's docstring)."""

    def __init__(self, redis: aioredis.Redis, settings: Settings):
        self.redis = redis
        self.settings = settings
        self._estimates: dict[tuple[str, str, bool], _Estimate] = {}
        self._checkers: dict[int, TaskChecker] = {}
        self.spilled = 0  # tasks sent to a fallback
        self.refused = 0  # tasks refused over their budget

    def checker(self, table: ModelTable) -> TaskChecker:
        """A task checker over the settings' models and the registry's (one per table)."""
        found = self._checkers.get(table.version)
        if found is None or found.settings is not table.settings_with(self.settings):
            self._checkers = {table.version: TaskChecker(table.settings_with(self.settings))}
            found = self._checkers[table.version]
        return found

    async def route(self, task: Task, table: ModelTable, *, sla_checked: bool = True) -> Lane:
        """Pick the task's version, render its template, check it, apply its SLA class; the
        task is changed in place (version, prompt, model when it spills) and its lane is
        returned.  Raises a `ValidationError` subclass or `SlaExceededError`."""
        entry = table.entries.get(task.model)
        task.version = self._version(task, entry, table)
        if task.template:
            self._render(task, table)
        self.checker(table)(task)
        if sla_checked and task.sla:
            await self._apply_sla(task, entry, table)
        return Lane(task.model, "b" if task.batch_id else "i", task.tenant, task.version)

    def shadow(self, task: Task, table: ModelTable) -> Task | None:
        """A copy of `task` for the canary's shadow comparison, or None: a share (the
        canary's `shadow`) of the tasks routed to another version, by task id hash, run on
        the canary in the bulk lane (spare capacity, lowest priority), with no reply and no
        follow-ups; its result goes to the bulk job "shadow-<version>" for comparison."""
        entry = table.entries.get(task.model)
        plan = entry.canary if entry is not None else None
        if (plan is None or plan.status != "running" or not plan.shadow
                or task.version == plan.version or task.batch_id or task.parent_id):
            return None
        if route_point(task.id + "~shadow") >= plan.shadow:
            return None
        return msgspec.structs.replace(
            task, id=task.id + "~shadow", correlation_id=task.correlation_id + "~shadow",
            version=plan.version, tenant=SHADOW_TENANT, reply_to="", followups=[],
            idempotency_key=None, batch_id=f"shadow-{plan.version}", priority=0, sla="",
            metadata={**task.metadata, "shadow_of": task.id})

    def _version(self, task: Task, entry: ModelEntry | None, table: ModelTable) -> str:
        if task.version:
            if entry is None or task.version not in entry.versions:
                serving = table.serving(task.model)
                raise UnknownVersionError("version", f"model {task.model!r} has no version "
                                          f"{task.version!r}; it serves {serving}",
                                          limit=serving, value=task.version)
            if entry.versions[task.version].state not in SERVING:
                serving = table.serving(task.model)
                state = entry.versions[task.version].state.value
                raise RetiredVersionError("version", f"{task.model}@{task.version} is {state}: "
                                          f"nothing runs on it any more; it serves {serving}",
                                          limit=serving, value=task.version)
            return task.version
        if entry is None:
            return ""
        return table.pick(task.model, task.correlation_id)

    @staticmethod
    def _render(task: Task, table: ModelTable) -> None:
        found = table.template(task.template, task.model, task.version)
        if found is None:
            raise ValidationError("template", f"no template {task.template!r} (agentfleet "
                                  "templates list)", value=task.template)
        if task.prompt is not None or task.messages is not None:
            raise ValidationError("template", "give a template or a prompt/messages, not both")
        task.prompt, task.messages = render(found, task.variables)
        task.template = found.ref
        task.variables = {}  # rendered once: the variables do not travel

    async def _apply_sla(self, task: Task, entry: ModelEntry | None, table: ModelTable) -> None:
        if task.sla not in SLA_CLASSES:
            raise ValidationError("sla", f"{task.sla!r} is not one of {list(SLA_CLASSES)}",
                                  limit=list(SLA_CLASSES), value=task.sla)
        budget = self.settings.sla_budget_s(task.sla)
        if entry is not None and task.sla in entry.sla_budget_s:
            budget = entry.sla_budget_s[task.sla]
        if not budget:
            return
        bulk = bool(task.batch_id)
        wait = await self.wait_s(task.model, task.version, bulk)
        if self._within(wait, budget, task.model, task.version, bulk):
            self._take(task.model, task.version, bulk)
            return
        where = (task.model, task.version)
        if entry is None or not entry.fallback:
            self.refused += 1
            raise SlaExceededError(task.model, task.version, task.sla, budget, wait,
                                   "no fallback is declared")
        fb_model, fb_version = parse_target(entry.fallback, task.model)
        fb_entry = table.entries.get(fb_model)
        if not fb_version and fb_entry is not None:
            fb_version = table.pick(fb_model, task.correlation_id)
        if fb_entry is not None and (fb_version not in fb_entry.versions or
                                     fb_entry.versions[fb_version].state not in SERVING):
            self.refused += 1
            raise SlaExceededError(*where, task.sla, budget, wait,
                                   f"its fallback {entry.fallback} serves nothing")
        fb_wait = await self.wait_s(fb_model, fb_version, bulk)
        if not self._within(fb_wait, budget, fb_model, fb_version, bulk):
            self.refused += 1
            raise SlaExceededError(*where, task.sla, budget, wait,
                                   f"its fallback {fb_model}@{fb_version or '-'} is over "
                                   f"budget too ({fb_wait:.2f}s)")
        if fb_model != task.model:
            moved = msgspec.structs.replace(task, model=fb_model, version=fb_version)
            try:
                self.checker(table)(moved)
            except ValidationError as exc:
                self.refused += 1
                raise SlaExceededError(*where, task.sla, budget, wait,
                                       f"its fallback {fb_model} cannot take it: {exc}") from exc
        task.model, task.version = fb_model, fb_version
        self.spilled += 1
        self._take(fb_model, fb_version, bulk)

    def _margin(self, model: str, version: str, bulk: bool) -> float:
        return self._estimates[(model, version, bulk)].service_s

    def _within(self, wait_s: float, budget_s: float, model: str, version: str,
                bulk: bool) -> bool:
        """Whether a task routed now starts within its budget: a task starts when a running
        one ends, up to a service time after the estimate, which fills at most
        BUDGET_SHARE of the budget."""
        return wait_s + self._margin(model, version, bulk) <= budget_s * BUDGET_SHARE

    def _take(self, model: str, version: str, bulk: bool) -> None:
        self._estimates[(model, version, bulk)].added += 1

    async def wait_s(self, model: str, version: str, bulk: bool = False) -> float:
        """The estimated queue wait of a new task on a version (see the module docstring)."""
        est = self._estimates.get((model, version, bulk))
        if est is None:
            est = self._estimates[(model, version, bulk)] = _Estimate()
        if time.monotonic() - est.at >= self.settings.sla_refresh_s:
            async with est.lock:  # one read for all the submits waiting on it
                if time.monotonic() - est.at >= self.settings.sla_refresh_s:
                    await self._refresh(est, model, version, bulk)
        return est.wait_s(time.monotonic())

    async def _refresh(self, est: _Estimate, model: str, version: str, bulk: bool) -> None:
        lanes = ("i", "b") if bulk else ("i",)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for lane in lanes:
                    pipe.zrange(keys.tenant_lanes(model, lane, version), 0, -1)
                pipe.hgetall(keys.version_load(model))
                *tenant_sets, load = await pipe.execute()
            streams = [keys.lane_stream(model, lane, keys.DEFAULT_TENANT, version)
                       for lane in lanes]
            for lane, tenants in zip(lanes, tenant_sets):
                streams += [keys.lane_stream(model, lane, t.decode(), version)
                            for t in tenants if t.decode() != keys.DEFAULT_TENANT]
            async with self.redis.pipeline(transaction=False) as pipe:
                for stream in streams:
                    pipe.xinfo_groups(stream)
                groups = await pipe.execute(raise_on_error=False)
        except RedisError as exc:
            raise BrokerError(f"reading the queue of {model}@{version} failed: {exc}") from exc
        ahead = 0
        for reply in groups:
            if isinstance(reply, Exception):  # no stream yet: nothing queued there
                continue
            for g in reply:
                name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
                if name == keys.GROUP:
                    ahead += int(g.get("lag") or 0) + int(g["pending"])
        found = parse_load(load).get(version, VersionLoad(0.0, 0, 0, 0.0))
        est.at = time.monotonic()
        est.ahead, est.added = ahead, 0
        est.rate, est.slots, est.workers, est.service_s = found


__all__ = ["Router", "SHADOW_TENANT", "parse_load"]
