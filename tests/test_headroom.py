"""`python -m bench.headroom --quick`, as CI runs it: interactive headroom beside a bulk job
on the fake engine (issue 12's CPU targets), and the benchmark stops at once, with the
worker's error, when its worker dies.  The figures themselves are the benchmark's to print
and to check (PASS/FAIL); docs/benchmarks.md records a full run."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)


def headroom(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.headroom", "--quick", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=110)


def test_quick_headroom_run_passes_its_targets():
    out = headroom()
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    passed = [line for line in out.stdout.splitlines() if line.startswith("PASS")]
    assert len(passed) == 3, out.stdout
    assert "interactive p99 with bulk / alone" in passed[0]


def test_the_benchmark_stops_at_once_when_its_worker_dies():
    started = time.monotonic()
    out = headroom("--worker-env", "AGENTFLEET_CRASH_AT=before_commit")  # dies at its 1st commit
    assert out.returncode == 1
    assert "FAIL  the worker exited with code 137" in out.stdout, out.stdout + out.stderr
    assert time.monotonic() - started < 30  # not the minutes its waits would allow
