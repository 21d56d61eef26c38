"""Where one Python thread spends its time (the event loop of the worker, or LLM.generate's
loop): a sampling profile.  (CPU seconds per process of an engine's tree: bench.harness.TreeCpu.)

The sampler is a thread that looks at the target thread's stack every `sample_ms`: it costs
the target a GIL hand-over per sample (a few microseconds), unlike cProfile, which slows
every Python call.  Samples whose leaf is the selector's wait are the loop being idle.
"""

from __future__ import annotations

import collections
import os
import sys
import threading


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
