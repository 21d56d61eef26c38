"""Headroom for interactive work beside a bulk job, on the fake engine (issue 12, CPU part).

    python -m bench.headroom [--quick] [--slots 64] [--delay-ms 50] [--jitter 0.5]
                             [--rate 50] [--duration-s 20] [--json out.json]

A worker runs in its own process (`agentfleet worker` with AGENTFLEET_ENGINE=fake,
AGENTFLEET_FAKE_SLOTS and AGENTFLEET_FAKE_DELAY_S: an engine of `--slots` slots, each request
taking `--delay-ms` times 1 -/+ `--jitter`, the waiting ones in vLLM's priority order),
against a Valkey of its own;
it caps bulk-job tasks at bulk_max_share (0.875) of the engine's slots.  Three runs:

  interactive alone  a producer paced at `--rate` tasks/s for `--duration-s`, one submit and
                     one wait per task: end-to-end latency on the producer's clock
  bulk alone         a bulk job (tasks with a batch id: the bulk lane) sized to keep the
                     engine busy past the window: its results per second over a window of
                     `--duration-s`, counted from its output stream (ids carry commit
                     times); then the rest of the job is cancelled
  both               the same job, and the same interactive traffic while it runs; the bulk
                     window is the traffic's

Targets: interactive p99 with the job at most 1.5x alone; the job's throughput with the
traffic at least 0.9x alone.  The job must outlast the traffic, or the run fails.  It prints
PASS or FAIL per target and exits 1 on a FAIL; when the worker dies it stops at once with
the worker's log.  `--quick` (16 slots, 3 s windows, about 20 s in all) is what CI runs
(tests/test_headroom.py).  The machine may be shared: the load average is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {"p99_ratio": 1.5, "bulk_ratio": 0.9}
WARM_S = 0.5  # after the job's first result, before its window opens
READY_TIMEOUT_S = 60.0


class WorkerDied(RuntimeError):
    """The worker process ended while the benchmark needed it."""


class Run:
    """The worker process and the clients of one benchmark run."""

    def __init__(self, args: argparse.Namespace, url: str, log_path: Path):
        from agentfleet.producer.client import Producer
        from agentfleet.producer.connection import connect
        from agentfleet.schemas.settings import Settings

        self.args = args
        self.settings = Settings(redis_url=url)
        self.model = self.settings.default_model
        self.log_path = log_path
        self.worker: subprocess.Popen | None = None
        self.interactive = Producer(connect(url), settings=self.settings)
        self.bulk = Producer(connect(url), settings=self.settings)
        self.redis = self.interactive.redis
        self.rng = random.Random(0)

    def engine_time(self) -> dict[str, str]:
        """A request's time in the fake engine: `--delay-ms` times 1 -/+ `--jitter`, since
        real requests differ in length (one fixed time makes the engine free its slots in
        lockstep bursts, a worst case that `--jitter 0` measures)."""
        if not self.args.jitter:
            return {}
        factor = 1 + self.args.jitter * (2 * self.rng.random() - 1)
        return {"fake_delay_s": f"{self.args.delay_ms / 1000 * factor:.4f}"}

    def start_worker(self) -> None:
        env = {**os.environ, "REDIS_URL": self.settings.redis_url, "AGENTFLEET_ENGINE": "fake",
               "AGENTFLEET_FAKE_SLOTS": str(self.args.slots),
               "AGENTFLEET_FAKE_DELAY_S": str(self.args.delay_ms / 1000),
               "AGENTFLEET_METRICS_PORT": "0", "AGENTFLEET_WORKER_ID": "headroom",
               "AGENTFLEET_LOG_FORMAT": "text", **dict(kv.split("=", 1)
                                                       for kv in self.args.worker_env)}
        with open(self.log_path, "wb") as log:
            self.worker = subprocess.Popen([sys.executable, "-m", "agentfleet", "worker"],
                                           env=env, stdout=log, stderr=subprocess.STDOUT)

    def died(self) -> WorkerDied:
        tail = self.log_path.read_text(errors="replace")[-3000:]
        return WorkerDied(f"the worker exited with code {self.worker.returncode}:\n{tail}")

    async def watched(self, coro):
        """Run `coro`, stopping at once (WorkerDied) if the worker process ends meanwhile."""
        work = asyncio.ensure_future(coro)
        while not work.done():
            await asyncio.wait([work], timeout=0.1)
            if self.worker.poll() is not None:
                work.cancel()
                raise self.died()
        return work.result()

    async def close(self) -> None:
        await self.interactive.close()
        await self.bulk.close()
        if self.worker is not None and self.worker.poll() is None:
            self.worker.terminate()
            try:
                self.worker.wait(30)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait()

    # ---- the runs -------------------------------------------------------------------------

    async def wait_live(self) -> None:
        from agentfleet.schemas import keys

        deadline = time.monotonic() + READY_TIMEOUT_S
        while not keys.live_workers(await self.redis.hvals(keys.workers_key(self.model)),
                                    time.time()):
            if time.monotonic() > deadline:
                raise RuntimeError("the worker did not start serving in time")
            await asyncio.sleep(0.05)

    async def traffic(self, warm_up: bool = False) -> dict:
        """Interactive tasks at `--rate` for `--duration-s` (a second when warming up):
        latencies on the producer's clock, and the window they went in (epoch seconds)."""
        from agentfleet.schemas.wire import Sampling, Task

        latencies: list[float] = []

        async def one(i: int) -> None:
            started = time.monotonic()
            task_id = await self.interactive.submit(Task(
                model=self.model, prompt=f"ask {i}", sampling=Sampling(max_tokens=8),
                metadata=self.engine_time()))
            result = await self.interactive.wait(task_id, timeout_s=60)
            assert result.ok, result.error_message
            latencies.append(time.monotonic() - started)

        n = int(self.args.rate * (1.0 if warm_up else self.args.duration_s))
        begin, t0 = time.time(), time.monotonic()
        pending = []
        for i in range(n):
            await asyncio.sleep(max(0.0, t0 + i / self.args.rate - time.monotonic()))
            pending.append(asyncio.ensure_future(one(i)))
        end = time.time()
        await asyncio.gather(*pending)
        return {"tasks": n, "window": (begin, end), **percentiles(latencies)}

    async def submit_job(self, name: str) -> tuple[str, int]:
        """A bulk job long enough to outlast a window: its id and size."""
        from agentfleet.schemas.wire import Sampling, Task

        cap = max(1, int(self.args.slots * self.settings.bulk_max_share))
        size = math.ceil(cap / (self.args.delay_ms / 1000)
                         * (WARM_S + self.args.duration_s + 2.0))
        batch_id = f"{name}-{time.time_ns()}"
        await self.bulk.submit_many(
            [Task(model=self.model, prompt=f"doc {i}", batch_id=batch_id,
                  sampling=Sampling(max_tokens=8), metadata=self.engine_time())
             for i in range(size)], reply=False)
        return batch_id, size

    async def job_started(self, batch_id: str) -> float:
        """When the job's first result was committed (epoch seconds)."""
        from agentfleet.schemas import keys

        out = keys.batch_output(self.model, batch_id)
        while not (first := await self.redis.xrange(out, "-", "+", count=1)):
            await asyncio.sleep(0.01)
        return entry_time(first[0][0])

    async def job_window(self, batch_id: str, size: int, begin: float, end: float) -> dict:
        """The job's results per second committed within [begin, end]; then the rest of the
        job is cancelled (its queued tasks finish at once, not run) and waited for."""
        from agentfleet.schemas import keys

        await asyncio.sleep(max(0.0, end + 0.2 - time.time()))
        counts = keys.batch_counts(self.model, batch_id)
        finished = sum(int(v) for v in await self.redis.hvals(counts))
        await self.bulk.cancel("batch:" + batch_id, self.model)
        deadline = time.monotonic() + 60
        while sum(int(v) for v in await self.redis.hvals(counts)) < size:
            if time.monotonic() > deadline:
                raise RuntimeError(f"bulk job {batch_id} did not settle after its cancel")
            await asyncio.sleep(0.05)
        out = keys.batch_output(self.model, batch_id)
        inside = len(await self.redis.xrange(out, f"{int(begin * 1000)}-0",
                                             f"{int(end * 1000)}-0"))
        return {"tasks_per_s": inside / (end - begin), "outlasted": finished < size}

    async def bulk_alone(self) -> dict:
        batch_id, size = await self.submit_job("alone")
        begin = await self.job_started(batch_id) + WARM_S
        return await self.job_window(batch_id, size, begin, begin + self.args.duration_s)

    async def both(self) -> tuple[dict, dict]:
        batch_id, size = await self.submit_job("both")
        await self.job_started(batch_id)
        await asyncio.sleep(WARM_S)
        interactive = await self.traffic()
        return interactive, await self.job_window(batch_id, size, *interactive["window"])


