"""bench/gpu/run.py keeps working: its plan, workloads and target checks (fast), and the fleet
path end to end on the CPU with the tiny sizes (marked `engine`: one vLLM start, about two
minutes on a 2-core machine).  The whole tiny run (offline, serve and fleet) takes four
minutes or more on such a machine, too long for the suite:
`python -m bench.gpu.run --tiny --phase bulk` runs it by hand.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu.engines import GPU_CONFIGS, TINY_CONFIGS, models_toml, serve_flags
from bench.gpu.run import DEFAULT_RUNS, add_ratios, check_targets, parse_phases
from agentfleet.schemas.settings import load_models_file

ROOT = Path(__file__).resolve().parents[1]


def test_every_default_plan_parses_and_names_known_configs():
    runs = parse_phases(list(DEFAULT_RUNS))
    assert {r.phase for r in runs} == set(DEFAULT_RUNS)
    assert all(r.config in GPU_CONFIGS and r.config in TINY_CONFIGS for r in runs)
    [two] = [r for r in runs if r.workers == 2 and r.phase == "twogpu"]
    assert (two.path, two.config, two.label) == ("fleet", "t512", "fleet@t512x2")
    # The mixed phase compares the fleet and the server on the same settings.
    assert {r.label for r in runs if r.phase == "mixed"} == {"fleet@t512p", "serve@t512p"}


def test_offline_stats_modifier():
    [run] = parse_phases(["bulk=offline@t512+stats"])
    assert (run.path, run.config, run.stats) == ("offline", "t512", True)
    assert run.label == "offline@t512+stats"


@pytest.mark.parametrize("bad", ["bulk=offline@nope", "bulk=fleet@same+prio", "nope",
                                 "bulk=fleet@same x2", "bulk=fleet@same+stats",
                                 "bulk=serve@samex2", "mixed=offline@t512"])
def test_bad_plans_are_refused(bad):
    with pytest.raises(SystemExit):
        parse_phases([bad])


def test_models_file_is_one_the_fleet_loads(tmp_path):
    path = tmp_path / "models.toml"
    path.write_text(models_toml(GPU_CONFIGS["t1024"], name="bench", path="/m"))
    spec = load_models_file(path)["bench"]
    assert (spec.max_num_seqs, spec.max_num_batched_tokens, spec.load_format) == (
        1024, 16384, "dummy")
    assert spec.gpu_memory_utilization == 0.45


def test_serve_flags_leave_unset_settings_to_vllm():
    assert serve_flags(GPU_CONFIGS["defaults"]) == [
        "--gpu-memory-utilization", "0.45", "--load-format", "dummy"]
    flags = serve_flags(GPU_CONFIGS["same"])
    assert flags[flags.index("--max-num-seqs") + 1] == "256"
    assert "--enable-prefix-caching" in flags


def test_targets_pass_and_fail_on_ratios():
    def row(phase, label, tps, **extra):
        path = label.split("@")[0]
        return {"phase": phase, "label": label, "path": path, "tokens_per_s": tps,
                "workers": extra.pop("workers", 1), **extra}

    results = [row("bulk", "offline@same", 1000.0), row("bulk", "serve@same", 980.0),
               row("bulk", "fleet@same", 960.0), row("tuned", "fleet@t1024", 1400.0),
               row("tuned", "serve@defaults", 1000.0)]
    add_ratios(results)
    assert results[2]["vs_offline"] == 0.96 and results[2]["vs_serve"] == 0.98
    status = {c.target: c.status for c in check_targets(results)}
    assert status["bulk: fleet >= 0.97 x offline (same settings: same)"] == "FAIL"
    assert status["bulk: fleet >= 1.0 x serve (same settings: same)"] == "FAIL"
    assert status["tuned: fleet >= 1.3 x serve defaults (bulk)"] == "PASS"
    assert status["two GPUs: 2 workers >= 1.9 x 1"] == "n/a"


def test_same_settings_are_whichever_config_the_bulk_phase_ran():
    results = [{"phase": "bulk", "label": f"{p}@t512", "path": p, "config": "t512",
                "tokens_per_s": tps, "workers": 1}
               for p, tps in (("offline", 1000.0), ("serve", 900.0), ("fleet", 990.0))]
    results += [{"phase": "twogpu", "label": label, "path": "fleet", "config": "t512",
                 "tokens_per_s": tps, "workers": n}
                for label, tps, n in (("fleet@t512", 1000.0, 1), ("fleet@t512x2", 1950.0, 2))]
    status = {c.target: c.status for c in check_targets(results)}
    assert status["bulk: fleet >= 0.97 x offline (same settings: t512)"] == "PASS"
    assert status["bulk: fleet >= 1.0 x serve (same settings: t512)"] == "PASS"
    assert status["two GPUs: 2 workers >= 1.9 x 1"] == "PASS"


def _mixed_row(path: str, *, alone_s: tuple[float, float], busy_p99_s: float,
               bulk_alone: float, bulk: float) -> dict:
    return {"phase": "mixed", "label": f"{path}@t512p", "path": path, "config": "t512p",
            "tokens_per_s": bulk, "workers": 1, "bulk_alone": {"tokens_per_s": bulk_alone},
            "interactive_alone": {"latency_s": {"p50": alone_s[0], "p99": alone_s[1]}},
            "interactive": {"latency_s": {"p50": busy_p99_s / 2, "p99": busy_p99_s}}}


def test_mixed_targets_read_the_same_engine_alone_and_serve_on_the_same_settings():
    serve = _mixed_row("serve", alone_s=(0.136, 0.141), busy_p99_s=20.0, bulk_alone=20000.0,
                       bulk=17000.0)
    fleet = _mixed_row("fleet", alone_s=(0.140, 0.152), busy_p99_s=0.21, bulk_alone=28000.0,
                       bulk=26000.0)
    checks = {c.target: c for c in check_targets([fleet, serve])}
    p99 = checks["mixed fleet@t512p: interactive p99 with the bulk job <= 1.5 x alone"]
    assert (p99.status, p99.value) == ("PASS", 1.382)
    bulk = checks["mixed fleet@t512p: bulk with interactive traffic >= 0.9 x bulk alone"]
    assert (bulk.status, bulk.value) == ("PASS", 0.929)
    p50 = checks["mixed fleet@t512p: interactive alone, p50 <= serve@t512p's + 10 ms (ms above)"]
    assert (p50.status, p50.value) == ("PASS", 4.0)
    p99 = checks["mixed fleet@t512p: interactive alone, p99 <= serve@t512p's + 10 ms (ms above)"]
    assert (p99.status, p99.value) == ("FAIL", 11.0)
    # Issue 12's measurement on one H200 (196 / 228 ms against 136 / 141) fails both; a
    # p99 under load of 2.2 x alone and bulk at 0.86 of alone fail theirs.
    fleet = _mixed_row("fleet", alone_s=(0.196, 0.228), busy_p99_s=0.5, bulk_alone=28000.0,
                       bulk=24000.0)
    status = {c.target.split(": ", 1)[1]: c.status for c in check_targets([fleet, serve])
              if c.target.startswith("mixed")}
    assert status == {
        "interactive p99 with the bulk job <= 1.5 x alone": "FAIL",
        "bulk with interactive traffic >= 0.9 x bulk alone": "FAIL",
        "interactive alone, p50 <= serve@t512p's + 10 ms (ms above)": "FAIL",
        "interactive alone, p99 <= serve@t512p's + 10 ms (ms above)": "FAIL",
        "interactive p99 with the bulk job <= 0.5 x serve@t512p's": "PASS"}


def test_dry_run_builds_every_workload(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu.run", "--tiny", "--dry-run", "--out", str(tmp_path),
         *(f"--phase={p}" for p in DEFAULT_RUNS)],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "fleet@t512x2" in proc.stdout
    assert "workload prefix: 12 prompts" in proc.stderr


def tiny_run(tmp_path, phase: str) -> tuple[subprocess.CompletedProcess, dict]:
    """`bench.gpu.run --tiny` of one phase on the CPU: the process and its one result row
    (the run's exit status checked)."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu.run", "--tiny", "--phase", phase,
         "--out", str(tmp_path), "--deadline-s", "540"],
        cwd=ROOT, capture_output=True, text=True, timeout=580)
    [row] = json.loads((tmp_path / "results.json").read_text())["results"]
    assert proc.returncode == 0, row.get("error") or proc.stderr[-3000:]
    return proc, row


