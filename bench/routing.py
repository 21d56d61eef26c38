"""Routing by load and SLA class, on the fake engine: a saturated primary version keeps its
interactive tasks within their budget by spilling to a fallback, or refuses them with the
typed error when it has none: never silently late.

    python -m bench.routing [--rate 200] [--duration-s 15] [--budget-s 1.0] [--json out.json]

It starts its own server (append-only off) and, in this process, a Worker serving:
  primary@v1   a registered model version whose engine runs 8 requests at once for 0.1 s
               each: 80 tasks/s;
  fallback     an unregistered model whose engine runs 32 at once for 0.05 s: 640 tasks/s.
A producer offers `--rate` interactive-class tasks per second (more than twice the primary's
capacity) for `--duration-s`, paced, one submit each, after a warm-up of both models (so that
their service times are known: the estimate needs one finished task of a version).  Three scenarios, one after another, each
from empty queues:

  fallback     the primary's fallback is `fallback`: tasks past the budget go there;
  refuse       no fallback: tasks past the budget are refused with SlaExceededError;
  unclassed    the same load without an SLA class (for reference: what routing avoids).

Queue wait = engine start - enqueue, from each result's timings.  Targets: with a fallback,
interactive p99 queue wait <= the budget, some tasks spilled, none refused; without one,
accepted tasks' p99 <= the budget, some refused, and the primary still takes at least 80%
of its capacity (the refusals are not over-eager); unclassed, p99 passes the budget (the
load does saturate the primary).  Prints PASS/FAIL per target, exits 1 on any FAIL.  The
machine may be shared: the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

PRIMARY, FALLBACK = "primary", "fallback"
PRIMARY_SLOTS, PRIMARY_DELAY_S = 8, 0.1
FALLBACK_SLOTS, FALLBACK_DELAY_S = 32, 0.05


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def _watch_server(server) -> None:
    while True:
        await asyncio.sleep(0.2)
        if server.proc.poll() is not None:
            raise RuntimeError(f"the server died (exit {server.proc.returncode}): stopping")


async def _scenario(producer, name: str, *, rate: float, duration_s: float,
                    sla: str) -> dict:
    from agentfleet.schemas.errors import SlaExceededError

    ids: list[str] = []
    refused = 0
    started = time.monotonic()
    spilled_before = producer.router.spilled
    n = int(rate * duration_s)
    for i in range(n):
        due = started + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            ids.append(await producer.submit(model=PRIMARY, prompt=f"{name} {i}", sla=sla))
        except SlaExceededError:
            refused += 1
    offered_s = time.monotonic() - started
    results = await producer.wait_many(ids, timeout_s=300)
    waits = {PRIMARY: [], FALLBACK: []}
    for r in results:
        waits[r.model].append(r.timings.engine_start - r.timings.enqueued)
    every = waits[PRIMARY] + waits[FALLBACK]
    return {
        "scenario": name, "offered": n, "offered_rate_per_s": round(n / offered_s, 1),
        "accepted": len(ids), "refused": refused,
        "spilled": producer.router.spilled - spilled_before,
        "failed": sum(not r.ok for r in results),
        "on_primary": len(waits[PRIMARY]), "on_fallback": len(waits[FALLBACK]),
        "primary_rate_per_s": round(len(waits[PRIMARY]) / offered_s, 1),
        "p50_wait_s": percentile(every, 0.5), "p99_wait_s": percentile(every, 0.99),
        "max_wait_s": max(every, default=None),
        "primary_p99_wait_s": percentile(waits[PRIMARY], 0.99),
        "fallback_p99_wait_s": percentile(waits[FALLBACK], 0.99),
    }


async def run(args: argparse.Namespace, url: str, tmp: Path) -> dict:
    import msgspec

    from agentfleet.producer.client import Producer
    from agentfleet.producer.connection import connect
    from agentfleet.producer.models import ModelRegistry
    from agentfleet.schemas.settings import ModelSpec, Settings
    from agentfleet.schemas.wire import Task
    from agentfleet.workers.fake_engine import FakeEngine
    from agentfleet.workers.worker import Worker

    settings = Settings(models={FALLBACK: ModelSpec(name=FALLBACK)}, default_model=FALLBACK,
                        engine="fake", metrics_port=0, sla_refresh_s=args.refresh_s)
    redis = connect(url)
    (tmp / "config.json").write_text("{}")
    registry = ModelRegistry(redis)
    await registry.register(PRIMARY, "v1", path=str(tmp), check_engine=False)
    await registry.set_route(PRIMARY, budgets={"interactive": args.budget_s})

    def engine(spec):
        return FakeEngine(model_version=spec.version, slots=PRIMARY_SLOTS,
                          delay_s=PRIMARY_DELAY_S)

    worker = Worker(msgspec.structs.replace(settings, max_inflight=256), redis,
                    {FALLBACK: FakeEngine(slots=FALLBACK_SLOTS, delay_s=FALLBACK_DELAY_S)},
                    models=[PRIMARY], engine_factory=engine, worker_id="bench-worker")
    serving = asyncio.create_task(worker.run(drain_timeout_s=10))
    producer = Producer(connect(url), settings=settings)
    figures: list[dict] = []
    try:
        await asyncio.wait_for(worker.ready.wait(), 30)
        capacity = PRIMARY_SLOTS / PRIMARY_DELAY_S
        # Both engines' speed known: a version's first tasks teach its service time.
        await _scenario(producer, "warm-up", rate=capacity * 0.9, duration_s=3, sla="")
        await producer.wait_many(await producer.submit_many(
            [Task(model=FALLBACK, prompt=f"warm {i}") for i in range(FALLBACK_SLOTS)]))
        await asyncio.sleep(1.5)  # the load reports carry the rate
        await registry.set_route(PRIMARY, fallback=FALLBACK)
        await asyncio.sleep(1.2)
        figures.append(await _scenario(producer, "fallback", rate=args.rate,
                                       duration_s=args.duration_s, sla="interactive"))
        await registry.set_route(PRIMARY, fallback="")
        await asyncio.sleep(1.2)
        figures.append(await _scenario(producer, "refuse", rate=args.rate,
                                       duration_s=args.duration_s, sla="interactive"))
        figures.append(await _scenario(producer, "unclassed", rate=args.rate,
                                       duration_s=args.duration_s, sla=""))
    finally:
        await producer.close()
        worker.request_stop()
        await asyncio.gather(serving, return_exceptions=True)
        await redis.aclose()
    return {"capacity_per_s": {PRIMARY: capacity,
                               FALLBACK: FALLBACK_SLOTS / FALLBACK_DELAY_S},
            "scenarios": figures}


def checks(report: dict, budget_s: float) -> list[tuple[str, bool, str]]:
    by = {f["scenario"]: f for f in report["scenarios"]}
    fb, rf, un = by["fallback"], by["refuse"], by["unclassed"]
    capacity = report["capacity_per_s"][PRIMARY]
    return [
        (f"fallback: interactive p99 queue wait <= {budget_s:g} s", fb["p99_wait_s"] <= budget_s,
         f"{fb['p99_wait_s']:.3f} s"),
        ("fallback: tasks spilled, none refused or failed",
         fb["spilled"] > 0 and fb["refused"] == 0 and fb["failed"] == 0,
         f"{fb['spilled']} spilled, {fb['refused']} refused, {fb['failed']} failed"),
        (f"refuse: accepted p99 queue wait <= {budget_s:g} s", rf["p99_wait_s"] <= budget_s,
         f"{rf['p99_wait_s']:.3f} s"),
        ("refuse: past the budget refused with SlaExceededError", rf["refused"] > 0,
         f"{rf['refused']} of {rf['offered']}"),
        ("refuse: the primary still takes >= 80% of its capacity",
         rf["primary_rate_per_s"] >= 0.8 * capacity,
         f"{rf['primary_rate_per_s']} of {capacity:g} tasks/s"),
        (f"unclassed: p99 passes {budget_s:g} s (the load saturates the primary)",
         un["p99_wait_s"] > budget_s, f"{un['p99_wait_s']:.3f} s"),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=200.0, help="offered tasks/s")
    p.add_argument("--duration-s", type=float, default=15.0)
    p.add_argument("--budget-s", type=float, default=1.0, help="the interactive budget")
    p.add_argument("--refresh-s", type=float, default=0.25, help="sla_refresh_s")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    from agentfleet.ops.embedded import ServerProcess

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-routing-") as tmp:
        server = ServerProcess(Path(tmp) / "server", appendonly=False)
        server.start()
        try:
            async def both() -> dict:
                watch = asyncio.create_task(_watch_server(server))
                work = asyncio.create_task(run(args, server.url, Path(tmp)))
                done, _ = await asyncio.wait({watch, work}, return_when=asyncio.FIRST_COMPLETED)
                watch.cancel()
                if work not in done:
                    work.cancel()
                    await asyncio.gather(work, return_exceptions=True)
                    await watch  # raises: the server died
                return work.result()

            try:
                import uvloop

                report = uvloop.run(both())
            except ImportError:
                report = asyncio.run(both())
        finally:
            server.stop()
    report.update(rate=args.rate, duration_s=args.duration_s, budget_s=args.budget_s,
                  cores=os.cpu_count(), load_start=load_start, load_end=os.getloadavg())
    print(f"{'scenario':<10} {'offered':>7} {'accepted':>8} {'refused':>7} {'spilled':>7} "
          f"{'primary/s':>9} {'p50 s':>7} {'p99 s':>7} {'max s':>7}")
    for f in report["scenarios"]:
        print(f"{f['scenario']:<10} {f['offered']:>7} {f['accepted']:>8} {f['refused']:>7} "
              f"{f['spilled']:>7} {f['primary_rate_per_s']:>9} {f['p50_wait_s']:>7.3f} "
              f"{f['p99_wait_s']:>7.3f} {f['max_wait_s']:>7.3f}")
    print(f"load average {report['load_start'][0]:.2f} -> {report['load_end'][0]:.2f} on "
          f"{report['cores']} cores")
    results = checks(report, args.budget_s)
    report["checks"] = [{"target": t, "status": "PASS" if ok else "FAIL", "value": v}
                        for t, ok, v in results]
    for target, ok, value in results:
        print(f"  {'PASS' if ok else 'FAIL'}  {target}: {value}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
