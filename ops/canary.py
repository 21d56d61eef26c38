"""The canary guard: promotes a canary step by step, rolls it back by itself on a breach, and
drains the versions that serve no more.  One process runs it at a time.

    agentfleet canary start m v2 --weight 5% --guard "error_ratio<1%,p99<2x"
    agentfleet canary status m          the canary, its step, its figures against the stable
    agentfleet canary rollback m        take it back now (the guard would on a breach)
    agentfleet canary promote m         skip the remaining steps
    agentfleet canary watch             run the guard here (workers run it by default)
    agentfleet canary compare m --fn mypkg.checks:same_answer    shadow outputs, compared

Who runs it: every worker (`canary_guard` on) and every `canary watch` process try to take
a lease in Redis (`keys.canary_lease`, SET NX with a TTL the holder renews every pass); the
one holding it runs the passes, the others wait to take over.  A pass, every `every_s`:

  - for each model with a canary running, read the per-minute aggregates the workers already
    write (workers/kpi.py; each field carries the version: `interactive@<version>`) since
    the canary's step began, for the canary and the stable version: attempts (tasks ended
    plus attempts retried), errors (ended with an engine-side error code, or retried), the
    end-to-end latency buckets.  The guard's conditions (schemas/registry.py) are checked:
    a breach rolls the canary back at once: early when the errors make it sure (at least 5,
    and the Wilson lower bound of the ratio above the limit), else once `min_tasks` attempts
    are in; a canary on which nothing finished for `STALL_S` is rolled back too (its engine
    may not start).  When the step has lasted `step_s` with `min_tasks` attempts and every
    condition holds, the next step's share is set; after the last, it is promoted;
  - for each registered model, move what the streams of versions that serve no more (and
    the model's unversioned streams) still hold to the stable version's (workers/lua/
    move.lua, one call per tenant stream): a rollback's queued tasks go to the stable version
    within a pass; a producer that routed to the old version before it saw the change loses
    nothing either.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import math
import os
import secrets
import signal
import time
from collections.abc import Callable

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from agentfleet.ops.tenants import who
from agentfleet.producer.models import ModelRegistry
from agentfleet.schemas import keys
from agentfleet.schemas.errors import AgentFleetError, BrokerError, RegistryError
from agentfleet.schemas.registry import (
    SERVING,
    GuardRule,
    ModelTable,
    load_table,
    parse_guard,
    serving_weights,
)
from agentfleet.schemas.settings import Settings
from agentfleet.schemas.wire import CanaryPlan, ModelEntry, Result, decode_result
from agentfleet.workers.kpi import parse_field, split_lane
from agentfleet.workers.kpi import LATENCY_BUCKETS_S
from agentfleet.workers.scripts import move_args, move_lua
from agentfleet.workers.transient import TRANSIENT

log = logging.getLogger("agentfleet.canary")

LEASE_S = 10.0  # the lease lives this long unless its holder renews it
STALL_S = 300.0  # a canary on which nothing finished for this long is rolled back
EARLY_ERRORS = 5  # errors enough to judge an error ratio before min_tasks attempts
MOVE_BATCH = 1000  # entries one move call takes
DRAINED_RECHECK_S = 10.0  # a drained stream set is looked at again this often
# Error codes that count against a canary: the engine failed, not the task's own input
# (invalid_task, prompt_too_long), its submitter (cancelled) or its deadline.
ENGINE_CODES = frozenset(("engine_error", "engine_dead", "attempts_exhausted", "internal",
                          "delivery_limit", "lost"))

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Figures(msgspec.Struct, kw_only=True):
    """One version's tasks in a guard's window, from the per-minute aggregates."""

    attempts: int = 0  # tasks ended + attempts retried
    errors: int = 0  # ended with an engine-side code, or retried
    buckets: list[int] = msgspec.field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))

    @property
    def error_ratio(self) -> float | None:
        return self.errors / self.attempts if self.attempts else None

    def quantile(self, q: float) -> float | None:
        from agentfleet.ops.report import bucket_quantile  # not at import: the client's CLI

        return bucket_quantile(q, self.buckets)


class Verdict(msgspec.Struct, kw_only=True):
    action: str  # "wait", "step", "rollback"
    reason: str = ""
    canary: Figures
    stable: Figures


def wilson_lower(errors: int, n: int, z: float = 2.0) -> float:
    """The lower bound of the error ratio's Wilson score interval (z = 2: about 98% sure)."""
    if n == 0:
        return 0.0
    p = errors / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z * z / n))


