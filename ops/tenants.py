"""`agentfleet tenants list|show|set|remove` and `agentfleet audit`: the tenant registry and
the record of every change to it, for operators.

    agentfleet tenants set acme --weight 2 --max-queued 10000 --why "contract of 2026-11"
    agentfleet tenants show acme          its settings, and per model what it has queued
    agentfleet audit --kind tenant        who changed what, when, from what to what, why
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import os

import msgspec
import redis.asyncio as aioredis

from agentfleet.producer.tenants import TenantRegistry
from agentfleet.schemas import keys
from agentfleet.schemas.tenants import DEFAULT
from agentfleet.schemas.wire import AuditEntry, TenantConfig

# CLI flag -> TenantConfig field (the same names, dashes for underscores)
FIELDS = ("weight", "max_queued", "tokens_per_minute", "max_running", "cache_group",
          "result_ttl_s", "trace_ttl_s", "redact", "note", "result_cache_ttl_s")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tenants", help="the tenant registry: weights, quotas, data rules")
    actions = p.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="every tenant with an entry, and the default's")
    s = actions.add_parser("show", help="one tenant: its settings and what it has queued")
    s.add_argument("tenant")
    s.add_argument("--json", action="store_true")
    s = actions.add_parser("set", help="create or change a tenant's entry (fields not given "
                           "keep their value, or the default's)")
    s.add_argument("tenant")
    s.add_argument("--weight", type=float, help="its share against other tenants' weights")
    s.add_argument("--max-queued", type=int, help="tasks queued and not ended, per model (0: "
                   "no limit)")
    s.add_argument("--tokens-per-minute", type=int, help="prompt + max_tokens enqueued per "
                   "minute, per model (0: no limit)")
    s.add_argument("--max-running", type=int, help="tasks in the engines at once, per model "
                   "(0: no limit)")
    s.add_argument("--cache-group", help="share the prefix cache with the tenants of this "
                   "group ('' for a cache of its own)")
    s.add_argument("--result-ttl-s", type=int, help="how long its results live (0: the fleet's)")
    s.add_argument("--trace-ttl-s", type=int, help="how long its traces live (0: the fleet's)")
    s.add_argument("--result-cache-ttl-s", type=int, help="answer its identical deterministic "
                   "tasks from a cached result this long, and join identical ones in flight "
                   "(0: off; docs/result-cache.md)")
    s.add_argument("--redact", action=argparse.BooleanOptionalAction,
                   help="keep its prompts and outputs out of traces, logs and Sentry")
    s.add_argument("--note")
    s.add_argument("--why", default="", help="recorded in the audit log")
    s = actions.add_parser("remove", help="drop an entry: the tenant gets the default's")
    s.add_argument("tenant")
    s.add_argument("--why", default="")
    a = sub.add_parser("audit", help="every change to the registries: who, when, why")
    a.add_argument("--kind", default=None, help="tenant, model, route, canary ...")
    a.add_argument("--count", type=int, default=50)
    a.add_argument("--json", action="store_true")


def who() -> str:
    try:
        return os.environ.get("AGENTFLEET_ACTOR") or getpass.getuser()
    except (KeyError, OSError):  # no user name in a container
        return f"uid {os.getuid()}"


async def run_tenants(redis: aioredis.Redis, args: argparse.Namespace,
                      models: list[str]) -> str:
    registry = TenantRegistry(redis)
    if args.action == "list":
        table = await registry.table()
        rows = [f"{'tenant':<24} {'weight':>7} {'max_queued':>10} {'tok/min':>9} "
                f"{'max_run':>7} {'cache':<10} note"]
        names = sorted(set(table.entries) | {DEFAULT})
        for name in names:
            c = table.get(name)
            own = "" if name in table.entries or name == DEFAULT else " (default's)"
            rows.append(f"{name:<24} {c.weight:>7g} {c.max_queued:>10} "
                        f"{c.tokens_per_minute:>9} {c.max_running:>7} "
                        f"{c.cache_group or 'own':<10} {c.note}{own}")
        return "\n".join(rows)
    if args.action == "show":
        table = await registry.table()
        config = table.get(args.tenant)
        async with redis.pipeline(transaction=False) as pipe:
            for model in models:
                pipe.hget(keys.queued_counts(model), args.tenant)
            queued = {m: int(v or 0) for m, v in zip(models, await pipe.execute())}
        shown = {"tenant": args.tenant, "entry": args.tenant in table.entries,
                 "settings": msgspec.to_builtins(config) | {"weight": config.weight},
                 "queued": queued}
        if args.json:
            return json.dumps(shown, indent=2)
        lines = [f"tenant {args.tenant}" + ("" if shown["entry"] else " (no entry: the "
                                            "default's settings)")]
        lines += [f"  {k}: {v}" for k, v in msgspec.to_builtins(config).items()]
        lines += [f"  queued on {m}: {n}" for m, n in queued.items()]
        return "\n".join(lines)
    if args.action == "set":
        changes = {f: getattr(args, f) for f in FIELDS if getattr(args, f) is not None}
        config = await registry.update(args.tenant, who=who(), why=args.why, **changes)
        return f"tenant {args.tenant}: " + ", ".join(
            f"{k}={v}" for k, v in msgspec.to_builtins(config).items())
    removed = await registry.remove(args.tenant, who=who(), why=args.why)
    return f"removed tenant {args.tenant} (was weight {removed.weight:g})"


async def run_audit(redis: aioredis.Redis, args: argparse.Namespace) -> str:
    entries = await TenantRegistry(redis).audit(args.count, kind=args.kind)
    if args.json:
        return json.dumps([msgspec.to_builtins(e) for e in entries], indent=2)
    if not entries:
        return "no changes recorded"
    return "\n".join(render_entry(e) for e in entries)


def render_entry(e: AuditEntry) -> str:
    when = dt.datetime.fromtimestamp(e.at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    change = _diff(e.before, e.after)
    why = f"  why: {e.why}" if e.why else ""
    return f"{when}  {e.who or '?':<12} {e.kind} {e.subject} {e.action}: {change}{why}"


def _diff(before, after) -> str:
    if before is None:
        return "created " + _fields(after)
    if after is None:
        return "removed (was " + _fields(before) + ")"
    changed = [f"{k} {before.get(k)!r} -> {v!r}" for k, v in after.items()
               if before.get(k) != v]
    gone = [f"{k} {v!r} -> (default)" for k, v in before.items() if k not in after]
    return ", ".join(changed + gone) or "no change"


def _fields(d) -> str:
    if isinstance(d, dict):
        return ", ".join(f"{k}={v!r}" for k, v in d.items()) or "defaults"
    return repr(d)


__all__ = ["TenantConfig", "add_parser", "run_audit", "run_tenants"]
