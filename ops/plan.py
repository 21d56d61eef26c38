"""`agentfleet plan --model M --deadline 6h`: how many workers a backlog needs to finish in time.

From measured throughput, not from a table: the per-minute aggregates (workers/kpi.py) say
how many tokens the model's fleet finished each minute of the last `--window` (an hour by
default); the heartbeats say how many workers are live now.  Then

    tokens/s per worker = tokens/s of the fleet's busiest minutes / live workers
    workers             = ceil(backlog tokens / (tokens/s per worker x usable seconds x efficiency))
    usable seconds      = deadline - start-up time of a new worker

The backlog is the model's queued tasks (both lanes, lag + pending) at their measured mean
tokens (ops/capacity.py), or `--backlog-tokens N`.  Every figure the answer rests on is
printed with it, as an assumption the SRE can check or override.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence

import msgspec
import redis

from agentfleet.ops.capacity import (
    LANES,
    TokenHistory,
    backlog_tokens,
    lane_task_tokens,
    load_token_history,
)
from agentfleet.ops.exporter import queued_tasks, read_queues
from agentfleet.schemas.errors import AgentFleetError

BUSIEST_SHARE = 0.25  # the throughput basis: the busiest quarter of the minutes with work


class PlanInput(msgspec.Struct, kw_only=True):
    """What a plan is computed from (measured, or given on the command line)."""

    model: str
    deadline_s: float
    backlog_tokens: float
    tokens_per_s_per_worker: float
    startup_s: float = 300.0
    efficiency: float = 0.9
    max_workers: int = 0  # 0: no cap


class Plan(msgspec.Struct, kw_only=True):
    """The answer and the figures it rests on."""

    model: str
    workers: int
    deadline_s: float
    backlog_tokens: float
    tokens_per_s_per_worker: float
    usable_s: float
    finish_s: float  # when the backlog would be done with `workers` workers, from now
    feasible: bool  # False: the deadline is inside the start-up time, or over max_workers
    assumptions: list[str] = []


def compute_plan(p: PlanInput, assumptions: Sequence[str] = ()) -> Plan:
    """Pure arithmetic: the workers that finish `p.backlog_tokens` within `p.deadline_s`."""
    if p.tokens_per_s_per_worker <= 0:
        raise AgentFleetError("tokens per second per worker: must be > 0 (no measured "
                              "throughput: pass --tokens-per-s-per-worker)")
    if not 0 < p.efficiency <= 1:
        raise AgentFleetError(f"--efficiency: {p.efficiency} is outside (0, 1]")
    usable_s = p.deadline_s - p.startup_s
    rate = p.tokens_per_s_per_worker * p.efficiency  # tokens/s one worker sustains
    notes = list(assumptions) + [
        f"a new worker starts serving {p.startup_s:g} s after it is asked for "
        f"(--startup-s: pod scheduling, image pull, engine load and compile)",
        f"workers sustain {p.efficiency:.0%} of the measured rate (--efficiency: scaling "
        f"steps, reclaims after a restart, uneven windows)",
        "new interactive traffic during the run is not in the backlog: add its tokens "
        "(--backlog-tokens) or its workers on top",
    ]
    if p.backlog_tokens <= 0:
        return Plan(model=p.model, workers=0, deadline_s=p.deadline_s, backlog_tokens=0.0,
                    tokens_per_s_per_worker=p.tokens_per_s_per_worker, usable_s=usable_s,
                    finish_s=0.0, feasible=True, assumptions=notes)
    if usable_s <= 0:
        return Plan(model=p.model, workers=0, deadline_s=p.deadline_s,
                    backlog_tokens=p.backlog_tokens,
                    tokens_per_s_per_worker=p.tokens_per_s_per_worker, usable_s=usable_s,
                    finish_s=math.inf, feasible=False, assumptions=notes)
    workers = max(1, math.ceil(p.backlog_tokens / (rate * usable_s)))
    feasible = not p.max_workers or workers <= p.max_workers
    finish_s = p.startup_s + p.backlog_tokens / (rate * workers)
    return Plan(model=p.model, workers=workers, deadline_s=p.deadline_s,
                backlog_tokens=p.backlog_tokens,
                tokens_per_s_per_worker=p.tokens_per_s_per_worker, usable_s=usable_s,
                finish_s=finish_s, feasible=feasible, assumptions=notes)


def measured_throughput(history: TokenHistory, live_workers: int,
                        busiest_share: float = BUSIEST_SHARE) -> tuple[float, list[str]]:
    """Tokens/s per worker from the busiest minutes of `history`, and how it was found.

    Returns (0, notes) when there is nothing to measure by (no finished task, or no worker).
    """
    minutes = history.tokens_per_minute()
    # The current minute is still filling up: leave it out when there are others.
    current = int(history.until // 60) * 60
    if len(minutes) > 1 and minutes[-1][0] == current:
        minutes = minutes[:-1]
    if not minutes:
        return 0.0, [f"no task of {history.model} finished in the window: nothing measured"]
    if live_workers <= 0:
        return 0.0, [f"no live worker of {history.model} now: the measured "
                     f"{sum(t for _, t in minutes) / 60 / len(minutes):.0f} tokens/s of the "
                     f"fleet cannot be divided per worker"]
    busiest = sorted((t for _, t in minutes), reverse=True)
    used = busiest[:max(1, math.ceil(len(busiest) * busiest_share))]
    fleet_tps = sum(used) / (60.0 * len(used))
    per_worker = fleet_tps / live_workers
    notes = [
        f"throughput: {fleet_tps:,.0f} tokens/s for the fleet, the mean of its busiest "
        f"{len(used)} of {len(minutes)} minutes with work (prompt + output tokens of "
        f"succeeded tasks, per-minute aggregates)",
        f"{live_workers} live worker(s) now (heartbeats), assumed to be the ones that did that "
        f"work, busy in those minutes: {per_worker:,.1f} tokens/s per worker (override: "
        f"--tokens-per-s-per-worker)",
    ]
    return per_worker, notes


def measure(client: redis.Redis, model: str, *, window_s: float,
            now: float | None = None) -> tuple[float, float, list[str]]:
    """(backlog tokens, tokens/s per worker, notes) of `model`, measured in Redis."""
    now = time.time() if now is None else now
    (queue,) = read_queues(client, [model])
    history = load_token_history(client, [model], since_s=window_s, now=now)[model]
    queued = queued_tasks(queue)
    tokens = backlog_tokens(queued, history)
    notes = []
    for lane in LANES:
        n = queued[lane]
        mean = lane_task_tokens(history, lane)
        basis = ("mean of the window; an estimate" if history.mean_task_tokens() is not None
                 else "no task finished in the window: a default; pass --backlog-tokens")
        notes.append(f"{lane} lane: {n:,.0f} queued task(s) (lag + pending) x {mean:,.0f} "
                     f"tokens each ({basis}) = {tokens[lane]:,.0f}")
    per_worker, more = measured_throughput(history, queue.live_workers)
    total = sum(v for v in tokens.values() if not math.isnan(v))
    return total, per_worker, notes + more


def render(plan: Plan) -> str:
    lines = [f"plan for {plan.model}: finish {plan.backlog_tokens:,.0f} tokens within "
             f"{_duration(plan.deadline_s)}"]
    if plan.backlog_tokens <= 0:
        lines.append("  nothing queued: no workers needed for the backlog")
    elif plan.usable_s <= 0:
        lines.append(f"  NOT POSSIBLE: the deadline is within a new worker's start-up time "
                     f"({_duration(plan.deadline_s - plan.usable_s)})")
    else:
        lines.append(f"  workers needed: {plan.workers}  (finishing in about "
                     f"{_duration(plan.finish_s)})")
        if not plan.feasible:
            lines.append("  NOT POSSIBLE within --max-workers: raise it or move the deadline")
    lines.append("assumptions:")
    lines += [f"  - {a}" for a in plan.assumptions]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if math.isinf(seconds):
        return "never"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def run_plan(url: str, *, model: str, deadline_s: float, window_s: float,
             backlog: float | None, per_worker: float | None, startup_s: float,
             efficiency: float, max_workers: int, as_json: bool) -> int:
    from agentfleet.producer.connection import connect_sync

    client = connect_sync(url, socket_timeout=10)
    try:
        measured_backlog, measured_rate, notes = measure(client, model, window_s=window_s)
    finally:
        client.close()
    if backlog is not None:
        notes = [n for n in notes if "lane:" not in n]
        notes.insert(0, f"backlog: {backlog:,.0f} tokens as given (--backlog-tokens); "
                        f"measured now: {measured_backlog:,.0f}")
    if per_worker is not None:
        notes = [n for n in notes if not n.startswith(("throughput", "no task", "no live"))
                 and "live worker(s)" not in n]
        notes.append(f"{per_worker:,.1f} tokens/s per worker as given "
                     f"(--tokens-per-s-per-worker); measured: {measured_rate:,.1f}")
    plan = compute_plan(PlanInput(
        model=model, deadline_s=deadline_s,
        backlog_tokens=measured_backlog if backlog is None else backlog,
        tokens_per_s_per_worker=measured_rate if per_worker is None else per_worker,
        startup_s=startup_s, efficiency=efficiency, max_workers=max_workers), notes)
    if as_json:
        out = msgspec.to_builtins(plan)
        out["finish_s"] = None if math.isinf(plan.finish_s) else plan.finish_s
        print(json.dumps(out))
    else:
        print(render(plan))
    return 0 if plan.feasible else 1
