"""Outcomes: from a finished task (its record and engine output) to its CommitRecord.

Pure: no I/O, no clock or randomness of its own (both are passed in), so every rule is
unit-tested without a server (tests/test_outcomes.py).  The rules:
  - a transient engine failure (engine_error, engine_dead) is retried with exponential
    backoff and jitter until max_attempts, then dead-lettered as attempts_exhausted;
  - decode errors, too many deliveries and unsupported versions are dead-lettered;
  - a deadline passed or a cancellation ends the task with its status (expired, cancelled);
  - a success enqueues the task's follow-ups (deterministic ids `<parent>.<n>`), a failure
    does not; a follow-up of the same model keeps its parent's version while that version
    serves, one of another model is routed by that model's registry entry;
  - chains (a follow-up, or a task with follow-ups or its own correlation id) get trace
    events; a lone task's result is its whole trace.
Agent steps (docs/agent-steps.md):
  - an output is read by its response format and tools (workers/structured.py) into the
    result's `parsed` and `tool_calls`; one that misses its format fails as output_invalid,
    or, cut by max_tokens, runs again with twice the budget up to `retry_max_tokens`;
  - a follow-up with `when` is enqueued only when its condition holds on the parsed output
    (the others are listed in the result's `skipped`); `for_each` or `items` make one child
    per item (ids `<parent>.<n>-<k>`), more than max_children fail the parent;
  - a task with a `join` opens its join with its commit (the children it waits for, the join
    step `<parent>.join`); each child's commit, whatever its status, joins it, and the one
    that ends the last child enqueues the step (workers/lua/commit.lua);
  - a join step's input (its children's results) is filled in when a worker reads it
    (`render_join`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import msgspec

from agentfleet.schemas import keys, resultcache, steps
from agentfleet.schemas.errors import ErrorCode, JoinInputLostError
from agentfleet.schemas.registry import ModelTable
from agentfleet.schemas.settings import Settings
from agentfleet.schemas.wire import (
    DeadLetter,
    Enqueued,
    Finished,
    FollowUp,
    JoinRef,
    Message,
    Result,
    Retried,
    Status,
    Task,
    Timings,
    ToolCall,
    decode_result,
    encode,
)
from agentfleet.workers import structured
from agentfleet.workers.inflight import InFlight
from agentfleet.workers.scripts import CacheWrite, CommitRecord, FollowUpWrite, JoinWrite

STATUS_BY_CODE = {
    ErrorCode.DEADLINE_EXCEEDED: Status.EXPIRED,
    ErrorCode.CANCELLED: Status.CANCELLED,
    ErrorCode.ATTEMPTS_EXHAUSTED: Status.DEAD_LETTERED,
    ErrorCode.DELIVERY_LIMIT: Status.DEAD_LETTERED,
    ErrorCode.DECODE_ERROR: Status.DEAD_LETTERED,
    ErrorCode.UNSUPPORTED_VERSION: Status.DEAD_LETTERED,
}
RETRYABLE = frozenset((ErrorCode.ENGINE_ERROR, ErrorCode.ENGINE_DEAD))


def traced(task: Task, settings: Settings) -> bool:
    """A lone task's result is its whole trace; chains also get a list per correlation id."""
    return settings.trace_enabled and bool(
        task.followups or task.parent_id or task.correlation_id != task.id)


