"""`agentfleet models ...` and `agentfleet templates ...`: the model registry and the prompt
templates, for operators (producer/models.py and producer/templates.py do the work; every
change lands in the audit log, `agentfleet audit --kind model`).

    agentfleet models register summariser v2 --path /models/sum-v2 \\
        --engine-arg max_num_seqs=256 --engine-arg quantization=fp8 --why "fine-tune 2026-12"
    agentfleet models set-weights summariser v1=90 v2=10
    agentfleet models route summariser --fallback summariser-small --budget interactive=2
    agentfleet models promote summariser v2 ; agentfleet models retire summariser v1
    agentfleet models list ; agentfleet models show summariser
    agentfleet models seed                  the settings' models file as version v1 of each
    agentfleet templates register summarise --prompt "Summarise in 3 lines: {doc}"
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import msgspec
import redis.asyncio as aioredis

from agentfleet.ops.tenants import who
from agentfleet.producer.models import ModelRegistry
from agentfleet.producer.routing import parse_load
from agentfleet.producer.templates import TemplateRegistry
from agentfleet.schemas import keys
from agentfleet.schemas.errors import AgentFleetError
from agentfleet.schemas.registry import SERVING, load_table
from agentfleet.schemas.settings import ModelSpec, Settings
from agentfleet.schemas.wire import Message

_SPEC_DEFAULTS = msgspec.structs.asdict(ModelSpec(name="-"))
_NOT_ENGINE = ("name", "path", "version", "engine_args", "sleep_group")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="the model registry: versions, weights, routing")
    actions = p.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="every registered model, its versions and their shares")
    s = actions.add_parser("show", help="one model: versions, engine arguments, workers")
    s.add_argument("model")
    s.add_argument("--json", action="store_true")
    s = actions.add_parser("register", help="add a version (checked: directory, vLLM engine "
                           "arguments, templates)")
    s.add_argument("model")
    s.add_argument("version")
    s.add_argument("--path", required=True, help="the model directory (config.json, weights)")
    s.add_argument("--engine-arg", action="append", default=[], metavar="NAME=VALUE",
                   help="a vLLM engine argument (repeatable; VALUE read as JSON when it parses)")
    s.add_argument("--template", action="append", default=[], metavar="NAME=N",
                   help="the template version this model version renders (repeatable)")
    s.add_argument("--weight", type=float, default=None,
                   help="its traffic weight (default: 100 for a model's first version, else 0)")
    s.add_argument("--sleep-group", default="", help="share a GPU with the engines of this "
                   "group in a worker (vLLM sleep mode)")
    s.add_argument("--note", default="")
    s.add_argument("--no-engine-check", action="store_true",
                   help="skip vLLM's check of the engine arguments (no vLLM here)")
    s.add_argument("--why", default="")
    s = actions.add_parser("set-weights", help="traffic weights, e.g. v1=90 v2=10")
    s.add_argument("model")
    s.add_argument("weights", nargs="+", metavar="VERSION=WEIGHT")
    s.add_argument("--why", default="")
    for name, text in (("promote", "make a version stable, with all the traffic"),
                       ("retire", "stop serving a version: drained, its queue moved")):
        s = actions.add_parser(name, help=text)
        s.add_argument("model")
        s.add_argument("version")
        s.add_argument("--why", default="")
    s = actions.add_parser("route", help="fallback of over-budget tasks, SLA budgets")
    s.add_argument("model")
    s.add_argument("--fallback", default=None,
                   help="MODEL, MODEL@VERSION or @VERSION ('' to refuse instead)")
    s.add_argument("--budget", action="append", default=[], metavar="CLASS=SECONDS",
                   help="interactive, standard or batch (0: no budget)")
    s.add_argument("--why", default="")
    s = actions.add_parser("seed", help="register the settings' models (models file) as "
                           "version v1 of each, where not registered yet")
    s.add_argument("--version", default="v1")
    s.add_argument("--no-engine-check", action="store_true")
    s.add_argument("--why", default="seeded from the models file")
    t = sub.add_parser("templates", help="prompt templates: register, list, show")
    tactions = t.add_subparsers(dest="action", required=True)
    s = tactions.add_parser("register", help="the next version of a template")
    s.add_argument("name")
    s.add_argument("--prompt", default=None, help="a prompt with {variable} places")
    s.add_argument("--messages-file", type=Path, default=None,
                   help='a JSON list of {"role": .., "content": ..} with {variable} places')
    s.add_argument("--note", default="")
    s.add_argument("--why", default="")
    tactions.add_parser("list", help="every template version")
    s = tactions.add_parser("show", help="one template: NAME@N, or NAME for the newest")
    s.add_argument("ref")


def _value(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _pairs(items: list[str], flag: str, convert=_value) -> dict:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise AgentFleetError(f"{flag} {item!r}: write NAME=VALUE")
        try:
            out[name] = convert(value)
        except ValueError as exc:
            raise AgentFleetError(f"{flag} {item!r}: {exc}") from exc
    return out


async def run_models(redis: aioredis.Redis, args: argparse.Namespace, settings: Settings) -> str:
    registry = ModelRegistry(redis)
    if args.action == "list":
        return await _list(redis)
    if args.action == "show":
        return await _show(redis, args.model, args.json)
    if args.action == "register":
        made = await registry.register(
            args.model, args.version, path=args.path,
            engine_args=_pairs(args.engine_arg, "--engine-arg"),
            templates=_pairs(args.template, "--template", int), weight=args.weight,
            sleep_group=args.sleep_group, note=args.note, base=settings.models.get(args.model),
            check_engine=not args.no_engine_check, who=who(), why=args.why)
        return (f"registered {args.model}@{made.version} (weight {made.weight:g}, "
                f"{made.path})")
    if args.action == "set-weights":
        weights = await registry.set_weights(args.model, _pairs(args.weights, "weights", float),
                                             who=who(), why=args.why)
        return f"{args.model}: " + _shares(weights)
    if args.action == "promote":
        entry = await registry.promote(args.model, args.version, who=who(), why=args.why)
        return f"{args.model}: {entry.stable} is stable, with all the traffic"
    if args.action == "retire":
        await registry.retire(args.model, args.version, who=who(), why=args.why)
        return (f"{args.model}@{args.version} retired: workers drain it, its queued tasks "
                "move to the stable version")
    if args.action == "route":
        entry = await registry.set_route(
            args.model, fallback=args.fallback,
            budgets=_pairs(args.budget, "--budget", float) if args.budget else None,
            who=who(), why=args.why)
        return (f"{args.model}: fallback {entry.fallback or '(none: refused)'}, budgets "
                f"{entry.sla_budget_s or '(the fleet settings)'}")
    return await _seed(registry, args, settings)


def _shares(weights: dict[str, float]) -> str:
    total = sum(weights.values()) or 1.0
    return ", ".join(f"{v} {w / total:.1%}" for v, w in sorted(weights.items()))


async def _workers(redis: aioredis.Redis, models: list[str]) -> dict[str, dict]:
    async with redis.pipeline(transaction=False) as pipe:
        for model in models:
            pipe.hgetall(keys.version_load(model))
        raw = await pipe.execute()
    return {m: parse_load(r) for m, r in zip(models, raw)}


async def _list(redis: aioredis.Redis) -> str:
    table = await load_table(redis)
    if not table.entries:
        return "no registered models (agentfleet models register, or models seed)"
    loads = await _workers(redis, sorted(table.entries))
    rows = [f"{'model':<24} {'version':<16} {'state':<12} {'share':>7} {'workers':>7} "
            f"{'tasks/s':>8}  note"]
    for name, entry in sorted(table.entries.items()):
        total = sum(v.weight for v in entry.versions.values() if v.state in SERVING) or 1.0
        for v in sorted(entry.versions.values(), key=lambda v: v.created_at):
            rate, _, workers, _ = loads[name].get(v.version, (0.0, 0, 0, 0.0))
            mark = " (stable)" if v.version == entry.stable else ""
            share = v.weight / total if v.state in SERVING else 0.0
            rows.append(f"{name:<24} {v.version:<16} {v.state.value:<12} {share:>7.1%} "
                        f"{workers:>7} {rate:>8.1f}  {v.note}{mark}")
        if entry.canary is not None and entry.canary.status == "running":
            rows.append(f"{'':<24} canary {entry.canary.version}: step "
                        f"{entry.canary.step + 1}/{len(entry.canary.steps)}, guard "
                        f"{entry.canary.guard}")
    return "\n".join(rows)


async def _show(redis: aioredis.Redis, model: str, as_json: bool) -> str:
    table = await load_table(redis)
    entry = table.entries.get(model)
    if entry is None:
        raise AgentFleetError(f"model {model!r} is not registered")
    loads = (await _workers(redis, [model]))[model]
    shown = msgspec.to_builtins(entry) | {"workers": {v: load._asdict()
                                                      for v, load in loads.items()}}
    if as_json:
        return json.dumps(shown, indent=2)
    lines = [f"model {model}: stable {entry.stable}, fallback {entry.fallback or '-'}, "
             f"budgets {entry.sla_budget_s or 'the fleet settings'}"]
    for v in entry.versions.values():
        rate, slots, n, _ = loads.get(v.version, (0.0, 0, 0, 0.0))
        lines.append(f"  {v.version}: {v.state.value}, weight {v.weight:g}, {v.path}")
        lines.append(f"    engine_args {v.engine_args or '{}'}, templates {v.templates or '{}'}"
                     f"{', sleep group ' + v.sleep_group if v.sleep_group else ''}")
        lines.append(f"    {n} workers, {rate:.1f} tasks/s, {slots} engine slots; registered "
                     f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(v.created_at))} UTC")
    if entry.canary is not None:
        c = entry.canary
        lines.append(f"  canary {c.version}: {c.status} at step {c.step + 1}/{len(c.steps)} "
                     f"({c.steps[c.step]:g}%), guard {c.guard}{'; ' + c.reason if c.reason else ''}")
    return "\n".join(lines)


async def _seed(registry: ModelRegistry, args: argparse.Namespace, settings: Settings) -> str:
    from agentfleet.workers.models import resolve_model_path

    table = await registry.table()
    done = []
    for name, spec in settings.models.items():
        if name in table.entries:
            continue
        path = resolve_model_path(spec, settings.home_path)
        engine_args = {f: v for f, v in msgspec.structs.asdict(spec).items()
                       if f not in _NOT_ENGINE and v != _SPEC_DEFAULTS[f]}
        await registry.register(name, spec.version or args.version, path=str(path),
                                engine_args={**engine_args, **spec.engine_args},
                                sleep_group=spec.sleep_group, base=None,
                                check_engine=not args.no_engine_check, who=who(),
                                why=args.why)
        done.append(f"{name}@{spec.version or args.version}")
    return "seeded " + ", ".join(done) if done else "every model of the settings is registered"


async def run_templates(redis: aioredis.Redis, args: argparse.Namespace) -> str:
    registry = TemplateRegistry(redis)
    if args.action == "register":
        messages = None
        if args.messages_file is not None:
            try:
                messages = msgspec.json.decode(args.messages_file.read_bytes(),
                                               type=list[Message])
            except (OSError, msgspec.DecodeError) as exc:
                raise AgentFleetError(f"--messages-file {args.messages_file}: {exc}") from exc
        made = await registry.register(args.name, prompt=args.prompt, messages=messages,
                                       note=args.note, who=who(), why=args.why)
        return f"registered template {made.ref} (variables {made.variables})"
    if args.action == "list":
        found = await registry.list()
        return "\n".join(f"{t.ref:<32} variables {t.variables}  {t.note}" for t in found) or \
            "no templates"
    table = await load_table(redis)
    found = table.template(args.ref)
    if found is None:
        raise AgentFleetError(f"no template {args.ref!r}")
    return json.dumps(msgspec.to_builtins(found), indent=2)


__all__ = ["add_parser", "run_models", "run_templates"]
