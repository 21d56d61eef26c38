"""`agentfleet trace <correlation-id>`: the whole chain as a timeline with durations.

A chain's events live in one list per model (`keys.trace_key`); a lone task (no parent, no
follow-ups, its own id as correlation id) keeps no list: its result, with its timings, is
its trace.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from agentfleet.schemas import keys
from agentfleet.schemas.settings import Settings
from agentfleet.schemas.wire import Enqueued, Finished, Result, TraceEvent, decode_event, decode_result


async def load_trace(redis: aioredis.Redis, settings: Settings,
                     correlation_id: str) -> list[TraceEvent]:
    """Every trace event of a correlation id, across all configured models, in time order."""
    models = list(settings.models)
    async with redis.pipeline(transaction=False) as pipe:
        for model in models:
            pipe.lrange(keys.trace_key(model, correlation_id), 0, -1)
        for model in models:
            pipe.get(keys.result_key(model, correlation_id))
        replies = await pipe.execute()
    events: list[TraceEvent] = [decode_event(raw) for lst in replies[:len(models)] for raw in lst]
    if not events:
        events = [Finished(result=decode_result(raw)) for raw in replies[len(models):] if raw]
    return sorted(events, key=_event_time)


def _event_time(event: TraceEvent) -> float:
    match event:
        case Enqueued(at=at):
            return at
        case Finished(result=result):
            return result.timings.enqueued or result.timings.finished
    return 0.0


def render(correlation_id: str, events: list[TraceEvent]) -> str:
    """A readable timeline: one line per step, offsets from the chain's first event."""
    if not events:
        return f"no trace for correlation id {correlation_id!r} (expired, or never enqueued)"
    rows: list[tuple[float, str, str, str]] = []
    finished: dict[str, Result] = {}
    enqueued: set[str] = set()
    for event in events:
        match event:
            case Enqueued(task_id=task_id, model=model, parent_id=parent, at=at):
                enqueued.add(task_id)
                rows.append((at, task_id, "follow-up enqueued" if parent else "enqueued",
                             f"model {model}" + (f", parent {parent}" if parent else "")))
            case Finished(result=r):
                finished[r.task_id] = r
                rows.extend(_steps(r, r.task_id not in enqueued))
    start = min(row[0] for row in rows if row[0] > 0)
    end = max(row[0] for row in rows)
    models = sorted({r.model for r in finished.values()})
    lines = [f"correlation {correlation_id}: {len(finished)} finished task(s) on "
             f"{', '.join(models) or '-'}, {_ms(end - start)} from first to last event"]
    width = max(len(row[1]) for row in rows)
    for at, task_id, step, detail in sorted(rows, key=lambda row: row[0]):
        offset = f"+{at - start:.3f}s"
        lines.append(f"  {offset:>10}  {task_id:<{width}}  {step:<20} {detail}")
    waiting = [c for r in finished.values() for c in r.followup_ids if c not in finished]
    for task_id in waiting:
        lines.append(f"  {'':>10}  {task_id:<{width}}  {'queued':<20} not finished yet")
    return "\n".join(lines)


def _steps(r: Result, show_enqueue: bool) -> list[tuple[float, str, str, str]]:
    t = r.timings
    rows = []
    if show_enqueue and t.enqueued:
        rows.append((t.enqueued, r.task_id, "enqueued", f"model {r.model}"
                     + (f", agent {r.agent_id}" if r.agent_id else "")))
    if t.read:
        rows.append((t.read, r.task_id, f"read by {r.worker_id}",
                     f"window {r.window_id} ({r.window_size} tasks), queued {_ms(t.read - t.enqueued)}"))
    if t.engine_start:
        rows.append((t.engine_start, r.task_id, "engine start", f"model {r.model_version}"))
    if t.first_token:
        rows.append((t.first_token, r.task_id, "first token",
                     f"time to first token {_ms(t.first_token - t.engine_start)}"))
    if t.finished:
        detail = (f"{r.finish_reason}, {r.prompt_tokens} prompt + {r.output_tokens} output "
                  f"tokens, engine {_ms(t.finished - (t.engine_start or t.read))}")
        if r.error_code is not None:
            detail = f"{r.error_code.value}: {r.error_message}"
        rows.append((t.finished, r.task_id, "finished", detail))
    if t.written:
        rows.append((t.written, r.task_id, "result written",
                     f"{r.status.value}, {_ms(t.written - t.enqueued)} after enqueue"))
    return rows


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"