def child(task: Task, index: int, spec: FollowUp, output: str, now: float,
          traceparent: str, *, parsed: object = None, tool_calls: Sequence[ToolCall] = (),
          item: object = steps.MISSING, item_index: int = 0,
          joins_into: JoinRef | None = None) -> Task:
    """The follow-up task `index` of `task`: same correlation id, parent's id, deterministic
    id (`<parent>.<index>`, or `<parent>.<index>-<item_index>` for an item of a fan-out),
    its templates filled from the parent's output (schemas/steps.py)."""
    context = _context(output, parsed, tool_calls, item)
    prompt = steps.render(spec.prompt, context) if spec.prompt is not None else None
    messages = [_fill(m, context, tool_calls) for m in spec.messages] \
        if spec.messages is not None else None
    if spec.continue_conversation:
        own = messages if messages is not None else [Message(role="user", content=prompt)]
        messages = [*conversation(task), Message(role="assistant", content=output,
                                                 tool_calls=list(tool_calls)), *own]
        prompt = None
    kid = Task(
        id=f"{task.id}.{index}-{item_index}" if item_index else f"{task.id}.{index}",
        correlation_id=task.correlation_id,
        parent_id=task.id,
        tenant=task.tenant,
        agent_id=spec.agent_id or task.agent_id,
        model=spec.model or task.model,
        prompt=prompt,
        messages=messages,
        sampling=spec.sampling or task.sampling,
        priority=task.priority,
        deadline=task.deadline,
        metadata={**task.metadata, **spec.metadata} if spec.metadata else task.metadata,
        followups=spec.followups,
        depth=task.depth + 1,
        reply_to=task.reply_to,
        enqueued_at=now,
        traceparent=traceparent,  # the parent task's span: a chain is one trace
        # a chain keeps its version: the parent's, for a step of the same model
        version=task.version if not spec.model or spec.model == task.model else "",
        affinity_key=spec.affinity_key or task.affinity_key,  # a chain stays together
    )
    if spec.response_format is not None or spec.tools or spec.join is not None \
            or joins_into is not None:
        kid.response_format = spec.response_format
        kid.tools = spec.tools
        kid.tool_choice = spec.tool_choice
        kid.retry_max_tokens = spec.retry_max_tokens
        kid.join = spec.join
        kid.joins_into = joins_into
    return kid


def _fill(m: Message, context: Mapping[str, object],
          tool_calls: Sequence[ToolCall]) -> Message:
    """A template message filled in; a tool message answers the parent's first call unless
    it names another."""
    call_id = steps.render(m.tool_call_id, context)
    if m.role == "tool" and not call_id and tool_calls:
        call_id = tool_calls[0].id
    return msgspec.structs.replace(m, content=steps.render(m.content, context),
                                   tool_call_id=call_id)


def conversation(task: Task) -> list[Message]:
    """A task's input as chat messages (a prompt is one user message)."""
    if task.messages is not None:
        return list(task.messages)
    return [Message(role="user", content=task.prompt or "")]


def _context(output: str, parsed: object, tool_calls: Sequence[ToolCall],
             item: object) -> dict[str, object]:
    tool: object = steps.MISSING
    if tool_calls:
        call = tool_calls[0]
        tool = {"id": call.id, "name": call.function.name,
                "arguments": structured.arguments(call)}
    return {"output": (output, parsed), "tool": tool, "item": item}


class Fanout(msgspec.Struct, kw_only=True):
    """What a succeeded step's follow-ups come to: the children (with how each came), the
    follow-ups whose condition did not hold, or the error that fails the step instead."""

    children: list[tuple[Task, str]] = []
    skipped: list[str] = []
    error: str = ""


def expand(task: Task, text: str, parsed: object, tool_calls: Sequence[ToolCall],
           now: float, traceparent: str, max_children: int) -> Fanout:
    """The children of a succeeded step: conditions tested on its parsed output (or its
    stripped text, for a free-text step), fan-outs expanded, one child per item."""
    found = Fanout()
    join = None
    if task.join is not None:
        join = JoinRef(parent=task.id, model=task.model,
                       join_model=task.join.model or task.model)
    value = parsed if parsed is not None else text.strip()
    for i, spec in enumerate(task.followups, 1):
        if spec.when is not None and not steps.holds(spec.when, value, tool_calls):
            found.skipped.append(f"{i}: {steps.describe(spec.when)}")
            continue
        via = f"when {steps.describe(spec.when)}" if spec.when is not None else ""
        items = spec.items
        if spec.for_each:
            items = steps.lookup(parsed, spec.for_each)
            if not isinstance(items, list):
                found.error = f"for_each: {spec.for_each!r} is not a list in the output"
                return found
        if not spec.for_each and not spec.items:
            found.children.append((child(task, i, spec, text, now, traceparent, parsed=parsed,
                                         tool_calls=tool_calls, joins_into=join), via))
            continue
        for k, item in enumerate(items, 1):
            kid = child(task, i, spec, text, now, traceparent, parsed=parsed,
                        tool_calls=tool_calls, item=item, item_index=k, joins_into=join)
            found.children.append((kid, f"item {k} of {len(items)}"
                                   + (f", {via}" if via else "")))
        if len(found.children) > max_children:
            found.error = (f"{len(found.children)} children, more than max_children "
                           f"{max_children} (for_each {spec.for_each!r})")
            return found
    return found


