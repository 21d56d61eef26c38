"""`agentfleet status`: every model's queue and recent work, live in the terminal.

    agentfleet status              a table refreshed in place (rich.live) until Ctrl-C
    agentfleet status --json       one snapshot as JSON, for scripts

Queue columns come from the exporter's reads (ops/exporter.py: one pipeline), the recent-work
columns from the workers' per-minute aggregates of the last `--window` (5 minutes by default):

  depth     tasks not finished: lag + pending of both lanes + retries waiting
  lag       interactive tasks never delivered; `bulk` the same for bulk jobs
  pending   delivered, not acknowledged; `oldest` the age of the oldest of them
  workers   live workers (a heartbeat within 10 s)
  tasks/s   tasks that ended, per second over the window
  p50, p99  end-to-end latency of interactive tasks over the window
  errors    tasks that ended failed, expired or dead-lettered over the window

Below the table: the tenants with the most queued work, and the tasks the result cache
answered without running them (hits and joins since the counters began; docs/result-cache.md).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Sequence

import msgspec
import redis

from agentfleet.producer.connection import connect_sync
from agentfleet.ops.exporter import QueueStats, read_queues
from agentfleet.ops.report import Window, load_window

WINDOW_S = 300.0


class ModelStatus(msgspec.Struct, kw_only=True):
    model: str
    depth: int
    lag: float
    pending: int
    oldest_pending_age_s: float
    bulk_lag: float
    bulk_pending: int
    delayed: int
    dead_letters: int
    live_workers: int
    tasks_per_s: float
    p50_s: float | None
    p99_s: float | None
    errors: int
    window_s: float
    # the tenants with the most queued work: (tenant, queued and not ended, never delivered)
    tenants: list[tuple[str, int, int]] = []
    # tasks answered by the result cache, never run: hits and joins, since the counters began
    answered_from_cache: int = 0


def snapshot(client: redis.Redis, models: Sequence[str],
             window_s: float = WINDOW_S) -> list[ModelStatus]:
    now = time.time()
    queues = read_queues(client, models)
    window = load_window(client, models, window_s, now, with_series=False)
    return combine(queues, window, now)


def combine(queues: list[QueueStats], window: Window, now: float) -> list[ModelStatus]:
    """Queue figures and the recent work of a window, per model (the console shows these)."""
    covered = max(now - window.since, 1.0)
    totals = {(t.model, t.lane): t for t in window.model_totals()}
    out = []
    for q in queues:
        interactive = totals.get((q.model, "interactive"))
        ended = errors = 0
        for lane in ("interactive", "bulk"):
            row = totals.get((q.model, lane))
            if row is not None:
                ended += row.ended
                errors += row.ended - row.succeeded - row.statuses.get("cancelled", 0)
        lag = q.interactive.lag + q.bulk.lag
        out.append(ModelStatus(
            model=q.model,
            depth=int((lag if lag == lag else 0) + q.interactive.pending + q.bulk.pending
                      + q.delayed),
            lag=q.interactive.lag, pending=q.interactive.pending + q.bulk.pending,
            oldest_pending_age_s=max(q.interactive.oldest_pending_age_s,
                                     q.bulk.oldest_pending_age_s),
            bulk_lag=q.bulk.lag, bulk_pending=q.bulk.pending, delayed=q.delayed,
            dead_letters=q.dead_letters, live_workers=q.live_workers,
            tasks_per_s=ended / covered,
            p50_s=interactive.quantile(0.5) if interactive else None,
            p99_s=interactive.quantile(0.99) if interactive else None,
            errors=errors, window_s=covered, tenants=_top_tenants(q),
            answered_from_cache=q.counters.get("cache_hits", 0)
            + q.counters.get("cache_joins", 0)))
    return out


def _top_tenants(q: QueueStats, n: int = 5) -> list[tuple[str, int, int]]:
    lag: dict[str, int] = {}
    for (_, tenant), st in q.tenants.items():
        lag[tenant] = lag.get(tenant, 0) + (int(st.lag) if st.lag == st.lag else 0)
    names = {t for t, v in lag.items() if v} | {t for t, v in q.queued.items() if v}
    rows = [(t, q.queued.get(t, 0), lag.get(t, 0)) for t in names]
    return sorted(rows, key=lambda r: (-r[1], -r[2], r[0]))[:n]


def to_json(statuses: list[ModelStatus]) -> str:
    return json.dumps({"at": time.time(), "models": [msgspec.to_builtins(s) for s in statuses]},
                      indent=2, default=str)


def render_table(statuses: list[ModelStatus], url: str = ""):
    """A rich Table of the snapshot."""
    from rich.table import Table

    table = Table(title=f"agentfleet status {url}".rstrip(), title_justify="left",
                  caption=f"{time.strftime('%H:%M:%S')}; rates over the last "
                          f"{WINDOW_S / 60:.0f} minutes", caption_justify="left")
    for column in ("model", "depth", "lag", "pending", "oldest", "bulk lag", "retrying",
                   "workers", "tasks/s", "p50", "p99", "errors", "dead letters"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for s in statuses:
        table.add_row(
            s.model, f"{s.depth:,}", _count(s.lag), f"{s.pending:,}",
            _age(s.oldest_pending_age_s) if s.pending else "-", _count(s.bulk_lag),
            f"{s.delayed:,}",
            f"[red]{s.live_workers}[/red]" if not s.live_workers and s.depth else
            str(s.live_workers),
            f"{s.tasks_per_s:,.1f}", _ms(s.p50_s), _ms(s.p99_s),
            f"[red]{s.errors:,}[/red]" if s.errors else "0", f"{s.dead_letters:,}")
    busiest = [(s.model, t) for s in statuses for t in s.tenants]
    if busiest and any(t[0] != "default" for _, t in busiest):
        table.caption += "\ntenants with the most queued: " + "; ".join(
            f"{model}/{tenant} {queued:,} queued ({lag:,} unread)"
            for model, (tenant, queued, lag) in busiest[:8])
    cached = [f"{s.model} {s.answered_from_cache:,}" for s in statuses if s.answered_from_cache]
    if cached:
        table.caption += "\nanswered by the result cache, never run: " + "; ".join(cached)
    return table


def _count(value: float) -> str:
    return "?" if value != value else f"{int(value):,}"  # NaN: the server cannot tell


def _age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def run_status(url: str, models: Sequence[str], *, as_json: bool, interval_s: float) -> int:
    """Print one JSON snapshot, or refresh a table in place until interrupted."""
    from rich.console import Console
    from rich.live import Live

    client = connect_sync(url, socket_timeout=5)
    try:
        if as_json:
            print(to_json(snapshot(client, models)), flush=True)
            return 0
        console = Console()
        # Ctrl-C or SIGTERM ends the view after the refresh in progress: a flag, not an
        # exception that could land inside a Redis call or a render.
        stop = threading.Event()
        previous = {sig: signal.signal(sig, lambda *_: stop.set())
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            with Live(render_table(snapshot(client, models), url), console=console,
                      auto_refresh=False) as live:
                while not stop.wait(interval_s):
                    live.update(render_table(snapshot(client, models), url), refresh=True)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0
    finally:
        client.close()
