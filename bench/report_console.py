"""The report's and the console's targets on a server as full as the issue says.

    python -m bench.report_console [--tasks 1000000] [--queued 1000000] [--dead 10000]
                                   [--requests 60]

Fills one embedded Valkey with:
  - 24 hours of aggregates for `--tasks` tasks, written by the workers' own writer
    (workers/kpi.KpiBuffer): two models, both lanes, 20 tenants (a few large, many small),
    two versions of one model (a 10% canary), error codes, queue depth and engine time;
  - `--queued` tasks waiting in one model's stream (1,000 of them delivered and pending);
  - `--dead` dead letters of 20 tenants; 100 bulk jobs (BatchClient, run by a worker); a
    few follow-up chains (traces), all with pipelines of 10,000 commands.
Then measures:
  report   `load_report` + `render_html` of the last 24 hours, in process (the median of 3),
           and the page's size.  Targets: <= 2 s, <= 1 MB.
  console  `agentfleet console` (uvicorn, as served) answering `--requests` sequential GETs
           per page through httpx, logged in as an admin and as a tenant's read key.
           Target: p95 <= 100 ms per page.  The report page is cached for 30 s: its first
           (cold) answer is held to the report's 2 s, the warm ones to 100 ms.
Prints PASS/FAIL per target and exits 1 on a FAIL, or at once if a process it started dies.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agentfleet.ops import apikeys
from agentfleet.ops.embedded import ServerProcess
from agentfleet.ops.report import load_report
from agentfleet.ops.report_render import render_html
from agentfleet.producer.batch import BatchClient
from agentfleet.producer.client import Producer
from agentfleet.producer.connection import connect, connect_sync
from agentfleet.schemas import keys
from agentfleet.schemas.errors import ErrorCode
from agentfleet.schemas.settings import ModelSpec, Settings
from agentfleet.schemas.wire import DeadLetter, FollowUp, Task, encode
from agentfleet.workers.kpi import KpiBuffer
from agentfleet.workers.metrics import LATENCY_BUCKETS_S

REPORT_S = 2.0
REPORT_BYTES = 1_000_000
PAGE_P95_S = 0.100
MODELS = ("chat-8b", "embed-1b")
TENANTS = [f"tenant-{i:02d}" for i in range(20)]
CODES = ("engine_error", "deadline_exceeded", "attempts_exhausted", "invalid_task")
PIPE = 10_000

SETTINGS = Settings(models={m: ModelSpec(name=m) for m in MODELS}, default_model=MODELS[0],
                    engine="fake", block_ms=20, retry_base_s=0.02, retry_max_s=0.05,
                    trace_enabled=True)


def _tenant(rng: random.Random) -> str:
    # a few tenants do most of the work
    return TENANTS[min(int(rng.paretovariate(1.2)) - 1, len(TENANTS) - 1)]


async def fill_aggregates(redis, tasks: int, now: float) -> None:
    """24 hours ending now, `tasks` tasks, through the workers' writer."""
    rng = random.Random(7)
    first = int((now - 86_400) // 60) * 60
    minutes = list(range(first, int(now // 60) * 60 + 60, 60))
    per_minute = tasks / len(minutes)
    buf = KpiBuffer(8 * 86_400, LATENCY_BUCKETS_S)
    for i, minute in enumerate(minutes):
        load = per_minute * (0.6 + 0.8 * (0.5 + 0.5 * __import__("math").sin(i / 229)))
        n_minute = max(int(load), 1)
        for model, share in zip(MODELS, (0.7, 0.3)):
            n_model = int(n_minute * share)
            by_tail: dict[tuple[str, str, str], int] = {}
            for _ in range(n_model):
                lane = "bulk" if rng.random() < 0.4 else "interactive"
                version = "v2" if model == MODELS[0] and rng.random() < 0.1 else "v1"
                key = (lane, version, _tenant(rng))
                by_tail[key] = by_tail.get(key, 0) + 1
            for (lane, version, tenant), n in by_tail.items():
                bulk = lane == "bulk"
                errors = sum(rng.random() < 0.004 for _ in range(n))
                ok = n - errors
                e2e = [rng.lognormvariate(5 if bulk else 0.3, 0.8) for _ in range(ok)]
                wait = [x * 0.2 for x in e2e]
                buf.groups.append((model, minute, lane, [tenant] * ok, e2e,
                                   [rng.randint(50, 800) for _ in range(ok)],
                                   [rng.randint(10, 300) for _ in range(ok)],
                                   [w + rng.lognormvariate(-2, 0.6) for w in wait], wait,
                                   [x * 0.7 for x in e2e], version, ok if bulk else 0))
                for _ in range(errors):
                    buf.tasks.append((model, minute, lane, tenant, "failed", rng.choice(CODES),
                                      rng.uniform(0.1, 5), 0, 0, None, 0.05, 0.5, version,
                                      False, f"corr-{minute}-{tenant}"))
            # what a worker's samplers write: engine time and queue depth
            buf._capacity[(model, minute)] = [120.0, 120.0 * rng.uniform(0.5, 0.95)]
            buf._stage({(model, minute): {f"z:depth:{lane}": str(rng.randint(0, 5000))
                                          for lane in ("interactive", "bulk")}})
        if i % 60 == 59 or minute == minutes[-1]:
            await buf.flush(redis)
            buf._last_tick = None


async def fill_queue(redis, queued: int, dead: int) -> None:
    model = MODELS[0]
    stream = keys.task_stream(model)
    await redis.xgroup_create(stream, keys.GROUP, id="0", mkstream=True)
    payload = encode(Task(model=model, prompt="Summarise the attached report in three "
                          "bullet points for a busy reader." * 2, tenant="tenant-00",
                          enqueued_at=time.time()))
    for start in range(0, queued, PIPE):
        async with redis.pipeline(transaction=False) as pipe:
            for _ in range(min(PIPE, queued - start)):
                pipe.xadd(stream, {"d": payload})
            await pipe.execute()
    await redis.xreadgroup(keys.GROUP, "bench-reader", {stream: ">"}, count=1000)  # pending
    rng = random.Random(3)
    for start in range(0, dead, PIPE):
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(start, min(start + PIPE, dead)):
                task = Task(model=model, id=f"dead-{i}", prompt=f"poison {i}",
                            tenant=rng.choice(TENANTS))
                pipe.xadd(keys.dead_stream(model), {"d": encode(DeadLetter(
                    task_id=task.id, model=model, reason="3 attempts failed; last: "
                    "engine_error: CUDA error: an illegal memory access was encountered",
                    error_code=ErrorCode.ATTEMPTS_EXHAUSTED, payload=encode(task), attempts=3,
                    deliveries=3, history=["engine_error: CUDA error"] * 3,
                    worker_id="gpu-7", at=time.time()))})
            await pipe.execute()


async def fill_batches_and_traces(url: str) -> tuple[str, str]:
    """100 small bulk jobs and 20 chains on the second model, run by a worker."""
    from agentfleet.workers.fake_engine import FakeEngine
    from agentfleet.workers.worker import Worker

    model = MODELS[1]
    redis = connect(url)
    worker = Worker(SETTINGS, redis, {model: FakeEngine()}, worker_id="bench-worker")
    running = asyncio.create_task(worker.run(drain_timeout_s=5))
    await asyncio.wait_for(worker.ready.wait(), 30)
    producer = Producer(connect(url), settings=SETTINGS)
    batches = BatchClient(producer)
    try:
        chains = [await producer.submit(model=model, prompt=f"plan {i}", tenant=TENANTS[i % 3],
                                        followups=[FollowUp(prompt="then {output}"),
                                                   FollowUp(prompt="and {output}")])
                  for i in range(20)]
        for chain in chains:
            await producer.wait_chain(chain, timeout_s=60)
        ids = []
        for j in range(100):
            lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                      "body": {"model": model, "messages": [{"role": "user",
                                                             "content": f"doc {j}/{i}"}],
                               "max_tokens": 8}} for i in range(50)]
            job = await batches.submit(lines)
            await redis.hset(keys.batch_meta(job.batch_id), "tenant", TENANTS[j % 5])
            ids.append(job.batch_id)
        for batch_id in ids:
            await batches.wait(batch_id, timeout_s=120)
        return chains[0], ids[-1]
    finally:
        worker.request_stop()
        await asyncio.wait_for(running, 30)
        await producer.close()


def measure_report(url: str) -> tuple[float, int, float]:
    client = connect_sync(url)
    try:
        took = []
        size = 0
        for _ in range(3):
            t0 = time.perf_counter()
            report = load_report(client, list(MODELS), 86_400)
            t1 = time.perf_counter()
            page = render_html(report)
            took.append((time.perf_counter() - t0, t1 - t0))
            size = len(page.encode())
        return statistics.median(t for t, _ in took), size, statistics.median(
            r for _, r in took)
    finally:
        client.close()


def measure_minutes_only(url: str) -> float:
    """Baseline: the same 24 hours read as 1,440 minute hashes per model (what the report
    read before the hour and series hashes, and still reads for hours older workers wrote)."""
    from agentfleet.ops.report import _hgetall_sync, _Reader

    client = connect_sync(url)
    try:
        now = time.time()
        minutes = range(int((now - 86_400) // 60) * 60, int(now // 60) * 60 + 60, 60)
        t0 = time.perf_counter()
        reader = _Reader(None)
        for model in MODELS:
            replies = _hgetall_sync(client, [keys.kpi_key(model, m) for m in minutes])
            for m, fields in zip(minutes, replies):
                reader.detail(model, fields, m)
        return time.perf_counter() - t0
    finally:
        client.close()


def measure_console(url: str, home: Path, admin: str, reader: str, chain: str, batch_id: str,
                    requests: int) -> list[tuple[str, float, float]]:
    import httpx

    models_file = home / "models.toml"
    models_file.write_text("".join(f"[models.{m}]\n" for m in MODELS))
    port = 18080 + os.getpid() % 1000
    env = {**os.environ, "REDIS_URL": url, "AGENTFLEET_HOME": str(home),
           "AGENTFLEET_MODELS_FILE": str(models_file), "AGENTFLEET_DEFAULT_MODEL": MODELS[0]}
    proc = subprocess.Popen([sys.executable, "-m", "agentfleet", "console", "--port",
                             str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    results = []
    try:
        deadline = time.monotonic() + 30
        while True:
            _alive(proc)
            try:
                httpx.get(base + "/login", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise SystemExit("console did not start") from None
                time.sleep(0.1)
        with httpx.Client(base_url=base, timeout=30) as admin_c, \
                httpx.Client(base_url=base, timeout=30) as read_c:
            for c, key in ((admin_c, admin), (read_c, reader)):
                assert c.post("/login", data={"key": key}).status_code == 303
            dead = admin_c.get(f"/dead-letters?model={MODELS[0]}").text
            entry = dead.split(f"/dead-letters/{MODELS[0]}/")[1].split('"')[0]
            mid = f"{int(entry.split('-')[0]) - 1}-0"
            t0 = time.perf_counter()
            cold = admin_c.get("/report?since=24h")
            results.append(("report page, cold (2 s target)", time.perf_counter() - t0,
                            time.perf_counter() - t0))
            assert cold.status_code == 200, cold.text[:500]
            pages = [("models and lanes", admin_c, "/"),
                     ("batches", admin_c, "/batches"),
                     ("batches of a tenant", read_c, "/batches"),
                     ("a batch", admin_c, f"/batches/{batch_id}"),
                     ("dead letters", admin_c, f"/dead-letters?model={MODELS[0]}"),
                     ("dead letters, a later page", admin_c,
                      f"/dead-letters?model={MODELS[0]}&before={mid}"),
                     ("dead letters of a tenant", read_c, f"/dead-letters?model={MODELS[0]}"),
                     ("a dead letter", admin_c, f"/dead-letters/{MODELS[0]}/{entry}"),
                     ("a trace", admin_c, f"/trace/{chain}"),
                     ("report page, warm", admin_c, "/report?since=24h")]
            for name, c, path in pages:
                took = []
                for _ in range(requests):
                    _alive(proc)
                    t0 = time.perf_counter()
                    reply = c.get(path)
                    took.append(time.perf_counter() - t0)
                    if reply.status_code != 200:
                        raise SystemExit(f"{name}: {path} answered {reply.status_code}: "
                                         f"{reply.text[:300]}")
                took.sort()
                results.append((name, statistics.median(took),
                                took[min(int(len(took) * 0.95), len(took) - 1)]))
        return results
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _alive(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        out = proc.stdout.read() if proc.stdout else ""
        print(f"FAIL  the console process died (exit {proc.returncode}):\n{out[-3000:]}")
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=1_000_000)
    p.add_argument("--queued", type=int, default=1_000_000)
    p.add_argument("--dead", type=int, default=10_000)
    p.add_argument("--requests", type=int, default=60, help="GETs per console page")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, \
            ServerProcess(Path(tmp) / "server", appendonly=False) as server:
        async def fill() -> tuple[str, str, str, str]:
            redis = connect(server.url)
            try:
                t0 = time.perf_counter()
                await fill_aggregates(redis, args.tasks, time.time())
                t1 = time.perf_counter()
                await fill_queue(redis, args.queued, args.dead)
                t2 = time.perf_counter()
                chain, batch_id = await fill_batches_and_traces(server.url)
                _, admin = await apikeys.create(redis, tenant="ops", role="admin")
                _, reader = await apikeys.create(redis, tenant="tenant-01", role="read")
                info = await redis.info("memory")
                print(f"filled: aggregates {t1 - t0:.1f} s, queue and dead letters "
                      f"{t2 - t1:.1f} s, jobs and traces {time.perf_counter() - t2:.1f} s; "
                      f"server memory {info['used_memory'] / 2**20:,.0f} MiB; "
                      f"{await redis.xlen(keys.task_stream(MODELS[0])):,} queued, "
                      f"{await redis.xlen(keys.dead_stream(MODELS[0])):,} dead letters",
                      flush=True)
                return admin, reader, chain, batch_id
            finally:
                await redis.aclose()

        admin, reader, chain, batch_id = asyncio.run(fill())
        took_s, size, load_s = measure_report(server.url)
        baseline_s = measure_minutes_only(server.url)
        print(f"baseline: reading the same 24 h from minute hashes alone takes "
              f"{baseline_s:.3f} s (the report read {load_s:.3f} s, this window and the one "
              "before it)", flush=True)
        results = [(f"report of 24 h, {args.tasks:,} tasks: load + render <= {REPORT_S:.0f} s",
                    took_s <= REPORT_S, f"{took_s:.3f} s (reading {load_s:.3f} s)"),
                   (f"report page <= {REPORT_BYTES / 1e6:.0f} MB", size <= REPORT_BYTES,
                    f"{size / 1e6:.3f} MB")]
        for name, median, p95 in measure_console(server.url, Path(tmp), admin, reader, chain,
                                                 batch_id, args.requests):
            if name.startswith("report page, cold"):
                results.append((name, p95 <= REPORT_S, f"{p95 * 1000:.0f} ms"))
            else:
                results.append((f"console: {name}, p95 <= {PAGE_P95_S * 1000:.0f} ms",
                                p95 <= PAGE_P95_S,
                                f"p50 {median * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms"))
    failed = False
    for name, ok, figure in results:
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {figure}")
        failed |= not ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
