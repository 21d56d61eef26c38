"""The affinity phase (issue 18, docs/affinity.md): agents of many kinds whose long system
prompts together exceed one GPU's KV cache, each running a chain of steps that continue their
conversation, on two GPUs.

    python -m bench.gpu.run --phase affinity                  # nvidia-h200-x2: two GPUs
    python -m bench.gpu.run --tiny --phase affinity           # the CPU smoke run
    python -m bench.gpu.run --phase affinity --affinity-kinds 400 --affinity-system-tokens 1000
    python -m bench.gpu.run --phase affinity --affinity-in-flight 64   # 64 agents at a time

Runs, each on the same chains (agents in random order, all started at once, or with
`--affinity-in-flight N` N at a time, each starting when one ends; offline always runs all):
  fleet@a512x2+affinity  two fleet workers (one GPU each), affinity partitions on
  fleet@a512x2           the same fleet with affinity off: any worker takes any task
  serve@a512x2           two `vllm serve` (one GPU each); every request goes to the next server
                         in turn (round-robin clients, what a team would deploy)
  offline@a512x2         `LLM.chat` in two processes (one GPU each), each on the agents of
                         half of the kinds, step by step: the reference without any queue,
                         with the ideal placement (each GPU caches only its kinds' prompts)
Each fleet run then also runs the plain bulk prompts (no shared prefix): affinity must cost
nothing there.  Figures per run: output tokens/s over the chains, p90 time to first token
(enqueue or request to the first token), the prefix-cache hit rate (vLLM's counters over both
engines); fleet runs add the affinity hits, steals and misses of their workers.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable

import aiohttp
import msgspec

from bench import harness
from bench.gpu.common import MODEL_NAME, Context, summary
from bench.gpu.engines import EngineConfig, llm_kwargs, models_toml
from bench.gpu.workload import PromptSet, Tokens, bulk_prompts, words_to_tokens
from bench.harness import Check, Processes, percentiles

PARTITIONS = 64  # affinity partitions of the fleet with affinity (AGENTFLEET_AFFINITY_PARTITIONS)


class ChainWorkload(msgspec.Struct, kw_only=True):
    """Agents of `len(systems)` kinds: agent i has kind `kinds[i]`, a first prompt, and
    follow-up prompts that continue its conversation (steps - 1 of them)."""

    name: str = "chains"
    systems: list[str]
    kinds: list[int]
    firsts: list[str]
    followups: list[str]
    max_tokens: int
    system_tokens: int
    in_flight: int = 0  # agents running at once (a closed loop); 0: all started at once

    @property
    def steps(self) -> int:
        return 1 + len(self.followups)

    def messages(self, agent: int) -> list[dict]:
        return [{"role": "system", "content": self.systems[self.kinds[agent]]},
                {"role": "user", "content": self.firsts[agent]}]


def chain_workload(tokens: Tokens, *, kinds: int, system_tokens: int, agents: int, steps: int,
                   max_tokens: int, in_flight: int = 0, seed: int = 18) -> ChainWorkload:
    rng = random.Random(seed)
    systems = [words_to_tokens(tokens, rng, f"You are agent kind {k}. Follow these rules:",
                               system_tokens) for k in range(kinds)]
    return ChainWorkload(
        systems=systems, kinds=[rng.randrange(kinds) for _ in range(agents)],
        firsts=[words_to_tokens(tokens, rng, f"Case {i}:", 24) for i in range(agents)],
        followups=[f"Step {s + 2}: go on from your answer, in more detail."
                   for s in range(steps - 1)],
        max_tokens=max_tokens, system_tokens=tokens.count(systems[0]), in_flight=in_flight)


def _hit_rate(counters: dict) -> float | None:
    q = counters.get("prefix_cache_queries")
    return round(counters.get("prefix_cache_hits", 0.0) / q, 4) if q else None


def _figures(wall_s: float, tasks: int, ok: int, output_tokens: int, ttft: list[float],
             counters: dict) -> dict:
    out = summary(wall_s=wall_s, tasks=tasks, ok=ok, output_tokens=output_tokens,
                  prompt_tokens=0)
    out["ttft_s"] = percentiles(ttft)
    out["engine_counters"] = counters
    out["prefix_hit_rate"] = _hit_rate(counters)
    return out


# ---- the fleet ---------------------------------------------------------------------------

def _chain_tasks(work: ChainWorkload, order: list[int]):
    from agentfleet.schemas.wire import FollowUp, Message, Sampling, Task

    sampling = Sampling(max_tokens=work.max_tokens, temperature=0.0, ignore_eos=True)
    tasks = []
    for agent in order:
        nxt: list[FollowUp] = []
        for prompt in reversed(work.followups):
            nxt = [FollowUp(prompt=prompt, continue_conversation=True, followups=nxt)]
        tasks.append(Task(model=MODEL_NAME, id=f"a{agent}", sampling=sampling, followups=nxt,
                          messages=[Message(**m) for m in work.messages(agent)]))
    return tasks


async def run_fleet_chains(ctx: Context, procs: Processes, cfg: EngineConfig,
                           work: ChainWorkload, bulk: PromptSet, *, workers: int,
                           affinity: bool) -> dict:
    from agentfleet.producer.client import Producer
    from agentfleet.producer.connection import connect
    from agentfleet.schemas.settings import Settings
    from bench.gpu.fleet_path import FleetWorkers, _bulk, _counter_delta, _tasks

    run_dir = ctx.work_dir / f"affinity-fleet-{time.monotonic_ns()}"
    run_dir.mkdir(parents=True)
    models_file = run_dir / "models.toml"
    models_file.write_text(models_toml(cfg, name=MODEL_NAME, path=str(ctx.model_dir)))
    with harness.server("valkey", procs) as server:
        env = ctx.env(
            REDIS_URL=server.url, AGENTFLEET_ENGINE="vllm",
            AGENTFLEET_MODELS_FILE=str(models_file), AGENTFLEET_DEFAULT_MODEL=MODEL_NAME,
            AGENTFLEET_HOME=str(run_dir / "home"), AGENTFLEET_METRICS_PORT="0",
            AGENTFLEET_LOG_FORMAT="text",
            AGENTFLEET_AFFINITY_PARTITIONS=str(PARTITIONS if affinity else 0))
        for name in ("max_inflight", "read_count"):
            if getattr(cfg, name) is not None:
                env["AGENTFLEET_" + name.upper()] = str(getattr(cfg, name))
        fleet = FleetWorkers(ctx, procs, env, workers, run_dir / "stats")
        redis = connect(server.url)
        producer = Producer(connect(server.url), settings=Settings.from_env(env))
        try:
            fleet.start()
            start_s = await fleet.wait_ready(redis)
            await asyncio.sleep(2.0)  # every worker has seen the others' heartbeats (1 s)
            warm = PromptSet(name="warm-up", prompts=bulk.prompts[:8],
                             prompt_tokens=bulk.prompt_tokens[:8], max_tokens=bulk.max_tokens)
            await producer.wait_many(await producer.submit_many(_tasks(warm)),
                                     timeout_s=ctx.run_timeout_s)
            before = await fleet.snapshot()
            order = list(range(len(work.kinds)))
            random.Random(7).shuffle(order)
            t0 = time.perf_counter()
            results = await _fleet_agents(producer, work, order, ctx.run_timeout_s)
            wall_s = time.perf_counter() - t0
            after = await fleet.snapshot()
            ok = [r for r in results if r.ok and r.output_tokens == work.max_tokens]
            ttft = [r.timings.first_token - r.timings.enqueued for r in results
                    if r.timings.first_token]
            result = _figures(wall_s, len(results), len(ok),
                              sum(r.output_tokens for r in results), ttft,
                              _counter_delta(before, after))
            lanes = [a.get("lanes", {}).get(MODEL_NAME, {}) for a in after]
            result["affinity"] = {k: sum(lane.get("affinity_" + k, 0) for lane in lanes)
                                  for k in ("hits", "steals", "misses", "rebalances")}
            result["tasks_per_worker"] = _per_worker(results)
            result["bulk"] = await _bulk(ctx, producer, bulk)  # no shared prefix
            result["engine_start_s"] = round(start_s, 1)
            return result
        finally:
            await producer.close()
            await redis.aclose()
            fleet.stop()


def _chain_ids(agent: int, steps: int) -> list[str]:
    return [f"a{agent}" + ".1" * s for s in range(steps)]  # a follow-up's id: parent's + ".1"


async def _fleet_agents(producer, work: ChainWorkload, order: list[int],
                        timeout_s: float) -> list:
    """Every agent's chain through the fleet: all first steps queued at once, or with
    `work.in_flight`, that many agents at a time (each starts when one has ended)."""
    if not work.in_flight:
        ids = [i for a in order for i in _chain_ids(a, work.steps)]
        await producer.submit_many(_chain_tasks(work, order))
        return [r async for r in producer.as_completed(ids, timeout_s=timeout_s)]
    results: list = []

    async def one(agent: int) -> None:
        await producer.submit_many(_chain_tasks(work, [agent]))
        results.extend([r async for r in producer.as_completed(
            _chain_ids(agent, work.steps), timeout_s=timeout_s)])

    await _agents(order, work.in_flight, one)
    return results


async def _agents(order: list[int], in_flight: int, run: Callable[[int], Awaitable]) -> None:
    """`run(agent)` for every agent: all at once, or `in_flight` at a time (a closed loop:
    each starts when one has ended)."""
    if not in_flight:
        await asyncio.gather(*(run(a) for a in order))
        return
    agents = iter(order)  # shared by the loops: each takes the next agent when it is free

    async def in_turn() -> None:
        for agent in agents:
            await run(agent)

    await asyncio.gather(*(in_turn() for _ in range(min(in_flight, len(order)))))


def _per_worker(results) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in results:
        counts[r.worker_id] = counts.get(r.worker_id, 0) + 1
    return counts


# ---- two `vllm serve` behind round-robin clients ----------------------------------------

async def run_serve_chains(ctx: Context, procs: Processes, cfg: EngineConfig,
                           work: ChainWorkload, *, servers: int, clients: int) -> dict:
    from bench.gpu.serve_path import COUNTERS, ServeProcess

    group = [ServeProcess(_on_gpu(ctx, i) if servers > 1 else ctx, procs, cfg)
             for i in range(servers)]
    try:
        if ctx.gpus and servers > ctx.gpus:  # sharing a GPU: one after the other (fleet_path)
            start_s = sum([await server.start() for server in group])
        else:
            start_s = max(await asyncio.gather(*(server.start() for server in group)))
        turn = itertools.cycle(group)
        limit = asyncio.Semaphore(clients)
        timeout = aiohttp.ClientTimeout(total=ctx.run_timeout_s)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=timeout) as session:
            before = [await s.samples(session) for s in group]
            ttft: list[float] = []
            done = {"tasks": 0, "ok": 0, "tokens": 0}

            async def chain(agent: int) -> None:
                messages = work.messages(agent)
                for step in range(work.steps):
                    if step:
                        messages.append({"role": "user", "content": work.followups[step - 1]})
                    async with limit:
                        first, text, tokens = await _chat(session, next(turn).url, messages,
                                                          work.max_tokens)
                    done["tasks"] += 1
                    if first is None:
                        return
                    ttft.append(first)
                    done["tokens"] += tokens
                    done["ok"] += tokens == work.max_tokens
                    messages.append({"role": "assistant", "content": text})

            order = list(range(len(work.kinds)))
            random.Random(7).shuffle(order)
            t0 = time.perf_counter()
            await _agents(order, work.in_flight, chain)
            wall_s = time.perf_counter() - t0
            after = [await s.samples(session) for s in group]
        counters = {k: sum(a.get(k, 0.0) - b.get(k, 0.0) for a, b in zip(after, before))
                    for k in COUNTERS}
        result = _figures(wall_s, done["tasks"], done["ok"], done["tokens"], ttft, counters)
        result["engine_start_s"] = round(start_s, 1)
        result["clients"] = clients
        return result
    finally:
        for server in group:
            server.stop()


async def _chat(session, url: str, messages: list[dict],
                max_tokens: int) -> tuple[float | None, str, int]:
    """One streamed chat completion: (time to first token, text, output tokens)."""
    body = {"model": MODEL_NAME, "messages": messages, "max_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, parts, tokens = None, [], 0
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                return None, "", 0
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                for choice in chunk.get("choices", ()):
                    delta = choice.get("delta", {}).get("content")
                    if delta:
                        if first is None:
                            first = time.perf_counter() - t0
                        parts.append(delta)
                if chunk.get("usage"):
                    tokens = chunk["usage"].get("completion_tokens", 0)
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None, "", 0
    return first, "".join(parts), tokens


def _on_gpu(ctx: Context, gpu: int) -> Context:
    """A copy of `ctx` whose children see one GPU (CUDA_VISIBLE_DEVICES), as the fleet's
    workers do (bench/gpu/fleet_path.py)."""
    mine = copy.copy(ctx)
    mine.env = lambda **extra: ctx.env(**{"CUDA_VISIBLE_DEVICES": ctx.gpu(gpu), **extra})
    return mine


# ---- offline: LLM.chat on each GPU's half -------------------------------------------------

async def run_offline_chains(ctx: Context, procs: Processes, cfg: EngineConfig,
                             work: ChainWorkload, *, gpus: int) -> dict:
    work_file = ctx.work_dir / "chains.json"
    work_file.write_text(msgspec.json.encode(work).decode())
    children, outs = [], []
    for i in range(gpus):
        out = ctx.work_dir / f"affinity-offline-{i}-{time.monotonic_ns()}.json"
        spec = {"model": str(ctx.model_dir), "engine": llm_kwargs(cfg), "work": str(work_file),
                "part": i, "parts": gpus, "out": str(out),
                "kv_cache_space_gib": cfg.kv_cache_space_gib}
        spec_file = out.with_suffix(".spec.json")
        spec_file.write_text(json.dumps(spec))
        env = _on_gpu(ctx, i).env() if gpus > 1 else ctx.env()
        children.append(procs.command([ctx.python, "-m", "bench.gpu.affinity", str(spec_file)],
                                      name=f"offline {i}", serving=False, env=env,
                                      log=ctx.log))
        outs.append(out)
    deadline = time.monotonic() + ctx.start_timeout_s + ctx.run_timeout_s
    while any(c.alive() for c in children):
        if time.monotonic() > deadline:
            raise RuntimeError(f"offline chains still going after their time:\n"
                               f"{children[0].tail()}")
        await asyncio.sleep(0.5)
    parts = []
    for child, out in zip(children, outs):
        procs.stop(child)
        if not out.exists():
            raise RuntimeError(f"offline chains wrote no result:\n{child.tail()}")
        parts.append(json.loads(out.read_text()))
    counters = {k: sum(p["engine_counters"].get(k, 0.0) for p in parts)
                for k in ("prefix_cache_queries", "prefix_cache_hits")}
    # The GPUs run side by side: the run lasts as long as the slower one.
    result = _figures(max(p["wall_s"] for p in parts), sum(p["tasks"] for p in parts),
                      sum(p["ok"] for p in parts), sum(p["output_tokens"] for p in parts), [],
                      counters)
    result["engine_start_s"] = round(max(p["engine_start_s"] for p in parts), 1)
    result["per_gpu_wall_s"] = [round(p["wall_s"], 2) for p in parts]
    return result


def offline_main(spec_path: str) -> None:
    """One GPU's half of the agents, step by step: every conversation's next turn in one
    `LLM.chat` call (the batch a queue-less script would make)."""
    spec = json.loads(open(spec_path).read())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    if spec.get("kv_cache_space_gib"):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec["kv_cache_space_gib"]))
    from vllm import LLM, SamplingParams

    from bench.gpu.offline import prefix_counters

    work = msgspec.json.decode(open(spec["work"], "rb").read(), type=ChainWorkload)
    # Split by kind: each GPU caches only its kinds' prompts, the ideal placement.
    agents = [a for a, kind in enumerate(work.kinds) if kind % spec["parts"] == spec["part"]]
    started = time.perf_counter()
    llm = LLM(model=spec["model"], **spec["engine"], disable_log_stats=False)
    start_s = time.perf_counter() - started
    params = SamplingParams(max_tokens=work.max_tokens, temperature=0.0, ignore_eos=True)
    llm.chat([[{"role": "user", "content": "warm up"}]] * 4, params, use_tqdm=False)
    before = prefix_counters(llm)
    talks = [work.messages(a) for a in agents]
    tasks = ok = tokens = 0
    t0 = time.perf_counter()
    for step in range(work.steps):
        if step:
            for talk in talks:
                talk.append({"role": "user", "content": work.followups[step - 1]})
        outputs = llm.chat(talks, params, use_tqdm=False)
        for talk, out in zip(talks, outputs):
            talk.append({"role": "assistant", "content": out.outputs[0].text})
            tasks += 1
            tokens += len(out.outputs[0].token_ids)
            ok += out.outputs[0].finish_reason == "length"
    wall_s = time.perf_counter() - t0
    after = prefix_counters(llm)
    with open(spec["out"], "w") as f:
        json.dump({"engine_start_s": start_s, "wall_s": wall_s, "tasks": tasks, "ok": ok,
                   "output_tokens": tokens,
                   "engine_counters": {k: after[k] - before[k] for k in after}}, f)
    sys.stdout.flush()
    os._exit(0)


# ---- the phase -------------------------------------------------------------------------

async def execute(ctx: Context, procs: Processes, run, cfg: EngineConfig, work: ChainWorkload,
                  bulk: PromptSet, clients: int) -> dict:
    if run.path == "fleet":
        row = await run_fleet_chains(ctx, procs, cfg, work, bulk, workers=run.workers,
                                     affinity=run.affinity)
    elif run.path == "serve":
        row = await run_serve_chains(ctx, procs, cfg, work, servers=run.workers,
                                     clients=clients)
    else:
        return await run_offline_chains(ctx, procs, cfg, work, gpus=run.workers)
    row["agents_in_flight"] = work.in_flight or len(work.kinds)
    return row


def targets(results: list[dict]) -> list[Check]:
    """Issue 18's targets on the affinity phase's rows; n/a where a row is missing."""
    rows = [r for r in results if r.get("phase") == "affinity" and "tokens_per_s" in r]
    on = next((r for r in rows if r["path"] == "fleet" and "+affinity" in r["label"]), None)
    off = next((r for r in rows if r["path"] == "fleet" and "+affinity" not in r["label"]),
               None)
    serve = next((r for r in rows if r["path"] == "serve"), None)
    checks: list[Check] = []

    def check(name: str, value: float | None, bound: float, higher: bool = True) -> None:
        ok = None if value is None else value >= bound if higher else value <= bound
        checks.append(Check(name, ok, value))

    def ratio(a, b):
        return round(a / b, 3) if a and b else None

    def get(row, *path):
        for key in path:
            row = row.get(key) if isinstance(row, dict) else None
        return row

    check("affinity: prefix-cache hit rate >= 2 x the fleet without",
          ratio(get(on, "prefix_hit_rate"), get(off, "prefix_hit_rate")), 2.0)
    check("affinity: output tokens/s >= 1.5 x the fleet without",
          ratio(get(on, "tokens_per_s"), get(off, "tokens_per_s")), 1.5)
    check("affinity: output tokens/s >= 1.5 x round-robin vllm serve",
          ratio(get(on, "tokens_per_s"), get(serve, "tokens_per_s")), 1.5)
    check("affinity: p90 time to first token <= 0.5 x the fleet without",
          ratio(get(on, "ttft_s", "p90"), get(off, "ttft_s", "p90")), 0.5, higher=False)
    check("affinity: p90 time to first token <= 0.5 x round-robin vllm serve",
          ratio(get(on, "ttft_s", "p90"), get(serve, "ttft_s", "p90")), 0.5, higher=False)
    check("affinity: plain bulk prompts, tokens/s >= 0.97 x without (costs nothing)",
          ratio(get(on, "bulk", "tokens_per_s"), get(off, "bulk", "tokens_per_s")), 0.97)
    return checks


def bulk_workload(tokens: Tokens, count: int, prompt_tokens: int, max_tokens: int) -> PromptSet:
    return bulk_prompts(tokens, name="affinity-bulk", count=count, prompt_tokens=prompt_tokens,
                        max_tokens=max_tokens, seed=19)


if __name__ == "__main__":
    offline_main(sys.argv[1])
