"""Bulk jobs in the OpenAI Batch format, on the fake engine: submit rate, memory, completion,
and what a running batch does to interactive latency.

    python -m bench.bulk_batch [--lines 100000] [--batch-lines 20000] [--delay-ms 200]
                               [--jitter 0.5] [--rate 200] [--duration-s 3]
                               [--server valkey|redis] [--json out.json]

It starts its own server (append-only off, data in a temporary folder) and, in fresh
processes (uvloop):

  submit       `BatchClient.submit` of a generated file of `--lines` chat requests, in a
               process of its own, with no worker running: lines per second (both passes:
               validation, then enqueue) and the process's peak RSS (ru_maxrss), with its
               RSS after imports for reference.
  complete     a Worker (FakeEngine, no delay) drains the job; the parent waits on the
               job's status, writes the output file and checks its custom ids against the
               input's: none lost, none twice.
  interactive  a producer paced at `--rate` tasks/s for `--duration-s`, one submit + wait
               per task, against a Worker whose FakeEngine takes `--delay-ms` per request
               (times `1 -/+ --jitter`, uniform): once alone, once while a job of
               `--batch-lines` requests runs in the bulk lane (the run checks that the job
               was still running when the traffic ended).  Then again with no jitter: every
               request the same time, so the engine frees its slots in lockstep bursts (the
               worst case for the lanes, reported, not checked).

Targets: >= 20,000 lines/s submitted, peak RSS < 200 MB, zero lost or duplicated lines,
interactive p99 with the job <= 2x without.  The machine may be shared: the load average is
printed with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench import harness
from bench.harness import Background, Check, Processes, Report, percentiles

MODEL = "bench"
FILE_MODEL = "gpt-4o-mini"  # the name in the file, mapped onto MODEL
READY_TIMEOUT_S = 60.0
TARGETS = {"submit_lines_per_s": 20_000, "submitter_peak_rss_mb": 200, "p99_ratio": 2.0}


# ---- children ----------------------------------------------------------------------------

def _settings():
    from agentfleet.schemas.settings import ModelSpec, Settings

    return Settings(models={MODEL: ModelSpec(name=MODEL)}, default_model=MODEL, engine="fake")


async def worker(report: Report, url: str, delay_s: float, jitter: float) -> None:
    """A Worker on a FakeEngine, serving until the parent terminates the process.

    Each request takes `delay_s` times a factor drawn uniformly from 1 -/+ `jitter`: real
    requests differ in length, and with one fixed time the engine's completions (and so
    its free slots) come in lockstep bursts, a worst case that `jitter` 0 measures.
    """
    import asyncio
    import random

    from agentfleet.producer.connection import connect
    from agentfleet.workers.fake_engine import FakeEngine
    from agentfleet.workers.worker import Worker

    class JitteredFakeEngine(FakeEngine):
        def submit(self, requests, on_done, *, salts=None) -> None:
            for request in requests:
                self.delay_s = delay_s * (1 + jitter * (2 * rng.random() - 1))
                super().submit([request], on_done)

    rng = random.Random(0)
    engine = JitteredFakeEngine(delay_s=delay_s) if jitter else FakeEngine(delay_s=delay_s)
    w = Worker(_settings(), connect(url), {MODEL: engine}, worker_id="bench-worker")
    run = asyncio.ensure_future(w.run())
    ready = asyncio.ensure_future(w.ready.wait())
    await asyncio.wait([run, ready], return_when=asyncio.FIRST_COMPLETED)
    if run.done():
        run.result()
    report("ready", {"pid": os.getpid()})
    await run


async def submitter(report: Report, url: str, path: str, batch_id: str) -> None:
    from agentfleet.producer.batch import BatchClient

    rss_start = harness.memory_kib(os.getpid())["VmRSS"] / 1024
    async with BatchClient.from_url(url, settings=_settings()) as client:
        server_cpu = await _server_cpu_s(client.redis)
        cpu, started = time.process_time(), time.monotonic()
        rep = await client.submit(path, batch_id=batch_id, model_map={FILE_MODEL: MODEL})
        elapsed, cpu = time.monotonic() - started, time.process_time() - cpu
        server_cpu = await _server_cpu_s(client.redis) - server_cpu
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    report("done", {"lines": rep.total, "elapsed_s": elapsed, "validate_s": rep.validate_s,
                    "submit_s": rep.submit_s, "lines_per_s": rep.total / elapsed,
                    "cpu_s": cpu, "server_cpu_s": server_cpu,
                    "rss_after_imports_mb": rss_start, "peak_rss_mb": peak_mb})


async def _server_cpu_s(redis) -> float:
    info = await redis.info("cpu")
    return info["used_cpu_user"] + info["used_cpu_sys"]


async def interactive(report: Report, url: str, rate: int, duration_s: float,
                      batch_id: str) -> None:
    """One submit + wait per task at its scheduled time; latency from submit to result."""
    import asyncio

    from agentfleet.producer.batch import BatchClient
    from agentfleet.producer.client import Producer
    from agentfleet.producer.connection import connect

    n = int(rate * duration_s)
    latencies = [0.0] * n
    async with Producer(connect(url), settings=_settings()) as producer:
        batches = BatchClient(producer)
        await producer.wait_many(await producer.submit_many(
            [_task(f"warm-up {i}") for i in range(50)]), timeout_s=60)
        before = await batches.status(batch_id) if batch_id else None

        async def one(i: int) -> None:
            started = time.monotonic()
            task_id = await producer.submit(_task(f"interactive {i}"))
            await producer.wait(task_id, timeout_s=60)
            latencies[i] = time.monotonic() - started

        fired = []
        start = time.monotonic() + 0.01
        for i in range(n):
            await asyncio.sleep(max(start + i / rate - time.monotonic(), 0))
            fired.append(asyncio.ensure_future(one(i)))
        await asyncio.gather(*fired)
        after = await batches.status(batch_id) if batch_id else None
    ms = percentiles(latencies, (0.5, 0.99), scale=1000)
    figures = {"n": n, "p50_ms": ms["p50"], "p99_ms": ms["p99"], "max_ms": ms["max"]}
    if before is not None and after is not None:
        figures.update(batch_done_before=before.done, batch_done_after=after.done,
                       batch_total=after.total, batch_running_throughout=not after.settled)
    report("done", figures)


def _task(prompt: str):
    from agentfleet.schemas.wire import Sampling, Task

    return Task(model=MODEL, prompt=prompt, sampling=Sampling(max_tokens=16))


# ---- parent ------------------------------------------------------------------------------

def _run(procs: Processes, function, *args, timeout_s: float = 600) -> dict:
    """A child from start to its "done"."""
    with procs.scope():
        return procs.expect(procs.spawn(function, *args), "done", timeout_s)


@contextlib.contextmanager
def _worker(procs: Processes, url: str, delay_s: float, jitter: float = 0.0) -> Iterator[None]:
    with procs.scope():
        procs.expect(procs.spawn(worker, url, delay_s, jitter, serving=True), "ready",
                     READY_TIMEOUT_S)
        yield


def write_requests(path: Path, n: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({
                "custom_id": f"request-{i}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": FILE_MODEL, "max_tokens": 16, "messages": [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": f"Summarise document {i} in one line."}]}}))
            f.write("\n")


def _flush(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    client.flushall()
    client.close()


def _wait_settled(procs: Processes, url: str, batch_id: str,
                  timeout_s: float) -> tuple[object, float]:
    from agentfleet.producer.batch import BatchClient

    async def wait():
        async with BatchClient.from_url(url, settings=_settings()) as client:
            started = time.monotonic()
            st = await client.wait(batch_id, timeout_s=timeout_s, poll_s=0.2)
            return st, time.monotonic() - started

    return procs.run(wait())


def _check_output(url: str, batch_id: str, requests: Path, out_dir: Path) -> dict:
    """Write the output file; compare its custom ids with the input's."""
    import asyncio

    from agentfleet.producer.batch import BatchClient

    async def write():
        async with BatchClient.from_url(url, settings=_settings()) as client:
            started = time.monotonic()
            rep = await client.write_results(batch_id, out_dir / "out.jsonl",
                                             out_dir / "errors.jsonl")
            return rep, time.monotonic() - started

    rep, write_s = asyncio.run(write())
    wanted = set()
    with requests.open("rb") as f:
        for line in f:
            wanted.add(json.loads(line)["custom_id"])
    got: dict[str, int] = {}
    for name in ("out.jsonl", "errors.jsonl"):
        with (out_dir / name).open("rb") as f:
            for line in f:
                custom_id = json.loads(line)["custom_id"]
                got[custom_id] = got.get(custom_id, 0) + 1
    return {"output_lines": rep.output, "error_lines": rep.errors, "write_s": write_s,
            "lost": len(wanted - got.keys()), "duplicated": sum(n > 1 for n in got.values()),
            "unknown": len(got.keys() - wanted)}


