"""`honcho start -c worker=3`: the Procfile runs a local fleet (fake engine for speed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Commands without REDIS_URL: the local server's default port (conftest's lock).
pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("default_port_lock")]
ROOT = Path(__file__).resolve().parent.parent


def test_procfile_runs_a_fleet_of_three_workers(tmp_path):
    honcho = Path(sys.executable).with_name("honcho")
    env = {**os.environ, "AGENTFLEET_ENGINE": "fake", "AGENTFLEET_HOME": str(tmp_path),
           "PYTHONUNBUFFERED": "1"}
    env.pop("REDIS_URL", None)
    proc = subprocess.Popen([str(honcho), "start", "-c", "worker=3", "-p", "15100"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            serving = sum("serving ['smollm2-135m']" in x for x in lines)
            chains = sum("2 steps" in x for x in lines)
            if serving == 3 and chains >= 3:
                break
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    out = "".join(lines) + rest
    assert sum("serving ['smollm2-135m']" in x for x in lines) == 3, out[-3000:]
    assert sum("2 steps" in x for x in lines) >= 3, out[-3000:]
    assert "worker.3" in out and "producer.1" in out
