"""What observability costs the queue layer: the fleet with metrics, KPI aggregates, traces
and JSON logs on, against all of them off, interleaved in one run.

    python -m bench.observability_overhead [--tasks 100000] [--rounds 3] [--json out.json]

The queue-layer benchmark's fleet path (bench/queue_layer.py: a fresh worker process on the
fake engine, uvloop, then a producer submitting `--tasks` tasks with `submit_many` and waiting
with `wait_many`), once per setting and round on one embedded Valkey, flushed between runs:

  off  metrics port 0, KPI aggregates off, traces off, text logs;
  on   /metrics served (on a free port), per-minute KPI aggregates, traces, JSON logs.

Target: on >= 0.9 x off (medians of the end-to-end rates).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from bench import harness
from bench.harness import Check, Processes
from bench.queue_layer import Bench

TARGET = 0.9


def settings(observed: bool) -> dict:
    """The worker's Settings fields for each side."""
    if not observed:
        return {"metrics_port": 0, "kpi_ttl_s": 0, "trace_enabled": False,
                "otel_enabled": False, "log_format": "text"}
    from agentfleet.ops.embedded import free_port

    return {"metrics_port": free_port(), "kpi_ttl_s": 8 * 86_400, "trace_enabled": True,
            "otel_enabled": False, "log_format": "json"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    machine = harness.machine(packages=("redis", "msgspec", "uvloop"))
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    with Processes() as procs, harness.server("valkey", procs) as server:
        bench = Bench(procs, server, argparse.Namespace(tasks=args.tasks))
        for r in range(1, args.rounds + 1):
            for side in ("off", "on"):
                bench.fresh()
                figures = bench.fleet(overrides=settings(side == "on"))
                runs[side].append(figures)
                print(f"round {r} {side:>3}: {figures['tasks_per_s']:9,.0f} tasks/s, cpu us/task "
                      f"{figures['cpu_us_per_task']}, background {figures['background_cores']} "
                      f"cores", flush=True)
    med = {side: statistics.median(f["tasks_per_s"] for f in rs) for side, rs in runs.items()}
    ratio = med["on"] / med["off"]
    for side in ("off", "on"):
        print(f"observability {side:>3}: {med[side]:9,.0f} tasks/s  runs "
              f"{[round(f['tasks_per_s']) for f in runs[side]]}")
    checks = [Check(f"on >= {TARGET} x off (end-to-end rate)", ratio >= TARGET, f"{ratio:.3f}")]
    status = harness.print_checks(checks)
    harness.write_result(args.json, benchmark="observability_overhead", checks=checks,
                         machine_info=machine, tasks=args.tasks, median_tasks_per_s=med,
                         ratio=ratio, runs=runs)
    return status


if __name__ == "__main__":
    sys.exit(harness.entry(main))
