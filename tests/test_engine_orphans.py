"""A worker killed outright (SIGKILL: the OOM killer, `kill -9`, a supervisor out of patience)
never runs vLLM's shutdown: its engine core processes must still go, not idle on under init
holding memory and a GPU (found once: two engine cores left by a killed test worker)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest

from agentfleet.ops.embedded import ServerProcess, free_port
from agentfleet.schemas.settings import DEFAULT_MODEL

pytestmark = [pytest.mark.engine, pytest.mark.timeout(600)]

MODELS_TOML = f"""
[models.{DEFAULT_MODEL}]
max_model_len = 256
max_num_seqs = 4
kv_cache_space_gib = 1
enforce_eager = true
"""


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def test_a_worker_killed_with_sigkill_takes_its_engine_processes_with_it(tmp_path):
    (tmp_path / "models.toml").write_text(MODELS_TOML)
    server = ServerProcess(tmp_path / "server", appendonly=False)
    server.start()
    port = free_port()
    env = {**os.environ, "REDIS_URL": server.url, "AGENTFLEET_ENGINE": "vllm",
           "AGENTFLEET_MODELS_FILE": str(tmp_path / "models.toml"),
           "AGENTFLEET_WORKER_ID": "doomed", "AGENTFLEET_METRICS_PORT": str(port)}
    worker = subprocess.Popen([sys.executable, "-m", "agentfleet", "worker"], env=env)
    descendants: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 400
        while not _ready(f"http://127.0.0.1:{port}/readyz"):
            assert worker.poll() is None, "the worker died while starting"
            assert time.monotonic() < deadline, "the worker never became ready"
            time.sleep(1)
        descendants = psutil.Process(worker.pid).children(recursive=True)
        names = [" ".join(p.cmdline()) or p.name() for p in descendants]
        assert any("EngineCore" in n for n in names), names  # vLLM's engine runs apart
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        gone, alive = psutil.wait_procs(descendants, timeout=30)
        assert alive == [], [(p.pid, p.name()) for p in alive]
    finally:
        for proc in descendants:  # whatever the check found alive: not left to the next test
            if proc.is_running():
                proc.kill()
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        server.stop()
