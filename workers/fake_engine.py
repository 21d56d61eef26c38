"""FakeEngine: a deterministic in-process test double for the inference engine.

It exists for fast tests and for benchmarks of the queue layer, where the engine's own speed
must not hide the queue's.  It never loads a model.  Its answer is a pure function of the
task, so tests can predict it:

    text          = "echo: " + the last 40 characters of the prompt (or last message)
    prompt_tokens = number of whitespace-separated words in the input
    output_tokens = min(max_tokens, words in text)

With `slots`, it runs at most that many requests at once, each for `delay_s`, and keeps the
rest waiting in the order a vLLM scheduler with priority scheduling uses (interactive before
bulk, then task priority, then arrival): the engine, not the CPU, is then the bottleneck, as a
GPU is, for benchmarks of fairness and interactive headroom.

With `error_rate`, that share of its requests fails with engine_error (transient: retried),
chosen by a hash of the task id and attempt, so that a test knows which and a retry of the
same task on another engine succeeds (a canary that fails 30% of its tasks).  With
`sleep_mode`, it sleeps and wakes as vLLM's sleep mode does (`wake_s` to wake), and fails any
request submitted while asleep: the runner's turn-taking (workers/sleep.py) is tested on it.

Test hooks, set through a task's metadata:
    fake_error = "<ErrorCode value>"  -> the request fails with that code
    fake_delay_s = "0.05"             -> the request finishes after that many seconds
    fake_crash = "1"                  -> the whole process dies at once (a poison task)
    fake_fail_attempts = "2"          -> engine_error on attempts before the 3rd (transient)
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import os
import time
import zlib
from collections.abc import Sequence

from agentfleet.schemas.errors import ErrorCode
from agentfleet.schemas.wire import Task
from agentfleet.workers.engine import EngineOutput, OnDone, engine_priority


class FakeEngine:
    """Answers at once (or after `delay_s`), with no model: a test double, not an engine."""

    def __init__(self, model_version: str = "fake-1", delay_s: float = 0.0,
                 slots: int | None = None, *, error_rate: float = 0.0,
                 sleep_mode: bool = False, wake_s: float = 0.0):
        self.model_version = model_version
        self.delay_s = delay_s
        self.slots = slots  # None: no limit, every request runs at once
        self.error_rate = error_rate
        self.can_sleep = sleep_mode
        self.wake_s = wake_s
        self.asleep = False
        self.sleeps = 0
        self.wake_times_s: list[float] = []
        self.submitted = 0
        self.peak_running = 0  # most requests that ran at once
        self._timers: dict[str, tuple[asyncio.TimerHandle, EngineOutput, OnDone]] = {}
        # (engine priority, arrival, request id, output, on_done, delay) waiting for a slot
        self._waiting: list[tuple[int, int, str, EngineOutput, OnDone, float]] = []
        self._arrival = itertools.count()

    async def start(self) -> None:
        return None

    def submit(self, requests: Sequence[tuple[str, Task]], on_done: OnDone, *,
               salts: Sequence[str] | None = None) -> None:
        self.submitted += len(requests)
        now = time.time()
        for request_id, task in requests:
            if self.asleep:
                on_done(EngineOutput(request_id=request_id, finished=now,
                                     error_code=ErrorCode.INTERNAL,
                                     error_message="submitted to a sleeping engine"))
                continue
            out = answer(request_id, task, now)
            if self.error_rate and out.error_code is None and _fails(task, self.error_rate):
                out = EngineOutput(request_id=request_id, engine_start=now, finished=now,
                                   error_code=ErrorCode.ENGINE_ERROR,
                                   error_message="fake engine: its error_rate failed this one")
            delay = self.delay_s
            if task.metadata:
                if "fake_crash" in task.metadata:
                    os._exit(3)  # what a segfault in a real engine looks like to the queue
                delay = float(task.metadata.get("fake_delay_s", delay))
            if delay <= 0:
                on_done(out)
                continue
            if self.slots is not None:
                heapq.heappush(self._waiting, (engine_priority(task), next(self._arrival),
                                               request_id, out, on_done, delay))
                continue
            self._run(request_id, out, on_done, delay, now)
        if self._waiting:
            self._start_waiting()

    def _run(self, request_id: str, out: EngineOutput, on_done: OnDone, delay: float,
             now: float) -> None:
        out.first_token = now + delay / 2
        out.finished = now + delay
        handle = asyncio.get_running_loop().call_later(delay, self._finish, request_id)
        self._timers[request_id] = (handle, out, on_done)
        self.peak_running = max(self.peak_running, len(self._timers))

    def _start_waiting(self) -> None:
        now = time.time()
        while self._waiting and len(self._timers) < self.slots:
            _, _, request_id, out, on_done, delay = heapq.heappop(self._waiting)
            self._run(request_id, out, on_done, delay, now)

    def _finish(self, request_id: str) -> None:
        _, out, on_done = self._timers.pop(request_id)
        on_done(out)
        if self._waiting:
            self._start_waiting()

    def abort(self, request_ids: Sequence[str]) -> None:
        aborted = set(request_ids)
        waiting = [w for w in self._waiting if w[2] in aborted]
        if waiting:
            self._waiting = [w for w in self._waiting if w[2] not in aborted]
            heapq.heapify(self._waiting)
            for _, _, _, out, on_done, _ in waiting:
                out.finish_reason = "abort"
                out.first_token = 0.0
                out.finished = time.time()
                on_done(out)
        for request_id in request_ids:
            entry = self._timers.pop(request_id, None)
            if entry is not None:
                handle, out, on_done = entry
                handle.cancel()
                out.finish_reason = "abort"
                out.finished = time.time()
                on_done(out)
        if self._waiting and self.slots is not None:
            self._start_waiting()

    async def stop(self) -> None:
        self.abort([w[2] for w in self._waiting] + list(self._timers))

    async def sleep(self) -> None:
        if self._timers or self._waiting:
            raise RuntimeError(f"sleep with {len(self._timers) + len(self._waiting)} requests "
                               "in flight: vLLM would abort them")
        self.asleep = True
        self.sleeps += 1

    async def wake_up(self) -> None:
        started = time.monotonic()
        await asyncio.sleep(self.wake_s)
        self.asleep = False
        self.wake_times_s.append(time.monotonic() - started)


def _fails(task: Task, rate: float) -> bool:
    return zlib.crc32(f"{task.id}:{task.attempt}".encode()) / 4294967296.0 < rate


def answer(request_id: str, task: Task, now: float) -> EngineOutput:
    source = task.prompt if task.prompt is not None else (task.messages or [])[-1].content
    meta = task.metadata
    if meta and ("fake_error" in meta or int(meta.get("fake_fail_attempts", 0)) > task.attempt):
        return EngineOutput(request_id=request_id, engine_start=now, finished=now,
                            error_code=ErrorCode(meta.get("fake_error", "engine_error")),
                            error_message="fake engine failed this request on purpose")
    text = "echo: " + source[-40:]
    words = len(text.split())
    return EngineOutput(
        request_id=request_id,
        text=text,
        finish_reason="length" if words >= task.sampling.max_tokens else "stop",
        prompt_tokens=len(source.split()),
        output_tokens=min(task.sampling.max_tokens, words),
        engine_start=now,
        first_token=now,
        finished=now,
    )