def join_step(task: Task, now: float, traceparent: str) -> Task:
    """The join step of `task` (`<parent>.join`), as the parent's commit keeps it: its
    templates are filled when a worker reads it (`render_join`), once every child ended."""
    spec = task.join
    return Task(
        id=f"{task.id}.join", correlation_id=task.correlation_id, parent_id=task.id,
        tenant=task.tenant, agent_id=spec.agent_id or task.agent_id,
        model=spec.model or task.model, prompt=spec.prompt, messages=spec.messages,
        sampling=spec.sampling or task.sampling, priority=task.priority,
        deadline=task.deadline,
        metadata={**task.metadata, **spec.metadata} if spec.metadata else task.metadata,
        followups=spec.followups, depth=task.depth + 1, reply_to=task.reply_to,
        enqueued_at=now, traceparent=traceparent, response_format=spec.response_format,
        tools=spec.tools, tool_choice=spec.tool_choice, retry_max_tokens=spec.retry_max_tokens,
        join=spec.join,
        join_of=JoinRef(parent=task.id, model=task.model, join_model=spec.model or task.model),
        affinity_key=spec.affinity_key or task.affinity_key)


def render_join(task: Task, state: Mapping[bytes, bytes], enqueued_at: float) -> Task:
    """A join step with its input filled in, from its join's state (keys.join_state):
    `{results}` is the children's results in the parent's order, each
    {"task_id", "status", "output" (parsed, else the text), "tool_calls"?, "error"?};
    `{output...}` and `{tool...}` are the parent's, as in any follow-up."""
    raw = state.get(b"parent")
    if raw is None:
        raise JoinInputLostError(f"the input of join {task.id} expired before it ran")
    parent = decode_result(raw)
    results = []
    for child_id in parent.followup_ids:
        got = state.get(b"r:" + child_id.encode())
        if not got:
            raise JoinInputLostError(f"join {task.id}: no result of {child_id}")
        results.append(join_entry(decode_result(got)))
    context = _context(parent.text, parent.parsed, parent.tool_calls, steps.MISSING)
    context["results"] = results
    # Filled once: a retry of the step queues it as it is now (join_of dropped), so text that
    # its input brought in is never read for placeholders again.
    filled = msgspec.structs.replace(task, enqueued_at=enqueued_at or task.enqueued_at,
                                     join_of=None)
    if task.prompt is not None:
        filled.prompt = steps.render(task.prompt, context)
    if task.messages is not None:
        filled.messages = [_fill(m, context, parent.tool_calls) for m in task.messages]
    return filled


def join_entry(r: Result) -> dict[str, object]:
    """One child's result as a join's input holds it."""
    entry: dict[str, object] = {"task_id": r.task_id, "status": r.status.value,
                                "output": r.parsed if r.parsed is not None else r.text}
    if r.tool_calls:
        entry["tool_calls"] = [steps.call_dict(c) for c in r.tool_calls]
    if r.error_code is not None:
        entry["error"] = f"{r.error_code.value}: {r.error_message}"
    return entry


