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
    [two] = [r for r in runs if r.workers == 2]
    assert (two.path, two.config, two.label) == ("fleet", "t512", "fleet@t512x2")
    [prio] = [r for r in runs if r.priority]
    assert prio.label == "fleet@t1024+prio"


def test_offline_stats_modifier():
    [run] = parse_phases(["bulk=offline@t512+stats"])
    assert (run.path, run.config, run.stats, run.priority) == ("offline", "t512", True, False)
    assert run.label == "offline@t512+stats"


@pytest.mark.parametrize("bad", ["bulk=offline@nope", "bulk=serve@same+prio", "nope",
                                 "bulk=fleet@same x2", "bulk=fleet@same+stats"])
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
    status = {c["target"]: c["status"] for c in check_targets(results)}
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
    status = {c["target"]: c["status"] for c in check_targets(results)}
    assert status["bulk: fleet >= 0.97 x offline (same settings: t512)"] == "PASS"
    assert status["bulk: fleet >= 1.0 x serve (same settings: t512)"] == "PASS"
    assert status["two GPUs: 2 workers >= 1.9 x 1"] == "PASS"


def test_dry_run_builds_every_workload(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu.run", "--tiny", "--dry-run", "--out", str(tmp_path),
         *(f"--phase={p}" for p in DEFAULT_RUNS)],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "fleet@t512x2" in proc.stdout
    assert "workload prefix: 12 prompts" in proc.stderr


@pytest.mark.engine
@pytest.mark.timeout(600)
def test_tiny_fleet_run_on_the_cpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu.run", "--tiny", "--phase", "bulk=fleet@same",
         "--out", str(tmp_path), "--deadline-s", "540"],
        cwd=ROOT, capture_output=True, text=True, timeout=580)
    report = json.loads((tmp_path / "results.json").read_text())
    [row] = report["results"]
    assert proc.returncode == 0, row.get("error") or proc.stderr[-3000:]
    assert row["ok"] == row["tasks"] == 16
    assert row["output_tokens"] == 16 * 8
    assert row["lanes"][0]["bench"]["committed"] >= 16


def test_the_schema_target_compares_schema_runs_with_plain_ones():
    from bench.gpu.structured_outputs import targets

    [run] = parse_phases(["schema"])
    assert (run.path, run.config, run.label) == ("fleet", "t512", "fleet@t512")
    row = {"phase": "schema", "label": "fleet@t512", "path": "fleet", "tokens_per_s": 890.0,
           "vs_plain": 0.89, "workers": 1}
    [check] = targets([row])
    assert check["status"] == "FAIL" and check["bound"] == 0.9
    assert [c["status"] for c in check_targets([{**row, "vs_plain": 0.93}])
            if c["target"].startswith("schema")] == ["PASS"]
    assert targets([])[0]["status"] == "n/a"
    with pytest.raises(SystemExit):  # the fleet only: structured outputs are its feature here
        import asyncio

        from bench.gpu.run import TINY_SIZES, execute

        asyncio.run(execute(None, parse_phases(["schema=offline@same"])[0], None,
                            {"bulk": None}, TINY_SIZES))


@pytest.mark.engine
@pytest.mark.timeout(600)
def test_tiny_schema_phase_on_the_cpu(tmp_path):
    """The schema phase (bench/gpu/structured_outputs.py) end to end on the CPU: one fleet,
    plain and JSON-schema runs of the tiny bulk prompts, ABBA."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu.run", "--tiny", "--phase", "schema=fleet@same",
         "--out", str(tmp_path), "--deadline-s", "540"],
        cwd=ROOT, capture_output=True, text=True, timeout=580)
    report = json.loads((tmp_path / "results.json").read_text())
    [row] = report["results"]
    assert proc.returncode == 0, row.get("error") or proc.stderr[-3000:]
    assert [len(row["runs"][k]) for k in ("plain", "schema")] == [2, 2]
    assert row["plain"]["output_tokens"] == row["output_tokens"] == 2 * 16 * 8
    assert row["constrained_to_end"] == 2 * 16  # 8 tokens never finish that JSON
    assert row["vs_plain"] > 0 and "schema fleet@same" in proc.stdout
