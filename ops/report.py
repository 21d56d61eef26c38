"""`agentfleet report --since 24h`: SLA and KPI figures per model and tenant, as text or HTML.

The figures come from the per-minute aggregates the workers keep in Redis (workers/kpi.py),
read with one pipeline of HGETALL per chunk of minutes, so a report needs no Prometheus.

Per model, lane (interactive, bulk) and tenant: tasks that ended, by status; success rate
(succeeded / ended, cancelled ones left out: a cancel is the producer's choice); latency
percentiles end to end, interpolated inside the histogram buckets as Prometheus'
histogram_quantile does; the share within the SLO bound (30 s); tokens; the busiest minute.
"""

from __future__ import annotations

import html
import io
import re
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec
import redis

from agentfleet.producer.connection import connect_sync
from agentfleet.schemas import keys
from agentfleet.workers.kpi import parse_field
from agentfleet.workers.metrics import LATENCY_BUCKETS_S

SLO_BOUND_S = 30.0
_SLO_INDEX = LATENCY_BUCKETS_S.index(SLO_BOUND_S)
_CHUNK = 2000  # HGETALLs per pipeline round trip
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """Seconds of "90s", "15m", "24h", "7d", "2w" (a bare number is seconds)."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration like 90s, 15m, 24h or 7d")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


class Row(msgspec.Struct, kw_only=True):
    """The aggregates of one model, lane and tenant over a window."""

    model: str
    lane: str
    tenant: str
    statuses: dict[str, int] = {}
    error_codes: dict[str, int] = {}
    buckets: list[int] = msgspec.field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    latency_sum_s: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0

    @property
    def ended(self) -> int:
        return sum(self.statuses.values())

    @property
    def succeeded(self) -> int:
        return self.statuses.get("succeeded", 0)

    @property
    def success_rate(self) -> float | None:
        counted = self.ended - self.statuses.get("cancelled", 0)
        return self.succeeded / counted if counted else None

    @property
    def timed(self) -> int:
        return sum(self.buckets)

    @property
    def mean_s(self) -> float | None:
        return self.latency_sum_s / self.timed if self.timed else None

    @property
    def within_slo(self) -> float | None:
        return sum(self.buckets[:_SLO_INDEX + 1]) / self.timed if self.timed else None

    def quantile(self, q: float) -> float | None:
        return bucket_quantile(q, self.buckets)

    def add(self, other: Row) -> None:
        for status, n in other.statuses.items():
            self.statuses[status] = self.statuses.get(status, 0) + n
        for code, n in other.error_codes.items():
            self.error_codes[code] = self.error_codes.get(code, 0) + n
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets)]
        self.latency_sum_s += other.latency_sum_s
        self.prompt_tokens += other.prompt_tokens
        self.output_tokens += other.output_tokens

    def summary(self) -> dict:
        return {"model": self.model, "lane": self.lane, "tenant": self.tenant,
                "ended": self.ended, "statuses": self.statuses, "error_codes": self.error_codes,
                "success_rate": self.success_rate, "p50_s": self.quantile(0.5),
                "p90_s": self.quantile(0.9), "p99_s": self.quantile(0.99),
                "mean_s": self.mean_s, "within_slo": self.within_slo,
                "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens}


def bucket_quantile(q: float, buckets: Sequence[int]) -> float | None:
    """The q-quantile of counts per latency bucket, linear inside a bucket (0 below the first;
    the last bound for values above it, as histogram_quantile does)."""
    total = sum(buckets)
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(buckets):
        if n and seen + n >= rank:
            if i == len(LATENCY_BUCKETS_S):
                return LATENCY_BUCKETS_S[-1]
            low = LATENCY_BUCKETS_S[i - 1] if i else 0.0
            return low + (LATENCY_BUCKETS_S[i] - low) * (rank - seen) / n
        seen += n
    return LATENCY_BUCKETS_S[-1]


class Window(msgspec.Struct, kw_only=True):
    """Everything a report shows for one window."""

    since: float
    until: float
    rows: list[Row]
    per_minute: dict[str, list[tuple[int, int]]]  # model -> [(minute, tasks ended)]

    def model_totals(self) -> list[Row]:
        totals: dict[tuple[str, str], Row] = {}
        for row in self.rows:
            total = totals.get((row.model, row.lane))
            if total is None:
                total = totals[(row.model, row.lane)] = Row(model=row.model, lane=row.lane,
                                                            tenant="(all)")
            total.add(row)
        return [totals[k] for k in sorted(totals)]

    def busiest_minute(self, model: str) -> tuple[int, int] | None:
        series = self.per_minute.get(model) or []
        return max(series, key=lambda mn: mn[1]) if series else None


def load_window(client: redis.Redis, models: Sequence[str], since_s: float,
                now: float | None = None) -> Window:
    """The aggregates of the last `since_s` seconds (whole minutes, the current one included)."""
    now = time.time() if now is None else now
    first = int((now - since_s) // 60) * 60
    minutes = list(range(first, int(now // 60) * 60 + 60, 60))
    wanted = [(model, minute) for model in models for minute in minutes]
    hashes: list[dict] = []
    for start in range(0, len(wanted), _CHUNK):
        with client.pipeline(transaction=False) as pipe:
            for model, minute in wanted[start:start + _CHUNK]:
                pipe.hgetall(keys.kpi_key(model, minute))
            hashes.extend(pipe.execute())
    rows: dict[tuple[str, str, str], Row] = {}
    per_minute: dict[str, list[tuple[int, int]]] = {}
    for (model, minute), fields in zip(wanted, hashes):
        if not fields:
            continue
        ended = 0
        for raw_field, raw_value in fields.items():
            parsed = parse_field(raw_field.decode(errors="replace"))
            if parsed is None:
                continue
            kind, detail, lane, tenant = parsed
            row = rows.get((model, lane, tenant))
            if row is None:
                row = rows[(model, lane, tenant)] = Row(model=model, lane=lane, tenant=tenant)
            value = float(raw_value)
            if kind == "s":
                row.statuses[detail] = row.statuses.get(detail, 0) + int(value)
                ended += int(value)
            elif kind == "e":
                row.error_codes[detail] = row.error_codes.get(detail, 0) + int(value)
            elif kind == "b" and detail.isdigit() and int(detail) < len(row.buckets):
                row.buckets[int(detail)] += int(value)
            elif kind == "l":
                row.latency_sum_s += value
            elif kind == "p":
                row.prompt_tokens += int(value)
            elif kind == "o":
                row.output_tokens += int(value)
        per_minute.setdefault(model, []).append((minute, ended))
    return Window(since=first, until=now, rows=[rows[k] for k in sorted(rows)],
                  per_minute=per_minute)


# ---- rendering ---------------------------------------------------------------------------

_COLUMNS = ("lane", "tenant", "ended", "succeeded", "failed", "expired", "cancelled",
            "dead", "success", "p50", "p90", "p99", "<=30s", "mean", "tokens in/out")


def _cells(row: Row) -> list[str]:
    st = row.statuses
    return [row.lane, row.tenant, f"{row.ended:,}", f"{row.succeeded:,}",
            f"{st.get('failed', 0):,}", f"{st.get('expired', 0):,}",
            f"{st.get('cancelled', 0):,}", f"{st.get('dead_lettered', 0):,}",
            _pct(row.success_rate), _secs(row.quantile(0.5)), _secs(row.quantile(0.9)),
            _secs(row.quantile(0.99)), _pct(row.within_slo), _secs(row.mean_s),
            f"{row.prompt_tokens:,}/{row.output_tokens:,}"]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


def _secs(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(epoch))


def render_text(window: Window, models: Sequence[str]) -> str:
    """The report as text tables (rich), one per model."""
    from rich.console import Console
    from rich.table import Table

    console = Console(record=True, width=170, force_terminal=False, file=io.StringIO())
    console.print(f"agentfleet report: {_when(window.since)} to {_when(window.until)}; "
                  f"SLO: {SLO_BOUND_S:.0f} s end to end; success excludes cancelled tasks")
    totals = {(t.model, t.lane): t for t in window.model_totals()}
    for model in models:
        rows = [r for r in window.rows if r.model == model]
        if not rows:
            console.print(f"\n{model}: no finished tasks in this window")
            continue
        table = Table(title=model, title_justify="left")
        for column in _COLUMNS:
            table.add_column(column, justify="left" if column in ("lane", "tenant") else "right")
        for row in rows:
            table.add_row(*_cells(row))
        for lane in ("interactive", "bulk"):
            if (model, lane) in totals:
                table.add_row(*_cells(totals[(model, lane)]), style="bold")
        console.print()
        console.print(table)
        codes: dict[str, int] = {}
        for row in rows:
            for code, n in row.error_codes.items():
                codes[code] = codes.get(code, 0) + n
        if codes:
            console.print("errors: " + ", ".join(f"{c} {n:,}" for c, n in
                                                 sorted(codes.items(), key=lambda x: -x[1])))
        busiest = window.busiest_minute(model)
        if busiest:
            console.print(f"busiest minute: {_when(busiest[0])}, {busiest[1]:,} tasks "
                          f"({busiest[1] / 60:.1f}/s)")
    return console.export_text()


def render_html(window: Window, models: Sequence[str]) -> str:
    """The report as one self-contained HTML page: inline CSS and SVG, nothing fetched."""
    esc = html.escape
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>agentfleet report {esc(_when(window.until))}</title><style>",
        "body{font:14px system-ui,sans-serif;margin:2em;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em}"
        "th,td{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:right}"
        "th:nth-child(-n+2),td:nth-child(-n+2){text-align:left}"
        "tr.total td{font-weight:bold;border-top:2px solid #999}"
        ".bad{color:#b00}.note{color:#666}svg{background:#f7f7f7}",
        "</style></head><body>",
        "<h1>agentfleet report</h1>",
        f"<p>{esc(_when(window.since))} to {esc(_when(window.until))}. SLO: "
        f"{SLO_BOUND_S:.0f} s end to end. Success rate leaves cancelled tasks out.</p>",
    ]
    totals = {(t.model, t.lane): t for t in window.model_totals()}
    for model in models:
        parts.append(f"<h2>{esc(model)}</h2>")
        rows = [r for r in window.rows if r.model == model]
        if not rows:
            parts.append("<p class=note>No finished tasks in this window.</p>")
            continue
        parts.append(_sparkline(window.per_minute.get(model, []), window))
        parts.append("<table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in _COLUMNS) + "</tr>")
        for row in rows:
            parts.append(_html_row(row, ""))
        for lane in ("interactive", "bulk"):
            if (model, lane) in totals:
                parts.append(_html_row(totals[(model, lane)], "total"))
        parts.append("</table>")
        codes: dict[str, int] = {}
        for row in rows:
            for code, n in row.error_codes.items():
                codes[code] = codes.get(code, 0) + n
        if codes:
            parts.append("<p class=bad>Errors: " + ", ".join(
                f"{esc(c)} {n:,}" for c, n in sorted(codes.items(), key=lambda x: -x[1]))
                + "</p>")
    parts.append(f"<p class=note>Generated {esc(_when(time.time()))} by agentfleet report "
                 "from per-minute aggregates in Redis.</p></body></html>")
    return "\n".join(parts)


def _html_row(row: Row, css: str) -> str:
    cells = "".join(f"<td>{html.escape(c)}</td>" for c in _cells(row))
    return f"<tr class={css}>{cells}</tr>" if css else f"<tr>{cells}</tr>"


def _sparkline(series: list[tuple[int, int]], window: Window, width: int = 720,
               height: int = 60) -> str:
    """Tasks ended per minute over the window, as an inline SVG bar chart."""
    if not series:
        return ""
    span = max(window.until - window.since, 60.0)
    peak = max(n for _, n in series) or 1
    bar = max(width * 60 / span, 1.0)
    rects = "".join(
        f'<rect x="{(minute - window.since) / span * width:.1f}" '
        f'y="{height - n / peak * height:.1f}" width="{bar:.1f}" '
        f'height="{n / peak * height:.1f}" fill="#4a7"/>'
        for minute, n in series)
    return (f'<svg width="{width}" height="{height}" role="img" aria-label="tasks per minute">'
            f"<title>tasks per minute, peak {peak:,}</title>{rects}</svg>")


def run_report(url: str, models: Sequence[str], *, since: str,
               html_path: Path | None = None) -> int:
    """Print the report of the last `since` (or write it as HTML to `html_path`)."""
    from agentfleet.schemas.errors import AgentFleetError

    try:
        since_s = parse_duration(since)
    except ValueError as exc:
        raise AgentFleetError(f"--since: {exc}") from exc
    client = connect_sync(url)
    try:
        window = load_window(client, models, since_s)
    finally:
        client.close()
    if html_path is not None:
        html_path.write_text(render_html(window, models))
        print(f"report written to {html_path}")
    else:
        print(render_text(window, models), end="")
    return 0