class Outcomes:
    """Builds the CommitRecords of one model runner."""

    def __init__(self, *, model: str, worker_id: str, settings: Settings,
                 model_version: Callable[[], str], spans=None,
                 retention: Callable[[str], tuple[int, int]] | None = None,
                 registry: Callable[[], ModelTable] | None = None):
        self.model = model
        self._registry = registry or ModelTable  # the model registry: follow-ups' versions
        # tenant -> (result ttl s, trace ttl s): its registry entry, else the fleet's settings
        self.retention = retention or (lambda tenant: (settings.result_ttl_s,
                                                       settings.trace_ttl_s))
        self.worker_id = worker_id
        self.settings = settings
        self._model_version = model_version
        self._spans = spans  # OpenTelemetry (workers/otel.py), None when off
        self._result_prefix = keys.result_prefix(model)
        self._reply_keys: dict[str, str] = {}

    def _part(self, affinity_key: str) -> int | None:
        """The affinity partition a follow-up or join step goes to (docs/affinity.md)."""
        return keys.affinity_partition(affinity_key, self.settings.affinity_partitions)

    def record(self, rec: InFlight, now: float, jitter: float) -> CommitRecord:
        """The outcome of `rec` (its output set); `jitter` in [0, 1) spreads retries."""
        out = rec.output
        task = rec.task
        if task is None:  # undecodable: keyed by its entry id, nobody to reply to
            task = Task(id="entry-" + rec.entry_id.decode(), model=self.model)
        code = out.error_code
        if rec.cancelled and code is None:
            code = ErrorCode.CANCELLED
            out.error_message = "cancelled while running"
        text, parsed, calls = out.text, None, out.tool_calls or ()
        if code is None and (task.response_format is not None or task.tools):
            got = structured.parse(task, out.text, out.finish_reason, out.tool_calls)
            if got.error:
                # On the output too: the metrics read a failure there (workers/metrics.py).
                code = out.error_code = ErrorCode.OUTPUT_INVALID
                out.error_message = got.error
                if (out.finish_reason == "length"
                        and task.retry_max_tokens > task.sampling.max_tokens):
                    return self._more_tokens(rec, task, got.error, now)
            text, parsed, calls = got.text, got.parsed, got.tool_calls
        if code in RETRYABLE:
            if task.attempt + 1 < self.settings.max_attempts:
                return self._retry(rec, task, code, out.error_message, now, jitter)
            out.error_message = (f"{task.attempt + 1} attempts failed; last: {code.value}: "
                                 f"{out.error_message}")
            code = ErrorCode.ATTEMPTS_EXHAUSTED
        trace_on = traced(task, self.settings)
        traceparent = task.traceparent
        fanout = None
        if code is None and (task.followups or task.join is not None):
            fanout = expand(task, text, parsed, calls, now, traceparent,
                            self.settings.max_children)
            if fanout.error:
                code = out.error_code = ErrorCode.OUTPUT_INVALID
                out.error_message = fanout.error
                fanout = None
        status = Status.SUCCEEDED if code is None else STATUS_BY_CODE.get(code, Status.FAILED)
        if self._spans is not None:
            traceparent = self._spans.record(
                task, status, worker_id=self.worker_id, window_id=rec.window_id,
                read=rec.read_at, engine_start=out.engine_start, first_token=out.first_token,
                finished=out.finished, written=now, prompt_tokens=out.prompt_tokens,
                output_tokens=out.output_tokens, error=out.error_message)
            if fanout is not None:  # the children continue the span the record just made
                for kid, _ in fanout.children:
                    kid.traceparent = traceparent
        followups: list[FollowUpWrite] = []
        registry = self._registry() if fanout is not None else None
        join_version = ""
        if registry is not None and registry.entries:  # a chain keeps its model's version
            if task.join is not None:
                join_model = task.join.model or task.model
                join_version = registry.carry_version(
                    join_model, task.version if join_model == task.model else "",
                    task.correlation_id)
            for kid, _ in fanout.children:
                kid.version = registry.carry_version(kid.model, kid.version, kid.correlation_id)
                if kid.joins_into is not None:
                    kid.joins_into.join_version = join_version
        for kid, via in fanout.children if fanout is not None else ():
            event = encode(Enqueued(task_id=kid.id, parent_id=task.id, model=kid.model,
                                    agent_id=kid.agent_id, at=now, via=via)) if trace_on else b""
            followups.append(FollowUpWrite(
                keys.task_stream(kid.model, kid.tenant, kid.version,
                                 self._part(kid.affinity_key)), encode(kid), event,
                keys.tenant_lanes(kid.model, "i", kid.version), keys.queued_counts(kid.model),
                kid.tenant))
        # Only the fields that differ from their defaults go through the constructor:
        # msgspec matches keyword arguments one by one, and most tasks leave these empty.
        result = Result(
            task_id=task.id, correlation_id=task.correlation_id, model=self.model,
            status=status, text=text, finish_reason=out.finish_reason,
            prompt_tokens=out.prompt_tokens, output_tokens=out.output_tokens,
            timings=Timings(enqueued=task.enqueued_at, read=rec.read_at,
                            engine_start=out.engine_start, first_token=out.first_token,
                            finished=out.finished, written=now),
            worker_id=self.worker_id, window_id=rec.window_id, window_size=rec.window_size,
            model_version=self._model_version(),
        )
        if task.parent_id:
            result.parent_id = task.parent_id
        if task.agent_id:
            result.agent_id = task.agent_id
        result.tenant = task.tenant
        if code is not None:
            result.error_code = code
        if out.error_message:
            result.error_message = out.error_message
        if followups:
            result.followup_ids = [kid.id for kid, _ in fanout.children]
        if parsed is not None:
            result.parsed = parsed
        if calls:
            result.tool_calls = list(calls)
        if fanout is not None:
            if fanout.skipped:
                result.skipped = fanout.skipped
            if task.join is not None:
                result.join_id = task.id + ".join"
        if task.attempt:
            result.attempts = task.attempt + 1
        if task.template:
            result.template = task.template
        trace = b""
        if trace_on:
            # Traces hold no content: no text, parsed value or tool arguments.
            bare = msgspec.structs.replace(result, text="", parsed=None)
            if calls:
                bare.tool_calls = [msgspec.structs.replace(c, function=msgspec.structs.replace(
                    c.function, arguments="")) for c in calls]
            trace = encode(Finished(result=bare))
        outcome, dead = b"r", b""
        if status is Status.DEAD_LETTERED:
            outcome = b"d"
            dead = encode(DeadLetter(
                task_id=task.id, model=self.model, reason=out.error_message, error_code=code,
                payload=rec.payload or encode(task), attempts=task.attempt + 1,
                deliveries=rec.deliveries, history=task.history, worker_id=self.worker_id,
                at=now))
        result_ttl_s, trace_ttl_s = self.retention(rec.tenant)
        record = CommitRecord(
            source=rec.source, entry_id=rec.entry_id, outcome=outcome, v1=encode(result),
            v2=dead, result_key=self._result_prefix + task.id,
            reply_key=self._reply_key(task.reply_to),
            trace_key=keys.trace_key(self.model, task.correlation_id) if trace else "",
            trace=trace, followups=followups, status=status, error_code=code,
            tenant=rec.tenant, result_ttl_s=result_ttl_s, trace_ttl_s=trace_ttl_s,
        )
        if task.batch_id:
            record.batch_out = keys.batch_output(self.model, task.batch_id)
            record.batch_counts = keys.batch_counts(self.model, task.batch_id)
            record.batch_status = status.value
        if fanout is not None and task.join is not None:
            record.join = self._open_join(task, fanout, now, traceparent, trace_on,
                                          join_version)
        elif task.joins_into is not None:
            record.join = self._join_member(task, now, trace_on)
        if task.cache_digest:
            record.cache = self._cache(task, result, now)
        return record

    def _cache(self, task: Task, result: Result, now: float) -> CacheWrite:
        """A task the result cache may answer: its answer for identical tasks, on success."""
        write = CacheWrite(
            cache_key=keys.result_cache(self.model, task.tenant, task.cache_digest),
            inflight_key=keys.result_cache_inflight(self.model, task.tenant, task.cache_digest),
            cancelled_key=keys.cancelled_key(self.model), task_id=task.id,
            ttl_s=max(task.cache_ttl_s, 1), now=now)
        if result.status is Status.SUCCEEDED:
            shared, bare = resultcache.shared(result)
            cancelled, expired = resultcache.ended(result)
            write = msgspec.structs.replace(write, shared=shared, bare=bare, cancelled=cancelled,
                                            expired=expired)
        return write

    def _open_join(self, task: Task, fanout: Fanout, now: float, traceparent: str,
                   trace_on: bool, version: str) -> JoinWrite:
        """The parent's side of a join: the step, and the children it waits for."""
        step = join_step(task, now, traceparent)
        step.version = step.join_of.join_version = version
        return JoinWrite(
            state_key=keys.join_state(task.model, task.id),
            stream=keys.task_stream(step.model, task.tenant, version,
                                    self._part(step.affinity_key)),
            lanes_key=keys.tenant_lanes(step.model, "i", version),
            queued_key=keys.queued_counts(step.model), tenant=task.tenant,
            event=self._join_event(task.id, step.model, len(fanout.children), now, trace_on),
            payload=encode(step), children=tuple(kid.id for kid, _ in fanout.children))

    def _join_member(self, task: Task, now: float, trace_on: bool) -> JoinWrite:
        """A child's side of its join: its place, filled with its result."""
        ref = task.joins_into
        return JoinWrite(
            state_key=keys.join_state(ref.model, ref.parent),
            stream=keys.task_stream(ref.join_model, task.tenant, ref.join_version,
                                    self._part(task.affinity_key)),
            lanes_key=keys.tenant_lanes(ref.join_model, "i", ref.join_version),
            queued_key=keys.queued_counts(ref.join_model), tenant=task.tenant,
            event=self._join_event(ref.parent, ref.join_model, 0, now, trace_on),
            member=task.id,
            trace_key=keys.trace_key(ref.model, task.correlation_id) if trace_on else "")

    @staticmethod
    def _join_event(parent: str, model: str, children: int, now: float, trace_on: bool) -> bytes:
        if not trace_on:
            return b""
        return encode(Enqueued(task_id=parent + ".join", parent_id=parent, model=model, at=now,
                               via=f"join of {children}" if children else "join"))

    def _more_tokens(self, rec: InFlight, task: Task, error: str, now: float) -> CommitRecord:
        """A structured output cut by max_tokens, again at once with twice the budget (up to
        the task's retry_max_tokens): an engine attempt like any other."""
        budget = min(task.retry_max_tokens, task.sampling.max_tokens * 2)
        line = (f"attempt {task.attempt + 1} on {self.worker_id}: {error}; again with "
                f"max_tokens {budget}")
        again = msgspec.structs.replace(
            task, attempt=task.attempt + 1, history=[*task.history, line][-10:],
            sampling=msgspec.structs.replace(task.sampling, max_tokens=budget))
        return self._again(rec, task, again, ErrorCode.OUTPUT_INVALID, line, now, now)

    def _retry(self, rec: InFlight, task: Task, code: ErrorCode, message: str, now: float,
               jitter: float) -> CommitRecord:
        """The task again, one attempt further, due after exponential backoff with jitter."""
        s = self.settings
        delay_s = min(s.retry_max_s, s.retry_base_s * 2 ** task.attempt)
        due = now + delay_s * (0.5 + jitter / 2)
        line = f"attempt {task.attempt + 1} on {self.worker_id}: {code.value}: {message}"
        again = msgspec.structs.replace(task, attempt=task.attempt + 1,
                                        history=[*task.history, line][-10:])
        return self._again(rec, task, again, code, line, now, due)

    def _again(self, rec: InFlight, task: Task, again: Task, code: ErrorCode, line: str,
               now: float, due: float) -> CommitRecord:
        lane = b"b" if rec.bulk else b"i"
        result_ttl_s, trace_ttl_s = self.retention(rec.tenant)
        return CommitRecord(
            source=rec.source, entry_id=rec.entry_id, outcome=b"y", v1=lane + encode(again),
            v2=repr(due), result_key=rec.source, reply_key="",
            trace_key=keys.trace_key(self.model, task.correlation_id or task.id),
            trace=encode(Retried(task_id=task.id, attempt=task.attempt + 1, error=line,
                                 at=now, due=due)) if traced(task, self.settings) else b"",
            followups=(), error_code=code, tenant=rec.tenant, result_ttl_s=result_ttl_s,
            trace_ttl_s=trace_ttl_s,
        )

    def _reply_key(self, producer_id: str) -> str:
        if not producer_id:
            return ""
        key = self._reply_keys.get(producer_id)
        if key is None:
            if len(self._reply_keys) > 10_000:
                self._reply_keys.clear()
            key = self._reply_keys[producer_id] = keys.reply_stream(self.model, producer_id)
        return key