def entry_time(entry_id: bytes) -> float:
    """A stream entry's time (its id's milliseconds: the server's clock, this machine's)."""
    return int(entry_id.split(b"-")[0]) / 1000


def percentiles(values_s: list[float]) -> dict:
    """p50 and p99 in ms, nearest rank."""
    ordered = sorted(values_s)

    def rank(q: float) -> float:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)] * 1000

    return {"p50_ms": rank(0.5), "p99_ms": rank(0.99)}


async def measure(args: argparse.Namespace, url: str, log_path: Path) -> dict:
    run = Run(args, url, log_path)
    try:
        run.start_worker()
        await run.watched(run.wait_live())
        await run.watched(run.traffic(warm_up=True))  # first connections, scripts loaded
        phases = {}
        for name, phase in (("alone", run.traffic), ("bulk", run.bulk_alone),
                            ("both", run.both)):
            cpu, started = cpu_s(run.worker.pid), time.monotonic()
            phases[name] = await run.watched(phase())
            phases[name + "_cpu"] = (cpu_s(run.worker.pid) - cpu) / (time.monotonic() - started)
    finally:
        await run.close()
    mixed, mixed_bulk = phases["both"]
    return {"interactive_alone": phases["alone"], "bulk_alone": phases["bulk"],
            "interactive_with_bulk": mixed, "bulk_with_interactive": mixed_bulk,
            "worker_cpu_share": {k[:-4]: phases[k] for k in phases if k.endswith("_cpu")}}


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def report(figures: dict, args: argparse.Namespace) -> int:
    alone, mixed = figures["interactive_alone"], figures["interactive_with_bulk"]
    bulk, mixed_bulk = figures["bulk_alone"], figures["bulk_with_interactive"]
    cap = int(args.slots * 0.875)
    print(f"engine {args.slots} slots x {args.delay_ms:g} ms +/-{args.jitter:.0%} (bulk cap "
          f"{cap}); interactive "
          f"{args.rate:g}/s for {args.duration_s:g} s; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"interactive alone      p50 {alone['p50_ms']:6.1f} ms  p99 {alone['p99_ms']:6.1f} ms"
          f"  ({alone['tasks']} tasks)")
    print(f"interactive with bulk  p50 {mixed['p50_ms']:6.1f} ms  p99 {mixed['p99_ms']:6.1f} ms")
    print(f"bulk alone             {bulk['tasks_per_s']:8,.1f} tasks/s")
    print(f"bulk with interactive  {mixed_bulk['tasks_per_s']:8,.1f} tasks/s")
    cpu = figures["worker_cpu_share"]
    print(f"worker CPU (share of a core): interactive alone {cpu['alone']:.0%}, bulk alone "
          f"{cpu['bulk']:.0%}, both {cpu['both']:.0%}")
    p99_ratio = mixed["p99_ms"] / alone["p99_ms"]
    bulk_ratio = mixed_bulk["tasks_per_s"] / bulk["tasks_per_s"]
    figures["p99_ratio"], figures["bulk_ratio"] = p99_ratio, bulk_ratio
    checks = [
        (p99_ratio <= TARGETS["p99_ratio"],
         f"interactive p99 with bulk / alone: {p99_ratio:.2f} (target <= {TARGETS['p99_ratio']})"),
        (bulk_ratio >= TARGETS["bulk_ratio"],
         f"bulk throughput with interactive / alone: {bulk_ratio:.2f} "
         f"(target >= {TARGETS['bulk_ratio']})"),
        (bulk["outlasted"] and mixed_bulk["outlasted"],
         "the bulk job outlasted each window (else the figures mean nothing)"),
    ]
    for ok, text in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    return 0 if all(ok for ok, _ in checks) else 1


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.headroom",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="16 slots, 40/s for 3 s: what CI runs (about 20 s)")
    p.add_argument("--slots", type=int, default=None, help="engine slots (64; quick 16)")
    p.add_argument("--delay-ms", type=float, default=50.0, help="engine time per request")
    p.add_argument("--jitter", type=float, default=0.5,
                   help="each request takes delay x (1 -/+ jitter), uniform (0: all equal)")
    p.add_argument("--rate", type=float, default=None, help="interactive tasks/s (50; quick 40)")
    p.add_argument("--duration-s", type=float, default=None,
                   help="interactive traffic and bulk window (20; quick 3)")
    p.add_argument("--worker-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment of the worker (fault injection in tests)")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    quick = {"slots": 16, "rate": 40.0, "duration_s": 3.0}
    full = {"slots": 64, "rate": 50.0, "duration_s": 20.0}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> int:
    from agentfleet.ops.embedded import ServerProcess

    args = parse(argv)
    with tempfile.TemporaryDirectory(prefix="headroom-") as tmp, \
            ServerProcess(Path(tmp) / "server", appendonly=False) as server:
        try:
            figures = asyncio.run(measure(args, server.url, Path(tmp) / "worker.log"))
        except WorkerDied as exc:
            print(f"FAIL  {exc}", flush=True)
            return 1
    status = report(figures, args)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items()
                                                  if k != "json"}, **figures}, indent=2,
                                        default=str))
    return status


if __name__ == "__main__":
    sys.exit(main())
