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
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from agentfleet.schemas import keys
from agentfleet.schemas.errors import ErrorCode
from agentfleet.schemas.registry import ModelTable
from agentfleet.schemas.settings import Settings
from agentfleet.schemas.wire import (
    DeadLetter,
    Enqueued,
    Finished,
    FollowUp,
    Message,
    Result,
    Retried,
    Status,
    Task,
    Timings,
    encode,
)
from agentfleet.workers.inflight import InFlight
from agentfleet.workers.scripts import CommitRecord, FollowUpWrite

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
          traceparent: str) -> Task:
    """The follow-up task `index` of `task`: same correlation id, parent's id, deterministic id."""
    def fill(text: str) -> str:
        return text.replace("{output}", output)

    return Task(
        id=f"{task.id}.{index}",
        correlation_id=task.correlation_id,
        parent_id=task.id,
        tenant=task.tenant,
        agent_id=spec.agent_id or task.agent_id,
        model=spec.model or task.model,
        prompt=fill(spec.prompt) if spec.prompt is not None else None,
        messages=[Message(role=m.role, content=fill(m.content)) for m in spec.messages]
        if spec.messages is not None else None,
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
    )


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
        if code in RETRYABLE:
            if task.attempt + 1 < self.settings.max_attempts:
                return self._retry(rec, task, code, out.error_message, now, jitter)
            out.error_message = (f"{task.attempt + 1} attempts failed; last: {code.value}: "
                                 f"{out.error_message}")
            code = ErrorCode.ATTEMPTS_EXHAUSTED
        status = Status.SUCCEEDED if code is None else STATUS_BY_CODE.get(code, Status.FAILED)
        followups: list[FollowUpWrite] = []
        trace_on = traced(task, self.settings)
        traceparent = task.traceparent
        if self._spans is not None:
            traceparent = self._spans.record(
                task, status, worker_id=self.worker_id, window_id=rec.window_id,
                read=rec.read_at, engine_start=out.engine_start, first_token=out.first_token,
                finished=out.finished, written=now, prompt_tokens=out.prompt_tokens,
                output_tokens=out.output_tokens, error=out.error_message)
        if status is Status.SUCCEEDED and task.followups:
            registry = self._registry()
            for i, spec in enumerate(task.followups, 1):
                kid = child(task, i, spec, out.text, now, traceparent)
                if registry.entries:
                    kid.version = registry.carry_version(kid.model, kid.version,
                                                         kid.correlation_id)
                event = encode(Enqueued(task_id=kid.id, parent_id=task.id, model=kid.model,
                                        agent_id=kid.agent_id, at=now)) if trace_on else b""
                followups.append(FollowUpWrite(
                    keys.task_stream(kid.model, kid.tenant, kid.version), encode(kid), event,
                    keys.tenant_lanes(kid.model, "i", kid.version), keys.queued_counts(kid.model),
                    kid.tenant))
        # Only the fields that differ from their defaults go through the constructor:
        # msgspec matches keyword arguments one by one, and most tasks leave these empty.
        result = Result(
            task_id=task.id, correlation_id=task.correlation_id, model=self.model,
            status=status, text=out.text, finish_reason=out.finish_reason,
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
            result.followup_ids = [f"{task.id}.{i}" for i in range(1, len(followups) + 1)]
        if task.attempt:
            result.attempts = task.attempt + 1
        if task.template:
            result.template = task.template
        trace = b""
        if trace_on:
            trace = encode(Finished(result=msgspec.structs.replace(result, text="")))
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
        return record

    def _retry(self, rec: InFlight, task: Task, code: ErrorCode, message: str, now: float,
               jitter: float) -> CommitRecord:
        """The task again, one attempt further, due after exponential backoff with jitter."""
        s = self.settings
        delay_s = min(s.retry_max_s, s.retry_base_s * 2 ** task.attempt)
        due = now + delay_s * (0.5 + jitter / 2)
        line = f"attempt {task.attempt + 1} on {self.worker_id}: {code.value}: {message}"
        again = msgspec.structs.replace(task, attempt=task.attempt + 1,
                                        history=[*task.history, line][-10:])
        lane = b"b" if rec.bulk else b"i"
        result_ttl_s, trace_ttl_s = self.retention(rec.tenant)
        return CommitRecord(
            source=rec.source, entry_id=rec.entry_id, outcome=b"y", v1=lane + encode(again),
            v2=repr(due), result_key=rec.source, reply_key="",
            trace_key=keys.trace_key(self.model, task.correlation_id or task.id),
            trace=encode(Retried(task_id=task.id, attempt=task.attempt + 1, error=line,
                                 at=now, due=due)) if traced(task, s) else b"",
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