def judge(plan: CanaryPlan, canary: Figures, stable: Figures, now: float,
          rules: list[GuardRule] | None = None) -> Verdict:
    """What the guard does for a canary at one step, from the figures of its window (pure)."""
    rules = parse_guard(plan.guard) if rules is None else rules

    def verdict(action: str, reason: str = "") -> Verdict:
        return Verdict(action=action, reason=reason, canary=canary, stable=stable)

    enough = canary.attempts >= plan.min_tasks
    unknown = []
    for rule in rules:
        if rule.metric == "error_ratio":
            ratio = canary.error_ratio
            if ratio is None:
                unknown.append(str(rule))
                continue
            sure = canary.errors >= EARLY_ERRORS and wilson_lower(
                canary.errors, canary.attempts) > rule.limit
            if (enough and ratio > rule.limit) or sure:
                return verdict("rollback", f"error_ratio {ratio:.1%} over {rule.limit:.1%} "
                               f"({canary.errors} of {canary.attempts} attempts)")
            continue
        q = int(rule.metric[1:]) / 100
        mine = canary.quantile(q)
        limit = rule.limit
        if rule.relative:
            base = stable.quantile(q)
            if base is None or stable.attempts < plan.min_tasks:
                unknown.append(f"{rule} (the stable version has too few tasks)")
                continue
            limit = rule.limit * max(base, LATENCY_BUCKETS_S[0])
        if mine is None:
            unknown.append(str(rule))
            continue
        if enough and mine > limit:
            return verdict("rollback", f"{rule.metric} {mine:.3f}s over {limit:.3f}s ({rule})")
    if canary.attempts == 0 and now - plan.started_at > STALL_S:
        return verdict("rollback", f"no task finished on it in {STALL_S:.0f} s")
    if not enough:
        return verdict("wait", f"{canary.attempts} of {plan.min_tasks} attempts")
    if unknown:
        return verdict("wait", "cannot tell yet: " + ", ".join(unknown))
    if now - plan.step_started_at < plan.step_s:
        return verdict("wait", f"step {plan.step + 1} of {len(plan.steps)} holds")
    return verdict("step", "every condition held for the step")