@pytest.mark.engine
@pytest.mark.timeout(600)
def test_tiny_fleet_run_on_the_cpu(tmp_path):
    _, row = tiny_run(tmp_path, "bulk=fleet@same")
    assert row["ok"] == row["tasks"] == 16
    assert row["output_tokens"] == 16 * 8
    assert row["lanes"][0]["bench"]["committed"] >= 16


def test_each_model_size_gets_the_one_copy_of_the_tokenizer(tmp_path):
    from bench.gpu.common import MODEL_SIZES, TOKENIZER_DIR, assemble_model

    dirs = [assemble_model(size, tmp_path) for size in MODEL_SIZES]
    for model in dirs:
        names = {p.name for p in model.iterdir()}
        assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= names
        assert (model / "tokenizer.json").resolve() == (TOKENIZER_DIR / "tokenizer.json")
    configs = [json.loads((d / "config.json").read_text()) for d in dirs]
    assert configs[0]["hidden_size"] != configs[1]["hidden_size"]


def test_idle_figures_and_what_each_comparison_shows():
    from bench.gpu.idle import VARIANTS, comparisons, histogram_means, summarize, table

    run = summarize([0.196, 0.200, 0.228], [0.010, 0.012], 64,
                    histograms=histogram_means(
                        {"request_decode_time_seconds_sum": 1.0,
                         "request_decode_time_seconds_count": 10},
                        {"request_decode_time_seconds_sum": 1.567,
                         "request_decode_time_seconds_count": 13}),
                    steps={"queue": 0.7})
    assert run["e2e_ms"]["p50"] == 200.0 and run["e2e_ms"]["p99"] == 228.0
    assert run["per_token_ms"] == round((200.0 - 10.0) / 63, 3)
    assert run["engine_decode_per_token_ms"] == round(189.0 / 63, 3)  # 567 ms / 3 requests
    serve = summarize([0.136, 0.138, 0.141], [0.008, 0.009], 64)
    results = {"serve": {"engine": {"start_s": 60}, "serve": serve},
               "fleet": {"engine": {"start_s": 30, "async_scheduling": True}, "fleet": run},
               "fcfs": {"skipped": "budget"}}
    [gap] = comparisons(results)
    assert (gap["run"], gap["against"], gap["e2e_p50_ms"], gap["e2e_p99_ms"]) == (
        "fleet/fleet", "serve/serve", 62.0, 87.0)
    text = table(results)
    assert "async_scheduling True" in text and "fcfs" in text and "budget" in text
    # Every comparison names runs that some variant makes.
    from bench.gpu.idle import COMPARISONS

    made = {f"{v.name}/{s}" for v in VARIANTS.values() for s in v.subruns}
    assert {p for _, a, b in COMPARISONS for p in (a, b)} <= made


