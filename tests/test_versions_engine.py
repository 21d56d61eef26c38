"""Two versions of the real small model in one worker on the CPU engine (`agentfleet worker`,
vLLM, SmolLM2-135M): at weights 90/10 each task runs on the version its correlation id
routes to, and its result says so; then a hot swap under steady load (promote v2, retire v1)
loses nothing.  One worker process, two engine starts (about a minute each on 2 cores)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from agentfleet.ops.embedded import ServerProcess
from agentfleet.producer.client import Producer
from agentfleet.producer.connection import connect
from agentfleet.producer.models import ModelRegistry
from agentfleet.producer.routing import parse_load
from agentfleet.schemas import keys
from agentfleet.schemas.settings import DEFAULT_MODEL, ModelSpec, Settings
from agentfleet.schemas.wire import Sampling, Task
from agentfleet.workers.models import resolve_model_path

pytestmark = [pytest.mark.engine, pytest.mark.timeout(1200)]

ENGINE_ARGS = {"max_model_len": 512, "max_num_seqs": 16, "kv_cache_space_gib": 1,
               "enforce_eager": True}


async def _serving(redis, version: str, worker: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while version not in parse_load(await redis.hgetall(keys.version_load(DEFAULT_MODEL))):
        assert worker.poll() is None, "the worker died"
        assert time.monotonic() < deadline, f"{version} not serving after {timeout_s} s"
        await asyncio.sleep(0.5)


async def test_two_versions_at_90_10_then_a_hot_swap_under_load(tmp_path):
    path = str(resolve_model_path(ModelSpec(name=DEFAULT_MODEL), Settings().home_path))
    server = ServerProcess(tmp_path / "server", appendonly=False)
    server.start()
    redis = connect(server.url)
    reg = ModelRegistry(redis)
    await reg.register(DEFAULT_MODEL, "v1", path=path, engine_args=ENGINE_ARGS,
                       check_engine=False, why="engine test")
    env = {**os.environ, "REDIS_URL": server.url, "AGENTFLEET_ENGINE": "vllm",
           "AGENTFLEET_WORKER_ID": "versions-worker", "AGENTFLEET_METRICS_PORT": "0"}
    worker = subprocess.Popen([sys.executable, "-m", "agentfleet", "worker"], env=env)
    producer = Producer(connect(server.url), settings=Settings())
    sampling = Sampling(max_tokens=4)
    try:
        await _serving(redis, "v1", worker, 600)
        ids: list[str] = []
        stop = asyncio.Event()

        async def steady() -> None:  # a task every 0.2 s, through the whole swap
            i = 0
            while not stop.is_set():
                ids.append(await producer.submit(model=DEFAULT_MODEL, prompt=f"Count to {i}.",
                                                 sampling=sampling))
                i += 1
                await asyncio.sleep(0.2)

        load = asyncio.create_task(steady())
        await reg.register(DEFAULT_MODEL, "v2", path=path, engine_args=ENGINE_ARGS,
                           check_engine=False)
        await _serving(redis, "v2", worker, 600)  # its engine started beside v1's
        await reg.set_weights(DEFAULT_MODEL, {"v1": 90, "v2": 10})
        await asyncio.sleep(1.2)  # the producer's registry cache
        table = await reg.table()
        tasks = [Task(model=DEFAULT_MODEL, prompt=f"Name a colour ({i}).", sampling=sampling,
                      correlation_id=f"engine-90-10-{i}") for i in range(60)]
        routed = await producer.submit_many(tasks)
        results = await producer.wait_many(routed, timeout_s=600)
        assert all(r.ok for r in results), [r for r in results if not r.ok][:2]
        for r in results:  # the version its correlation id routes to made it
            assert r.model_version == table.pick(DEFAULT_MODEL, r.correlation_id), r
        counts = {v: sum(r.model_version == v for r in results) for v in ("v1", "v2")}
        assert counts["v2"] >= 1 and counts["v1"] >= 40, counts

        await reg.promote(DEFAULT_MODEL, "v2", why="hot swap")
        await reg.retire(DEFAULT_MODEL, "v1", why="hot swap")
        deadline = time.monotonic() + 300
        while "v1" in parse_load(await redis.hgetall(keys.version_load(DEFAULT_MODEL))):
            assert worker.poll() is None and time.monotonic() < deadline
            await asyncio.sleep(0.5)  # v1's runner drains, its engine stops
        await asyncio.sleep(2.0)
        stop.set()
        await load
        swapped = await producer.wait_many(ids, timeout_s=600)
        assert len({r.task_id for r in swapped}) == len(ids) > 10
        assert all(r.ok for r in swapped), [r for r in swapped if not r.ok][:2]
        assert {r.model_version for r in swapped} == {"v1", "v2"}
        assert swapped[-1].model_version == "v2"
        stats = await redis.hgetall(keys.stats_key(DEFAULT_MODEL))
        assert int(stats[b"written"]) == len(ids) + len(routed)
        assert int(stats.get(b"duplicates", 0)) == 0
    finally:
        await producer.close()
        worker.send_signal(signal.SIGTERM)
        try:
            code = worker.wait(180)
        except subprocess.TimeoutExpired:  # where it hangs: every thread's stack, on stderr
            worker.send_signal(signal.SIGUSR1)
            time.sleep(2)
            worker.kill()
            code = "hung"
        await redis.aclose()
        server.stop()
    assert code == 0, "the worker did not exit within 180 s of SIGTERM: stacks above"
