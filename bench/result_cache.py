"""The result cache (docs/result-cache.md): engine calls saved on a workload with repeats, and
what the cache costs a submit that it cannot answer.

    python -m bench.result_cache [--tasks 4000] [--distinct 400] [--delay-s 0.05] [--slots 64]

Workload: `tasks` greedy tasks whose prompts are drawn from `distinct` ones by a Zipf law
(s = 1.1: a few prompts repeat often, most rarely), submitted in one burst by one producer
to one in-process worker on the fake engine (`slots` requests at once, `delay_s` each: the
engine, not the CPU, is the bottleneck, as a GPU is).  Run twice on one embedded server:
the tenant without the cache, then with it.  Then the cost: `submit_many` of 10,000 distinct
tasks (none answerable) with the cache off and on, best of three.  Prints PASS or FAIL per
target: every task answered once in both runs; with the cache the engine runs each distinct
prompt at most once; a submit that the cache cannot answer costs at most 25 us more
producer CPU (its digest, its own half of a result, its waiter record: 2-core VM).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

from agentfleet.ops.embedded import ServerProcess
from agentfleet.producer.client import Producer
from agentfleet.producer.connection import connect
from agentfleet.producer.tenants import TenantRegistry
from agentfleet.schemas import keys
from agentfleet.schemas.settings import ModelSpec, Settings
from agentfleet.schemas.wire import Task, TenantConfig
from agentfleet.workers.fake_engine import FakeEngine
from agentfleet.workers.worker import Worker


def _prompts(tasks: int, distinct: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** 1.1 for k in range(distinct)]
    return [f"document {k}: summarise it" for k in rng.choices(range(distinct), weights,
                                                                   k=tasks)]


async def _run(url: str, settings: Settings, tenant: str, prompts: list[str], slots: int,
               delay_s: float) -> dict:
    redis = connect(url)
    engine = FakeEngine(slots=slots, delay_s=delay_s)
    worker = Worker(settings, redis, {"m": engine}, worker_id=f"bench-{tenant}")
    running = asyncio.create_task(worker.run(drain_timeout_s=5))
    await worker.ready.wait()
    async with Producer(connect(url), settings=settings) as p:
        started = time.perf_counter()
        ids = await p.submit_many([Task(model="m", prompt=x, tenant=tenant) for x in prompts])
        results = [r async for r in p.as_completed(ids, timeout_s=600)]
        took = time.perf_counter() - started
    worker.request_stop()
    await running
    stats = await redis.hgetall(keys.stats_key("m"))
    await redis.aclose()
    caches = [r.cache for r in results]
    return {"answered": len({r.task_id for r in results if r.ok}), "engine_calls": engine.submitted,
            "hits": caches.count("hit"), "joined": caches.count("joined"), "wall_s": took,
            "stats": {k.decode(): int(v) for k, v in stats.items()}}


async def _submit_cost(url: str, settings: Settings, tenant: str, n: int = 10_000) -> float:
    best = float("inf")
    async with Producer(connect(url), settings=settings) as p:
        for rep in range(3):
            tasks = [Task(model="m", prompt=f"{tenant} {rep} distinct {i}", tenant=tenant)
                     for i in range(n)]
            started = time.process_time()
            await p.submit_many(tasks, reply=False)
            best = min(best, time.process_time() - started)
    return best / n * 1e6


async def main(args: argparse.Namespace) -> int:
    settings = Settings(models={"m": ModelSpec(name="m", max_model_len=512)}, default_model="m",
                        engine="fake", block_ms=20)
    server = ServerProcess(Path(tempfile.mkdtemp()), appendonly=False)
    server.start()
    try:
        redis = connect(server.url)
        await TenantRegistry(redis).set("cached", TenantConfig(result_cache_ttl_s=600))
        await redis.aclose()
        prompts = _prompts(args.tasks, args.distinct)
        off = await _run(server.url, settings, "plain", prompts, args.slots, args.delay_s)
        on = await _run(server.url, settings, "cached", prompts, args.slots, args.delay_s)
        cost_off = await _submit_cost(server.url, settings, "plain")
        cost_on = await _submit_cost(server.url, settings, "cached")
    finally:
        server.stop()
    distinct = len(set(prompts))
    print(f"{args.tasks} tasks, {distinct} distinct prompts, fake engine {args.slots} slots "
          f"x {args.delay_s * 1000:.0f} ms")
    for name, r in (("cache off", off), ("cache on", on)):
        print(f"  {name:<9}: engine calls {r['engine_calls']:>5}, hits {r['hits']:>5}, joined "
              f"{r['joined']:>5}, all answered in {r['wall_s']:.2f} s")
    print(f"  submit_many producer CPU per task (distinct tasks): cache off {cost_off:.1f} us, "
          f"on {cost_on:.1f} us")
    checks = [
        ("every task answered once, both runs", off["answered"] == on["answered"] == args.tasks),
        (f"cache on: engine calls <= distinct prompts ({on['engine_calls']} <= {distinct})",
         on["engine_calls"] <= distinct),
        (f"cache off: engine calls = tasks ({off['engine_calls']})",
         off["engine_calls"] == args.tasks),
        (f"a submit the cache cannot answer costs <= 25 us more producer CPU "
         f"({cost_on - cost_off:.1f} us)", cost_on - cost_off <= 25),
    ]
    for text, ok in checks:
        print(("PASS " if ok else "FAIL ") + text)
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=4000)
    parser.add_argument("--distinct", type=int, default=400)
    parser.add_argument("--delay-s", type=float, default=0.05)
    parser.add_argument("--slots", type=int, default=64)
    sys.exit(asyncio.run(main(parser.parse_args())))