@pytest.mark.engine
@pytest.mark.timeout(900)
def test_tiny_idle_fleet_variant_on_the_cpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu.idle", "--tiny", "--variants", "fleet",
         "--requests", "2", "--tokens", "4", "--out", str(tmp_path), "--deadline-s", "800"],
        cwd=ROOT, capture_output=True, text=True, timeout=880)
    report = json.loads((tmp_path / "idle.json").read_text())
    fleet = report["results"]["fleet"]
    assert proc.returncode == 0, fleet.get("error") or proc.stderr[-3000:]
    assert set(fleet) == {"engine", "fleet", "fleet-gc", "fleet-block", "direct", "asyncllm",
                          "asyncllm-plain", "asyncllm-delta"}
    assert fleet["fleet"]["steps_p50_ms"]["decode"] > 0
    assert fleet["asyncllm-delta"]["step_ms"]["n"] == 2 * 3  # two requests, three gaps each
    assert "the queue and the worker's loops" in proc.stdout


def test_fairness_phase_plans_and_targets():
    runs = parse_phases(["fairness"])
    assert [r.label for r in runs] == ["fleet@t512p", "fleet@t512p+nofair"]
    with pytest.raises(SystemExit):
        parse_phases(["bulk=fleet@t512p+nofair"])  # only the fairness phase turns it off
    fair = {"phase": "fairness", "label": "fleet@t512p", "path": "fleet", "config": "t512p",
            "tokens_per_s": 19_600.0,
            "interactive_alone": {"ttft_s": {"p50": 0.030, "p99": 0.040}},
            "interactive": {"ttft_s": {"p50": 0.040, "p99": 0.056}}}
    unfair = {"phase": "fairness", "label": "fleet@t512p+nofair", "path": "fleet",
              "config": "t512p", "tokens_per_s": 20_000.0}
    checks = {c.target: c for c in check_targets([fair, unfair])}
    ttft = checks["fairness: B's p99 time to first token under A's flood <= 1.5 x alone"]
    assert (ttft.status, ttft.value) == ("PASS", 1.4)
    tput = checks["fairness: tokens/s with fairness on >= 0.97 x off"]
    assert (tput.status, tput.value) == ("PASS", 0.98)


def test_the_schema_target_compares_schema_runs_with_plain_ones():
    from bench.gpu.structured_outputs import targets

    [run] = parse_phases(["schema"])
    assert (run.path, run.config, run.label) == ("fleet", "t512", "fleet@t512")
    row = {"phase": "schema", "label": "fleet@t512", "path": "fleet", "tokens_per_s": 890.0,
           "vs_plain": 0.89, "workers": 1}
    [check] = targets([row])
    assert check.status == "FAIL" and check.value == 0.89 and "0.9 x" in check.target
    assert [c.status for c in check_targets([{**row, "vs_plain": 0.93}])
            if c.target.startswith("schema")] == ["PASS"]
    assert targets([])[0].status == "n/a"
    with pytest.raises(SystemExit):  # the fleet only: structured outputs are its feature here
        import asyncio

        from bench.gpu.run import TINY_SIZES, execute

        asyncio.run(execute(None, None, parse_phases(["schema=offline@same"])[0], None,
                            {"bulk": None}, TINY_SIZES))


