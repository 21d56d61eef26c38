"""What every path of a run shares: the model directory, the log, the mixed traffic."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO

import msgspec

from bench.harness import Processes, all_cpu_s, child_env, cpu_s, percentiles, portable
from bench.gpu.workload import PromptSet

log = logging.getLogger("bench.gpu")

MODEL_NAME = "bench"  # the served model name on every path
MODELS = Path(__file__).resolve().parent / "models"
# The model configs (config.json only: a Llama at SmolLM2's sizes, run on dummy weights) and
# the one copy of the tokenizer files they share.
MODEL_SIZES = ("1.7b", "135m")
TOKENIZER_DIR = MODELS / "smollm2"


def assemble_model(size: str, into: Path) -> Path:
    """A directory vLLM loads: smollm2-SIZE's config.json beside the shared tokenizer files,
    linked into `into`."""
    model = into / f"smollm2-{size}"
    model.mkdir(parents=True, exist_ok=True)
    for source in [MODELS / f"smollm2-{size}" / "config.json", *TOKENIZER_DIR.iterdir()]:
        link = model / source.name
        if not link.exists():
            link.symlink_to(source)
    return model


class Mixed(msgspec.Struct, kw_only=True):
    """Interactive tasks at a steady rate: alone (`alone` of them, the baseline on the idle
    engine), then while bulk work queued all at once runs (until it is done)."""

    interactive: PromptSet
    rate_per_s: float
    alone: int
    start_after_s: float = 1.0  # let the bulk work saturate the engine first


class Answer(msgspec.Struct, kw_only=True):
    """One interactive request as its caller saw it."""

    latency_s: float
    ok: bool
    queue_s: float | None = None  # the fleet's enqueued -> engine, where known
    ttft_s: float | None = None  # the fleet's enqueued -> first token, where known


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
        self.gpus = _visible_gpus()

    def gpu(self, i: int) -> str:
        """The GPU of a run's i-th engine (CUDA_VISIBLE_DEVICES): its own where there are
        enough, else they take turns (two engines at 0.45 of one GPU's memory fit on one:
        the cache of each is then that of one GPU's engine, its compute shared)."""
        return str(i % self.gpus if self.gpus else i)

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a child: ours, the repository on PYTHONPATH, offline Hub."""
        env = child_env()
        for name, value in (("HF_HUB_OFFLINE", "1"), ("VLLM_NO_USAGE_STATS", "1"),
                            ("PYTHONUNBUFFERED", "1")):
            env.setdefault(name, value)
        env.update(extra)
        return env

    def banner(self, text: str) -> None:
        self.log.write(f"\n===== {time.strftime('%H:%M:%S')} {text} =====\n")


def _visible_gpus() -> int:
    """NVIDIA GPUs on this machine (`nvidia-smi -L`); 0 where there are none."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


async def paced(rate_per_s: float, start_s: float, send: Callable[[int], Awaitable],
                *, until: asyncio.Event | None = None, count: int | None = None) -> list:
    """Call `send(k)` (a coroutine) at a steady rate from `start_s` after now, `count` times
    or until `until` is set; return the tasks started, for the caller to await."""
    loop = asyncio.get_running_loop()
    t0 = loop.time() + start_s
    started: list[asyncio.Task] = []
    k = 0
    while (count is None or k < count) and not (until is not None and until.is_set()):
        delay = t0 + k / rate_per_s - loop.time()
        if delay > 0:
            if until is None:
                await asyncio.sleep(delay)
            else:
                try:
                    await asyncio.wait_for(until.wait(), delay)
                    break
                except TimeoutError:
                    pass
        started.append(asyncio.ensure_future(send(k)))
        k += 1
    return started


def engine_cores() -> dict[int, int]:
    """The running vLLM engine core processes (their title is `VLLM::EngineCore...`): pid to
    the pid of the process that started it (the fleet worker, or offline's driver)."""
    found = {}
    for pid, (parent, _) in all_cpu_s().items():
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"VLLM::EngineCore"):
                found[pid] = parent
        except OSError:
            continue
    return found