def _interactive_pair(procs: Processes, url: str, args: argparse.Namespace, jitter: float,
                      tmp: Path) -> dict:
    """Interactive latency alone, then with a job of args.batch_lines in the bulk lane."""
    delay_s = args.delay_ms / 1000
    _flush(url)
    with _worker(procs, url, delay_s, jitter):
        alone = _run(procs, interactive, url, args.rate, args.duration_s, "")
    _flush(url)
    small = tmp / "small.jsonl"
    write_requests(small, args.batch_lines)
    # Queued first: it starts with the worker.
    _run(procs, submitter, url, str(small), "bench-small")
    with _worker(procs, url, delay_s, jitter):
        with_batch = _run(procs, interactive, url, args.rate, args.duration_s, "bench-small")
    ratio = with_batch["p99_ms"] / alone["p99_ms"]
    engine = f"{args.delay_ms:g} ms" + (f" +/- {jitter:.0%}" if jitter else " exactly")
    print(f"interactive at {args.rate}/s for {args.duration_s:g} s, engine {engine}:"
          f"\n  alone       p50 {alone['p50_ms']:.1f} ms  p99 {alone['p99_ms']:.1f} ms"
          f"\n  with batch  p50 {with_batch['p50_ms']:.1f} ms  p99 {with_batch['p99_ms']:.1f} ms"
          f"  (ratio {ratio:.2f}; batch {with_batch['batch_done_before']:,} -> "
          f"{with_batch['batch_done_after']:,} of {with_batch['batch_total']:,} done during the "
          f"run)", flush=True)
    return {"alone": alone, "with_batch": with_batch, "p99_ratio": ratio}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lines", type=int, default=100_000)
    p.add_argument("--batch-lines", type=int, default=20_000)
    p.add_argument("--delay-ms", type=float, default=200.0)
    p.add_argument("--jitter", type=float, default=0.5,
                   help="request time spread (0.5: delay x 0.5..1.5); 0 is measured too")
    p.add_argument("--rate", type=int, default=200)
    p.add_argument("--duration-s", type=float, default=3.0)
    p.add_argument("--server", choices=["valkey", "redis"], default="valkey")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    machine = harness.machine(packages=("redis", "msgspec", "uvloop"))
    figures: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp, Processes() as procs, \
            harness.server(args.server, procs) as server:
        url = server.url
        requests = Path(tmp) / "requests.jsonl"
        write_requests(requests, args.lines)
        figures["file_mb"] = requests.stat().st_size / 1e6

        print(f"submit: {args.lines:,} lines ({figures['file_mb']:.1f} MB) ...", flush=True)
        background = Background()
        sub = _run(procs, submitter, url, str(requests), "bench-big")
        sub["background_cores"] = background.cores()
        figures["submit"] = sub
        per_line_us = {k: sub[k] / args.lines * 1e6 for k in ("cpu_s", "server_cpu_s")}
        print(f"  {sub['lines_per_s']:,.0f} lines/s ({sub['elapsed_s']:.2f} s: validate "
              f"{sub['validate_s']:.2f} s, enqueue {sub['submit_s']:.2f} s); submitter peak "
              f"RSS {sub['peak_rss_mb']:.0f} MB ({sub['rss_after_imports_mb']:.0f} MB after "
              f"imports)\n  CPU per line: submitter {per_line_us['cpu_s']:.1f} us, server "
              f"{per_line_us['server_cpu_s']:.1f} us; other processes used "
              f"{sub['background_cores']:.2f} cores meanwhile", flush=True)
        with _worker(procs, url, 0.0):
            st, took = _wait_settled(procs, url, "bench-big", 600)
        check = _check_output(url, "bench-big", requests, Path(tmp))
        figures["complete"] = {"status": st.status, "by_status": st.by_status,
                               "drain_s": took, **check}
        print(f"complete: {st.status} {st.by_status} drained in {took:.1f} s; output "
              f"{check['output_lines']:,} lines (written in {check['write_s']:.1f} s), errors "
              f"{check['error_lines']}, lost {check['lost']}, duplicated {check['duplicated']}",
              flush=True)

        figures["interactive"] = {}
        for jitter in (args.jitter, 0.0) if args.jitter else (0.0,):
            run = _interactive_pair(procs, url, args, jitter, Path(tmp))
            figures["interactive"][f"jitter_{jitter}"] = run
    load_end = os.getloadavg()
    main_run = figures["interactive"][f"jitter_{args.jitter}"]
    ratio, with_batch = main_run["p99_ratio"], main_run["with_batch"]
    checks = [
        Check(f"submit >= {TARGETS['submit_lines_per_s']:,} lines/s",
              sub["lines_per_s"] >= TARGETS["submit_lines_per_s"], f"{sub['lines_per_s']:,.0f}"),
        Check(f"submitter peak RSS < {TARGETS['submitter_peak_rss_mb']} MB",
              sub["peak_rss_mb"] < TARGETS["submitter_peak_rss_mb"],
              f"{sub['peak_rss_mb']:.0f} MB"),
        Check("no line lost or duplicated",
              check["lost"] == check["duplicated"] == check["unknown"] == 0
              and check["output_lines"] == args.lines,
              f"lost {check['lost']}, duplicated {check['duplicated']}"),
        Check(f"interactive p99 with the job <= {TARGETS['p99_ratio']:g} x without",
              ratio <= TARGETS["p99_ratio"], f"{ratio:.2f}x"),
        Check("the job ran throughout the interactive traffic",
              bool(with_batch.get("batch_running_throughout"))),
    ]
    print(f"load average {machine['load_avg'][0]:.1f} -> {load_end[0]:.1f} on "
          f"{machine['cores']} cores")
    status = harness.print_checks(checks)
    harness.write_result(args.json, benchmark="bulk_batch", checks=checks, machine_info=machine,
                         args={k: v for k, v in vars(args).items() if k != "json"},
                         load_end=load_end, **figures)
    return status


if __name__ == "__main__":
    sys.exit(harness.entry(main))
