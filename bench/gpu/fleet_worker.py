"""One fleet worker for the benchmark: `agentfleet worker`'s set-up, plus counters on demand.

    AGENTFLEET_ENGINE=vllm AGENTFLEET_MODELS_FILE=... REDIS_URL=... \\
        python -m bench.gpu.fleet_worker --stats-dir DIR [--sample-ms 5]

It serves the default model with the engine `make_engine` picks.  SIGUSR1 writes a snapshot
to DIR/<n>.json: the lane's counters, vLLM's own counters (prefix cache, preemptions) from
prometheus_client's registry, where AsyncLLM's default stat logger keeps them, and, between
the first and the second snapshot, a sampling profile of the event loop's thread.  SIGTERM drains and stops, as in production.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import threading
from pathlib import Path

import msgspec

from bench.gpu.stacks import StackSampler
from agentfleet.ops.cli import install_event_loop
from agentfleet.producer.connection import connect
from agentfleet.schemas.settings import Settings
from agentfleet.workers.worker import Worker, make_engine

log = logging.getLogger("bench.fleet_worker")

_VLLM_COUNTERS = ("prefix_cache_queries", "prefix_cache_hits", "num_preemptions",
                  "generation_tokens", "prompt_tokens")


def vllm_counters() -> dict[str, float]:
    """Sums of vLLM's own Prometheus counters in this process."""
    from prometheus_client import REGISTRY

    found = dict.fromkeys(_VLLM_COUNTERS, 0.0)
    for family in REGISTRY.collect():
        for sample in family.samples:
            name = sample.name.removeprefix("vllm:")
            if name.endswith("_total") and name[:-6] in found:
                found[name[:-6]] += sample.value
    return found


class Snapshots:
    def __init__(self, directory: Path, worker: Worker, sample_ms: float):
        self.directory = directory
        self.worker = worker
        self.sample_ms = sample_ms
        self.count = 0
        self.sampler: StackSampler | None = None
        self.loop_thread = threading.get_ident()

    def write(self) -> None:
        self.count += 1
        snapshot = {
            "lanes": {lane.model: msgspec.to_builtins(lane.stats) for lane in self.worker.runners},
            "vllm": vllm_counters(),
        }
        if self.count == 1 and self.sample_ms:
            self.sampler = StackSampler(self.sample_ms, self.loop_thread)
        elif self.sampler is not None:
            self.sampler.stop()
            snapshot["stacks"] = self.sampler.report()
            self.sampler = None
        tmp = self.directory / f".{self.count}.json"
        tmp.write_text(json.dumps(snapshot))
        tmp.rename(self.directory / f"{self.count}.json")


async def serve(args: argparse.Namespace) -> None:
    settings = Settings.from_env()
    redis = connect(settings.redis_url)
    model = settings.default_model
    worker = Worker(settings, redis, {model: make_engine(settings.models[model], settings)})
    snapshots = Snapshots(Path(args.stats_dir), worker, args.sample_ms)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, worker.request_stop)
    loop.add_signal_handler(signal.SIGUSR1, snapshots.write)
    try:
        await worker.run(drain_timeout_s=30.0)
    finally:
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stats-dir", required=True)
    parser.add_argument("--sample-ms", type=float, default=0.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s worker[{os.getpid()}] %(levelname)s %(message)s")
    install_event_loop()
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
