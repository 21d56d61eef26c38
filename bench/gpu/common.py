"""What every path of a run shares: where things are, the log, timing helpers."""

from __future__ import annotations

import asyncio
import math
import os
import sys
import time
from pathlib import Path
from typing import IO

import msgspec

from bench.gpu.workload import PromptSet

MODEL_NAME = "bench"  # the served model name on every path


class Mixed(msgspec.Struct, kw_only=True):
    """Bulk work all queued at once, and interactive tasks arriving at a steady rate."""

    interactive: PromptSet
    rate_per_s: float
    start_after_s: float = 1.0  # let the bulk work saturate the engine first


class Context:
    """One benchmark run's settings and shared files."""

    def __init__(self, *, model_dir: Path, out_dir: Path, work_dir: Path, tiny: bool,
                 sample_ms: float, start_timeout_s: float, run_timeout_s: float):
        self.model_dir = model_dir
        self.out_dir = out_dir
        self.work_dir = work_dir
        self.tiny = tiny
        self.sample_ms = sample_ms
        self.start_timeout_s = start_timeout_s
        self.run_timeout_s = run_timeout_s
        self.python = sys.executable
        self.log: IO = open(out_dir / "engines.log", "a", buffering=1)
        self.repo_root = Path(__file__).resolve().parents[2]

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a child: ours, the repository on PYTHONPATH, offline Hub."""
        env = dict(os.environ)
        paths = [str(self.repo_root), *filter(None, env.get("PYTHONPATH", "").split(":"))]
        env["PYTHONPATH"] = ":".join(dict.fromkeys(paths))
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(extra)
        return env

    def banner(self, text: str) -> None:
        self.log.write(f"\n===== {time.strftime('%H:%M:%S')} {text} =====\n")

    def log_tail(self, since: int, limit: int = 3000) -> str:
        self.log.flush()
        with open(self.log.name, errors="replace") as f:
            f.seek(since)
            return f.read()[-limit:]


def percentiles(values: list[float], qs=(0.5, 0.9, 0.99)) -> dict[str, float]:
    """Nearest-rank percentiles, and the max; {} for no values."""
    if not values:
        return {}
    ordered = sorted(values)
    n = len(ordered)
    found = {f"p{round(q * 100)}": ordered[min(n - 1, max(0, math.ceil(q * n) - 1))]
             for q in qs}
    found["max"] = ordered[-1]
    found["n"] = n
    return found


async def paced(rate_per_s: float, start_s: float, until: asyncio.Event, send) -> list:
    """Call `send(k)` (a coroutine) at a steady rate from `start_s` after now until `until` is
    set; return the tasks started, to be awaited by the caller."""
    loop = asyncio.get_running_loop()
    t0 = loop.time() + start_s
    started: list[asyncio.Task] = []
    k = 0
    while not until.is_set():
        delay = t0 + k / rate_per_s - loop.time()
        if delay > 0:
            try:
                await asyncio.wait_for(until.wait(), delay)
                break
            except TimeoutError:
                pass
        started.append(asyncio.ensure_future(send(k)))
        k += 1
    return started


def summary(*, wall_s: float, tasks: int, ok: int, output_tokens: int,
            prompt_tokens: int) -> dict:
    return {
        "wall_s": round(wall_s, 3),
        "tasks": tasks,
        "ok": ok,
        "output_tokens": output_tokens,
        "prompt_tokens": prompt_tokens,
        "tokens_per_s": round(output_tokens / wall_s, 1) if wall_s else 0.0,
        "tasks_per_s": round(tasks / wall_s, 2) if wall_s else 0.0,
    }
