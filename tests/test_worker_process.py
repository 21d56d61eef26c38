"""The worker as a process: a failing loop or a dead engine drains and ends non-zero (never
silently), exit codes tell a supervisor what happened, and the probes answer."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import msgspec
import pytest

from agentfleet.schemas.errors import WorkerCrashedError
from agentfleet.schemas.wire import Task
from agentfleet.workers.fake_engine import FakeEngine
from agentfleet.workers.worker import Worker


async def test_a_failing_loop_drains_in_flight_work_and_raises(redis, producer, settings,
                                                               caplog):
    worker = Worker(settings, redis, {"m1": FakeEngine(delay_s=0.3)}, worker_id="w1")
    runner = worker.runners[0]
    run = asyncio.create_task(worker.run(drain_timeout_s=10))
    await asyncio.wait_for(worker.ready.wait(), 10)
    ids = await producer.submit_many([Task(model="m1", prompt=f"p{i}") for i in range(5)])
    while runner.busy < 5:
        await asyncio.sleep(0.01)

    async def broken() -> None:
        raise RuntimeError("a bug in a loop")

    with caplog.at_level(logging.ERROR, logger="agentfleet.worker"):
        side = asyncio.ensure_future(worker._guard("broken", broken))  # as _serve runs loops
        with pytest.raises(WorkerCrashedError, match="a bug in a loop"):
            await asyncio.wait_for(run, 15)
    await side
    assert any(r.exc_info and "broken" in r.getMessage() for r in caplog.records)
    results = await producer.wait_many(ids, timeout_s=10)  # committed during the drain
    assert all(r.ok for r in results)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "AGENTFLEET_ENGINE": "fake", "AGENTFLEET_METRICS_PORT": "0",
            "AGENTFLEET_BLOCK_MS": "20", **env}
    return subprocess.run([sys.executable, "-m", "agentfleet", *args], env=full,
                          capture_output=True, text=True, timeout=timeout)


async def test_exit_codes_tell_a_crash_from_bad_config_from_an_unreachable_server(
        server, producer, tmp_path):
    # 1: the engine died (a task makes the fake engine report engine_dead)
    await producer.submit(model="m1", prompt="x", metadata={"fake_error": "engine_dead"})
    models = "[models.m1]\nmax_model_len = 512\n"
    env = {"REDIS_URL": server.url, "AGENTFLEET_MAX_ATTEMPTS": "1"}
    path = tmp_path / "models.toml"
    path.write_text(models)
    env["AGENTFLEET_MODELS_FILE"] = str(path)
    env["AGENTFLEET_DEFAULT_MODEL"] = "m1"
    crashed = await asyncio.to_thread(_cli, "worker", **env)
    assert crashed.returncode == 1, crashed.stderr[-2000:]
    assert "engine of m1 died" in crashed.stderr
    # 2: configuration that cannot work, in one line
    bad = await asyncio.to_thread(_cli, "worker", **{**env, "AGENTFLEET_ENGINE": "bogus"})
    assert bad.returncode == 2 and "AGENTFLEET_ENGINE" in bad.stderr
    assert "Traceback" not in bad.stderr
    # 3: nobody listens at REDIS_URL
    gone = await asyncio.to_thread(_cli, "worker", REDIS_URL=f"redis://127.0.0.1:{_free_port()}",
                                   AGENTFLEET_SERVER_WAIT_S="1")
    assert gone.returncode == 3 and "unreachable" in gone.stderr
    assert "Traceback" not in gone.stderr


async def test_probes_say_ready_while_serving_and_not_while_draining(redis, settings):
    s = msgspec.structs.replace(settings, metrics_port=_free_port())
    worker = Worker(s, redis, {"m1": FakeEngine()}, worker_id="probe")
    server = worker.metrics.serve(s.metrics_port, "127.0.0.1")

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    try:
        assert await asyncio.to_thread(get, "/readyz") == (503, "starting (engines loading)\n")
        run = asyncio.create_task(worker.run(drain_timeout_s=5))
        await asyncio.wait_for(worker.ready.wait(), 10)
        assert await asyncio.to_thread(get, "/healthz") == (200, "ok\n")
        assert await asyncio.to_thread(get, "/readyz") == (200, "serving\n")
        worker.request_stop()
        await asyncio.wait_for(run, 10)
        assert (await asyncio.to_thread(get, "/readyz"))[0] == 503
    finally:
        worker.metrics.close()
