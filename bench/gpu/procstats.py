"""Where the CPU goes during a timed window: CPU seconds per process of an engine's tree, and a
sampling profile of one Python thread (the event loop of the worker, or LLM.generate's loop).

The sampler is a thread that looks at the target thread's stack every `sample_ms`: it costs
the target a GIL hand-over per sample (a few microseconds), unlike cProfile, which slows
every Python call.  Samples whose leaf is the selector's wait are the loop being idle.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time

import psutil


class ProcessCpu:
    """CPU seconds used by a process and its descendants between creation and `delta()`."""

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)
        self.t0 = time.perf_counter()
        self.start = self._sample()

    def _sample(self) -> dict[int, tuple[str, float]]:
        found: dict[int, tuple[str, float]] = {}
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return found
        for proc in procs:
            try:
                times = proc.cpu_times()
                found[proc.pid] = (proc.name(), times.user + times.system)
            except psutil.NoSuchProcess:
                continue
        return found

    def delta(self) -> dict:
        """{"wall_s": .., "processes": [{"pid", "name", "cpu_s", "util"}...]} busiest first."""
        wall_s = time.perf_counter() - self.t0
        now = self._sample()
        rows = []
        for pid, (name, cpu_s) in now.items():
            used = cpu_s - self.start.get(pid, (name, 0.0))[1]
            if used > 0.05:
                rows.append({"pid": pid, "name": name, "cpu_s": round(used, 2),
                             "util": round(used / wall_s, 3) if wall_s else 0.0})
        rows.sort(key=lambda r: -r["cpu_s"])
        return {"wall_s": round(wall_s, 3), "processes": rows}


class StackSampler:
    """Samples one thread's Python stack every `sample_ms` (0: off) until `stop()`."""

    def __init__(self, sample_ms: float, thread_id: int | None = None, depth: int = 6):
        self.every_s = sample_ms / 1000
        self.target = thread_id if thread_id is not None else threading.get_ident()
        self.depth = depth
        self.leaves: collections.Counter[str] = collections.Counter()
        self.stacks: collections.Counter[str] = collections.Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if sample_ms > 0:
            self._thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            frame = sys._current_frames().get(self.target)
            if frame is None:
                continue
            names = []
            while frame is not None and len(names) < self.depth:
                code = frame.f_code
                names.append(f"{os.path.basename(code.co_filename)}:{code.co_name}")
                frame = frame.f_back
            self.samples += 1
            self.leaves[names[0]] += 1
            self.stacks[" < ".join(names)] += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def report(self, top: int = 25) -> dict:
        if not self.samples:
            return {}
        n = self.samples
        return {
            "samples": n,
            "every_ms": self.every_s * 1000,
            "leaves": [[name, round(c / n, 4)] for name, c in self.leaves.most_common(top)],
            "stacks": [[name, round(c / n, 4)] for name, c in self.stacks.most_common(top)],
        }