@pytest.mark.engine
@pytest.mark.timeout(600)
def test_tiny_schema_phase_on_the_cpu(tmp_path):
    """The schema phase (bench/gpu/structured_outputs.py) end to end on the CPU: one fleet,
    plain and JSON-schema runs of the tiny bulk prompts, ABBA."""
    proc, row = tiny_run(tmp_path, "schema=fleet@same")
    assert [len(row["runs"][k]) for k in ("plain", "schema")] == [2, 2]
    assert row["plain"]["output_tokens"] == row["output_tokens"] == 2 * 16 * 8
    assert row["constrained_to_end"] == 2 * 16  # 8 tokens never finish that JSON
    assert row["vs_plain"] > 0 and "schema fleet@same" in proc.stdout


# ---- the affinity phase (bench/gpu/affinity.py, issue 18) ----------------------------------

def test_the_affinity_plan_runs_two_gpus_on_every_path():
    runs = parse_phases(["affinity"])
    assert [(r.path, r.workers, r.affinity) for r in runs] == [
        ("fleet", 2, True), ("fleet", 2, False), ("serve", 2, False), ("offline", 2, False)]
    assert runs[0].label == "fleet@a512x2+affinity"
    assert GPU_CONFIGS["a512"].max_model_len == 4096
    for bad in ("bulk=fleet@t512+affinity", "affinity=serve@a512+affinity"):
        with pytest.raises(SystemExit):
            parse_phases([bad])


def _affinity_row(label: str, tps: float, hit: float, p90: float, bulk: float | None = None):
    row = {"phase": "affinity", "label": label, "path": label.split("@")[0],
           "tokens_per_s": tps, "prefix_hit_rate": hit, "ttft_s": {"p90": p90}, "workers": 2}
    if bulk is not None:
        row["bulk"] = {"tokens_per_s": bulk}
    return row


def test_affinity_targets_pass_and_fail_on_ratios():
    from bench.gpu.affinity import targets

    rows = [_affinity_row("fleet@a512x2+affinity", 9000.0, 0.9, 0.5, bulk=20000.0),
            _affinity_row("fleet@a512x2", 4500.0, 0.4, 2.0, bulk=20100.0),
            _affinity_row("serve@a512x2", 6500.0, 0.45, 0.9)]
    status = {c.target: (c.status, c.value) for c in targets(rows)}
    assert status["affinity: prefix-cache hit rate >= 2 x the fleet without"] == ("PASS", 2.25)
    assert status["affinity: output tokens/s >= 1.5 x round-robin vllm serve"] == (
        "FAIL", 1.385)
    assert status["affinity: p90 time to first token <= 0.5 x round-robin vllm serve"] == (
        "FAIL", 0.556)
    assert status["affinity: plain bulk prompts, tokens/s >= 0.97 x without (costs nothing)"][
        0] == "PASS"
    assert {s for s, _ in (status[t] for t in status)} <= {"PASS", "FAIL"}
    assert all(c.status == "n/a" for c in targets(rows[1:2]))


@pytest.mark.engine
@pytest.mark.timeout(900)
def test_tiny_affinity_phase_on_the_cpu(tmp_path):
    """The affinity phase's fleet with affinity, tiny sizes: two fleet workers with
    partitions, the chains and then the plain bulk prompts (two CPU engines).  The other paths
    of the phase are those of the other phases (serve, offline); the whole phase is eight CPU
    engines, about 15 minutes here: `python -m bench.gpu.run --tiny --phase affinity`."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu.run", "--tiny", "--phase",
         "affinity=fleet@a512x2+affinity", "--out", str(tmp_path), "--deadline-s", "800"],
        cwd=ROOT, capture_output=True, text=True, timeout=850)
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert proc.returncode in (0, 1) and not [r for r in rows if "error" in r], proc.stderr[-3000:]
    assert [r["label"] for r in rows] == ["fleet@a512x2+affinity"]
    with_affinity = rows[0]
    assert with_affinity["ok"] == with_affinity["tasks"] == 8 * 4, with_affinity
    assert with_affinity["engine_counters"]["prefix_cache_queries"] > 0
    # The 8 warm-up and 32 chain tasks, each read from a partition: by its owner (a hit),
    # or by the other worker once it waited affinity_steal_after_ms (on a loaded machine
    # the busier CPU engine's partitions are stolen from: 12 of 40 once in CI).
    counts = with_affinity["affinity"]
    read = counts["hits"] + counts["steals"] + counts["misses"]
    assert read >= 40 and counts["hits"] >= read / 2, counts
    assert with_affinity["bulk"]["ok"] == 16
    assert len(with_affinity["tasks_per_worker"]) == 2
