"""The queue layer on a Redis Cluster against one server, in one run
(`python -m bench.queue_layer --cluster`).

    python -m bench.queue_layer --cluster [--tasks 60000] [--rounds 3] [--replicas 0]
                                [--workers-per-model 1] [--producers-per-model 1]
                                [--pin-servers]
                                [--latency-rate 2000] [--latency-duration-s 10]
                                [--json out.json]

Two servers run side by side for the whole run: one embedded Valkey, and an embedded cluster
of 3 primaries (`ops.embedded.ServerCluster`; no replicas unless `--replicas 1`: a replica
only adds replication work to the same cores, and throughput is what is measured here).
Three models are chosen so that their hash tags land on the three different primaries (the
placement is printed and checked).  Each setup gets the same load:

  fleet     `--workers-per-model` worker processes per model (FakeEngine, uvloop) and
            `--producers-per-model` producer processes per model (1 and 1 unless said),
            each `submit_many` of its share of the tasks then `wait_many`; the producers
            start together on a signal once every process is ready.  The rate is all tasks
            over the first submit to the last result of any producer.
  latency   one paced producer per model at rate/3 tasks/s for the duration, one `submit` +
            `wait` per task, against the same three workers; percentiles over all tasks.

With `--pin-servers` (a machine with a core per server and some for the clients), each
server process gets a CPU of its own and every worker and producer the rest: the servers are
what is measured, and clients outnumbering the cores would otherwise take their CPU in turns.

Measurements are interleaved (round 1: one server then the cluster, round 2 the other way
round ...) and each figure is the median over rounds.  Every process is watched: one that
dies stops the run at once (bench.harness).  The targets are issue 19's: the cluster at least
2.5x one server's throughput, and the queue layer's latency targets on the cluster.  On a
machine with fewer cores than processes the cluster cannot show its scaling: the servers,
workers and producers all share the same cores, and the run says how many that was.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

from bench import harness
from bench.harness import Background, Check, Processes, Report, cpu_s, percentiles

PRIMARIES = 3
MODELS = 3
READY_TIMEOUT_S = 60.0
TARGETS = {"cluster_vs_one": 2.5, "latency_p50_ms": 2.0, "latency_p99_ms": 10.0}


# ---- children ----------------------------------------------------------------------------


def _settings(model: str):
    from agentfleet.schemas.settings import ModelSpec, Settings

    return Settings(models={model: ModelSpec(name=model)}, default_model=model, engine="fake")


def _go():
    """An event set by the parent's SIGUSR1 (sent once every process of the measurement is
    ready); the handler is in place when this returns, before the child reports "ready"."""
    import asyncio

    go = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, go.set)
    return go


async def model_worker(report: Report, url: str, model: str, k: int = 0) -> None:
    """A Worker (the `k`th of its model) serving `model` on a FakeEngine until the parent
    stops it."""
    import asyncio

    from agentfleet.producer.connection import connect
    from agentfleet.workers.fake_engine import FakeEngine
    from agentfleet.workers.worker import Worker

    worker = Worker(_settings(model), connect(url), {model: FakeEngine()},
                    worker_id=f"bench-{model}-{k}")
    run = asyncio.ensure_future(worker.run())
    ready = asyncio.ensure_future(worker.ready.wait())
    await asyncio.wait([run, ready], return_when=asyncio.FIRST_COMPLETED)
    if run.done():
        run.result()
    report("ready", {"pid": os.getpid()})
    await run


async def model_producer(report: Report, url: str, model: str, n: int) -> None:
    """`submit_many` of n tasks for `model`, then `wait_many`, from the parent's signal."""
    import asyncio

    from agentfleet.producer.client import Producer
    from agentfleet.producer.connection import connect
    from agentfleet.schemas.wire import Task

    tasks = [Task(model=model, prompt=f"hello world {i}") for i in range(n)]
    async with Producer(connect(url), settings=_settings(model)) as producer:
        await producer.wait_many(await producer.submit_many(
            [Task(model=model, prompt="warm up")]))  # connections and scripts in place
        go = _go()
        report("ready", {})
        await go.wait()
        cpu0, t0 = time.process_time(), time.monotonic()
        ids = await producer.submit_many(tasks)
        t1 = time.monotonic()
        results = await producer.wait_many(ids, timeout_s=600)
        t2, cpu1 = time.monotonic(), time.process_time()
    if failed := sum(not r.ok for r in results):
        raise RuntimeError(f"{failed} of {n} tasks failed")
    report("done", {"t0": t0, "submitted": t1, "end": t2, "cpu_s": cpu1 - cpu0})


