"""A worker under load that gets SIGTERM is done within the grace period the manifests give it.

The grace period (terminationGracePeriodSeconds) and the drain timeout (--drain-timeout-s of
the container's args) are read from the rendered worker Deployment in ops/k8s/; the worker is
a real `agentfleet worker` process (fake engine) on a real server, started with exactly those
args.  Its load: short tasks that finish during the drain (committed) and long ones that
cannot (left pending for another worker), so the drain runs to its deadline: the worst case.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from agentfleet.producer.client import Producer
from agentfleet.producer.connection import connect
from agentfleet.schemas import keys
from agentfleet.schemas.settings import Settings
from agentfleet.schemas.wire import Status, Task

K8S = Path(__file__).resolve().parent.parent / "ops" / "k8s"
pytestmark = pytest.mark.timeout(180)


def worker_pod_spec() -> dict:
    for path in sorted(K8S.glob("worker-*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == "Deployment":
                return doc["spec"]["template"]["spec"]
    raise AssertionError("no worker Deployment in ops/k8s")


# One server is enough: the drain does not depend on it, and each run waits the drain out.
@pytest.mark.parametrize("server", ["valkey"], indirect=True)
async def test_sigterm_under_load_drains_within_the_manifests_grace_period(server, redis,
                                                                           tmp_path):
    pod = worker_pod_spec()
    grace_s = pod["terminationGracePeriodSeconds"]
    (container,) = pod["containers"]
    args = container["args"]
    drain_s = float(args[args.index("--drain-timeout-s") + 1])
    assert drain_s < grace_s
    model = args[args.index("--models") + 1]
    models_file = tmp_path / "models.toml"
    models_file.write_text(f'[models."{model}"]\nmax_model_len = 512\n')
    env = {**os.environ, "REDIS_URL": server.url, "AGENTFLEET_ENGINE": "fake",
           "AGENTFLEET_MODELS_FILE": str(models_file), "AGENTFLEET_DEFAULT_MODEL": model,
           "AGENTFLEET_HOME": str(tmp_path), "AGENTFLEET_METRICS_PORT": "0",
           "AGENTFLEET_WORKER_ID": "drain-w", "AGENTFLEET_BLOCK_MS": "50"}
    # The container's args as they are, after the image's ENTRYPOINT (`agentfleet`).
    proc = subprocess.Popen([sys.executable, "-m", "agentfleet", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    settings = Settings.from_env({"REDIS_URL": server.url,
                                  "AGENTFLEET_MODELS_FILE": str(models_file),
                                  "AGENTFLEET_DEFAULT_MODEL": model})
    producer = Producer(connect(server.url), settings=settings)
    try:
        short = await producer.submit_many(
            [Task(model=model, prompt=f"short {i}", metadata={"fake_delay_s": "2"})
             for i in range(300)])
        long = await producer.submit_many(
            [Task(model=model, prompt=f"long {i}", metadata={"fake_delay_s": "600"})
             for i in range(20)])
        stream = keys.task_stream(model)
        deadline = time.monotonic() + 30
        while True:  # every task read: all of them in the worker's engine
            try:
                pending = (await redis.xpending(stream, keys.GROUP))["pending"]
            except Exception:
                pending = 0
            if pending == len(short) + len(long):
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, f"only {pending} tasks read"
            await asyncio.sleep(0.05)

        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, grace_s + 30)
        took_s = time.monotonic() - sent
        assert code == 0, proc.stderr.read().decode()[-3000:]
        # The kubelet would SIGKILL at grace_s: the worker must be gone before, and it waits
        # its drain out (the long tasks cannot finish).
        assert drain_s <= took_s < grace_s, (took_s, drain_s, grace_s)

        results = await producer.wait_many(short, timeout_s=10)
        assert all(r.status is Status.SUCCEEDED for r in results)
        # The long ones were not acknowledged: pending, for another worker to reclaim.
        assert (await redis.xpending(stream, keys.GROUP))["pending"] == len(long)
        assert not await redis.hexists(keys.workers_key(model), "drain-w")  # beat removed
    finally:
        await producer.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
