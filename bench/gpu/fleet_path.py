"""The whole fleet: an embedded Valkey, worker processes with the vLLM engine, a producer.

Timing starts once every worker has started its engine and a warm-up has gone through: from
just before `submit_many` to the last result out of `as_completed`, as a backend sees it.
A worker or the server that dies stops the run at once with its log (bench.harness).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

from bench import harness
from bench.gpu.common import MODEL_NAME, Answer, Context, Mixed, mixed_traffic, summary
from bench.gpu.engines import EngineConfig, models_toml
from bench.gpu.workload import PromptSet
from bench.harness import Child, Processes, TreeCpu, percentiles
from agentfleet.producer.client import Producer
from agentfleet.producer.connection import connect
from agentfleet.schemas import keys
from agentfleet.schemas.settings import Settings
from agentfleet.schemas.wire import Result, Sampling, Task

_run_seq = 0


class FleetWorkers:
    """`count` worker processes (one GPU each when count > 1 and there are enough, else
    taking turns: Context.gpu) on one model's stream."""

    def __init__(self, ctx: Context, procs: Processes, env: dict[str, str], count: int,
                 stats_root: Path):
        self.ctx = ctx
        self.procs = procs
        self.env = env
        self.count = count
        self.stats_dirs = [stats_root / f"w{i}" for i in range(count)]
        self.children: list[Child] = []
        self.snapshots = 0

    def start(self) -> None:
        """The first engine on each GPU; wait_ready starts those that share one."""
        self._launch(range(min(self.count, self.ctx.gpus or self.count)))

    def _launch(self, which: range) -> None:
        for i in which:
            stats_dir = self.stats_dirs[i]
            stats_dir.mkdir(parents=True, exist_ok=True)
            env = dict(self.env)
            if self.count > 1:
                env["CUDA_VISIBLE_DEVICES"] = self.ctx.gpu(i)
            argv = [self.ctx.python, "-m", "bench.gpu.fleet_worker", "--stats-dir",
                    str(stats_dir), "--sample-ms", str(self.ctx.sample_ms)]
            self.children.append(self.procs.command(argv, name=f"fleet worker {i}", env=env,
                                                    log=self.ctx.log))

    async def wait_ready(self, redis) -> float:
        """Until every worker heartbeats (its engine has started).  Where engines share a
        GPU (fewer GPUs than workers) each round starts once the one before is up: vLLM
        sizes its KV cache from the GPU's free memory, which another engine starting at the
        same time would be taking."""
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.ctx.start_timeout_s
        while time.monotonic() < deadline:
            started = len(self.children)
            if await redis.hlen(keys.workers_key(MODEL_NAME)) >= started:
                if started >= self.count:
                    return time.perf_counter() - t0
                self._launch(range(started, min(self.count, started + self.ctx.gpus)))
                deadline = time.monotonic() + self.ctx.start_timeout_s
            await asyncio.sleep(0.5)
        raise RuntimeError(f"fleet workers not ready within {self.ctx.start_timeout_s:.0f} s:\n"
                           f"{self.children[-1].tail()}")

    async def snapshot(self) -> list[dict]:
        """SIGUSR1 to each worker; their counters once written."""
        self.snapshots += 1
        for child in self.children:
            child.send(signal.SIGUSR1)
        found = []
        for stats_dir in self.stats_dirs:
            path = stats_dir / f"{self.snapshots}.json"
            for _ in range(200):
                if path.exists():
                    break
                await asyncio.sleep(0.05)
            found.append(json.loads(path.read_text()) if path.exists() else {})
        return found

    def stop(self) -> None:
        for child in self.children:  # SIGTERM to all first: they drain in parallel
            child.stopping = True
            child.send(signal.SIGTERM)
        for child in self.children:
            self.procs.stop(child, grace_s=60.0)


def _tasks(work: PromptSet, *, batch_id: str = "", tenant: str = "default") -> list[Task]:
    sampling = Sampling(max_tokens=work.max_tokens, temperature=0.0, ignore_eos=True)
    return [Task(model=MODEL_NAME, prompt=p, sampling=sampling, batch_id=batch_id,
                 tenant=tenant) for p in work.prompts]


async def _collect(producer: Producer, ids: list[str], timeout_s: float,
                   t0: float) -> tuple[list[Result], float]:
    results = []
    async for result in producer.as_completed(ids, timeout_s=timeout_s):
        results.append(result)
    return results, time.perf_counter() - t0


def _summarise(results: list[Result], wall_s: float, work: PromptSet) -> dict:
    ok = [r for r in results if r.ok and r.output_tokens == work.max_tokens]
    out = summary(wall_s=wall_s, tasks=len(results), ok=len(ok),
                  output_tokens=sum(r.output_tokens for r in results),
                  prompt_tokens=sum(r.prompt_tokens for r in results))
    t = [r.timings for r in results]
    out["latency_s"] = percentiles([x.finished - x.enqueued for x in t if x.finished])
    out["queue_s"] = percentiles([x.engine_start - x.enqueued for x in t if x.engine_start])
    failed = [r for r in results if not r.ok][:3]
    if failed:
        out["failures"] = [f"{r.error_code}: {r.error_message}" for r in failed]
    return out


