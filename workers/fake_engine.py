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

Structured outputs (docs/agent-steps.md) get a deterministic answer that fits them, as if an
engine enforced them: a JSON schema's smallest instance (every property; arrays of minItems,
else one item; an enum's or choice's first value that the input mentions, else its first;
strings "echo: ..." within maxLength; numbers at their minimum), a tool call of the first tool
the input names (or the first tool; "auto" answers {"content": ...} when the input names
none), with arguments built the same way.  Regexes and grammars are answered with the
fake_output hook.  Such answers count a token per 4 characters, and are cut at max_tokens
(finish_reason "length"), as a real engine cuts them.

With `error_rate`, that share of its requests fails with engine_error (transient: retried),
chosen by a hash of the task id and attempt, so that a test knows which and a retry of the
same task on another engine succeeds (a canary that fails 30% of its tasks).  With
`sleep_mode`, it sleeps and wakes as vLLM's sleep mode does (`wake_s` to wake), and fails any
request submitted while asleep: the runner's turn-taking (workers/sleep.py) is tested on it.

Test hooks, set through a task's metadata:
    fake_output = "<text>"            -> the answer is this text (tokens: a word each)
    fake_error = "<ErrorCode value>"  -> the request fails with that code
    fake_delay_s = "0.05"             -> the request finishes after that many seconds
    fake_crash = "1"                  -> the whole process dies at once (a poison task)
    fake_fail_attempts = "2"          -> engine_error on attempts before the 3rd (transient)
    fake_token_delay_s = "0.01"       -> a streaming task's words come one per that many
                                         seconds (also the engine's `token_delay_s`)

A streaming task (`Task.stream`) publishes its text word by word (each word with the
whitespace before it is one token) to `partials` (workers/streaming.py), then its end; it
takes no slot.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import os
import re
import time
import zlib
from collections.abc import Mapping, Sequence

import msgspec

from agentfleet.schemas import steps
from agentfleet.schemas.errors import ErrorCode
from agentfleet.schemas.wire import Task
from agentfleet.workers.engine import EngineOutput, OnDone, engine_priority


class FakeEngine:
    """Answers at once (or after `delay_s`), with no model: a test double, not an engine."""

    def __init__(self, model_version: str = "fake-1", delay_s: float = 0.0,
                 slots: int | None = None, token_delay_s: float = 0.0, *,
                 error_rate: float = 0.0, sleep_mode: bool = False, wake_s: float = 0.0,
                 spare_slots: int = 0):
        self.model_version = model_version
        self.delay_s = delay_s
        self.slots = slots  # None: no limit, every request runs at once
        self.spare_slots = spare_slots if slots else 0  # it runs slots + these, as vLLM does
        self.token_delay_s = token_delay_s
        self.partials = None  # a PartialPublisher, set by the worker (workers/streaming.py)
        self._streams: dict[str, _Stream] = {}
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
            if task.stream and self.partials is not None and out.error_code is None:
                self._stream(request_id, task, out, on_done)
                continue
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
        out.engine_start = now  # a request that waited for a slot starts now, not at submit
        out.first_token = now + delay / 2
        out.finished = now + delay
        handle = asyncio.get_running_loop().call_later(delay, self._finish, request_id)
        self._timers[request_id] = (handle, out, on_done)
        self.peak_running = max(self.peak_running, len(self._timers))

    def _start_waiting(self) -> None:
        now = time.time()
        while self._waiting and len(self._timers) < self.slots + self.spare_slots:
            _, _, request_id, out, on_done, delay = heapq.heappop(self._waiting)
            self._run(request_id, out, on_done, delay, now)

    def _finish(self, request_id: str) -> None:
        _, out, on_done = self._timers.pop(request_id)
        on_done(out)
        if self._waiting:
            self._start_waiting()

    def _stream(self, request_id: str, task: Task, out: EngineOutput, on_done: OnDone) -> None:
        """Publish the answer a word at a time, `token_delay_s` apart, then finish it."""
        delay = float(task.metadata.get("fake_token_delay_s", self.token_delay_s)) \
            if task.metadata else self.token_delay_s
        words = re.findall(r"\s*\S+", out.text)
        joined = "".join(words)
        if joined != out.text:  # trailing whitespace: part of the last token
            words = [*words[:-1], (words[-1] if words else "") + out.text[len(joined):]]
        stream = _Stream(request_id, task, out, on_done, words)
        self._streams[request_id] = stream
        if delay <= 0:
            while stream.left():
                self._next_token(stream, 0.0)
            return
        stream.handle = asyncio.get_running_loop().call_later(delay, self._next_token, stream,
                                                              delay)

    def _next_token(self, stream: _Stream, delay: float) -> None:
        now = time.time()
        word = stream.words[stream.sent]
        stream.sent += 1
        if stream.sent == 1:
            stream.out.first_token = now
        self.partials.delta(stream.task, word, stream.sent, now)
        if stream.left():
            if delay > 0:
                stream.handle = asyncio.get_running_loop().call_later(delay, self._next_token,
                                                                      stream, delay)
            return
        self._end_stream(stream, stream.out.finish_reason)

    def _end_stream(self, stream: _Stream, finish_reason: str) -> None:
        self._streams.pop(stream.request_id, None)
        out = stream.out
        out.finished = time.time()
        out.finish_reason = finish_reason
        self.partials.final(stream.task, finish_reason, stream.sent)
        stream.on_done(out)

    def abort(self, request_ids: Sequence[str]) -> None:
        for request_id in request_ids:
            stream = self._streams.get(request_id)
            if stream is not None:
                if stream.handle is not None:
                    stream.handle.cancel()
                self._end_stream(stream, "abort")
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
        self.abort([w[2] for w in self._waiting] + list(self._timers) + list(self._streams))

    async def sleep(self) -> None:
        if self._timers or self._waiting or self._streams:
            raise RuntimeError(f"sleep with {len(self._timers) + len(self._waiting) + len(self._streams)} requests "
                               "in flight: vLLM would abort them")
        self.asleep = True
        self.sleeps += 1

    async def wake_up(self) -> None:
        started = time.monotonic()
        await asyncio.sleep(self.wake_s)
        self.asleep = False
        self.wake_times_s.append(time.monotonic() - started)



class _Stream:
    """A streaming request in the fake engine: its words and how many are out."""

    __slots__ = ("request_id", "task", "out", "on_done", "words", "sent", "handle")

    def __init__(self, request_id: str, task: Task, out: EngineOutput, on_done: OnDone,
                 words: list[str]):
        self.request_id = request_id
        self.task = task
        self.out = out
        self.on_done = on_done
        self.words = words
        self.sent = 0
        self.handle: asyncio.TimerHandle | None = None

    def left(self) -> bool:
        return self.sent < len(self.words)


def _fails(task: Task, rate: float) -> bool:
    return zlib.crc32(f"{task.id}:{task.attempt}".encode()) / 4294967296.0 < rate


def answer(request_id: str, task: Task, now: float) -> EngineOutput:
    source = task.prompt if task.prompt is not None else (task.messages or [])[-1].content
    meta = task.metadata
    if meta and ("fake_error" in meta or int(meta.get("fake_fail_attempts", 0)) > task.attempt):
        return EngineOutput(request_id=request_id, engine_start=now, finished=now,
                            error_code=ErrorCode(meta.get("fake_error", "engine_error")),
                            error_message="fake engine failed this request on purpose")
    shaped = structured_answer(task, source)
    if shaped is not None:
        tokens = math.ceil(len(shaped) / 4)
        cut = tokens > task.sampling.max_tokens
        return EngineOutput(
            request_id=request_id, text=shaped[:task.sampling.max_tokens * 4] if cut else shaped,
            finish_reason="length" if cut else "stop", prompt_tokens=len(source.split()),
            output_tokens=min(tokens, task.sampling.max_tokens), engine_start=now,
            first_token=now, finished=now)
    text = meta["fake_output"] if meta and "fake_output" in meta else "echo: " + source[-40:]
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


_json = msgspec.json.Encoder()


def structured_answer(task: Task, source: str) -> str | None:
    """The fake's answer to a task with tools or a response format; None for free text."""
    if task.metadata and "fake_output" in task.metadata:
        return None
    kind = steps.choice_name(task.tool_choice, task.tools) if task.tools else "none"
    if kind != "none":
        named = {t.function.name: t for t in task.tools}
        if kind == "named":
            tool = named[task.tool_choice.function.name]
            return _json.encode(example(_params(tool), source)).decode()
        mentioned = [t for t in task.tools if t.function.name in source]
        if kind == "auto" and not mentioned:
            return _json.encode({"content": "echo: " + source[-40:]}).decode()
        tool = (mentioned or task.tools)[0]
        return _json.encode([{"name": tool.function.name,
                              "parameters": example(_params(tool), source)}]).decode()
    fmt = task.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_schema":
        return _json.encode(example(fmt.json_schema.schema if fmt.json_schema else {},
                                    source)).decode()
    if fmt.type == "json_object":
        return _json.encode({"echo": source[-40:]}).decode()
    if fmt.type == "choice":
        return _mentioned(fmt.choice, source)
    return ""  # regex, grammar: only the fake_output hook answers them


def _params(tool) -> dict:
    return tool.function.parameters or {"type": "object", "properties": {}}


def _mentioned(options: Sequence, source: str) -> object:
    """The first option the input names (case-insensitive), else the first."""
    low = source.lower()
    return next((o for o in options if str(o).lower() in low), options[0])


def example(schema: object, source: str, root: object = None, index: int = 0,
            depth: int = 0) -> object:
    """A small instance of a JSON schema, picked from the input where it has a choice."""
    root = schema if root is None else root
    if not isinstance(schema, Mapping) or depth > 32:  # 32: a $ref that loops stops somewhere
        return None
    depth += 1
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: object = root
        for part in ref[2:].split("/"):
            target = target.get(part, {}) if isinstance(target, Mapping) else {}
        return example(target, source, root, index, depth)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return _mentioned(schema["enum"], source)
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            return example(schema[key][0], source, root, index, depth)
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        return {name: example(sub, source, root, index, depth)
                for name, sub in (schema.get("properties") or {}).items()}
    if kind == "array":
        count = schema.get("minItems") or min(1, schema.get("maxItems", 1))
        return [example(schema.get("items", {}), source, root, k + 1, depth)
                for k in range(count)]
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum", -1) + 1)
        return int(low) if kind == "integer" else float(low)
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    text = (f"{index}. " if index else "") + "echo: " + source[-24:]  # items differ, even cut
    return text[:schema.get("maxLength", len(text))]
