"""The CLI as a user runs it: embedded server, worker subprocess, demo, trace."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

# Commands without REDIS_URL: the local server's default port (conftest's lock).
pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("default_port_lock")]


def run_cli(*args: str, home, timeout_s: float = 100) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(AGENTFLEET_HOME=str(home), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "agentfleet", *args], env=env, text=True,
                          capture_output=True, timeout=timeout_s)


def test_demo_on_the_fake_engine_then_trace_from_the_persisted_server(tmp_path):
    demo = run_cli("demo", "--engine", "fake", "--agents", "6", home=tmp_path)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "12 steps (12 succeeded) of 6 agents" in demo.stdout
    cid = re.search(r"again later: agentfleet trace (demo-\S+-00)", demo.stdout)
    assert cid, demo.stdout[-2000:]
    assert f"correlation {cid.group(1)}: 2 finished task(s)" in demo.stdout
    url = re.search(r"REDIS_URL=(redis://\S+)", demo.stdout + demo.stderr)
    assert url, "the demo names its embedded server"
    # The embedded server stopped with the demo ...
    port = int(url.group(1).rsplit(":", 1)[1].split("/")[0])
    import socket
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
    # ... and its append-only file brings the chain back in a new one; a second demo on the
    # same server traces only its own chain.
    time.sleep(1.1)  # correlation ids carry the second the demo started
    again = run_cli("demo", "--engine", "fake", "--agents", "2", home=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    second = re.search(r"again later: agentfleet trace (demo-\S+-00)", again.stdout).group(1)
    assert second != cid.group(1)
    assert f"correlation {second}: 2 finished task(s)" in again.stdout
    trace = run_cli("trace", cid.group(1), home=tmp_path)
    assert trace.returncode == 0, trace.stderr
    assert "follow-up enqueued" in trace.stdout
    assert "result written" in trace.stdout


def test_unknown_model_is_a_clear_error(tmp_path):
    out = run_cli("submit", "--model", "gpt-9", "--prompt", "hi", "--wait-s", "0", home=tmp_path)
    assert out.returncode == 2
    assert "model: unknown model 'gpt-9'" in out.stderr
