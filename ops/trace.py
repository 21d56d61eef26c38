"""`agentfleet trace <correlation-id>`: the whole chain as a timeline with durations, then
its shape: branches (with the condition that held, and the ones that did not), fan-outs and
their joins (docs/agent-steps.md).

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
            case Enqueued(task_id=task_id, model=model, parent_id=parent, at=at, via=via):
                enqueued.add(task_id)
                step = ("join enqueued" if via.startswith("join") else "follow-up enqueued") \
                    if parent else "enqueued"
                rows.append((at, task_id, step,
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
    lines += shape(events)
    return "\n".join(lines)


def shape(events: list[TraceEvent]) -> list[str]:
    """The chain as a tree: each task's follow-ups under it (how each came: a condition, an
    item of a fan-out), the branches not taken, a fan-out's join with the children it
    waited for.  Nothing for a chain of one task."""
    finished: dict[str, Result] = {}
    enqueued: dict[str, Enqueued] = {}
    for event in events:
        match event:
            case Enqueued(task_id=task_id):
                enqueued[task_id] = event
            case Finished(result=r):
                finished[r.task_id] = r
    if len(finished) + len(set(enqueued) - set(finished)) < 2:
        return []
    children: dict[str, list[str]] = {}
    for task_id, e in enqueued.items():
        if e.parent_id and task_id != e.parent_id + ".join":
            children.setdefault(e.parent_id, []).append(task_id)
    for r in finished.values():
        if r.parent_id and r.task_id != r.parent_id + ".join":
            kids = children.setdefault(r.parent_id, [])
            if r.task_id not in kids:
                kids.append(r.task_id)
    known = set(finished) | set(enqueued)
    roots = sorted(t for t in known if not _parent(t, finished, enqueued)
                   or _parent(t, finished, enqueued) not in known)
    lines = ["  steps:"]
    for root in roots:
        _tree(root, "    ", "", finished, enqueued, children, lines)
    return lines


def _parent(task_id: str, finished: dict[str, Result], enqueued: dict[str, Enqueued]) -> str:
    if task_id in finished and finished[task_id].parent_id:
        return finished[task_id].parent_id
    e = enqueued.get(task_id)
    return e.parent_id if e is not None else ""


def _tree(task_id: str, indent: str, branch: str, finished: dict[str, Result],
          enqueued: dict[str, Enqueued], children: dict[str, list[str]],
          lines: list[str]) -> None:
    r = finished.get(task_id)
    e = enqueued.get(task_id)
    state = r.status.value if r is not None else "queued"
    detail = []
    if r is not None and r.error_code is not None:
        detail.append(r.error_code.value)
    if r is not None and r.tool_calls:
        detail.append("called " + ", ".join(c.function.name for c in r.tool_calls))
    if e is not None and e.via:
        detail.append(e.via)
    lines.append(f"{indent}{branch}{task_id}  [{state}]" + (f"  {'; '.join(detail)}"
                                                             if detail else ""))
    step = indent + ("    " if branch.startswith("└") else "│   " if branch else "")
    order = {c: i for i, c in enumerate(r.followup_ids)} if r is not None else {}
    kids = sorted(children.get(task_id, ()), key=lambda c: (order.get(c, len(order)), c))
    skipped = r.skipped if r is not None else []
    join = r.join_id if r is not None and r.join_id else ""
    if not join and (task_id + ".join" in finished or task_id + ".join" in enqueued):
        join = task_id + ".join"
    rows: list[tuple[str, str]] = [("task", k) for k in kids]
    rows += [("skip", s) for s in skipped]
    if join:
        rows.append(("join", join))
    for i, (kind, value) in enumerate(rows):
        mark = "└── " if i == len(rows) - 1 else "├── "
        if kind == "task":
            _tree(value, step, mark, finished, enqueued, children, lines)
        elif kind == "skip":
            lines.append(f"{step}{mark}(not taken) follow-up {value}")
        else:
            ended = [finished[k] for k in kids if k in finished]
            counts: dict[str, int] = {}
            for k in ended:
                counts[k.status.value] = counts.get(k.status.value, 0) + 1
            waited = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"
            before = len(lines)
            _tree(value, step, mark, finished, enqueued, children, lines)
            lines[before] += f"  <- {len(kids)} children ({waited})"


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
    if r.cache:  # the result cache answered it: it never ran (docs/result-cache.md)
        step = "cache hit" if r.cache == "hit" else "joined"
        rows.append((t.enqueued, r.task_id, step,
                     f"{r.status.value}, the answer of {r.cached_from}, run by "
                     f"{r.worker_id or '-'} on {r.model_version or r.model}"))
    return rows


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"
