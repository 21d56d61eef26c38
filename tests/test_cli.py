"""The CLI as a user runs it: embedded server, worker subprocess, demo, trace."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)


def run_cli(*args: str, home, timeout_s: float = 100) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(AGENTFLEET_HOME=str(home), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "ops.cli", *args], env=env, text=True,
                          capture_output=True, timeout=timeout_s)


def test_demo_on_the_fake_engine_then_trace_from_the_persisted_server(tmp_path):
    demo = run_cli("demo", "--engine", "fake", "--agents", "6", home=tmp_path)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "12 steps (12 succeeded) of 6 agents" in demo.stdout
    assert "correlation demo-00: 2 finished task(s)" in demo.stdout
    url = re.search(r"REDIS_URL=(redis://\S+)", demo.stdout + demo.stderr)
    assert url, "the demo names its embedded server"
    # The embedded server stopped with the demo ...
    port = int(url.group(1).rsplit(":", 1)[1].split("/")[0])
    import socket
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
    # ... and its append-only file brings the chain back in a new one.
    trace = run_cli("trace", "demo-00", home=tmp_path)
    assert trace.returncode == 0, trace.stderr
    assert "follow-up enqueued" in trace.stdout
    assert "result written" in trace.stdout


def test_unknown_model_is_a_clear_error(tmp_path):
    out = run_cli("submit", "--model", "gpt-9", "--prompt", "hi", "--wait-s", "0", home=tmp_path)
    assert out.returncode == 2
    assert "model: unknown model 'gpt-9'" in out.stderr