async def _bulk(ctx: Context, producer: Producer, work: PromptSet, batch_id: str = "",
                tenant: str = "default") -> dict:
    """All of `work` submitted at once (as a bulk job when `batch_id`), every result back."""
    t0 = time.perf_counter()
    ids = await producer.submit_many(_tasks(work, batch_id=batch_id, tenant=tenant))
    submit_s = time.perf_counter() - t0
    results, wall_s = await _collect(producer, ids, ctx.run_timeout_s, t0)
    result = _summarise(results, wall_s, work)
    result["submit_s"] = round(submit_s, 3)
    return result


async def run_fleet(ctx: Context, procs: Processes, cfg: EngineConfig, work: PromptSet, *,
                    workers: int = 1, mixed: Mixed | None = None, tenants: bool = False,
                    fairness: bool = True, body=None) -> dict:
    """`tenants`: the mixed traffic as two tenants of one lane (B steady, A flooding with the
    bulk work as interactive tasks) rather than interactive tasks beside a bulk job.
    `body(ctx, producer, work)`, when given, runs the measured part instead of one bulk
    submission (the schema phase: bench/gpu/structured_outputs.py)."""
    global _run_seq
    _run_seq += 1
    run_dir = ctx.work_dir / f"fleet{_run_seq}"
    run_dir.mkdir(parents=True, exist_ok=True)
    models_file = run_dir / "models.toml"
    models_file.write_text(models_toml(cfg, name=MODEL_NAME, path=str(ctx.model_dir)))
    with harness.server("valkey", procs) as server:
        env = ctx.env(
            REDIS_URL=server.url, AGENTFLEET_ENGINE="vllm",
            AGENTFLEET_MODELS_FILE=str(models_file), AGENTFLEET_DEFAULT_MODEL=MODEL_NAME,
            AGENTFLEET_HOME=str(run_dir / "home"), AGENTFLEET_METRICS_PORT="0",
            AGENTFLEET_LOG_FORMAT="text", AGENTFLEET_FAIRNESS="true" if fairness else "false",
        )
        for name in ("max_inflight", "read_count"):
            if getattr(cfg, name) is not None:
                env["AGENTFLEET_" + name.upper()] = str(getattr(cfg, name))
        fleet = FleetWorkers(ctx, procs, env, workers, run_dir / "stats")
        redis = connect(server.url)
        producer = Producer(connect(server.url), settings=Settings.from_env(env))
        try:
            fleet.start()
            start_s = await fleet.wait_ready(redis)
            warm = PromptSet(name="warm-up", prompts=work.prompts[:8],
                             prompt_tokens=work.prompt_tokens[:8], max_tokens=work.max_tokens)
            await producer.wait_many(await producer.submit_many(_tasks(warm)),
                                     timeout_s=ctx.run_timeout_s)
            before = await fleet.snapshot()
            cpu = [TreeCpu(child.pid) for child in fleet.children]
            if body is not None:
                result = await body(ctx, producer, work)
            elif mixed is None:
                result = await _bulk(ctx, producer, work)
            else:
                result = await _mixed(ctx, producer, work, mixed, tenants=tenants)
            result["cpu"] = [c.delta() for c in cpu]
            after = await fleet.snapshot()
            result["engine_start_s"] = round(start_s, 1)
            result["workers"] = workers
            result["engine_counters"] = _counter_delta(before, after)
            result["lanes"] = [a.get("lanes") for a in after]
            result["stacks"] = [a.get("stacks") for a in after if a.get("stacks")]
            return result
        finally:
            await producer.close()
            await redis.aclose()
            fleet.stop()


def _counter_delta(before: list[dict], after: list[dict]) -> dict[str, float]:
    total: dict[str, float] = {}
    for b, a in zip(before, after):
        for name, value in a.get("vllm", {}).items():
            total[name] = total.get(name, 0.0) + value - b.get("vllm", {}).get(name, 0.0)
    return total


async def _mixed(ctx: Context, producer: Producer, bulk: PromptSet, mixed: Mixed, *,
                 tenants: bool = False) -> dict:
    inter = mixed.interactive
    sampling = Sampling(max_tokens=inter.max_tokens, temperature=0.0, ignore_eos=True)
    jobs = iter(range(1, 1_000_000))

    async def one(k: int) -> Answer:
        t0 = time.perf_counter()
        task = Task(model=MODEL_NAME, prompt=inter.prompts[k % len(inter.prompts)],
                    sampling=sampling, tenant="steady" if tenants else "default")
        try:
            result = await producer.wait(await producer.submit(task),
                                         timeout_s=ctx.run_timeout_s)
        except Exception:  # counted as not ok
            return Answer(latency_s=time.perf_counter() - t0, ok=False)
        t = result.timings
        return Answer(latency_s=time.perf_counter() - t0,
                      ok=result.ok and result.output_tokens == inter.max_tokens,
                      queue_s=t.engine_start - t.enqueued if t.engine_start else None,
                      ttft_s=t.first_token - t.enqueued if t.first_token else None)

    if tenants:  # tenant A floods the interactive lane of its own stream
        return await mixed_traffic(one, lambda: _bulk(ctx, producer, bulk, tenant="flood"),
                                   mixed)
    return await mixed_traffic(
        one, lambda: _bulk(ctx, producer, bulk, batch_id=f"bulk{_run_seq}-{next(jobs)}"), mixed)