async def model_latency(report: Report, url: str, model: str, rate: float,
                        duration_s: float) -> None:
    """One `submit` + `wait` per task at its scheduled time, `rate` per second; the times
    from submit to result, in ms."""
    import asyncio

    from agentfleet.producer.client import Producer
    from agentfleet.producer.connection import connect
    from agentfleet.schemas.wire import Task

    n = int(rate * duration_s)
    took_ms = [0.0] * n
    async with Producer(connect(url), settings=_settings(model)) as producer:
        await producer.wait_many(await producer.submit_many(
            [Task(model=model, prompt=f"warm up {i}") for i in range(100)]))
        go = _go()
        report("ready", {})
        await go.wait()

        async def one(i: int) -> None:
            started = time.monotonic()
            task_id = await producer.submit(model=model, prompt=f"hello world {i}")
            await producer.wait(task_id, timeout_s=60)
            took_ms[i] = round((time.monotonic() - started) * 1000, 3)

        fired: list[asyncio.Task] = []
        cpu0 = time.process_time()
        start = time.monotonic() + 0.01
        i = 0
        while i < n:
            now = time.monotonic()
            while i < n and start + i / rate <= now:
                fired.append(asyncio.ensure_future(one(i)))
                i += 1
            if i < n:  # at least 1 ms: uvloop's timers count whole milliseconds
                await asyncio.sleep(max(start + i / rate - time.monotonic(), 0.001))
        fired_s = time.monotonic() - start
        await asyncio.gather(*fired)
    report("done", {"fired_per_s": n / fired_s, "cpu_s": time.process_time() - cpu0,
                     "took_ms": took_ms})


# ---- parent side -------------------------------------------------------------------------


class Setup:
    """One of the two: a name, a URL, the server processes (for their CPU)."""

    def __init__(self, name: str, url: str, pids: list[int]):
        self.name, self.url, self.pids = name, url, pids

    def server_cpu_s(self) -> float:
        return sum(cpu_s(pid) for pid in self.pids)


def choose_models(cluster) -> tuple[list[str], list[dict]]:
    """MODELS names whose task streams lie on different primaries of `cluster`, and where."""
    from redis.cluster import key_slot

    from agentfleet.schemas import keys

    chosen: dict[int, dict] = {}
    for i in range(1000):
        name = f"bench{i}"
        stream = keys.task_stream(name)
        node = cluster.node_for(stream)
        if node.port not in chosen:
            chosen[node.port] = {"model": name, "slot": key_slot(stream.encode()),
                                 "primary": f"127.0.0.1:{node.port}"}
        if len(chosen) == MODELS:
            break
    placement = sorted(chosen.values(), key=lambda p: p["slot"])
    return [p["model"] for p in placement], placement


