"""Engines sharing a GPU take turns (workers/sleep.py), on the fake engine's sleep mode: one
awake at a time, never asleep with a request in it, woken when work for it queues, put to
sleep when idle, and under load on both neither starves.  vLLM's own sleep and wake run on
the GPU only (bench/gpu/versions.py measures them)."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest

from agentfleet.producer.models import ModelRegistry
from agentfleet.schemas.wire import Task
from versions_fleet import fake_factory, model_directory, wait_until


@pytest.fixture
async def shared_gpu(redis, start_worker, settings, tmp_path):
    """m1@v1 and m1@v2 in one sleep group of one worker (v2 at weight 0: reached by pin)."""
    reg = ModelRegistry(redis)
    path = str(model_directory(tmp_path))
    await reg.register("m1", "v1", path=path, check_engine=False, sleep_group="gpu0")
    await reg.register("m1", "v2", path=path, check_engine=False, sleep_group="gpu0")
    engine = {"sleep_mode": True, "wake_s": 0.05, "delay_s": 0.02, "slots": 4}
    factory = fake_factory(v1=engine, v2=engine)
    s = msgspec.structs.replace(settings, sleep_turn_s=0.3, sleep_idle_s=0.6)
    worker = await start_worker(("m1",), engines={}, registry_models=["m1"],
                                engine_factory=factory, worker_settings=s)
    awake_at_once = []

    async def watch() -> None:  # the invariant, sampled every 2 ms
        while True:
            awake = [v for v, e in factory.made.items() if not e.asleep]
            awake_at_once.append(len(awake))
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    yield worker, factory.made, awake_at_once
    watcher.cancel()
    await asyncio.gather(watcher, return_exceptions=True)


async def test_engines_start_one_at_a_time_and_one_is_awake(shared_gpu):
    worker, engines, awake = shared_gpu
    assert sorted(engines) == ["v1", "v2"]
    share = worker.versions.shares["gpu0"]
    assert len(share.members) == 2
    assert sum(not e.asleep for e in engines.values()) == 1  # the last started
    assert max(awake) <= 1


async def test_work_for_a_sleeping_engine_wakes_it_and_nothing_fails(producer, shared_gpu):
    worker, engines, awake = shared_gpu
    sleeping = next(v for v, e in engines.items() if e.asleep)
    ids = await producer.submit_many([Task(model="m1", prompt=f"p{i}", version=sleeping)
                                      for i in range(20)])
    results = await producer.wait_many(ids, timeout_s=10)
    assert all(r.ok and r.model_version == sleeping for r in results), results[0]
    assert engines[sleeping].wake_times_s  # it was woken
    assert max(awake) <= 1 and worker.failure is None
    # idle for sleep_idle_s: put to sleep, freeing the GPU
    await wait_until(lambda: all(e.asleep for e in engines.values()), 5, "idle engines asleep")


async def test_under_load_on_both_they_take_turns_and_neither_starves(producer, shared_gpu):
    worker, engines, awake = shared_gpu
    done: dict[str, list[float]] = {"v1": [], "v2": []}
    stop = asyncio.Event()

    async def load(version: str) -> None:
        while not stop.is_set():
            ids = await producer.submit_many([Task(model="m1", prompt=f"{version} {i}",
                                                   version=version) for i in range(8)])
            for r in await producer.wait_many(ids, timeout_s=20):
                assert r.ok and r.model_version == version, r
                done[version].append(time.monotonic())

    loads = [asyncio.create_task(load(v)) for v in ("v1", "v2")]
    await asyncio.sleep(3.0)
    stop.set()
    await asyncio.gather(*loads)
    share = worker.versions.shares["gpu0"]
    assert share.switches >= 4  # turns of about sleep_turn_s each
    assert len(done["v1"]) > 20 and len(done["v2"]) > 20
    assert max(awake) <= 1 and worker.failure is None
    assert all(e.sleeps >= 2 for e in engines.values())
