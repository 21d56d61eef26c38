"""Fair shares between tenants, on the fake engine (issue 14, CPU targets).

    python -m bench.fairness [--quick] [--slots 64] [--delay-ms 100] [--json out.json]

The worker runs in its own process on a `FakeEngine` with `--slots` slots, each request
taking `--delay-ms` -/+ 50%: the engine, not the CPU, is the bottleneck, as a GPU is.  Three
measurements, each on a fresh server:

  flood    tenant B submits one task at a time at `--b-rate`/s (submit, wait, next), first
           alone, then while tenant A has a backlog of `--backlog` tasks and adds 100x B's
           rate.  B's queue wait is from its enqueue to its engine start (the time it
           waited for a slot, in Redis and in the worker); A's throughput is its results
           per second in the same window.  Then A alone, for the engine's capacity.
  weights  three backlogged tenants with weights 1:2:5 (tenants registry) and prompts of
           different lengths, queued before the worker starts; each tenant's share of the
           tokens (prompt + output) that finished in the window.
  layer    the queue layer's throughput with 8 tenants against one, fairness on, on an
           engine of many slots that answers at once (the admission queue on the hot path).

Targets: B's p99 queue wait under the flood at most 1.5x alone; A gets the capacity B
leaves (A + B at least 0.9x A alone); token shares within 5% (absolute) of 1/8, 2/8, 5/8;
8 tenants at least 0.9x one.  Prints PASS/FAIL per target, exits 1 on a FAIL, stops at once
when the worker dies.  `--quick` shrinks the windows (what tests/test_fairness_bench.py runs).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from bench import harness
from bench.harness import Check, Processes, Report

MODEL = "fair-m"
WEIGHTS = {"w1": 1.0, "w2": 2.0, "w5": 5.0}
PROMPT_WORDS = {"w1": 400, "w2": 40, "w5": 120}  # long prompts must not buy a bigger share
TARGETS = {"flood_p99_ratio": 1.5, "capacity_ratio": 0.9, "share_abs": 0.05,
           "layer_ratio": 0.9}


JITTER = 0.5  # each request's engine time is delay x (1 -/+ 0.5): completions spread, as a
# real engine's do (lockstep waves of equal requests would free every slot at once)


def _meta(delay_s: float, rng) -> dict[str, str]:
    if not delay_s:
        return {}
    return {"fake_delay_s": f"{delay_s * (1 + JITTER * (2 * rng.random() - 1)):.4f}"}


def _settings(**overrides):
    from agentfleet.schemas.settings import ModelSpec, Settings

    return Settings(models={MODEL: ModelSpec(name=MODEL, max_model_len=8192,
                                             max_prompt_chars=100_000)},
                    default_model=MODEL, engine="fake", **overrides)


async def worker(report: Report, url: str, slots: int, delay_s: float, overrides: dict) -> None:
    """A Worker on a FakeEngine of `slots` slots, serving until the parent stops it."""
    from agentfleet.producer.connection import connect
    from agentfleet.workers.worker import Worker, make_engine

    # Built as `agentfleet worker` builds it (AGENTFLEET_ENGINE=fake): its spare slots too.
    settings = _settings(fake_slots=slots, fake_delay_s=delay_s, **overrides)
    engine = make_engine(settings.models[MODEL], settings)
    w = Worker(settings, connect(url), {MODEL: engine}, worker_id="fair-worker")
    run = asyncio.ensure_future(w.run())
    ready = asyncio.ensure_future(w.ready.wait())
    await asyncio.wait([run, ready], return_when=asyncio.FIRST_COMPLETED)
    if run.done():
        run.result()
    report("ready", {"pid": os.getpid()})
    await run


async def steady(report: Report, url: str, tenant: str, rate: float, duration_s: float,
                 delay_s: float) -> None:
    """One task at a time at `rate`/s for `duration_s`: each task's queue wait (enqueue to
    engine start) and end to end."""
    import random

    from agentfleet.producer.client import Producer
    from agentfleet.producer.connection import connect
    from agentfleet.schemas.wire import Sampling, Task

    waits, reads, e2e = [], [], []
    rng = random.Random(1)
    async with Producer(connect(url), settings=_settings()) as p:
        start = time.monotonic()
        i = 0
        while time.monotonic() - start < duration_s:
            due = start + i / rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            r = await p.wait(await p.submit(Task(model=MODEL, tenant=tenant, prompt=f"b {i}",
                                                 sampling=Sampling(max_tokens=8),
                                                 metadata=_meta(delay_s, rng))), 60)
            if not r.ok:
                raise RuntimeError(f"{tenant}: {r.status}: {r.error_message}")
            waits.append(r.timings.engine_start - r.timings.enqueued)
            reads.append(r.timings.read - r.timings.enqueued)
            e2e.append(r.timings.written - r.timings.enqueued)
            i += 1
    report("done", {"waits": waits, "reads": reads, "e2e": e2e})


async def flood(report: Report, url: str, tenant: str, backlog: int, rate: float,
                duration_s: float, delay_s: float) -> None:
    """A backlog of `backlog` tasks, then `rate` more per second for `duration_s`; reports
    how many of its tasks finished per second in the window (from their results)."""
    import random

    from agentfleet.producer.client import Producer
    from agentfleet.producer.connection import connect
    from agentfleet.schemas.wire import Sampling, Task

    rng = random.Random(2)

    def tasks(n: int, tag: str) -> list:
        return [Task(model=MODEL, tenant=tenant, prompt=f"a {tag} {i}",
                     sampling=Sampling(max_tokens=8), metadata=_meta(delay_s, rng))
                for i in range(n)]

    async with Producer(connect(url), settings=_settings()) as p:
        ids = await p.submit_many(tasks(backlog, "backlog"))
        report("ready", {})
        t0 = time.monotonic()
        wall0 = time.time()
        step = 0.05
        sent = 0
        while (elapsed := time.monotonic() - t0) < duration_s:
            due = int(elapsed * rate) - sent
            if due > 0:
                ids += await p.submit_many(tasks(due, f"f{sent}"))
                sent += due
            await asyncio.sleep(step)
        wall1 = time.time()
        # results that finished inside the window, read from their result keys
        got = await p.get_results(ids, MODEL)
        done = sum(1 for r in got if wall0 <= r.timings.finished <= wall1)
    report("done", {"per_s": done / (wall1 - wall0), "sent": sent})


async def weighted(report: Report, url: str, per_tenant: int, window_s: float,
                   delay_s: float) -> None:
    """Three backlogged tenants with weights 1:2:5; their token shares over the window."""
    import random

    from agentfleet.producer.client import Producer
    from agentfleet.producer.connection import connect
    from agentfleet.producer.tenants import TenantRegistry
    from agentfleet.schemas.wire import Sampling, Task, TenantConfig

    rng = random.Random(3)
    async with Producer(connect(url), settings=_settings()) as p:
        registry = TenantRegistry(p.redis)
        for tenant, weight in WEIGHTS.items():
            await registry.set(tenant, TenantConfig(weight=weight), who="bench.fairness")
        # All three backlogs are queued before the worker starts: the shares of steady
        # state.  (Queued one after the other into a running worker, the first tenant
        # fills the read-ahead, max_inflight, before the others come, and runs ahead until
        # that drains: seconds on a loaded machine, longer than a quick run's ramp.)
        ids: dict[str, list[str]] = {}
        for tenant in WEIGHTS:
            words = " ".join(["word"] * PROMPT_WORDS[tenant])
            ids[tenant] = await p.submit_many(
                [Task(model=MODEL, tenant=tenant, prompt=f"{words} {i}",
                      sampling=Sampling(max_tokens=8), metadata=_meta(delay_s, rng))
                 for i in range(per_tenant)])
        report("queued", {})
        while not any([await p.get_results(t[:64], MODEL) for t in ids.values()]):
            await asyncio.sleep(0.1)  # the worker is starting
        await asyncio.sleep(2.0)  # past the start: every tenant backlogged in the worker
        wall0 = time.time()
        await asyncio.sleep(window_s)
        wall1 = time.time()
        tokens = {}
        for tenant, tenant_ids in ids.items():
            got = await p.get_results(tenant_ids, MODEL)
            tokens[tenant] = sum(r.prompt_tokens + r.output_tokens for r in got
                                 if wall0 <= r.timings.finished <= wall1)
            left = len(tenant_ids) - len(got)
            if left == 0:
                raise RuntimeError(f"{tenant} ran out of backlog: raise --per-tenant")
    report("done", {"tokens": tokens})


async def layer(report: Report, url: str, tenants: int, n: int) -> None:
    """n tasks spread over `tenants` tenants, submitted at once; results per second."""
    from agentfleet.producer.client import Producer
    from agentfleet.producer.connection import connect
    from agentfleet.schemas.wire import Task

    names = ["default"] + [f"t{i}" for i in range(1, tenants)]
    tasks = [Task(model=MODEL, tenant=names[i % tenants], prompt=f"hello world {i}")
             for i in range(n)]
    async with Producer(connect(url), settings=_settings()) as p:
        t0 = time.monotonic()
        ids = await p.submit_many(tasks)
        results = await p.wait_many(ids, timeout_s=600)
        t1 = time.monotonic()
    if any(not r.ok for r in results):
        raise RuntimeError("failed tasks")
    report("done", {"per_s": n / (t1 - t0)})


def measure_flood(procs: Processes, args) -> dict:
    out = {}
    with harness.server("valkey", procs) as srv:
        with procs.scope():
            procs.expect(procs.spawn(worker, srv.url, args.slots, args.delay_ms / 1000, {},
                                     serving=True), "ready", 60)
            delay = args.delay_ms / 1000
            alone = procs.expect(procs.spawn(steady, srv.url, "steady", args.b_rate,
                                             args.window_s, delay), "done", args.window_s + 120)
            out["b_alone"] = harness.percentiles(alone["waits"], scale=1000, ndigits=2)
            # of which enqueue to read (the rest: read to engine start, inside the worker)
            out["b_alone_read"] = harness.percentiles(alone["reads"], scale=1000, ndigits=2)
            a = procs.spawn(flood, srv.url, "flood", args.backlog, 100 * args.b_rate,
                            args.window_s + 2, delay)
            procs.expect(a, "ready", 300)
            procs.sleep(1.0)
            b = procs.spawn(steady, srv.url, "steady", args.b_rate, args.window_s, delay)
            with_flood = procs.expect(b, "done", args.window_s + 120)
            a_done = procs.expect(a, "done", args.window_s + 300)
            out["b_flood"] = harness.percentiles(with_flood["waits"], scale=1000, ndigits=2)
            out["b_flood_read"] = harness.percentiles(with_flood["reads"], scale=1000,
                                                      ndigits=2)
            out["a_per_s_with_b"] = round(a_done["per_s"], 1)
            out["b_per_s"] = round(len(with_flood["waits"]) / args.window_s, 1)
    with harness.server("valkey", procs) as srv:
        with procs.scope():
            procs.expect(procs.spawn(worker, srv.url, args.slots, args.delay_ms / 1000, {},
                                     serving=True), "ready", 60)
            a = procs.spawn(flood, srv.url, "flood", args.backlog, 100 * args.b_rate,
                            args.window_s, args.delay_ms / 1000)
            procs.expect(a, "ready", 300)
            out["a_alone_per_s"] = round(procs.expect(a, "done", args.window_s + 300)["per_s"], 1)
    return out


def measure_weights(procs: Processes, args) -> dict:
    with harness.server("valkey", procs) as srv:
        with procs.scope():
            tenants = procs.spawn(weighted, srv.url, args.per_tenant, args.share_window_s,
                                  args.delay_ms / 1000)
            procs.expect(tenants, "queued", 300)
            procs.expect(procs.spawn(worker, srv.url, args.slots, args.delay_ms / 1000, {},
                                     serving=True), "ready", 60)
            got = procs.expect(tenants, "done", args.share_window_s + 300)
    total = sum(got["tokens"].values()) or 1
    return {"tokens": got["tokens"],
            "shares": {t: round(v / total, 4) for t, v in got["tokens"].items()}}


def measure_layer(procs: Processes, args) -> dict:
    out = {}
    for tenants in (1, 8, 1, 8):  # interleaved: the machine's noise hits both alike
        with harness.server("valkey", procs) as srv:
            with procs.scope():
                procs.expect(procs.spawn(worker, srv.url, 512, 0.0, {}, serving=True),
                             "ready", 60)
                got = procs.expect(procs.spawn(layer, srv.url, tenants, args.layer_tasks),
                                   "done", 600)
        out.setdefault(f"tenants_{tenants}", []).append(round(got["per_s"]))
    return out


def checks(figures: dict) -> list[Check]:
    f, w, layer_ = figures["flood"], figures["weights"], figures["layer"]
    ratio = f["b_flood"]["p99"] / max(f["b_alone"]["p99"], 1e-9)
    capacity = (f["a_per_s_with_b"] + f["b_per_s"]) / max(f["a_alone_per_s"], 1e-9)
    worst = max(abs(w["shares"].get(t, 0) - WEIGHTS[t] / sum(WEIGHTS.values()))
                for t in WEIGHTS)
    one = max(layer_["tenants_1"])
    eight = max(layer_["tenants_8"])
    return [
        Check("flood: B's p99 queue wait <= 1.5 x alone", ratio <= TARGETS["flood_p99_ratio"],
              f"{f['b_flood']['p99']:.2f} vs {f['b_alone']['p99']:.2f} ms ({ratio:.2f}x)"),
        Check("flood: A gets the capacity B leaves ((A + B) >= 0.9 x A alone)",
              capacity >= TARGETS["capacity_ratio"],
              f"{f['a_per_s_with_b']:.0f} + {f['b_per_s']:.0f} vs {f['a_alone_per_s']:.0f}/s "
              f"({capacity:.2f}x)"),
        Check("weights 1:2:5: token shares within 5% of 1/8, 2/8, 5/8",
              worst <= TARGETS["share_abs"], f"{w['shares']} (worst off by {worst:.3f})"),
        Check("queue layer, 8 tenants >= 0.9 x one (fairness on)",
              eight >= TARGETS["layer_ratio"] * one, f"{eight:,} vs {one:,} tasks/s "
              f"({eight / one:.2f}x; best of 2 each)"),
    ]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short windows (CI)")
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--delay-ms", type=float, default=100.0, help="each request's engine time")
    p.add_argument("--b-rate", type=float, default=5.0, help="tenant B's tasks per second")
    p.add_argument("--backlog", type=int, default=100_000, help="tenant A's backlog")
    p.add_argument("--window-s", type=float, default=60.0,
                   help="B's window, alone and under the flood (300 tasks at 5/s: a p99 of "
                        "100 is the second-worst task)")
    p.add_argument("--per-tenant", type=int, default=40_000,
                   help="each weighted tenant's backlog (the 40-word one takes about half of "
                        "the tasks: 20,000 ran out in a 60 s window)")
    p.add_argument("--share-window-s", type=float, default=60.0)
    p.add_argument("--layer-tasks", type=int, default=50_000)
    p.add_argument("--json", default="", help="write the result document here")
    args = p.parse_args(argv)
    if args.quick:
        args.backlog, args.window_s, args.per_tenant = 10_000, 8.0, 4_000
        args.share_window_s, args.layer_tasks = 8.0, 10_000
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    info = harness.machine()
    print(f"machine: {info['cores']} cores, load {info['load_avg']}, commit {info['commit']}",
          flush=True)
    figures = {}
    with Processes() as procs:
        figures["flood"] = measure_flood(procs, args)
        print(f"flood: {figures['flood']}", flush=True)
        figures["weights"] = measure_weights(procs, args)
        print(f"weights: {figures['weights']}", flush=True)
        figures["layer"] = measure_layer(procs, args)
        print(f"layer: {figures['layer']}", flush=True)
    results = checks(figures)
    status = harness.print_checks(results)
    harness.write_result(args.json, benchmark="fairness", checks=results, machine_info=info,
                         figures=figures, settings=vars(args))
    return status


if __name__ == "__main__":
    raise SystemExit(harness.entry(main))
