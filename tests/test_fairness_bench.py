"""bench.fairness runs end to end on small sizes (its targets are checked by the benchmark
itself, on a quiet machine: docs/benchmarks.md); the token shares, which do not depend on the
machine's speed, must hold even here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_fairness_benchmark_measures_flood_weights_and_layer(tmp_path):
    out = tmp_path / "fair.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.fairness", "--quick", "--window-s", "4",
         "--backlog", "4000", "--share-window-s", "5", "--per-tenant", "3000",
         "--layer-tasks", "3000", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    figures = doc["figures"]
    assert figures["flood"]["b_flood"]["n"] > 5 and figures["flood"]["a_alone_per_s"] > 0
    shares = figures["weights"]["shares"]
    assert abs(shares["w1"] - 1 / 8) < 0.05 and abs(shares["w5"] - 5 / 8) < 0.05, shares
    statuses = {c["target"]: c["status"] for c in doc["checks"]}
    assert statuses["weights 1:2:5: token shares within 5% of 1/8, 2/8, 5/8"] == "PASS"
    assert len(figures["layer"]["tenants_8"]) == 2