def cpu_seconds(pids) -> float:
    """CPU seconds (user + system) the processes have used so far (the gone ones: none)."""
    total = 0.0
    for pid in pids:
        try:
            total += cpu_s(pid)
        except OSError:
            continue
    return total


def py_spy(out_dir: Path, seconds: float, *, parents: bool = True) -> list:
    """Samples every engine core (and the process that started it) with py-spy for `seconds`,
    in the background: `<out_dir>/py-spy-<role>-<pid>.txt` (raw, one stack a line)."""
    import shutil
    import subprocess

    exe = shutil.which("py-spy") or "/root/site/bin/py-spy"
    cores = engine_cores()
    if not cores or not Path(exe).exists():
        print(f"no profile: py-spy at {exe!r}, engine cores {cores}", flush=True)
        return []
    targets = {pid: "engine-core" for pid in cores}
    if parents:
        targets.update({parent: "parent" for parent in cores.values()})
    spies = []
    for pid, role in targets.items():
        path = out_dir / f"py-spy-{role}-{pid}"
        spies.append(subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
             "--threads", "--nonblocking", "--format", "raw", "--output", f"{path}.txt"],
            stdout=subprocess.DEVNULL, stderr=open(f"{path}.log", "w")))
    return spies


def interactive_figures(answers: list[Answer], mixed: Mixed) -> dict:
    good = [a for a in answers if a.ok]
    figures = {"rate_per_s": mixed.rate_per_s, "sent": len(answers), "ok": len(good),
               "latency_s": percentiles([a.latency_s for a in answers]),
               "max_tokens": mixed.interactive.max_tokens}
    queue_s = [a.queue_s for a in good if a.queue_s is not None]
    if queue_s:
        figures["queue_s"] = percentiles(queue_s)
    ttft_s = [a.ttft_s for a in good if a.ttft_s is not None]
    if ttft_s:
        figures["ttft_s"] = percentiles(ttft_s)
    return figures


async def mixed_traffic(one: Callable[[int], Awaitable[Answer]],
                        bulk: Callable[[], Awaitable[dict]], mixed: Mixed) -> dict:
    """On one started engine, the same for every path: interactive requests alone, bulk work
    alone, then bulk work with interactive requests arriving meanwhile.  The result is the
    last bulk run's summary, with "bulk_alone", "interactive_alone" and "interactive"."""
    alone = await asyncio.gather(*await paced(mixed.rate_per_s, 0.0, one, count=mixed.alone))
    bulk_alone = await bulk()
    done = asyncio.Event()

    async def bulk_then_stop() -> dict:
        try:
            return await bulk()
        finally:
            done.set()

    bulk_task = asyncio.ensure_future(bulk_then_stop())
    started = await paced(mixed.rate_per_s, mixed.start_after_s, one, until=done)
    result = await bulk_task
    result["bulk_alone"] = bulk_alone
    result["interactive_alone"] = interactive_figures(list(alone), mixed)
    result["interactive"] = interactive_figures(list(await asyncio.gather(*started)), mixed)
    return result


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


def attempt(ctx: Context, label: str, run: Callable[[Processes], dict]) -> dict:
    """`run(procs)`'s figures, its processes stopped after; {"error": ...} if it failed (or
    one of its processes died): one run's failure must not lose the others."""
    try:
        with Processes(log_dir=ctx.work_dir) as procs:
            return run(procs)
    except Exception as exc:
        log.exception("%s failed", label)
        return {"error": f"{type(exc).__name__}: {str(exc)[-1500:]}"}


def save(path: Path, report: dict) -> None:
    """The report so far (after every run: a later failure keeps what came before)."""
    path.write_text(json.dumps(portable(report), indent=1))
