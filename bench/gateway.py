"""The gateway's targets, on the fake engine: added latency, throughput, streaming delay, and a
100,000-line batch through /v1/files and /v1/batches.

    python -m bench.gateway [--duration-s 5] [--connections 64] [--rate 1000] [--lines 100000]
                            [--token-delay-ms 10] [--json out.json] [--doc]

It starts its own Valkey (append-only off), then in processes of their own: a worker (a
`Worker` on a FakeEngine that streams a word every `--token-delay-ms`), the gateway (the real
`agentfleet gateway` command, one process, on `--server`) and load generators (a raw HTTP/1.1
client over keep-alive connections, uvloop).  It stops at once, with a FAIL, when any process
it started dies.

  latency      chat completions paced at `--rate`/s for `--duration-s`, through the Python
               producer (submit + wait) and then through the gateway (HTTP): the gateway's
               added p50 and p99 (each measured from the request's scheduled time)
  submits      POST /v1/tasks, `--connections` closed-loop clients, with the worker paused
               (SIGSTOP: its consumption is not the gateway's cost; the figure with it
               running is printed too)
  chat         chat completions, closed loop, round trip through the running worker
  streaming    streamed chat completions asking `stream_options.include_timing`: each chunk
               says when the engine produced it; the delay is its arrival minus that
  batch        a `--lines` file uploaded through /v1/files, a batch created, waited for, its
               output downloaded and compared with `agentfleet batch` on the same file
               (per custom id: status, text, finish reason, usage); the gateway process's
               RSS sampled every 100 ms from before the upload to after the download

Targets (the issue's): added p50 <= 2 ms and p99 <= 10 ms at 1,000 requests/s; >= 5,000
submits/s; >= 2,000 chat round trips/s; streaming delay p50 <= 5 ms; the batch's output equal
to `agentfleet batch`'s, and the gateway's RSS growing less than 64 MB while it moves the file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.harness import run_uvloop

MODEL = "bench"
TENANT = "bench"  # the API key's tenant: its tasks sit in its own lane streams
READY_TIMEOUT_S = 60.0
TARGETS = {"added_p50_ms": 2.0, "added_p99_ms": 10.0, "submits_per_s": 5000,
           "chat_per_s": 2000, "stream_delay_p50_ms": 5.0, "batch_rss_growth_mb": 64}
CHAT_BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hello there, how are "
                                           "you today"}], "max_tokens": 8}

_CTX = mp.get_context("spawn")
Report = Callable[[tuple], None]


class ProcessDied(RuntimeError):
    """A process the benchmark started has died: the run stops with a FAIL."""


# ---- children ----------------------------------------------------------------------------

def _child(name: str, out: mp.Queue, *args) -> None:
    """A spawned child: `_CHILDREN[name](out.put, *args)` on uvloop; any failure reaches the
    parent as ("error", text)."""
    try:
        run_uvloop(_CHILDREN[name](out.put, *args))
    except BaseException:  # noqa: BLE001 - the parent must hear about any failure
        out.put(("error", f"{name}: {traceback.format_exc()}"))
        raise SystemExit(1) from None


async def worker(report: Report, url: str, token_delay_s: float) -> None:
    """A Worker on a FakeEngine (settings from the environment: AGENTFLEET_ENGINE=fake)."""
    import asyncio

    from agentfleet.producer.connection import connect
    from agentfleet.schemas.settings import Settings
    from agentfleet.workers.fake_engine import FakeEngine
    from agentfleet.workers.worker import Worker

    settings = Settings.from_env()
    w = Worker(settings, connect(url), {MODEL: FakeEngine(token_delay_s=token_delay_s)},
               worker_id="bench-worker")
    run = asyncio.ensure_future(w.run())
    ready = asyncio.ensure_future(w.ready.wait())
    await asyncio.wait([run, ready], return_when=asyncio.FIRST_COMPLETED)
    if run.done():
        run.result()
    report(("ready", {"pid": os.getpid()}))
    await run


async def producer_paced(report: Report, url: str, rate: float, duration_s: float) -> None:
    """The baseline: submit + wait through the Python producer, paced at `rate`/s."""
    import asyncio

    from agentfleet.producer.client import Producer
    from agentfleet.schemas.settings import Settings
    from agentfleet.schemas.wire import Message, Sampling, Task

    async with Producer.from_url(url, settings=Settings.from_env()) as p:
        content = CHAT_BODY["messages"][0]["content"]

        async def one(at: float, into: list[float]) -> None:
            task = Task(model=MODEL, messages=[Message(role="user", content=content)],
                        sampling=Sampling(max_tokens=8, temperature=1.0))
            await p.wait(await p.submit(task), timeout_s=30)
            into.append(time.perf_counter() - at)

        await _paced(one, rate, min(duration_s, 1.0), [])  # warm-up
        latencies: list[float] = []
        await _paced(one, rate, duration_s, latencies)
    report(("done", {"latencies": latencies}))


async def _paced(one, rate: float, duration_s: float, into: list[float]) -> None:
    """Start `one(scheduled time)` at `rate` per second (open loop), then wait for all."""
    import asyncio

    n = int(rate * duration_s)
    start = time.perf_counter() + 0.05
    tasks = []
    for i in range(n):
        at = start + i / rate
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(at, into)))
    await asyncio.gather(*tasks)


class _Conn:
    """One keep-alive HTTP/1.1 connection of the load generator."""

    def __init__(self, reader, writer):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> _Conn:
        import asyncio

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        i = lower.find(b"content-length:")
        if i >= 0:
            length = int(head[i + 15:head.index(b"\r\n", i)])
            return status, await self.reader.readexactly(length)
        return status, await self.chunked()

    async def chunked(self, on_chunk=None) -> bytes:
        parts = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
            data = await self.reader.readexactly(size + 2)
            if size == 0:
                return b"".join(parts)
            if on_chunk is not None:
                on_chunk(data[:-2])
            else:
                parts.append(data[:-2])

    def close(self) -> None:
        self.writer.close()


def _raw_request(method: str, path: str, key: str, body: bytes) -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


async def http_closed(report: Report, port: int, key: str, path: str, body: bytes,
                      connections: int, duration_s: float) -> None:
    """`connections` clients, each sending its next request when the last is answered."""
    import asyncio

    raw = _raw_request("POST", path, key, body)
    conns = [await _Conn.open(port) for _ in range(connections)]
    latencies: list[float] = []
    errors: list[int] = []
    stop = time.perf_counter() + duration_s

    async def client(conn: _Conn) -> None:
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            status, _ = await conn.request(raw)
            if status >= 300:
                errors.append(status)
            latencies.append(time.perf_counter() - t0)

    for conn in conns:  # warm-up: one request each
        await conn.request(raw)
    started = time.perf_counter()
    await asyncio.gather(*[client(c) for c in conns])
    elapsed = time.perf_counter() - started
    for conn in conns:
        conn.close()
    report(("done", {"requests": len(latencies), "elapsed_s": elapsed, "errors": errors[:5],
                     "error_count": len(errors), "latencies": latencies}))


async def http_paced(report: Report, port: int, key: str, rate: float,
                     duration_s: float) -> None:
    """Chat completions at `rate`/s (open loop) over a pool of keep-alive connections."""
    import asyncio

    raw = _raw_request("POST", "/v1/chat/completions", key, json.dumps(CHAT_BODY).encode())
    idle: list[_Conn] = []
    errors: list[int] = []

    async def one(at: float, into: list[float]) -> None:
        conn = idle.pop() if idle else await _Conn.open(port)
        try:
            status, _ = await conn.request(raw)
        except (asyncio.IncompleteReadError, ConnectionError):
            # The server closes keep-alive connections idle for 5 s (uvicorn's default); a
            # pooled one at the bottom of the stack can be: open another, as clients do.
            conn.close()
            conn = await _Conn.open(port)
            status, _ = await conn.request(raw)
        into.append(time.perf_counter() - at)
        if status >= 300:
            errors.append(status)
        idle.append(conn)

    await _paced(one, rate, min(duration_s, 1.0), [])  # warm-up: the pool fills
    latencies: list[float] = []
    await _paced(one, rate, duration_s, latencies)
    for conn in idle:
        conn.close()
    report(("done", {"latencies": latencies, "error_count": len(errors),
                     "errors": errors[:5]}))


async def http_streams(report: Report, port: int, key: str, concurrency: int,
                       duration_s: float) -> None:
    """Streamed chat completions; per chunk, its arrival minus when the engine made it."""
    import asyncio

    body = json.dumps({**CHAT_BODY, "max_tokens": 64, "stream": True,
                       "stream_options": {"include_timing": True},
                       "messages": [{"role": "user", "content": " ".join(
                           f"word{i}" for i in range(40))}]}).encode()
    raw = _raw_request("POST", "/v1/chat/completions", key, body)
    delays: list[float] = []
    streams = 0
    stop = time.perf_counter() + duration_s

    def on_chunk(data: bytes) -> None:
        now = time.time()
        for line in data.split(b"\n"):
            if line.startswith(b"data: {") and b'"agentfleet"' in line:
                delays.append(now - json.loads(line[6:])["agentfleet"]["produced_at"])

    async def client() -> None:
        nonlocal streams
        conn = await _Conn.open(port)
        while time.perf_counter() < stop:
            conn.writer.write(raw)
            head = await conn.reader.readuntil(b"\r\n\r\n")
            if int(head[9:12]) != 200:
                raise RuntimeError(f"stream refused: {head[:200]!r}")
            await conn.chunked(on_chunk)
            streams += 1
        conn.close()

    await asyncio.gather(*[client() for _ in range(concurrency)])
    report(("done", {"delays": delays, "streams": streams}))


_CHILDREN = {"worker": worker, "producer_paced": producer_paced, "http_closed": http_closed,
             "http_paced": http_paced, "http_streams": http_streams}


# ---- the parent --------------------------------------------------------------------------

def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] if ordered else 0.0


class Fleet:
    """The processes of one run; `check()` raises ProcessDied when any has died."""

    def __init__(self) -> None:
        self.procs: dict[str, object] = {}

    def add(self, name: str, proc) -> None:
        self.procs[name] = proc

    def check(self) -> None:
        for name, proc in self.procs.items():
            alive = proc.is_alive() if hasattr(proc, "is_alive") else proc.poll() is None
            if not alive:
                raise ProcessDied(f"the {name} process died (exit code "
                                  f"{getattr(proc, 'exitcode', None) or proc.returncode})")

    def run(self, name: str, *args, timeout_s: float = 600) -> dict:
        """A load child to its end, watching every process meanwhile."""
        out: mp.Queue = _CTX.Queue()
        proc = _CTX.Process(target=_child, args=(name, out, *args), daemon=True)
        proc.start()
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    kind, payload = out.get(timeout=0.2)
                    break
                except queue.Empty:
                    self.check()
                    if not proc.is_alive():
                        raise ProcessDied(f"the {name} load process died") from None
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{name}: no result within {timeout_s}s") from None
            if kind == "error":
                raise RuntimeError(payload)
            return payload
        finally:
            if proc.is_alive():
                proc.terminate()
            proc.join(10)


@contextlib.contextmanager
def _started_worker(fleet: Fleet, url: str, token_delay_s: float) -> Iterator[int]:
    out: mp.Queue = _CTX.Queue()
    proc = _CTX.Process(target=_child, args=("worker", out, url, token_delay_s), daemon=True)
    proc.start()
    try:
        kind, payload = out.get(timeout=READY_TIMEOUT_S)
        if kind != "ready":
            raise ProcessDied(f"the worker did not start: {payload}")
        fleet.add("worker", proc)
        yield proc.pid
    finally:
        fleet.procs.pop("worker", None)
        if proc.is_alive():
            proc.terminate()
        proc.join(10)


@contextlib.contextmanager
def _started_gateway(fleet: Fleet, env: dict[str, str], port: int,
                     cpus: set[int] | None = None) -> Iterator[int]:
    """`agentfleet gateway`, on `cpus` if given; yields the pid of its worker process."""
    import psutil

    log_path = Path(env["AGENTFLEET_HOME"]) / "gateway.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("wb")
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    proc = subprocess.Popen([sys.executable, "-m", "agentfleet", "gateway", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not _ready(port):
            if proc.poll() is not None:
                raise ProcessDied(f"the gateway did not start: {log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise ProcessDied("the gateway did not get ready in time")
            time.sleep(0.1)
        fleet.add("gateway", proc)
        children = psutil.Process(proc.pid).children()
        yield children[0].pid if children else proc.pid
    finally:
        fleet.procs.pop("gateway", None)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _cpu_list(text: str) -> set[int]:
    """'0-1' or '0,1' (the kernel's cpulist format) as a set of CPU numbers."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def _ready(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"GET /readyz HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the batch ---------------------------------------------------------------------------

def write_requests(path: Path, n: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({
                "custom_id": f"request-{i}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": MODEL, "max_tokens": 16, "messages": [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": f"Summarise document {i} in one line."}]}}))
            f.write("\n")


class _Http:
    """A blocking HTTP/1.1 client for the batch's few, large requests."""

    def __init__(self, port: int, key: str):
        self.port = port
        self.key = key

    def _open(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=120)

    def json(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else b""
        with self._open() as s:
            s.sendall(_raw_request(method, path, self.key, data).replace(
                b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        head, _, payload = reply.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 2"):
            raise RuntimeError(f"{method} {path}: {head[:100]!r} {payload[:500]!r}")
        return json.loads(payload)

    def upload(self, path: Path) -> dict:
        boundary = "benchboundary7d1"
        pre = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n"
               f"batch\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
               f"filename=\"{path.name}\"\r\nContent-Type: application/jsonl\r\n\r\n").encode()
        post = f"\r\n--{boundary}--\r\n".encode()
        length = len(pre) + path.stat().st_size + len(post)
        head = (f"POST /v1/files HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {self.key}\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                f"Content-Length: {length}\r\nConnection: close\r\n\r\n").encode()
        with self._open() as s, path.open("rb") as f:
            s.sendall(head + pre)
            while chunk := f.read(1 << 20):
                s.sendall(chunk)
            s.sendall(post)
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        head, _, payload = reply.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 2"):
            raise RuntimeError(f"upload: {head[:100]!r} {payload[:500]!r}")
        return json.loads(payload)

    def download(self, file_id: str, to: Path) -> None:
        with self._open() as s:
            s.sendall(f"GET /v1/files/{file_id}/content HTTP/1.1\r\nHost: bench\r\n"
                      f"Authorization: Bearer {self.key}\r\nConnection: close\r\n\r\n".encode())
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += s.recv(65536)
            head, _, rest = buf.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"download: {head[:200]!r}")
            if b"chunked" in head.lower():
                raise RuntimeError("download: chunked content is not read here")
            with to.open("wb") as f:
                f.write(rest)
                while chunk := s.recv(1 << 20):
                    f.write(chunk)


class RssSampler(threading.Thread):
    """The gateway process's RSS every 100 ms."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process(pid)
        self.samples: list[float] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.samples.append(self.proc.memory_info().rss / 2**20)
            except Exception:  # noqa: BLE001 - the process went: the fleet check says so
                return
            self.stopping.wait(0.1)


def _run_cli(fleet: Fleet, env: dict[str, str], tmp: Path, args: list[str],
             timeout_s: float = 900) -> None:
    """`agentfleet ARGS` to its end, stopping at once if a process of the fleet dies."""
    log = tmp / "cli.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "agentfleet", *args], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        try:
            while proc.poll() is None:
                fleet.check()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"agentfleet {args[0]} {args[1]}: still running after "
                                       f"{timeout_s}s")
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"agentfleet {' '.join(args[:2])}: {log.read_text()[-2000:]}")


def _normalised(path: Path) -> dict[str, tuple]:
    out = {}
    with path.open() as f:
        for line in f:
            row = json.loads(line)
            response = row["response"] or {}
            body = response.get("body") or {}
            choice = (body.get("choices") or [{}])[0]
            out[row["custom_id"]] = (
                response.get("status_code"), (choice.get("message") or {}).get("content"),
                choice.get("finish_reason"), json.dumps(body.get("usage"), sort_keys=True),
                json.dumps(row["error"], sort_keys=True))
    return out


def run_batch(fleet: Fleet, http: _Http, gateway_pid: int, env: dict[str, str], tmp: Path,
              lines: int) -> dict:
    source = tmp / "requests.jsonl"
    write_requests(source, lines)
    sampler = RssSampler(gateway_pid)
    sampler.start()
    time.sleep(0.3)
    baseline = min(sampler.samples)
    started = time.monotonic()
    upload = http.upload(source)
    uploaded_s = time.monotonic() - started
    batch = http.json("POST", "/v1/batches", {"input_file_id": upload["id"],
                                              "endpoint": "/v1/chat/completions",
                                              "completion_window": "24h"})
    while batch["status"] not in ("completed", "failed", "expired", "cancelled"):
        fleet.check()
        time.sleep(0.5)
        batch = http.json("GET", f"/v1/batches/{batch['id']}")
    done_s = time.monotonic() - started
    if batch["status"] != "completed" or not batch["output_file_id"]:
        raise RuntimeError(f"the batch ended {batch['status']}: {batch.get('errors')}")
    through_gateway = tmp / "gateway_out.jsonl"
    http.download(batch["output_file_id"], through_gateway)
    total_s = time.monotonic() - started
    sampler.stopping.set()
    sampler.join()
    peak = max(sampler.samples)
    # the same file through `agentfleet batch` (the CLI, as a user runs it)
    cli_out = tmp / "cli_out.jsonl"
    cli_started = time.monotonic()
    for args in (["submit", str(source), "--batch-id", "cli-run", "--wait"],
                 ["results", "cli-run", "-o", str(cli_out)]):
        _run_cli(fleet, env, tmp, ["batch", *args])
    cli_s = time.monotonic() - cli_started
    ours, theirs = _normalised(through_gateway), _normalised(cli_out)
    differing = [k for k in theirs if ours.get(k) != theirs[k]]
    return {"lines": lines, "input_mb": source.stat().st_size / 2**20,
            "output_mb": through_gateway.stat().st_size / 2**20, "upload_s": uploaded_s,
            "completed_s": done_s, "total_s": total_s, "cli_s": cli_s,
            "gateway_lines": len(ours), "cli_lines": len(theirs), "differing": len(differing),
            "differing_ids": differing[:5], "rss_baseline_mb": baseline, "rss_peak_mb": peak,
            "rss_growth_mb": peak - baseline}


# ---- main --------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration-s", type=float, default=5.0)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--lines", type=int, default=100_000)
    ap.add_argument("--token-delay-ms", type=float, default=10.0)
    ap.add_argument("--streams", type=int, default=8, help="concurrent streaming clients")
    ap.add_argument("--server", choices=["granian", "uvicorn"], default=None,
                    help="the gateway's HTTP server (default: the setting's)")
    ap.add_argument("--gateway-cpus", type=_cpu_list, default=None, metavar="LIST",
                    help="pin the gateway to these CPUs (e.g. 0-1) and every other process "
                         "of the run to the rest: the targets' 'one gateway process on 2 "
                         "cores' on a larger machine")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--doc", action="store_true", help="append the run to docs/benchmarks.md")
    args = ap.parse_args(argv)

    from agentfleet.ops.embedded import ServerProcess, valkey_binary

    figures: dict[str, object] = {"load_start": os.getloadavg(), "cores": os.cpu_count(),
                                  "args": vars(args) | {"json": str(args.json)}}
    if args.gateway_cpus:
        # Children inherit the parent's affinity: everything but the gateway stays off its CPUs.
        rest = set(os.sched_getaffinity(0)) - args.gateway_cpus
        if not rest:
            ap.error("--gateway-cpus leaves no CPU for the load generators, worker and server")
        os.sched_setaffinity(0, rest)
        figures["pinned"] = {"gateway": sorted(args.gateway_cpus), "others": sorted(rest)}
    results: list[tuple[str, bool, str]] = []
    fleet = Fleet()
    try:
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            models = tmp / "models.toml"
            models.write_text(f"[models.{MODEL}]\nmax_model_len = 2048\n")
            with ServerProcess(tmp / "server", binary=valkey_binary(), appendonly=False) \
                    as server:
                fleet.add("server", server.proc)
                env = {**os.environ, "REDIS_URL": server.url, "AGENTFLEET_ENGINE": "fake",
                       "AGENTFLEET_MODELS_FILE": str(models), "AGENTFLEET_DEFAULT_MODEL": MODEL,
                       "AGENTFLEET_HOME": str(tmp / "home"), "AGENTFLEET_METRICS_PORT": "0",
                       "AGENTFLEET_LOG_FORMAT": "json",
                       "AGENTFLEET_GATEWAY_FILES_DIR": str(tmp / "files")}
                if args.server:
                    env["AGENTFLEET_GATEWAY_SERVER"] = args.server
                figures["server"] = env.get("AGENTFLEET_GATEWAY_SERVER", "uvicorn")
                os.environ.update({k: env[k] for k in env if k.startswith(("AGENTFLEET_",
                                                                            "REDIS_URL"))})
                key = _make_key(server.url)
                port = _free_port()
                with _started_worker(fleet, server.url, args.token_delay_ms / 1000) as wpid, \
                        _started_gateway(fleet, env, port, args.gateway_cpus) as gpid:
                    _measure(fleet, args, figures, results, server.url, key, port, wpid, gpid,
                             env, tmp)
    except ProcessDied as exc:
        results.append(("processes", False, str(exc)))
    figures["load_end"] = os.getloadavg()
    for name, ok, line in results:
        print(f"{'PASS' if ok else 'FAIL'}  {name:<10} {line}")
    if "pinned" in figures:
        print(f"pinned: gateway on CPUs {figures['pinned']['gateway']}, the rest on "
              f"{len(figures['pinned']['others'])} others")
    print(f"gateway server {figures.get('server')}; load average "
          f"{figures['load_start'][0]:.1f} -> {figures['load_end'][0]:.1f} on "
          f"{figures['cores']} cores")
    figures["results"] = results
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    if args.doc:
        _append_doc(figures, results, argv)
    return 0 if results and all(ok for _, ok, _ in results) else 1


def _make_key(url: str) -> str:
    import asyncio

    from agentfleet.ops import apikeys
    from agentfleet.producer.connection import connect

    async def make() -> str:
        client = connect(url)
        try:
            return (await apikeys.create(client, tenant=TENANT, role="submit"))[1]
        finally:
            await client.aclose()

    return asyncio.run(make())


def _measure(fleet: Fleet, args, figures: dict, results: list, url: str, key: str, port: int,
             worker_pid: int, gateway_pid: int, env: dict, tmp: Path) -> None:
    import psutil

    gateway = psutil.Process(gateway_pid)
    d = args.duration_s
    # 1. latency the gateway adds over the producer, paced
    base = fleet.run("producer_paced", url, args.rate, d)["latencies"]
    via = fleet.run("http_paced", port, key, args.rate, d)
    p50 = (_pct(via["latencies"], 50) - _pct(base, 50)) * 1000
    p99 = (_pct(via["latencies"], 99) - _pct(base, 99)) * 1000
    figures["latency"] = {"producer_p50_ms": _pct(base, 50) * 1000,
                          "producer_p99_ms": _pct(base, 99) * 1000,
                          "gateway_p50_ms": _pct(via["latencies"], 50) * 1000,
                          "gateway_p99_ms": _pct(via["latencies"], 99) * 1000,
                          "added_p50_ms": p50, "added_p99_ms": p99,
                          "errors": via["error_count"]}
    ok = p50 <= TARGETS["added_p50_ms"] and p99 <= TARGETS["added_p99_ms"] \
        and not via["error_count"]
    results.append(("latency", ok, f"added p50 {p50:.2f} ms (<= 2), p99 {p99:.2f} ms (<= 10) at "
                    f"{args.rate:,.0f}/s; producer p50 {_pct(base, 50) * 1000:.2f} ms p99 "
                    f"{_pct(base, 99) * 1000:.2f} ms, gateway p50 "
                    f"{_pct(via['latencies'], 50) * 1000:.2f} ms p99 "
                    f"{_pct(via['latencies'], 99) * 1000:.2f} ms"))
    # 2. submits, the worker paused; then with it running (no target)
    task = json.dumps({"model": MODEL, "prompt": "hello there"}).encode()
    os.kill(worker_pid, signal.SIGSTOP)
    try:
        cpu = gateway.cpu_times()
        paused = fleet.run("http_closed", port, key, "/v1/tasks", task, args.connections, d)
        cpu_s = sum(gateway.cpu_times()[:2]) - sum(cpu[:2])
    finally:
        os.kill(worker_pid, signal.SIGCONT)
    running = fleet.run("http_closed", port, key, "/v1/tasks", task, args.connections, d)
    rate = paused["requests"] / paused["elapsed_s"]
    figures["submits"] = {"per_s": rate, "gateway_cpu_us": cpu_s / paused["requests"] * 1e6,
                          "p50_ms": _pct(paused["latencies"], 50) * 1000,
                          "with_worker_per_s": running["requests"] / running["elapsed_s"],
                          "errors": paused["error_count"] + running["error_count"]}
    results.append(("submits", rate >= TARGETS["submits_per_s"] and not paused["error_count"],
                    f"{rate:,.0f} POST /v1/tasks per s (>= 5,000; worker paused), "
                    f"{figures['submits']['gateway_cpu_us']:.0f} us gateway CPU each; "
                    f"{figures['submits']['with_worker_per_s']:,.0f}/s with it running"))
    _drain(url)
    # 3. chat round trips
    cpu = gateway.cpu_times()
    chat = fleet.run("http_closed", port, key, "/v1/chat/completions",
                     json.dumps(CHAT_BODY).encode(), args.connections, d)
    cpu_s = sum(gateway.cpu_times()[:2]) - sum(cpu[:2])
    rate = chat["requests"] / chat["elapsed_s"]
    figures["chat"] = {"per_s": rate, "p50_ms": _pct(chat["latencies"], 50) * 1000,
                       "p99_ms": _pct(chat["latencies"], 99) * 1000,
                       "gateway_cpu_us": cpu_s / chat["requests"] * 1e6,
                       "errors": chat["error_count"]}
    results.append(("chat", rate >= TARGETS["chat_per_s"] and not chat["error_count"],
                    f"{rate:,.0f} chat completions per s round trip (>= 2,000), p50 "
                    f"{figures['chat']['p50_ms']:.1f} ms p99 {figures['chat']['p99_ms']:.1f} ms "
                    f"at {args.connections} connections, "
                    f"{figures['chat']['gateway_cpu_us']:.0f} us gateway CPU each"))
    # 4. streaming
    streamed = fleet.run("http_streams", port, key, args.streams, d)
    delays = streamed["delays"]
    figures["streaming"] = {"chunks": len(delays), "streams": streamed["streams"],
                            "p50_ms": _pct(delays, 50) * 1000, "p99_ms": _pct(delays, 99) * 1000}
    results.append(("streaming", bool(delays) and _pct(delays, 50) * 1000 <=
                    TARGETS["stream_delay_p50_ms"],
                    f"token to client p50 {_pct(delays, 50) * 1000:.2f} ms (<= 5), p99 "
                    f"{_pct(delays, 99) * 1000:.2f} ms over {len(delays):,} chunks of "
                    f"{streamed['streams']} streams ({args.streams} at once, a token every "
                    f"{args.token_delay_ms:g} ms)"))
    # 5. the batch
    batch = run_batch(fleet, _Http(port, key), gateway_pid, env, tmp, args.lines)
    figures["batch"] = batch
    same = batch["differing"] == 0 and batch["gateway_lines"] == batch["cli_lines"] == args.lines
    results.append(("batch", same and batch["rss_growth_mb"] < TARGETS["batch_rss_growth_mb"],
                    f"{batch['lines']:,} lines ({batch['input_mb']:.1f} MB in, "
                    f"{batch['output_mb']:.1f} MB out) in {batch['total_s']:.1f} s; output "
                    f"{'equal to' if same else 'DIFFERS from'} `agentfleet batch`'s "
                    f"({batch['differing']} differing); gateway RSS "
                    f"{batch['rss_baseline_mb']:.0f} -> {batch['rss_peak_mb']:.0f} MB (+"
                    f"{batch['rss_growth_mb']:.1f}, < 64)"))


def _drain(url: str) -> None:
    """Empty the stream the submit run filled, so the next runs start from a clean queue."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + 120
        from agentfleet.schemas import keys

        while time.monotonic() < deadline:
            groups = client.xinfo_groups(keys.task_stream(MODEL, TENANT))
            if all(g["lag"] in (0, None) and g["pending"] == 0 for g in groups):
                return
            time.sleep(0.2)
    finally:
        client.close()


def _append_doc(figures: dict, results: list, argv: list[str] | None) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = "python -m bench.gateway " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"\n### Run of {when} (commit {commit})\n",
             f"`{command.strip()}`, gateway on {figures.get('server')}, on "
             f"{figures['cores']} cores ({cpu}), Python "
             f"{platform.python_version()}; load average {figures['load_start'][0]:.1f} -> "
             f"{figures['load_end'][0]:.1f}"
             + (f"; the gateway pinned to CPUs {figures['pinned']['gateway']}, every other "
                f"process of the run to the other {len(figures['pinned']['others'])}"
                if "pinned" in figures else "") + ".\n",
             "| target | result | |", "|---|---|---|"]
    lines += [f"| {name} | {'PASS' if ok else 'FAIL'} | {line} |" for name, ok, line in results]
    path = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
    text = path.read_text()
    # At the end of the Gateway section (before the next section's heading), newest last.
    start = text.index("\n## Gateway\n")
    end = text.find("\n## ", start + 1)
    end = len(text) if end < 0 else end
    path.write_text(text[:end].rstrip("\n") + "\n" + "\n".join(lines) + "\n" + text[end:])


if __name__ == "__main__":
    sys.exit(main())