async def read_figures(redis: aioredis.Redis, model: str, versions: list[str], since: float,
                       until: float) -> dict[str, Figures]:
    """Figures per version from the per-minute aggregates of [since, until] (whole minutes:
    the first may hold a little from before `since`)."""
    first = int(since // 60) * 60
    minutes = range(first, int(until // 60) * 60 + 60, 60)
    try:
        async with redis.pipeline(transaction=False) as pipe:
            for minute in minutes:
                pipe.hgetall(keys.kpi_key(model, minute))
            hashes = await pipe.execute()
    except RedisError as exc:
        raise BrokerError(f"reading the aggregates of {model} failed: {exc}") from exc
    out = {v: Figures() for v in versions}
    for fields in hashes:
        for raw, value in fields.items():
            parsed = parse_field(raw.decode(errors="replace"))
            if parsed is None:
                continue
            kind, detail, lane, _ = parsed
            figures = out.get(split_lane(lane)[1])
            if figures is None:
                continue
            n = int(float(value))
            if kind == "s":
                figures.attempts += n
            elif kind == "y":
                figures.attempts += n
                figures.errors += n
            elif kind == "e" and detail in ENGINE_CODES:
                figures.errors += n
            elif kind == "b":
                figures.buckets[int(detail)] += n
    return out


class Guard:
    """The canary guard's loop, under the lease (see the module docstring)."""

    def __init__(self, redis: aioredis.Redis, settings: Settings, *, holder: str = "",
                 every_s: float = 2.0):
        self.redis = redis
        self.settings = settings
        self.holder = holder or f"guard-{secrets.token_hex(4)}"
        self.every_s = every_s
        self.registry = ModelRegistry(redis)
        self.holding = False
        self.passes = 0
        self._move = redis.register_script(move_lua())
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._drained: dict[tuple[str, str], float] = {}  # (model, version) -> checked at

    async def run(self) -> None:
        """Pass after pass while this process holds the lease; wait to take it otherwise."""
        try:
            while True:
                try:
                    if await self._lease():
                        await self.pass_once()
                except (*TRANSIENT, BrokerError) as exc:
                    log.warning("canary guard %s: a pass failed (%s); trying again",
                                self.holder, exc)
                await asyncio.sleep(self.every_s)
        finally:
            if self.holding:
                try:
                    await asyncio.shield(self._release(keys=[keys.canary_lease()],
                                                       args=[self.holder]))
                except (*TRANSIENT, RedisError):
                    pass  # it expires by itself

    async def _lease(self) -> bool:
        ttl_ms = int(max(LEASE_S, 3 * self.every_s) * 1000)
        if self.holding and await self._renew(keys=[keys.canary_lease()],
                                              args=[self.holder, ttl_ms]):
            return True
        self.holding = bool(await self.redis.set(keys.canary_lease(), self.holder, nx=True,
                                                 px=ttl_ms))
        if self.holding:
            log.info("canary guard: %s holds the lease", self.holder)
        return self.holding

    async def pass_once(self) -> None:
        table = await load_table(self.redis)
        now = time.time()
        for model, entry in table.entries.items():
            plan = entry.canary
            if plan is not None and plan.status == "running":
                entry = await self._guard(model, entry, plan, now)
            await self.drain(model, entry)
        self.passes += 1

    async def _guard(self, model: str, entry: ModelEntry, plan: CanaryPlan,
                     now: float) -> ModelEntry:
        figures = await read_figures(self.redis, model, [plan.version, entry.stable],
                                     plan.step_started_at, now)
        verdict = judge(plan, figures[plan.version], figures[entry.stable], now)
        me = f"guard:{self.holder}"
        try:
            if verdict.action == "rollback":
                log.warning("canary %s@%s: rolled back: %s", model, plan.version,
                            verdict.reason)
                return await self.registry.rollback_canary(model, reason=verdict.reason,
                                                           who=me)
            if verdict.action == "step":
                after = await self.registry.step_canary(model, plan.step, who=me,
                                                        why=verdict.reason)
                log.info("canary %s@%s: %s", model, plan.version,
                         "promoted" if after.stable == plan.version else
                         f"step {plan.step + 2}: {plan.steps[plan.step + 1]:g}%")
                return after
        except RegistryError as exc:  # changed by hand meanwhile: the next pass sees it
            log.info("canary %s: %s", model, exc)
        return entry

    async def drain(self, model: str, entry: ModelEntry) -> int:
        """Move what versions that serve no more (and the unversioned streams) hold to the
        stable version; returns how many tasks moved."""
        done = [v.version for v in entry.versions.values() if v.state not in SERVING]
        moved = 0
        now = time.monotonic()
        for version in ["", *done]:
            if now - self._drained.get((model, version), -math.inf) < DRAINED_RECHECK_S:
                continue
            count, empty = await self._drain_version(model, version, entry.stable)
            moved += count
            if empty:
                self._drained[(model, version)] = now
            else:
                self._drained.pop((model, version), None)
        if moved:
            log.info("model %s: moved %d queued tasks to the stable version %s", model, moved,
                     entry.stable)
        return moved

    async def _drain_version(self, model: str, version: str, stable: str) -> tuple[int, bool]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for lane in keys.LANES:
                pipe.zrange(keys.tenant_lanes(model, lane, version), 0, -1)
            marked = await pipe.execute()
        moved, empty = 0, True
        for lane, tenants in zip(keys.LANES, marked):
            for tenant in sorted({t.decode() for t in tenants} | {keys.DEFAULT_TENANT}):
                while True:
                    keys_, args = move_args(
                        source=keys.lane_stream(model, lane, tenant, version),
                        target=keys.lane_stream(model, lane, tenant, stable),
                        target_lanes=keys.tenant_lanes(model, lane, stable),
                        source_lanes=keys.tenant_lanes(model, lane, version),
                        stats_key=keys.stats_key(model), consumer=f"mover-{self.holder}",
                        count=MOVE_BATCH, min_idle_ms=self.settings.claim_idle_ms,
                        tenant=tenant)
                    count, _, drained = await self._move(keys=keys_, args=args)
                    moved += count
                    if count < MOVE_BATCH:
                        empty = empty and bool(drained)
                        break
        return moved, empty


# ---- shadow comparison ------------------------------------------------------------------------

async def compare_shadows(redis: aioredis.Redis, model: str, version: str,
                          compare: Callable[[Result, Result], object],
                          count: int = 1000) -> dict:
    """Pair the newest `count` shadow results of a canary (the bulk job "shadow-<version>")
    with their originals and score them with `compare(original, shadow)` (a bool or a
    number); returns the pairs' count, the mean score and the pairs not ready yet."""
    raw = await redis.xrevrange(keys.batch_output(model, f"shadow-{version}"), count=count)
    shadows = [decode_result(fields[b"r"]) for _, fields in raw]
    async with redis.pipeline(transaction=False) as pipe:
        for shadow in shadows:
            pipe.get(keys.result_key(model, shadow.task_id.removesuffix("~shadow")))
        originals = await pipe.execute()
    scores, missing = [], 0
    for shadow, original in zip(shadows, originals):
        if original is None or not shadow.ok:
            missing += 1
            continue
        scores.append(float(compare(decode_result(original), shadow)))
    return {"model": model, "version": version, "pairs": len(scores), "not_ready": missing,
            "mean_score": sum(scores) / len(scores) if scores else None}


def load_function(spec: str) -> Callable:
    """"package.module:function" -> the function (the user's comparison)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise AgentFleetError(f"--fn {spec!r}: write package.module:function")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise AgentFleetError(f"--fn {spec!r}: {exc}") from exc


# ---- the command line -------------------------------------------------------------------------

def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("canary", help="canary rollouts: start, status, rollback, promote, "
                       "watch, compare")
    actions = p.add_subparsers(dest="action", required=True)
    s = actions.add_parser("start", help="route a share of a model's traffic to a version "
                           "under a guard")
    s.add_argument("model")
    s.add_argument("version")
    s.add_argument("--weight", required=True, help="its first share, e.g. 5%%")
    s.add_argument("--guard", required=True,
                   help='conditions, e.g. "error_ratio<1%%,p99<2x" (p50|p90|p99 in s, ms or '
                        "x the stable's)")
    s.add_argument("--steps", default="", help="shares after the first, e.g. 10,25,50 "
                   "(100 is the last: promoted)")
    s.add_argument("--step-s", type=float, default=300.0, help="a step lasts at least this")
    s.add_argument("--min-tasks", type=int, default=50,
                   help="attempts on the canary a step needs before it is judged")
    s.add_argument("--shadow", default="0", help="share of the stable's tasks also run on "
                   "the canary in the bulk lane, e.g. 2%%")
    s.add_argument("--why", default="")
    for name, text in (("status", "the canary of a model (all models without one)"),
                       ("rollback", "take the running canary back now"),
                       ("promote", "promote the running canary now")):
        s = actions.add_parser(name, help=text)
        s.add_argument("model", nargs="?" if name == "status" else None, default="")
        if name != "status":
            s.add_argument("--why", default="")
        else:
            s.add_argument("--json", action="store_true")
    s = actions.add_parser("watch", help="run the guard here until SIGTERM (one process at a "
                           "time runs it: a lease in Redis)")
    s.add_argument("--every-s", type=float, default=2.0)
    s = actions.add_parser("compare", help="score the canary's shadow outputs against the "
                           "stable's with your function")
    s.add_argument("model")
    s.add_argument("--fn", required=True, help="package.module:function(original, shadow)")
    s.add_argument("--version", default="", help="default: the model's canary")
    s.add_argument("--count", type=int, default=1000)


def percent(text: str, field: str) -> float:
    raw = text.strip().removesuffix("%")
    try:
        value = float(raw)
    except ValueError as exc:
        raise AgentFleetError(f"--{field} {text!r}: a percent, e.g. 5%") from exc
    return value


async def run_canary(redis: aioredis.Redis, args: argparse.Namespace, settings: Settings) -> str:
    registry = ModelRegistry(redis)
    if args.action == "start":
        steps = [percent(s, "steps") for s in args.steps.split(",") if s.strip()]
        weight = percent(args.weight, "weight")
        plan = await registry.start_canary(
            args.model, args.version, weight_pct=weight, guard=args.guard,
            steps=[weight, *steps] if steps else None, step_s=args.step_s,
            min_tasks=args.min_tasks, shadow=percent(args.shadow, "shadow") / 100,
            who=who(), why=args.why)
        return (f"canary {args.model}@{plan.version}: {plan.steps[0]:g}% now, steps "
                f"{', '.join(f'{s:g}%' for s in plan.steps)}, guard {plan.guard}")
    if args.action == "rollback":
        entry = await registry.rollback_canary(args.model, reason=args.why or "by hand",
                                               who=who(), why=args.why)
        moved = await Guard(redis, settings, holder=f"cli-{who()}").drain(args.model, entry)
        return (f"rolled back {args.model}@{entry.canary.version}; {moved} queued tasks "
                f"moved to {entry.stable}")
    if args.action == "promote":
        entry = await registry.get(args.model)
        if entry is None or entry.canary is None or entry.canary.status != "running":
            raise RegistryError(f"model {args.model}: no canary is running")
        after = await registry.promote(args.model, entry.canary.version, who=who(),
                                       why=args.why)
        return f"promoted {args.model}@{after.stable}"
    if args.action == "compare":
        entry = await registry.get(args.model)
        version = args.version or (entry.canary.version if entry and entry.canary else "")
        if not version:
            raise AgentFleetError(f"model {args.model}: no canary; pass --version")
        found = await compare_shadows(redis, args.model, version, load_function(args.fn),
                                      args.count)
        return json.dumps(found, indent=2)
    return await _status(redis, args)


async def _status(redis: aioredis.Redis, args: argparse.Namespace) -> str:
    table: ModelTable = await load_table(redis)
    models = [args.model] if args.model else sorted(table.entries)
    now = time.time()
    shown, lines = [], []
    for model in models:
        entry = table.entries.get(model)
        if entry is None:
            raise RegistryError(f"model {model!r} is not registered")
        plan = entry.canary
        if plan is None:
            lines.append(f"{model}: no canary (stable {entry.stable})")
            continue
        figures = await read_figures(redis, model, [plan.version, entry.stable],
                                     plan.step_started_at, now)
        verdict = judge(plan, figures[plan.version], figures[entry.stable], now) \
            if plan.status == "running" else None
        row = {"model": model, "canary": msgspec.to_builtins(plan),
               "weights": serving_weights(entry),
               "figures": {v: {"attempts": f.attempts, "errors": f.errors,
                               "p99_s": f.quantile(0.99)} for v, f in figures.items()},
               "next": verdict.action if verdict else None,
               "why": verdict.reason if verdict else plan.reason}
        shown.append(row)
        lines.append(f"{model}: canary {plan.version} {plan.status}, step {plan.step + 1}/"
                     f"{len(plan.steps)} ({plan.steps[plan.step]:g}%), guard {plan.guard}")
        for version, f in figures.items():
            p99 = f.quantile(0.99)
            lines.append(f"  {version:<16} attempts {f.attempts:>7}  errors {f.errors:>6}  "
                         f"p99 {'-' if p99 is None else f'{p99:.3f}s'}")
        lines.append(f"  next: {row['next'] or '-'} ({row['why']})")
    if getattr(args, "json", False):
        return json.dumps(shown, indent=2)
    return "\n".join(lines) or "no registered models"


def run_watch(url: str, settings: Settings, every_s: float) -> int:
    """`agentfleet canary watch`: the guard in the foreground until SIGTERM or SIGINT."""
    from agentfleet.producer.connection import connect

    async def main() -> None:
        redis = connect(url)
        guard = Guard(redis, settings, holder=f"watch-{os.uname().nodename}-{os.getpid()}",
                      every_s=every_s)
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await guard.run()
        except asyncio.CancelledError:
            pass
        finally:
            await redis.aclose()

    asyncio.run(main())
    return 0


__all__ = ["Guard", "Verdict", "compare_shadows", "judge", "read_figures", "run_canary",
           "run_watch"]
