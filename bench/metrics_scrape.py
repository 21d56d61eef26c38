"""Metrics benchmark: how long a scrape of /metrics takes, and what metrics cost per task.

    python -m bench.metrics_scrape [--models 10] [--scrapes 200] [--json out.json]

  worker    a Worker's /metrics with `--models` lanes, each holding the histograms of 100,000
            observed tasks (two priorities, a few failures) and engine statistics; timed over
            HTTP as Prometheus does it (fresh connection, whole body read).  Twice: with every
            value folded, and with each histogram holding the most unfolded values it can
            (2,048: a scrape then also sorts them).
  exporter  `agentfleet exporter`'s /metrics with `--models` models on an embedded Valkey:
            10,000 entries per stream, 500 pending, heartbeats, counters, retries, dead letters.
  hot path  microseconds per task of `observe_commit` (all succeeded; a group with failures)
            and per window of `observe_read`, in this process, no I/O.
  overhead  (--overhead N) a Worker process on the fake engine drains N tasks with metrics and
            per-minute aggregates on (the defaults) and off (metrics_port and kpi_ttl_s 0),
            alternating, `--rounds` times: its CPU per task and the end-to-end rate.  The
            queue-layer benchmark's fleet path, shortened, to check the 10% budget.

The target: a scrape under 50 ms with 10 models.  The machine is shared: only figures of the
same run compare.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import urllib.request
from pathlib import Path

from bench import harness
from bench.harness import Check, Processes, cpu_s, percentiles

TARGET_SCRAPE_MS = 50.0
TASKS_PER_LANE = 100_000


def _scrape_ms(url: str, n: int, server_pid: int | None = None) -> dict:
    """Wall time per scrape, and CPU per scrape: this process's (the serving thread and the
    HTTP client), and the Redis server's when `server_pid` is given.  On a busy machine the
    wall times carry scheduling delays; the CPU figures do not."""
    times = []
    size = 0
    cpu0 = time.process_time()
    server0 = cpu_s(server_pid) if server_pid else 0.0
    for _ in range(n):
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=10) as resp:
            size = len(resp.read())
        times.append(time.perf_counter() - started)
    cpu_ms = (time.process_time() - cpu0) * 1000 / n
    p = percentiles(times, (0.5, 0.99), scale=1000)
    out = {"p50_ms": p["p50"], "p99_ms": p["p99"], "max_ms": p["max"], "cpu_ms": cpu_ms,
           "bytes": size, "scrapes": n}
    if server_pid:
        out["server_cpu_ms"] = (cpu_s(server_pid) - server0) * 1000 / n
    return out


def _records(n: int, model: str, *, failures: int = 0):
    """n in-flight records as a lane holds them after the engine finished them."""
    from agentfleet.schemas.errors import ErrorCode
    from agentfleet.schemas.wire import Result, Status, Task, encode
    from agentfleet.workers.engine import EngineOutput
    from agentfleet.workers.inflight import InFlight
    from agentfleet.workers.scripts import CommitRecord

    now = time.time()
    done, records = [], []
    for i in range(n):
        rec = InFlight("s", False, b"%d-0" % i, now - 0.002, "w/m/1", n)
        rec.task = Task(id=f"t{i}", model=model, prompt="p", priority=i % 2 if failures else 0,
                        enqueued_at=now - 0.01 - (i % 50) / 1000)
        failed = i < failures
        rec.output = EngineOutput(
            request_id=str(i), text="answer", prompt_tokens=20 + i % 7, output_tokens=i % 64,
            engine_start=now - 0.002, first_token=now - 0.0015, finished=now - 0.0005,
            error_code=ErrorCode.INVALID_TASK if failed else None,
            error_message="bad" if failed else "")
        status = Status.FAILED if failed else Status.SUCCEEDED
        code = ErrorCode.INVALID_TASK if failed else None
        result = Result(task_id=f"t{i}", status=status, error_code=code)
        done.append(rec)
        records.append(CommitRecord(source="s", entry_id=rec.entry_id, outcome=b"r",
                                    v1=encode(result), v2=b"", result_key="", reply_key="",
                                    trace_key="", trace=b"", followups=(), status=status,
                                    error_code=code))
    return done, records


def _worker(models: int):
    from agentfleet.producer.connection import connect
    from agentfleet.schemas.settings import ModelSpec, Settings
    from agentfleet.workers.fake_engine import FakeEngine
    from agentfleet.workers.worker import Worker

    names = [f"model-{i:02d}" for i in range(models)]
    settings = Settings(models={m: ModelSpec(name=m) for m in names}, default_model=names[0],
                        engine="fake")
    # The client is never used: no connection is opened until a command is sent.
    return Worker(settings, connect("redis://127.0.0.1:1/0"), {m: FakeEngine() for m in names},
                  worker_id="bench")


def bench_worker(models: int, scrapes: int) -> dict:
    from agentfleet.ops.embedded import free_port
    from agentfleet.workers.metrics import _FOLD_AT

    worker = _worker(models)
    for lane in worker.runners:
        lm = lane.metrics
        done, records = _records(256, lane.model, failures=3)
        for _ in range(TASKS_PER_LANE // 256):
            lm.observe_read(256)
            lm.observe_commit(done, records)
        lm.engine_stats(kv_cache_usage=0.4, running=30, waiting=2, prefix_cache_queries=1000,
                        prefix_cache_hits=600)
    server = worker.metrics.serve(free_port(), addr="127.0.0.1")
    try:
        _scrape_ms(server.url, 5)  # warm-up
        folded = _scrape_ms(server.url, scrapes)
        unfolded = []
        for _ in range(max(scrapes // 10, 5)):  # fill every buffer to just below its fold
            for lane in worker.runners:
                lm = lane.metrics
                for hist in lm._histograms():
                    hist.raw.extend([0.01] * (_FOLD_AT - len(hist.raw)))
            unfolded.append(_scrape_ms(server.url, 1)["max_ms"])
        unfolded.sort()
    finally:
        worker.metrics.close()
    return {"folded": folded, "unfolded": {
        "p50_ms": statistics.median(unfolded), "max_ms": unfolded[-1], "scrapes": len(unfolded)}}


def bench_exporter(models: int, scrapes: int) -> dict:
    import redis
    from prometheus_client import generate_latest

    from agentfleet.ops.embedded import free_port
    from agentfleet.ops.exporter import exporter_registry
    from agentfleet.schemas import keys
    from agentfleet.workers.metrics import MetricsServer

    names = [f"model-{i:02d}" for i in range(models)]
    with harness.server() as server:
        client = redis.Redis.from_url(server.url)
        try:
            now = time.time()
            for model in names:
                stream = keys.task_stream(model)
                pipe = client.pipeline(transaction=False)
                for _ in range(10_000):
                    pipe.xadd(stream, {"d": b"x" * 100})
                pipe.execute()
                client.xgroup_create(stream, keys.GROUP, id="0")
                client.xreadgroup(keys.GROUP, "c1", {stream: ">"}, count=500)
                client.hset(keys.workers_key(model), mapping={f"w{i}": now for i in range(8)})
                client.hset(keys.stats_key(model), mapping={"written": 123456, "retried": 7})
                client.zadd(keys.delayed_key(model), {b"r%d" % i: now + 60 for i in range(20)})
                client.xadd(keys.dead_stream(model), {"d": b"dead"})
            registry = exporter_registry(client, names)
            metrics = MetricsServer(lambda: generate_latest(registry), free_port(), "127.0.0.1")
            try:
                _scrape_ms(metrics.url, 5)
                return _scrape_ms(metrics.url, scrapes, server.proc.pid)
            finally:
                metrics.close()
        finally:
            client.close()


def bench_hot_path() -> dict:
    worker = _worker(1)
    lm = worker.runners[0].metrics
    out = {}
    for size in (1, 16, 256):
        done, records = _records(size, lm.model)
        rounds = max(200_000 // size, 200)
        started = time.perf_counter()
        for _ in range(rounds):
            lm.observe_commit(done, records)
        out[f"commit_group_{size}_us_per_task"] = (
            (time.perf_counter() - started) / (rounds * size) * 1e6)
    done, records = _records(256, lm.model, failures=8)
    started = time.perf_counter()
    for _ in range(400):
        lm.observe_commit(done, records)
    out["commit_group_256_with_failures_us_per_task"] = (
        (time.perf_counter() - started) / (400 * 256) * 1e6)
    started = time.perf_counter()
    for _ in range(100_000):
        lm.observe_read(64)
    out["read_window_us"] = (time.perf_counter() - started) / 100_000 * 1e6
    return out


def bench_overhead(tasks: int, rounds: int) -> dict:
    """The queue-layer benchmark's fleet path with metrics and aggregates on (the defaults)
    and off (metrics_port and kpi_ttl_s 0), alternating."""
    from bench.queue_layer import Bench

    off = {"metrics_port": 0, "kpi_ttl_s": 0}
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    with Processes() as procs, harness.server("valkey", procs) as server:
        bench = Bench(procs, server, argparse.Namespace(tasks=tasks))
        for _ in range(rounds):
            for mode in ("on", "off"):
                bench.fresh()
                figures = bench.fleet(overrides={} if mode == "on" else off)
                runs[mode].append({"tasks_per_s": figures["tasks_per_s"],
                                   "worker_cpu_us_per_task":
                                       figures["cpu_us_per_task"]["worker"]})
    med = {mode: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
           for mode, rs in runs.items()}
    return {"tasks": tasks, "runs": runs, "median": med,
            "rate_on_vs_off": med["on"]["tasks_per_s"] / med["off"]["tasks_per_s"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.metrics_scrape", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=10)
    parser.add_argument("--scrapes", type=int, default=200)
    parser.add_argument("--overhead", type=int, default=0, metavar="TASKS",
                        help="also run the metrics on/off worker comparison with TASKS tasks")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of --overhead")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args(argv)
    import logging

    from agentfleet.workers.metrics import _FOLD_AT

    logging.disable(logging.ERROR)  # the failures we feed in would log one line per group
    machine = harness.machine(packages=("redis", "prometheus-client"))
    worker = bench_worker(args.models, args.scrapes)
    exporter = bench_exporter(args.models, args.scrapes)
    hot = asyncio.run(asyncio.to_thread(bench_hot_path))
    f = worker["folded"]
    print(f"worker /metrics, {args.models} models, {TASKS_PER_LANE:,} tasks each, "
          f"{f['bytes']:,} bytes: p50 {f['p50_ms']:.1f} ms, p99 {f['p99_ms']:.1f} ms, "
          f"max {f['max_ms']:.1f} ms; CPU {f['cpu_ms']:.1f} ms per scrape "
          f"({f['scrapes']} scrapes)")
    u = worker["unfolded"]
    print(f"  with {_FOLD_AT:,} unfolded values per histogram: p50 {u['p50_ms']:.1f} ms, "
          f"max {u['max_ms']:.1f} ms ({u['scrapes']} scrapes)")
    e = exporter
    print(f"exporter /metrics, {args.models} models on Valkey, {e['bytes']:,} bytes: "
          f"p50 {e['p50_ms']:.1f} ms, p99 {e['p99_ms']:.1f} ms, max {e['max_ms']:.1f} ms; "
          f"CPU {e['cpu_ms']:.1f} ms exporter + {e['server_cpu_ms']:.2f} ms Valkey per scrape")
    print("hot path: " + ", ".join(f"{k} {v:.3f}" for k, v in hot.items()))
    checks = [Check("worker scrape p99 < 50 ms", f["p99_ms"] < TARGET_SCRAPE_MS,
                    f"{f['p99_ms']:.1f} ms"),
              Check("exporter scrape p99 < 50 ms", e["p99_ms"] < TARGET_SCRAPE_MS,
                    f"{e['p99_ms']:.1f} ms")]
    overhead = None
    if args.overhead:
        overhead = bench_overhead(args.overhead, args.rounds)
        for mode in ("on", "off"):
            m = overhead["median"][mode]
            print(f"metrics {mode:>3}: {m['tasks_per_s']:,.0f} tasks/s end to end, worker "
                  f"{m['worker_cpu_us_per_task']:.1f} us CPU per task (median of {args.rounds}; "
                  "all: " + ", ".join(f"{r['tasks_per_s']:,.0f}" for r in overhead["runs"][mode])
                  + ")")
        checks.append(Check("metrics on >= 0.9 x off (end-to-end rate)",
                            overhead["rate_on_vs_off"] >= 0.9,
                            f"{overhead['rate_on_vs_off']:.3f}"))
    status = harness.print_checks(checks)
    harness.write_result(args.json, benchmark="metrics_scrape", checks=checks,
                         machine_info=machine, models=args.models, worker=worker,
                         exporter=exporter, hot_path=hot, overhead=overhead)
    return status


if __name__ == "__main__":
    sys.exit(harness.entry(main))
