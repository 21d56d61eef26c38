"""Model versions on one GPU: two versions at 90/10 against one alone, and two models taking
turns on one GPU through vLLM's sleep mode against each alone, with the wake time.

    python -m bench.gpu.versions --out /tmp/versions             # on the GPU machine
    python -m bench.gpu.versions --tiny --out /tmp/versions      # the CPU smoke run
    python -m bench.gpu.versions --phase split|sleep [--tasks N]

Phases (each a fresh embedded server, a fresh `agentfleet worker` on vLLM per run, dummy
weights of SmolLM2-1.7B, or of the 135M model with --tiny; the same prompts for every run):
  split   one version alone (weight 100), then two versions of one model at weights 90/10 in
          one worker (two engines at gpu_memory_utilization 0.45 each): output tokens per
          second over the same tasks.  Target: 90/10 >= 0.95 x alone.
  sleep   model A alone, model B alone, then both in one worker in one sleep group (each
          engine at gpu_memory_utilization 0.85: they cannot both hold the GPU), the same
          tasks in rounds, A's then B's, each round waiting for the one before: tokens per
          second of the turns against the mean of the two alone, and per switch the time
          from enqueue to the first token of the first task of the woken model.  Target:
          that wake-and-first-token within 5 s.  On a platform without sleep mode (vLLM's
          CPU) the two engines run side by side, and the wake figures are n/a.
Results go to OUT/versions.json after every run, worker logs to OUT/workers.log.  A worker
that dies stops the benchmark at once with the tail of its log (exit 1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET_SPLIT_RATIO = 0.95
TARGET_WAKE_S = 5.0


def model_dir(size: str, into: Path) -> Path:
    """A directory vLLM loads with dummy weights: smollm2-SIZE's config.json and the
    tokenizer files, kept beside it or shared (models/smollm2/)."""
    own = HERE / "models" / f"smollm2-{size}"
    if (own / "tokenizer.json").is_file():
        return own
    made = into / f"smollm2-{size}"
    made.mkdir(parents=True, exist_ok=True)
    for source in [own / "config.json", *(HERE / "models" / "smollm2").iterdir()]:
        shutil.copy(source, made / source.name)
    return made


def engine_args(tiny: bool, memory: float) -> dict:
    if tiny:
        return {"max_model_len": 512, "max_num_seqs": 8, "max_num_batched_tokens": 2048,
                "kv_cache_space_gib": 1, "enforce_eager": True, "load_format": "dummy",
                "dtype": "bfloat16", "seed": 0}
    return {"max_model_len": 2048, "max_num_seqs": 512, "max_num_batched_tokens": 8192,
            "gpu_memory_utilization": memory, "load_format": "dummy", "dtype": "bfloat16",
            "seed": 0}


def prompts(count: int, words: int) -> list[str]:
    vocab = ("agent task result report model queue worker token batch window stream "
             "version canary weight route budget engine sleep wake turn").split()
    return [f"Request {i}: " + " ".join(vocab[(i * 7 + j * 3) % len(vocab)]
                                        for j in range(words)) for i in range(count)]


class Worker:
    """`agentfleet worker` in a process group of its own, logging to OUT/workers.log."""

    def __init__(self, url: str, log, name: str, models: list[str]):
        env = {**os.environ, "REDIS_URL": url, "AGENTFLEET_ENGINE": "vllm",
               "AGENTFLEET_WORKER_ID": name, "AGENTFLEET_METRICS_PORT": "0",
               "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "PYTHONUNBUFFERED": "1"}
        log.write(f"\n===== {time.strftime('%H:%M:%S')} worker {name} =====\n")
        log.flush()
        self.log_path = Path(log.name)
        self.offset = self.log_path.stat().st_size
        self.proc = subprocess.Popen([sys.executable, "-m", "agentfleet", "worker", "--models",
                                      ",".join(models)], env=env,
                                     stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def check(self) -> None:
        if self.proc.poll() is not None:
            with open(self.log_path, errors="replace") as f:
                f.seek(self.offset)
                tail = f.read()[-3000:]
            raise RuntimeError(f"the worker died (exit {self.proc.returncode}); its log ends:\n"
                               f"{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its engine cores too: the GPU frees
        except ProcessLookupError:
            pass
        self.proc.wait()


async def _ready(redis, worker: Worker, served: list[tuple[str, str]], timeout_s: float) -> None:
    from agentfleet.producer.routing import parse_load
    from agentfleet.schemas import keys

    deadline = time.monotonic() + timeout_s
    while True:
        worker.check()
        up = set()
        for model in {m for m, _ in served}:
            up |= {(model, v) for v in parse_load(await redis.hgetall(keys.version_load(model)))}
        if set(served) <= up:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"not serving after {timeout_s:.0f} s: {sorted(set(served) - up)}")
        await asyncio.sleep(1.0)


async def _run_tasks(producer, worker: Worker, model: str, texts: list[str], max_tokens: int,
                     timeout_s: float) -> dict:
    from agentfleet.schemas.wire import Sampling, Task

    sampling = Sampling(max_tokens=max_tokens, ignore_eos=True)
    started = time.time()
    ids = await producer.submit_many([Task(model=model, prompt=t, sampling=sampling)
                                      for t in texts])
    waiting = asyncio.ensure_future(producer.wait_many(ids, timeout_s=timeout_s))
    while not waiting.done():
        worker.check()
        await asyncio.wait({waiting}, timeout=1.0)
    results = waiting.result()
    wall_s = time.time() - started
    failed = [r for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} tasks failed, first: {failed[0].error_message}")
    first = min(results, key=lambda r: r.timings.enqueued)
    tokens = sum(r.output_tokens for r in results)
    return {"tasks": len(results), "output_tokens": tokens, "wall_s": round(wall_s, 3),
            "tokens_per_s": round(tokens / wall_s, 1),
            "first_token_s": round(min(r.timings.first_token for r in results)
                                   - first.timings.enqueued, 3),
            "versions": {v: sum(r.model_version == v for r in results)
                         for v in sorted({r.model_version for r in results})}}


class Bench:
    def __init__(self, args: argparse.Namespace, out: Path, work: Path):
        self.args = args
        self.out = out
        self.work = work
        self.size = "135m" if args.tiny else "1.7b"
        self.model = str(model_dir(self.size, work))
        self.texts = prompts(args.tasks, 20 if args.tiny else 70)
        self.max_tokens = 8 if args.tiny else 128
        self.log = open(out / "workers.log", "a", buffering=1)
        self.results: list[dict] = []

    def save(self) -> None:
        (self.out / "versions.json").write_text(json.dumps(
            {"tiny": self.args.tiny, "model": f"smollm2-{self.size} (dummy weights)",
             "tasks": self.args.tasks, "max_tokens": self.max_tokens,
             "results": self.results, "checks": checks(self.results, self.args.tiny)},
            indent=2))

    async def fleet(self, label: str, registrations: list[tuple], measure) -> dict:
        """A fresh server with `registrations` (model, version, weight, memory, group), a
        worker serving them, `measure(producer, worker)`; everything stopped after."""
        from agentfleet.ops.embedded import ServerProcess
        from agentfleet.producer.client import Producer
        from agentfleet.producer.connection import connect
        from agentfleet.producer.models import ModelRegistry
        from agentfleet.schemas.settings import Settings

        server = ServerProcess(self.work / f"server-{label}", appendonly=False)
        server.start()
        worker = None
        try:
            redis = connect(server.url)
            reg = ModelRegistry(redis)
            for model, version, weight, memory, group in registrations:
                await reg.register(model, version, path=self.model, weight=weight,
                                   engine_args=engine_args(self.args.tiny, memory),
                                   sleep_group=group, check_engine=False)
            worker = Worker(server.url, self.log, f"bench-{label}",
                            sorted({m for m, *_ in registrations}))
            started = time.monotonic()
            await _ready(redis, worker, [(m, v) for m, v, *_ in registrations],
                         self.args.start_timeout_s)
            producer = Producer(connect(server.url), settings=Settings())
            try:
                row = {"run": label, "start_s": round(time.monotonic() - started, 1),
                       **await measure(producer, worker)}
            finally:
                await producer.close()
                await redis.aclose()
        finally:
            if worker is not None:
                worker.stop()
            server.stop()
        print(json.dumps(row), flush=True)
        self.results.append(row)
        self.save()
        return row

    async def split(self) -> None:
        def once(model: str):
            async def measure(producer, worker):
                return await _run_tasks(producer, worker, model, self.texts, self.max_tokens,
                                        self.args.run_timeout_s)
            return measure

        await self.fleet("split-alone", [("m", "v1", 100, 0.45, "")], once("m"))
        await self.fleet("split-90-10", [("m", "v1", 90, 0.45, ""), ("m", "v2", 10, 0.45, "")],
                         once("m"))

    async def sleep(self) -> None:
        rounds = self.args.rounds

        def alone(model: str):
            async def measure(producer, worker):
                return await _run_tasks(producer, worker, model, self.texts, self.max_tokens,
                                        self.args.run_timeout_s)
            return measure

        async def turns(producer, worker):
            per = max(1, len(self.texts) // (2 * rounds))
            tokens, wakes, started = 0, [], time.time()
            for k in range(2 * rounds):
                model = "a" if k % 2 == 0 else "b"
                got = await _run_tasks(producer, worker, model, self.texts[:per],
                                       self.max_tokens, self.args.run_timeout_s)
                tokens += got["output_tokens"]
                if k:  # the model before this one held the GPU: this one woke
                    wakes.append(got["first_token_s"])
            wall_s = time.time() - started
            return {"rounds": rounds, "tasks_per_round": per, "output_tokens": tokens,
                    "wall_s": round(wall_s, 3), "tokens_per_s": round(tokens / wall_s, 1),
                    "wake_first_token_s": wakes, "sleep_mode": await _sleep_mode()}

        group = "gpu0"
        await self.fleet("sleep-a-alone", [("a", "v1", 100, 0.85, "")], alone("a"))
        await self.fleet("sleep-b-alone", [("b", "v1", 100, 0.85, "")], alone("b"))
        await self.fleet("sleep-turns", [("a", "v1", 100, 0.85, group),
                                         ("b", "v1", 100, 0.85, group)], turns)


async def _sleep_mode() -> bool:
    from agentfleet.schemas.engine_args import sleep_mode_available

    return sleep_mode_available()


def checks(results: list[dict], tiny: bool) -> list[dict]:
    by = {r["run"]: r for r in results}
    out = []
    if "split-alone" in by and "split-90-10" in by:
        ratio = by["split-90-10"]["tokens_per_s"] / by["split-alone"]["tokens_per_s"]
        out.append({"target": f"two versions at 90/10 >= {TARGET_SPLIT_RATIO} x one alone",
                    "value": round(ratio, 3),
                    "status": "n/a (tiny)" if tiny else
                    "PASS" if ratio >= TARGET_SPLIT_RATIO else "FAIL"})
    if {"sleep-a-alone", "sleep-b-alone", "sleep-turns"} <= by.keys():
        alone = (by["sleep-a-alone"]["tokens_per_s"] + by["sleep-b-alone"]["tokens_per_s"]) / 2
        turns = by["sleep-turns"]
        out.append({"target": "turns on one GPU against each alone (reported)",
                    "value": round(turns["tokens_per_s"] / alone, 3), "status": "info"})
        wakes = turns["wake_first_token_s"]
        worst = max(wakes) if wakes else None
        out.append({"target": f"a sleeping model wakes and serves its first task within "
                              f"{TARGET_WAKE_S:g} s", "value": worst,
                    "status": "n/a (no sleep mode here)" if not turns["sleep_mode"] else
                    "PASS" if worst is not None and worst <= TARGET_WAKE_S else "FAIL"})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the 135M model, small sizes (CPU)")
    p.add_argument("--phase", action="append", choices=["split", "sleep"], default=None)
    p.add_argument("--tasks", type=int, default=None, help="default 2000 (16 with --tiny)")
    p.add_argument("--rounds", type=int, default=3, help="sleep: turns of each model")
    p.add_argument("--out", type=Path, default=Path("bench-versions-out"))
    p.add_argument("--start-timeout-s", type=float, default=900.0)
    p.add_argument("--run-timeout-s", type=float, default=1800.0)
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = p.parse_args(argv)
    args.tasks = args.tasks or (16 if args.tiny else 2000)
    phases = args.phase or ["split", "sleep"]
    print(f"versions bench: phases {phases}, {args.tasks} tasks, "
          f"{'tiny (CPU)' if args.tiny else 'GPU'}", flush=True)
    if args.dry_run:
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-versions-") as tmp:
        bench = Bench(args, args.out, Path(tmp))
        try:
            for phase in phases:
                asyncio.run(getattr(bench, phase)())
        except (RuntimeError, OSError) as exc:
            print(f"FAIL  the benchmark stopped: {exc}", flush=True)
            return 1
        finally:
            bench.log.close()
    failed = False
    for check in checks(bench.results, args.tiny):
        print(f"  {check['status']:<6} {check['target']}: {check['value']}")
        failed = failed or check["status"] == "FAIL"
    print(f"results: {args.out / 'versions.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
