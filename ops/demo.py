"""The main job: a worker on the default model and a few dozen agents running two-step chains.

Each agent asks one question (step 1) and declares a follow-up that condenses the answer
(step 2, built by the worker from step 1's output).  The demo shows progress, then the
answers, the throughput, latency percentiles and one chain's trace.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import msgspec
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from agentfleet.ops.cli import install_event_loop, redis_url
from agentfleet.ops.trace import load_trace, render
from agentfleet.producer.client import Producer
from agentfleet.schemas import keys
from agentfleet.schemas.errors import WorkerCrashedError
from agentfleet.schemas.settings import Settings
from agentfleet.schemas.wire import FollowUp, Message, Result, Sampling, Task

QUESTIONS = [
    "What is the capital of Japan?",
    "Why is the sky blue?",
    "Name three primary colours.",
    "What does a compiler do?",
    "How many legs does a spider have?",
    "What is photosynthesis?",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water at sea level?",
    "What is a prime number?",
    "Why do we have seasons?",
    "What is the largest planet in the solar system?",
    "What is machine learning?",
]


def run_demo(settings: Settings, *, agents: int, max_tokens: int, engine: str | None) -> int:
    if engine:
        settings = msgspec.structs.replace(settings, engine=engine)
    if settings.engine == "vllm":  # missing model files: one line here, not the worker's
        from agentfleet.workers.models import resolve_model_path

        resolve_model_path(settings.models[settings.default_model], settings.home_path)
    console = Console()
    with redis_url(settings) as url:
        worker = _start_worker(url, settings)
        try:
            install_event_loop()
            return asyncio.run(_agents(url, settings, agents, max_tokens, console, worker))
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()


def _start_worker(url: str, settings: Settings) -> subprocess.Popen:
    env = {**os.environ, "REDIS_URL": url, "AGENTFLEET_ENGINE": settings.engine,
           "AGENTFLEET_WORKER_ID": "demo-worker",
           "AGENTFLEET_METRICS_PORT": os.environ.get("AGENTFLEET_METRICS_PORT", "0")}
    return subprocess.Popen([sys.executable, "-m", "agentfleet", "worker", "--models",
                             settings.default_model], env=env)


async def _agents(url: str, settings: Settings, agents: int, max_tokens: int,
                  console: Console, worker: subprocess.Popen) -> int:
    model = settings.default_model
    async with Producer.from_url(url, settings=settings) as producer:
        await _wait_for_worker(producer, model, worker, console)
        sampling = Sampling(max_tokens=max_tokens)
        # Correlation ids of this run only: the embedded server keeps earlier demos' traces.
        run = time.strftime("%m%d-%H%M%S")
        roots = [
            Task(model=model, agent_id=f"agent-{i:02d}", correlation_id=f"demo-{run}-{i:02d}",
                 messages=[Message(role="system", content="You are a concise assistant."),
                           Message(role="user", content=QUESTIONS[i % len(QUESTIONS)])],
                 sampling=sampling,
                 followups=[FollowUp(messages=[Message(
                     role="user", content="Say this again in one short sentence: {output}")])])
            for i in range(agents)
        ]
        started = time.time()
        chains: list[list[Result]] = []
        with Progress(TextColumn("[bold]agents"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("steps"), TimeElapsedColumn(), console=console) as bar:
            progress = bar.add_task("steps", total=2 * agents)
            await producer.submit_many(roots)

            async def agent(root: Task) -> None:
                first = await producer.wait(root.id, timeout_s=600)
                bar.advance(progress)
                chain = [first]
                for child in first.followup_ids:
                    chain.append(await producer.wait(child, timeout_s=600))
                    bar.advance(progress)
                if not first.followup_ids:
                    bar.advance(progress)
                chains.append(chain)

            await asyncio.gather(*(agent(root) for root in roots))
        elapsed = time.time() - started
        _report(console, chains, elapsed)
        console.rule("one chain's trace")
        cid = roots[0].correlation_id
        print(render(cid, await load_trace(producer.redis, settings, cid)), flush=True)
        console.print(f"\nagain later: agentfleet trace {cid}" + (
            "" if settings.redis_url else
            f"  (the embedded server was REDIS_URL={url}; its append-only file keeps the data)"))
    failed = sum(not r.ok for chain in chains for r in chain)
    return 1 if failed else 0


async def _wait_for_worker(producer: Producer, model: str, worker: subprocess.Popen,
                           console: Console) -> None:
    with console.status("starting the worker (the engine's first start compiles: ~2 min)"):
        while not await producer.redis.hlen(keys.workers_key(model)):
            if worker.poll() is not None:  # it said why on stderr
                raise WorkerCrashedError(f"demo: its worker exited with code "
                                         f"{worker.returncode}")
            await asyncio.sleep(0.5)


def _report(console: Console, chains: list[list[Result]], elapsed_s: float) -> None:
    results = [r for chain in chains for r in chain]
    table = Table(title="answers (first 6 agents)", show_lines=True)
    table.add_column("agent")
    table.add_column("step 1")
    table.add_column("step 2 (follow-up)")
    for chain in sorted(chains, key=lambda c: c[0].agent_id)[:6]:
        table.add_row(chain[0].agent_id, _text(chain[0]), _text(chain[1]) if len(chain) > 1
                      else "-")
    console.print(table)
    tokens = sum(r.output_tokens for r in results)
    ok = sum(r.ok for r in results)
    console.print(f"{len(results)} steps ({ok} succeeded) of {len(chains)} agents in "
                  f"{elapsed_s:.1f} s: {len(results) / elapsed_s:.1f} tasks/s, "
                  f"{tokens / elapsed_s:.0f} output tokens/s")
    for step in (0, 1):
        lat = sorted(c[step].timings.written - c[step].timings.enqueued
                     for c in chains if len(c) > step)
        ttft = sorted(c[step].timings.first_token - c[step].timings.engine_start
                      for c in chains if len(c) > step and c[step].timings.first_token)
        if lat:
            console.print(f"step {step + 1}: enqueue to result p50 {_pct(lat, 50):.2f} s, "
                          f"p95 {_pct(lat, 95):.2f} s, p99 {_pct(lat, 99):.2f} s; "
                          f"time to first token p50 {_pct(ttft, 50) if ttft else 0:.2f} s")
    chain_s = sorted(c[-1].timings.written - c[0].timings.enqueued for c in chains)
    console.print(f"whole chain: p50 {_pct(chain_s, 50):.2f} s, p99 {_pct(chain_s, 99):.2f} s")


def _text(r: Result) -> str:
    return r.text.strip() if r.ok else f"[red]{r.status.value}: {r.error_message}"


def _pct(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(len(values) * p / 100))]
