"""The model registry: logical models, their versions, weights, states, fallbacks and canaries.

    from agentfleet.producer.models import ModelRegistry
    registry = ModelRegistry(redis)
    await registry.register("summariser", "v2", path="/models/sum-v2",
                            engine_args={"max_num_seqs": 256}, who="ops", why="new weights")
    await registry.set_weights("summariser", {"v1": 90, "v2": 10}, who="ops")
    await registry.promote("summariser", "v2")
    await registry.retire("summariser", "v1")

Entries live in one hash (`keys.models()`, a msgpack ModelEntry per logical model); every
change bumps `keys.models_version()` and appends an `AuditEntry` (kind "model", "route" or
"canary": who, when, before, after, why) to `keys.audit_log()`, in one transaction, retried
when another change raced in (WATCH on the version).  Producers, workers, the exporter and the
CLI keep a `ModelTable` through `schemas.registry.TableCache`: changes reach running processes
within a second, without a restart.  Bad input is refused before anything is stored: a
directory without config.json, engine arguments vLLM refuses (checked with vLLM's own engine
configuration, as a worker's start would), weights that add up to zero.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError, WatchError

from agentfleet.producer.tenants import append_audit
from agentfleet.schemas import keys
from agentfleet.schemas.engine_args import check_engine_args
from agentfleet.schemas.errors import BrokerError, RegistryError, ValidationError
from agentfleet.schemas.registry import (
    MAX_WEIGHT,
    SERVING,
    SLA_CLASSES,
    ModelTable,
    check_model_name,
    check_version_name,
    check_weights,
    load_table,
    new_version,
    parse_guard,
    parse_target,
    serving_weights,
)
from agentfleet.schemas.settings import ModelSpec
from agentfleet.schemas.wire import (
    AuditEntry,
    CanaryPlan,
    ModelEntry,
    ModelVersion,
    VersionState,
    decode_model_entry,
    encode,
)

_RETRIES = 20  # a change that keeps losing the race for this long is reported, not looped

Change = Callable[[ModelEntry | None], tuple[ModelEntry, object, object]]


def _plain(value: object) -> object:
    return msgspec.to_builtins(value) if value is not None else None


class ModelRegistry:
    """Reads and changes the model registry; every change is audited."""

    def __init__(self, redis: aioredis.Redis):
        self.redis = redis

    async def table(self) -> ModelTable:
        return await load_table(self.redis)

    async def get(self, model: str) -> ModelEntry | None:
        raw = await self.redis.hget(keys.models(), model)
        return decode_model_entry(raw) if raw is not None else None

    # ---- versions -------------------------------------------------------------------------

    async def register(self, model: str, version: str, *, path: str,
                       engine_args: dict | None = None, templates: dict[str, int] | None = None,
                       weight: float | None = None, sleep_group: str = "", note: str = "",
                       base: ModelSpec | None = None, check_engine: bool = True,
                       who: str = "", why: str = "") -> ModelVersion:
        """Add a version to a logical model (the first one creates the model and becomes its
        stable version, with all the traffic).  A later version gets no traffic (weight 0)
        until `set_weights`, a canary or `promote`, unless `weight` says otherwise.

        Checked first, each refusal a `ValidationError` naming the field: names, the weight,
        the directory (`path` must hold config.json), the templates named (they must exist),
        and, with `check_engine`, the engine arguments through vLLM (`base` is the model's
        ModelSpec from the settings, if any: the version's engine settings start from it).
        """
        check_model_name(model)
        check_version_name(version)
        directory = Path(path).expanduser()
        if not (directory / "config.json").is_file():
            raise ValidationError("path", f"{directory} is not a model directory (no "
                                  "config.json): the weights must be in place before the "
                                  "version is registered", value=str(directory))
        if weight is not None and not (math.isfinite(weight) and 0 <= weight <= MAX_WEIGHT):
            raise ValidationError("weight", f"{weight} is outside 0..{MAX_WEIGHT:g}",
                                  limit=(0, MAX_WEIGHT), value=weight)
        table = await self.table()
        for name, n in (templates or {}).items():
            if f"{name}@{n}" not in table.templates:
                raise ValidationError(f"templates.{name}", f"template {name}@{n} is not "
                                      "registered (agentfleet templates register)",
                                      value=f"{name}@{n}")
        entry = table.entries.get(model)
        if entry is not None and version in entry.versions:
            raise RegistryError(f"model {model} already has a version {version!r} "
                                f"({entry.versions[version].state.value}); versions are not "
                                "replaced: register a new name")
        first = entry is None
        made = new_version(version, path=str(directory), engine_args=engine_args,
                           templates=templates, sleep_group=sleep_group, note=note,
                           weight=(100.0 if first else 0.0) if weight is None else weight)
        probe = ModelTable({model: ModelEntry(name=model, stable=version,
                                              versions={version: made})})
        try:
            spec = probe.spec(model, version, base)
        except msgspec.ValidationError as exc:
            raise ValidationError("engine_args", f"{exc}", value=engine_args) from exc
        if check_engine:
            check_engine_args(spec, directory)

        def change(current: ModelEntry | None) -> tuple[ModelEntry, object, object]:
            if current is None:
                if made.weight <= 0:
                    raise ValidationError("weight", "the first version of a model must have "
                                          "a weight above 0", limit="> 0", value=made.weight)
                current = ModelEntry(name=model, stable=version)
            elif version in current.versions:
                raise RegistryError(f"model {model} already has a version {version!r}")
            versions = {**current.versions, version: made}
            after = msgspec.structs.replace(current, versions=versions)
            return after, None, _plain(made) | {"checked": check_engine}

        await self._change(model, "model", "register", change, who, why)
        return made

    async def set_weights(self, model: str, weights: dict[str, float], *, who: str = "",
                          why: str = "") -> dict[str, float]:
        """New traffic weights of serving versions (those not named keep theirs); their sum
        must stay above zero.  Refused while a canary runs: its guard owns the weights."""
        def change(entry: ModelEntry | None) -> tuple[ModelEntry, object, object]:
            entry = _need(model, entry)
            if entry.canary is not None and entry.canary.status == "running":
                raise RegistryError(f"model {model}: a canary of {entry.canary.version} is "
                                    "running; its guard owns the weights (agentfleet canary "
                                    "rollback|promote first)")
            versions = dict(entry.versions)
            for version, weight in weights.items():
                v = _version(entry, version)
                if v.state not in SERVING:
                    raise RegistryError(f"model {model}: version {version} is "
                                        f"{v.state.value}; it serves nothing (register a new "
                                        "version, or start a canary of it)")
                versions[version] = msgspec.structs.replace(v, weight=float(weight))
            after = msgspec.structs.replace(entry, versions=versions)
            check_weights(serving_weights(after))
            return after, serving_weights(entry), serving_weights(after)

        after = await self._change(model, "model", "set-weights", change, who, why)
        return serving_weights(after)

    async def promote(self, model: str, version: str, *, who: str = "",
                      why: str = "") -> ModelEntry:
        """Make `version` the stable one, with all the traffic; the others stay loaded at
        weight 0 (standby for a fast rollback: `set_weights`) until retired.  A running
        canary of it ends promoted."""
        def change(entry: ModelEntry | None) -> tuple[ModelEntry, object, object]:
            entry = _need(model, entry)
            target = _version(entry, version)
            if target.state not in SERVING:
                raise RegistryError(f"model {model}: version {version} is "
                                    f"{target.state.value}: start a canary of it first")
            after = _promoted(entry, version, "promoted by hand")
            return after, _routing(entry), _routing(after)

        return await self._change(model, "model", "promote", change, who, why)

    async def retire(self, model: str, version: str, *, who: str = "",
                     why: str = "") -> ModelEntry:
        """Stop serving `version`: nothing routes to it (tasks pinned to it are refused with
        `RetiredVersionError`), workers stop reading its streams and finish what they hold,
        its queued tasks move to the stable version, its engines stop.  The stable version
        cannot be retired: promote another first."""
        def change(entry: ModelEntry | None) -> tuple[ModelEntry, object, object]:
            entry = _need(model, entry)
            v = _version(entry, version)
            if version == entry.stable:
                raise RegistryError(f"model {model}: {version} is the stable version; "
                                    "promote another before retiring it")
            if v.state not in SERVING:
                raise RegistryError(f"model {model}: version {version} is already "
                                    f"{v.state.value}")
            versions = {**entry.versions,
                        version: msgspec.structs.replace(v, state=VersionState.RETIRED,
                                                         weight=0.0)}
            canary = entry.canary
            if canary is not None and canary.status == "running" and canary.version == version:
                canary = msgspec.structs.replace(canary, status="rolled_back",
                                                 reason="retired by hand")
                versions = _restore(versions, canary)
            after = msgspec.structs.replace(entry, versions=versions, canary=canary)
            check_weights(serving_weights(after))
            return after, {"state": v.state.value, "weight": v.weight}, {
                "state": VersionState.RETIRED.value, "weight": 0.0}

        return await self._change(model, "model", "retire", change, who, why)

    async def set_route(self, model: str, *, fallback: str | None = None,
                        budgets: dict[str, float] | None = None, who: str = "",
                        why: str = "") -> ModelEntry:
        """Where over-budget tasks go (`fallback`: "<model>", "<model>@<version>",
        "@<version>", or "" for refusing them), and per-class budgets overriding the fleet's
        (0: no budget; a class left out keeps the fleet's)."""
        if fallback:
            fb_model, _ = parse_target(fallback, model)
        for sla, budget in (budgets or {}).items():
            if sla not in SLA_CLASSES:
                raise ValidationError(f"sla_budget_s.{sla}", f"unknown SLA class; one of "
                                      f"{list(SLA_CLASSES)}", limit=list(SLA_CLASSES), value=sla)
            if not (math.isfinite(budget) and budget >= 0):
                raise ValidationError(f"sla_budget_s.{sla}", f"{budget} must be >= 0 seconds",
                                      limit=">= 0", value=budget)

        def change(entry: ModelEntry | None) -> tuple[ModelEntry, object, object]:
            entry = _need(model, entry)
            updates: dict[str, object] = {}
            if fallback is not None:
                if fallback and fb_model == model:
                    _, fb_version = parse_target(fallback, model)
                    if not fb_version or fb_version not in entry.versions:
                        raise ValidationError("fallback", f"{fallback!r}: a fallback within "
                                              f"{model} names one of its versions "
                                              f"{sorted(entry.versions)}", value=fallback)
                updates["fallback"] = fallback
            if budgets is not None:
                updates["sla_budget_s"] = {**entry.sla_budget_s, **budgets}
            after = msgspec.structs.replace(entry, **updates)
            return after, _route_view(entry), _route_view(after)

        return await self._change(model, "route", "set", change, who, why)

    # ---- canaries -------------------------------------------------------------------------

    async def start_canary(self, model: str, version: str, *, weight_pct: float, guard: str,
                           steps: list[float] | None = None, step_s: float = 300.0,
                           min_tasks: int = 50, shadow: float = 0.0, who: str = "",
                           why: str = "") -> CanaryPlan:
        """Route `weight_pct` percent of the model's traffic to `version` under `guard`;
        the guard (ops/canary.py, run by one worker or `agentfleet canary watch`) raises the
        share step by step (`steps`, percents, the last 100: promoted) while every condition
        holds, and rolls it back by itself on a breach."""
        parse_guard(guard)
        if not 0 < weight_pct < 100:
            raise ValidationError("weight", f"{weight_pct:g}% is outside (0, 100)",
                                  limit=(0, 100), value=weight_pct)
        plan_steps = sorted({float(s) for s in steps} if steps else
                            {weight_pct, *(s for s in (10.0, 25.0, 50.0) if s > weight_pct)})
        plan_steps = [s for s in plan_steps if s < 100] + [100.0]
        if any(not 0 < s <= 100 for s in plan_steps) or plan_steps[0] != weight_pct:
            raise ValidationError("steps", f"{plan_steps}: percents in (0, 100], starting "
                                  f"at the weight {weight_pct:g}", value=plan_steps)
        if not (step_s > 0 and min_tasks >= 1 and 0 <= shadow <= 1):
            raise ValidationError("step_s", "step_s > 0, min_tasks >= 1, shadow in [0, 1]",
                                  value=(step_s, min_tasks, shadow))
        now = time.time()

        def change(entry: ModelEntry | None) -> tuple[ModelEntry, object, object]:
            entry = _need(model, entry)
            v = _version(entry, version)
            if version == entry.stable:
                raise RegistryError(f"model {model}: {version} is the stable version")
            if entry.canary is not None and entry.canary.status == "running":
                raise RegistryError(f"model {model}: a canary of {entry.canary.version} is "
                                    "already running")
            if v.state is VersionState.RETIRED:
                raise RegistryError(f"model {model}: {version} is retired; register a new "
                                    "version")
            before = serving_weights(entry)
            before.pop(version, None)
            plan = CanaryPlan(version=version, guard=guard, steps=plan_steps, step_s=step_s,
                              min_tasks=min_tasks, started_at=now, step_started_at=now,
                              shadow=shadow, stable_weights=before)
            after = _canary_weights(msgspec.structs.replace(
                entry, canary=plan, versions={**entry.versions, version: msgspec.structs.replace(
                    v, state=VersionState.CANARY)}), weight_pct)
            return after, None, _plain(plan)

        after = await self._change(model, "canary", "start", change, who, why)
        return after.canary

    async def step_canary(self, model: str, expect_step: int, *, who: str = "guard",
                          why: str = "") -> ModelEntry:
        """The canary's next step (its share rises; at 100 it is promoted).  `expect_step`
        guards against a step taken twice: nothing changes if the canary is elsewhere."""
        def change(entry: ModelEntry | None) -> tuple[ModelEntry, object, object]:
            entry = _need(model, entry)
            plan = _running(model, entry)
            if plan.step != expect_step:
                raise _Unchanged(entry)
            step = plan.step + 1
            share = plan.steps[step]
            if share >= 100:
                after = _promoted(entry, plan.version, why or "every step passed its guard")
                return after, {"step": plan.step, "share_pct": plan.steps[plan.step]}, {
                    "promoted": plan.version}
            plan = msgspec.structs.replace(plan, step=step, step_started_at=time.time())
            after = _canary_weights(msgspec.structs.replace(entry, canary=plan), share)
            return after, {"step": step - 1, "share_pct": plan.steps[step - 1]}, {
                "step": step, "share_pct": share}

        return await self._change(model, "canary", "step", change, who, why)

    async def rollback_canary(self, model: str, *, reason: str, who: str = "guard",
                              why: str = "") -> ModelEntry:
        """Take the running canary back: no new task goes to it (its weight 0, state
        rolled_back, the weights before it restored); its queued tasks are moved to the
        stable version by the guard (ops/canary.py); what is in flight finishes."""
        def change(entry: ModelEntry | None) -> tuple[ModelEntry, object, object]:
            entry = _need(model, entry)
            plan = _running(model, entry)
            v = entry.versions[plan.version]
            versions = _restore({**entry.versions, plan.version: msgspec.structs.replace(
                v, state=VersionState.ROLLED_BACK, weight=0.0)}, plan)
            ended = msgspec.structs.replace(plan, status="rolled_back", reason=reason)
            after = msgspec.structs.replace(entry, versions=versions, canary=ended)
            return after, {"version": plan.version, "weight": v.weight}, {
                "version": plan.version, "state": "rolled_back", "reason": reason}

        return await self._change(model, "canary", "rollback", change, who, why or reason)

    # ---- the audit ------------------------------------------------------------------------

    async def _change(self, model: str, kind: str, action: str, change: Change, who: str,
                      why: str) -> ModelEntry:
        """Apply `change` to the entry of `model` atomically with its audit record."""
        async def step(pipe) -> Write | ModelEntry:
            raw = await pipe.hget(keys.models(), model)
            current = decode_model_entry(raw) if raw is not None else None
            try:
                after, before_view, after_view = change(current)
            except _Unchanged as same:
                return same.entry
            return Write(keys.models(), model, after, AuditEntry(
                kind=kind, subject=model, action=action, who=who, why=why, at=time.time(),
                before=before_view, after=after_view))

        return await watched_change(self.redis, keys.models_version(), step,
                                    f"changing model {model}")


class Write(NamedTuple):
    """One registry write: a hash field's new value and its audit entry."""

    key: str
    field: str
    value: object  # a wire Struct
    audit: AuditEntry


async def watched_change(redis: aioredis.Redis, watch: str, step, what: str):
    """Run `step(pipe)` under WATCH of `watch` (it reads through the pipeline and returns a
    `Write`, or anything else to write nothing), then write, bump the registry's version and
    append the audit entry in one transaction; again when another change raced in."""
    for _ in range(_RETRIES):
        try:
            async with redis.pipeline(transaction=True) as pipe:
                await pipe.watch(watch)
                write = await step(pipe)
                if not isinstance(write, Write):
                    return write
                pipe.multi()
                pipe.hset(write.key, write.field, encode(write.value))
                pipe.incr(keys.models_version())
                await append_audit(pipe, write.audit)
                await pipe.execute()
                return write.value
        except WatchError:
            continue
        except RedisError as exc:
            raise BrokerError(f"{what} failed: {exc}") from exc
    raise RegistryError(f"{what}: the registry kept changing under it; try again")


class _Unchanged(Exception):
    def __init__(self, entry: ModelEntry):
        self.entry = entry


def _need(model: str, entry: ModelEntry | None) -> ModelEntry:
    if entry is None:
        raise RegistryError(f"model {model!r} is not registered (agentfleet models register)")
    return entry


def _version(entry: ModelEntry, version: str) -> ModelVersion:
    v = entry.versions.get(version)
    if v is None:
        raise RegistryError(f"model {entry.name} has no version {version!r}; it has "
                            f"{sorted(entry.versions)}")
    return v


def _running(model: str, entry: ModelEntry) -> CanaryPlan:
    plan = entry.canary
    if plan is None or plan.status != "running":
        raise RegistryError(f"model {model}: no canary is running")
    return plan


def _canary_weights(entry: ModelEntry, share_pct: float) -> ModelEntry:
    """The canary's weight so that it gets `share_pct` percent of the model's traffic, the
    other versions keeping their weights before the canary (and so their proportions)."""
    plan = entry.canary
    others = sum(plan.stable_weights.values())
    versions = dict(entry.versions)
    for version, weight in plan.stable_weights.items():
        if version in versions:
            versions[version] = msgspec.structs.replace(versions[version], weight=weight)
    versions[plan.version] = msgspec.structs.replace(
        versions[plan.version], weight=others * share_pct / (100.0 - share_pct))
    return msgspec.structs.replace(entry, versions=versions)


def _restore(versions: dict[str, ModelVersion], plan: CanaryPlan) -> dict[str, ModelVersion]:
    out = dict(versions)
    for version, weight in plan.stable_weights.items():
        v = out.get(version)
        if v is not None and v.state in SERVING:
            out[version] = msgspec.structs.replace(v, weight=weight)
    return out


def _promoted(entry: ModelEntry, version: str, reason: str) -> ModelEntry:
    versions = {}
    for name, v in entry.versions.items():
        if name == version:
            versions[name] = msgspec.structs.replace(v, state=VersionState.ACTIVE, weight=100.0)
        elif v.state in SERVING:
            versions[name] = msgspec.structs.replace(v, state=VersionState.ACTIVE, weight=0.0)
        else:
            versions[name] = v
    canary = entry.canary
    if canary is not None and canary.status == "running":
        status = "promoted" if canary.version == version else "rolled_back"
        canary = msgspec.structs.replace(canary, status=status, reason=reason)
    return msgspec.structs.replace(entry, stable=version, versions=versions, canary=canary)


def _routing(entry: ModelEntry) -> dict:
    return {"stable": entry.stable, "weights": serving_weights(entry)}


def _route_view(entry: ModelEntry) -> dict:
    return {"fallback": entry.fallback, "sla_budget_s": dict(entry.sla_budget_s)}


__all__ = ["ModelRegistry", "Write", "watched_change"]
