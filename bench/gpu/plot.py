"""Plot bench/gpu/run.py results: output tokens/s per run, grouped by phase, and the mixed
phase's interactive latency.

    python -m bench.gpu.plot RESULTS.json [RESULTS.json ...] --png docs/gpu_throughput.png

Needs matplotlib (not a dependency of the project: install it where you plot).
"""

from __future__ import annotations

import argparse
import json

PHASES = ["bulk", "tuned", "prefix", "mixed", "twogpu"]
PATH_COLOURS = {"offline": "#7f7f7f", "serve": "#1f77b4", "fleet": "#2ca02c"}


def load(paths: list[str]) -> tuple[list[dict], dict]:
    rows, machine = [], {}
    for path in paths:
        report = json.load(open(path))
        machine = machine or report.get("machine", {})
        rows += [r for r in report["results"] if "tokens_per_s" in r]
    rows.sort(key=lambda r: (PHASES.index(r["phase"]) if r["phase"] in PHASES else 99,
                             r.get("call", 0)))
    return rows, machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+")
    parser.add_argument("--png", required=True)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, machine = load(args.results)
    mixed = [r for r in rows if "interactive" in r]
    fig, axes = plt.subplots(1, 2 if mixed else 1, figsize=(13 if mixed else 9, 4.8),
                             gridspec_kw={"width_ratios": [3, 1]} if mixed else None,
                             squeeze=False)
    ax = axes[0][0]
    labels = [f"{r['phase']}\n{r['label']}" + (f" (call {r['call']})" if "call" in r else "")
              for r in rows]
    values = [r["tokens_per_s"] for r in rows]
    bars = ax.bar(range(len(rows)), values, color=[PATH_COLOURS[r["path"]] for r in rows])
    for bar, r in zip(bars, rows):
        ax.annotate(f"{r['tokens_per_s']:,.0f}", (bar.get_x() + bar.get_width() / 2,
                                                   bar.get_height()),
                    ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("output tokens/s")
    gpu = (machine.get("gpus") or ["?"])[0].split(",")[0]
    ax.set_title(f"Throughput, SmolLM2-1.7B-sized Llama (dummy weights), {gpu}, "
                 f"vLLM {machine.get('vllm', '?')}", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    if mixed:
        ax2 = axes[0][1]
        names = [r["label"] for r in mixed]
        names = [f"{n} (call {r['call']})" if "call" in r else n for n, r in zip(names, mixed)]
        p50 = [r["interactive"]["latency_s"].get("p50", 0) for r in mixed]
        p99 = [r["interactive"]["latency_s"].get("p99", 0) for r in mixed]
        xs = range(len(mixed))
        ax2.bar([x - 0.2 for x in xs], p50, width=0.4, label="p50",
                color=[PATH_COLOURS[r["path"]] for r in mixed], alpha=0.6)
        ax2.bar([x + 0.2 for x in xs], p99, width=0.4, label="p99",
                color=[PATH_COLOURS[r["path"]] for r in mixed])
        ax2.set_xticks(list(xs), names, rotation=60, ha="right", fontsize=7)
        ax2.set_ylabel("interactive latency, s (p50 light, p99 dark)")
        ax2.set_title("mixed: interactive tasks under bulk load", fontsize=9)
        ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(args.png)


if __name__ == "__main__":
    main()