def pin_servers(pids: list[int]) -> dict:
    """Each server process on a CPU of its own, this process (and so every worker and
    producer it starts from now on) on the others: the server, the bottleneck being
    measured, is then never descheduled for a client when clients outnumber the cores."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < len(pids) + 2:
        raise SystemExit(f"--pin-servers: {len(pids)} servers need more than {len(cpus)} CPUs")
    for pid, cpu in zip(pids, cpus):
        os.sched_setaffinity(pid, {cpu})
    rest = cpus[len(pids):]
    os.sched_setaffinity(0, rest)
    return {"servers": cpus[:len(pids)], "clients": rest}


class Run:
    def __init__(self, procs: Processes, models: list[str], args: argparse.Namespace):
        self.procs, self.models, self.args = procs, models, args

    def _workers(self, procs: Processes, setup: Setup) -> list:
        workers = [procs.spawn(model_worker, setup.url, m, k, serving=True,
                               name=f"worker-{m}-{k}")
                   for m in self.models for k in range(self.args.workers_per_model)]
        for w in workers:
            procs.expect(w, "ready", READY_TIMEOUT_S)
        return workers

    def _start(self, procs: Processes, children: list) -> None:
        for child in children:
            procs.expect(child, "ready", READY_TIMEOUT_S)
        for child in children:
            child.send(signal.SIGUSR1)

    def fleet(self, setup: Setup) -> dict:
        each = self.args.producers_per_model
        per = self.args.tasks // (len(self.models) * each)
        n = per * len(self.models) * each
        with self.procs.scope() as procs:
            workers = self._workers(procs, setup)
            producers = [procs.spawn(model_producer, setup.url, m, per,
                                     name=f"producer-{m}-{k}")
                         for m in self.models for k in range(each)]
            cpu0 = {"workers": sum(cpu_s(w.pid) for w in workers),
                    "servers": setup.server_cpu_s()}
            background = Background()
            self._start(procs, producers)
            got = [procs.expect(p, "done", 900) for p in producers]
            cores = background.cores()
            cpu = {"producers": sum(g["cpu_s"] for g in got),
                   "workers": sum(cpu_s(w.pid) for w in workers) - cpu0["workers"],
                   "servers": setup.server_cpu_s() - cpu0["servers"]}
        t0 = min(g["t0"] for g in got)
        return {"tasks": n, "tasks_per_s": n / (max(g["end"] for g in got) - t0),
                "submit_per_s": n / (max(g["submitted"] for g in got) - t0),
                "background_cores": cores,
                "cpu_us_per_task": {k: round(v * 1e6 / n, 1) for k, v in cpu.items()}}

    def latency(self, setup: Setup) -> dict:
        rate = self.args.latency_rate / len(self.models)
        with self.procs.scope() as procs:
            self._workers(procs, setup)
            producers = [procs.spawn(model_latency, setup.url, m, rate,
                                     self.args.latency_duration_s, name=f"latency-{m}")
                         for m in self.models]
            background = Background()
            self._start(procs, producers)
            got = [procs.expect(p, "done", self.args.latency_duration_s + 300)
                   for p in producers]
            cores = background.cores()
        took = [t for g in got for t in g["took_ms"]]
        return {"tasks": len(took), "fired_per_s": round(sum(g["fired_per_s"] for g in got)),
                "submit_to_done_ms": percentiles(took, ndigits=3),
                "background_cores": cores}


def _fresh(single, cluster) -> None:
    import redis

    with redis.Redis.from_url(single.url) as r:
        r.flushall()
    cluster.flushall()


def _one_line(f: dict) -> str:
    if "tasks_per_s" in f:
        return (f"{f['tasks_per_s']:>9,.0f} tasks/s end to end, {f['submit_per_s']:>9,.0f}/s "
                f"submit; cpu us/task {f['cpu_us_per_task']}; background "
                f"{f['background_cores']} cores")
    p = f["submit_to_done_ms"]
    return (f"submit->done ms p50 {p['p50']:.2f} p99 {p['p99']:.2f} max {p['max']:.1f} "
            f"(fired {f['fired_per_s']:,}/s); background {f['background_cores']} cores")


def main(args: argparse.Namespace) -> int:
    from agentfleet.ops.embedded import ServerCluster

    machine = harness.machine(packages=("redis", "hiredis", "msgspec", "uvloop"))
    with Processes() as procs, harness.server("valkey", procs) as single, \
            tempfile.TemporaryDirectory(prefix="af-bench-cluster-") as data_dir:
        cluster = ServerCluster(Path(data_dir), primaries=PRIMARIES, replicas=args.replicas)
        try:
            cluster.start()
            for i, node in enumerate(cluster.nodes):
                procs.adopt(f"cluster-node{i}", node.proc,
                            log_path=node.data_dir / "server.log")
            models, placement = choose_models(cluster)
            primaries = [n for n in cluster.nodes if n.port in
                         {int(p["primary"].rsplit(":", 1)[1]) for p in placement}]
            if args.pin_servers:
                machine["pinned"] = pin_servers([single.proc.pid] +
                                                [n.proc.pid for n in cluster.nodes])
            setups = [Setup("one server", single.url, [single.proc.pid]),
                      Setup("cluster", cluster.url, [n.proc.pid for n in cluster.nodes])]
            machine["cluster"] = {"primaries": PRIMARIES, "replicas_per_primary": args.replicas,
                                  "workers_per_model": args.workers_per_model,
                                  "producers_per_model": args.producers_per_model}
            print(f"{machine}; tasks {args.tasks:,}, rounds {args.rounds}", flush=True)
            print("placement (model: slot of its task stream -> primary):")
            for p in placement:
                print(f"  {p['model']}: slot {p['slot']:>5} -> {p['primary']}")
            run = Run(procs, models, args)
            runs: dict[str, list[dict]] = {f"{kind}:{s.name}": [] for kind in
                                           ("fleet", "latency") for s in setups}
            for r in range(1, args.rounds + 1):
                order = setups if r % 2 else setups[::-1]
                for kind, measure in (("fleet", run.fleet), ("latency", run.latency)):
                    for setup in order:
                        _fresh(single, cluster)
                        started = time.monotonic()
                        figures = measure(setup)
                        runs[f"{kind}:{setup.name}"].append(figures)
                        print(f"round {r} {kind:<7} {setup.name:<10} {_one_line(figures)}  "
                              f"({time.monotonic() - started:.1f}s)", flush=True)
            for node in cluster.nodes:  # stopped by us below, not a death
                for child in procs.children:
                    if child.proc is node.proc:
                        child.stopping = True
        finally:
            cluster.stop()
    summary = summarize(runs, placement, primaries, args)
    print_report(summary, args)
    status = harness.print_checks(summary["checks"])
    harness.write_result(args.json, benchmark="queue_layer --cluster",
                         checks=summary.pop("checks"), machine_info=machine,
                         args={k: v for k, v in vars(args).items() if k != "json"},
                         placement=placement, summary=summary, runs=runs)
    return status


def summarize(runs: dict, placement: list[dict], primaries: list, args) -> dict:
    med = statistics.median
    rate = {s: [f["tasks_per_s"] for f in runs[f"fleet:{s}"]] for s in ("one server", "cluster")}
    rates = {s: med(v) for s, v in rate.items()}
    latency = {s: {k: med([f["submit_to_done_ms"][k] for f in runs[f"latency:{s}"]])
                   for k in ("p50", "p90", "p99", "max")} for s in ("one server", "cluster")}
    ratio = rates["cluster"] / rates["one server"]
    at = f"{args.latency_rate:,}/s"
    lat = latency["cluster"]
    checks = [
        Check(f"{MODELS} models on {MODELS} different primaries",
              len({p["primary"] for p in placement}) == MODELS == len(primaries),
              ", ".join(f"{p['model']}->{p['primary']}" for p in placement)),
        Check("cluster throughput >= 2.5 x one server", ratio >= TARGETS["cluster_vs_one"],
              f"{ratio:.2f}x ({rates['cluster']:,.0f} vs {rates['one server']:,.0f} tasks/s)"),
        Check(f"cluster latency p50 <= 2 ms at {at}", lat["p50"] <= TARGETS["latency_p50_ms"],
              f"{lat['p50']:.2f} ms"),
        Check(f"cluster latency p99 <= 10 ms at {at}", lat["p99"] <= TARGETS["latency_p99_ms"],
              f"{lat['p99']:.2f} ms"),
    ]
    return {"tasks_per_s": {"median": rates, "all": rate}, "cluster_vs_one": ratio,
            "per_round_cluster_vs_one": [c / o for c, o in zip(rate["cluster"],
                                                              rate["one server"])],
            "latency_ms": {"rate_per_s": args.latency_rate, **latency},
            "background_cores_median": {k: med([f["background_cores"] for f in v])
                                        for k, v in runs.items()},
            "checks": checks}


def print_report(summary: dict, args) -> None:
    print()
    print(f"{'':<12} {'tasks/s':>9}  all runs")
    for s in ("one server", "cluster"):
        print(f"{s:<12} {summary['tasks_per_s']['median'][s]:>9,.0f}  "
              + ", ".join(f"{v:,.0f}" for v in summary["tasks_per_s"]["all"][s]))
    print(f"cluster / one server: {summary['cluster_vs_one']:.2f}x (per round "
          + ", ".join(f"{r:.2f}" for r in summary["per_round_cluster_vs_one"]) + ")")
    print(f"latency at {args.latency_rate:,}/s, submit -> result, ms (median of rounds):")
    for s, p in summary["latency_ms"].items():
        if s != "rate_per_s":
            print(f"  {s:<12} p50 {p['p50']:.2f}  p90 {p['p90']:.2f}  p99 {p['p99']:.2f}  "
                  f"max {p['max']:.1f}")
    print(f"background cores (median per measurement): {summary['background_cores_median']}")
    print()
