"""What observability costs the queue layer: the fleet with metrics, KPI aggregates, traces
and JSON logs on, against all of them off, interleaved in one run.

    python -m bench.observability_overhead [--tasks 100000] [--rounds 3]

Each round starts a fresh worker process (fake engine, uvloop) per setting on one embedded
Valkey (flushed between runs); the producer submits `--tasks` tasks with `submit_many` and
waits for all with `wait_many`.  Target: on >= 0.9 x off.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

from agentfleet.ops.embedded import ServerProcess
from agentfleet.producer.connection import connect
from agentfleet.schemas.settings import ModelSpec, Settings
from agentfleet.schemas.wire import Task

MODEL = "m"


def settings(observed: bool) -> Settings:
    return Settings(models={MODEL: ModelSpec(name=MODEL)}, default_model=MODEL, engine="fake",
                    trace_enabled=observed, otel_enabled=False,
                    metrics_port=0 if not observed else 19464,
                    kpi_ttl_s=8 * 86_400 if observed else 0)


def _worker(url: str, observed: bool) -> None:
    import uvloop

    from agentfleet.ops.logs import setup_logging
    from agentfleet.workers.fake_engine import FakeEngine
    from agentfleet.workers.worker import Worker

    s = settings(observed)
    setup_logging("json" if observed else "text")

    async def main() -> None:
        worker = Worker(s, connect(url), {MODEL: FakeEngine()}, worker_id="w")
        if observed:
            worker.metrics.serve(s.metrics_port)
        await worker.run()

    uvloop.run(main())


async def _produce(url: str, n: int, observed: bool) -> float:
    from agentfleet.producer.client import Producer

    producer = Producer(connect(url), settings=settings(observed))
    tasks = [Task(model=MODEL, prompt=f"hello world {i}") for i in range(n)]
    started = time.perf_counter()
    await producer.wait_many(await producer.submit_many(tasks), timeout_s=300)
    elapsed = time.perf_counter() - started
    await producer.close()
    return n / elapsed


def one_run(url: str, n: int, observed: bool) -> float:
    import redis
    import uvloop

    redis.Redis.from_url(url).flushall()
    ctx = mp.get_context("spawn")
    worker = ctx.Process(target=_worker, args=(url, observed))
    worker.start()
    time.sleep(2.0)
    try:
        return uvloop.run(_produce(url, n, observed))
    finally:
        worker.terminate()
        worker.join()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    on: list[float] = []
    off: list[float] = []
    with tempfile.TemporaryDirectory() as tmp, \
            ServerProcess(Path(tmp) / "server", appendonly=False) as server:
        for _ in range(args.rounds):
            off.append(one_run(server.url, args.tasks, observed=False))
            on.append(one_run(server.url, args.tasks, observed=True))
    ratio = statistics.median(on) / statistics.median(off)
    print(f"observability off: {statistics.median(off):9,.0f} tasks/s  runs {[round(x) for x in off]}")
    print(f"observability on : {statistics.median(on):9,.0f} tasks/s  runs {[round(x) for x in on]}")
    print(f"on / off         : {ratio:9.3f}   target >= 0.9: {'PASS' if ratio >= 0.9 else 'FAIL'}")
    return 0 if ratio >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
