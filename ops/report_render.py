"""A `Report` (ops/report.py) as text for a terminal, or as one self-contained HTML page.

The page fetches nothing: CSS and SVG charts (ops/svg.py) inline, no script, so it can be
mailed or archived as one file.  Light and dark by the reader's `prefers-color-scheme`,
black on white in print; numbers never wrap inside their cells (`white-space: nowrap`), and
wide tables scroll inside their own box rather than widening the page.
"""

from __future__ import annotations

import html
import io
import time
from collections.abc import Callable

from agentfleet.ops.report import (
    ALL,
    OTHER,
    BreakdownRow,
    Point,
    Report,
    SloResult,
)
from agentfleet.ops.svg import CHART_CSS, Line, bar_chart, line_chart

_SLO_NAMES = {"availability": "availability", "ttft": "time to first token",
              "end_to_end": "end to end", "within_window": "within the job's window"}
_SPARK = "▁▂▃▄▅▆▇█"
TOP_CODES_PLOTTED = 5


def pct(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value * 100:.{digits}f}%"


def secs(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.1f} ms"
    return f"{value:.2f} s" if value < 120 else f"{value / 60:.1f} min"


def num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(epoch))


def span_text(seconds: float) -> str:
    if seconds >= 86400 and seconds % 86400 < 60:
        return f"{seconds / 86400:.0f} d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h".replace(".0 h", " h")
    return f"{seconds / 60:.0f} min"


def _objective(s: SloResult) -> str:
    target = pct(s.objective, 1 if s.objective * 1000 % 10 else 0)
    if s.bound_s is not None:
        return f"{target} within {secs(s.bound_s)}"
    return target


def _budget(s: SloResult) -> str:
    if s.budget_left is None:
        return "-"
    if s.budget_left == float("-inf"):
        return "spent"
    return pct(s.budget_left, 0)


def _verdict(s: SloResult) -> str:
    return "-" if s.met is None else ("met" if s.met else "missed")


def _delta(now: float | None, before: float | None, *, ratio: bool = True) -> str:
    if now is None or before is None:
        return "-"
    if ratio:
        if not before:
            return "-"
        return f"{(now / before - 1) * 100:+.1f}%"
    return f"{(now - before) * 100:+.2f} pt"


# Column title, cell, shown-when (None: always): the breakdown table
_COLUMNS: list[tuple[str, Callable[[BreakdownRow], str], str | None]] = [
    ("version", lambda r: r.version or "-", "versions"),
    ("lane", lambda r: r.lane, None),
    ("tenant", lambda r: r.tenant or "-", "tenants"),
    ("ended", lambda r: num(r.ended), None),
    ("succeeded", lambda r: num(r.succeeded), None),
    ("failed", lambda r: num(r.failed), None),
    ("expired", lambda r: num(r.expired), None),
    ("cancelled", lambda r: num(r.cancelled), None),
    ("dead", lambda r: num(r.dead_lettered), None),
    ("success", lambda r: pct(r.success_rate), None),
    ("p50", lambda r: secs(r.p50_s), None),
    ("p99", lambda r: secs(r.p99_s), None),
    ("TTFT p50", lambda r: secs(r.ttft_p50_s), None),
    ("TTFT p99", lambda r: secs(r.ttft_p99_s), None),
    ("wait p50", lambda r: secs(r.wait_p50_s), None),
    ("in SLO", lambda r: pct(r.within_slo), None),
    ("tokens in", lambda r: num(r.prompt_tokens), None),
    ("tokens out", lambda r: num(r.output_tokens), None),
]


def _columns(report: Report) -> list[tuple[str, Callable[[BreakdownRow], str]]]:
    shown = {"versions": report.has_versions, "tenants": report.has_tenants}
    return [(title, cell) for title, cell, when_ in _COLUMNS if when_ is None or shown[when_]]


def _row_label(r: BreakdownRow) -> bool:
    return r.total


# ---- text ---------------------------------------------------------------------------------

def sparkline(values: list[float | None], width: int = 72) -> str:
    """Unicode blocks of `values` squeezed to `width` characters (max per cell)."""
    if not values:
        return ""
    per = max(1, -(-len(values) // width))
    cells = []
    for i in range(0, len(values), per):
        chunk = [v for v in values[i:i + per] if v is not None]
        cells.append(max(chunk) if chunk else None)
    top = max((v for v in cells if v is not None), default=0) or 1
    return "".join(" " if v is None else _SPARK[min(int(v / top * 7.999), 7)] for v in cells)


def render_text(report: Report) -> str:
    """The report as text tables (rich)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(record=True, width=180, force_terminal=False, file=io.StringIO())
    span = report.until - report.since
    console.print(f"agentfleet report: {when(report.since)} to {when(report.until)} "
                  f"({span_text(span)})" + (f"; tenants: {', '.join(report.tenants)}"
                                             if report.tenants else ""))
    table = Table(title="Service level objectives", title_justify="left")
    for c in ("model", "lane", "objective", "target", "attainment", "budget left", ""):
        table.add_column(c, justify="left" if c in ("model", "lane", "objective") else "right")
    for s in report.slos:
        table.add_row(s.model, s.lane, _SLO_NAMES[s.name], _objective(s), pct(s.attainment, 3),
                      _budget(s), _verdict(s))
    if not report.slos:
        console.print("\nNo finished tasks in this window.")
    else:
        console.print()
        console.print(table)
    if report.kpis:
        table = Table(title="Key figures", title_justify="left")
        for c in ("model", "tasks", "tokens in", "tokens out", "tokens/task", "engine-hours",
                  "busy", "out tokens/engine-h", "cost", "cost/1M out"):
            table.add_column(c, justify="left" if c == "model" else "right")
        for k in report.kpis:
            table.add_row(k.model, num(k.tasks), num(k.prompt_tokens), num(k.output_tokens),
                          num(k.tokens_per_task, 1), num(k.engine_hours, 2), pct(k.busy_share, 1),
                          num(k.output_tokens_per_engine_hour), num(k.cost, 2),
                          num(k.cost_per_million_output_tokens, 2))
        console.print()
        console.print(table)
    columns = _columns(report)
    for model in report.models:
        rows = [r for r in report.breakdown if r.model == model]
        console.print()
        if not rows:
            console.print(f"{model}: no finished tasks in this window")
            continue
        points = report.series.get(model, [])
        if points:
            console.print(f"{model}  tasks per {span_text(report.resolution_s)}  "
                          + sparkline([p.interactive + p.bulk for p in points]))
            console.print(f"{' ' * len(model)}  p99 end to end    "
                          + sparkline([p.e2e_p99_s for p in points]))
        ident = [c for c in columns if c[0] in ("version", "lane", "tenant")]
        split = next(i for i, c in enumerate(columns) if c[0] == "p50")
        # Two tables, so that each fits a terminal: counts, then latency and tokens.
        for part, cols in (("tasks", columns[:split]),
                           ("latency and tokens", ident + columns[split:])):
            table = Table(title=f"{model}: {part}", title_justify="left")
            for title, _ in cols:
                table.add_column(title, justify="left" if title in ("version", "lane", "tenant")
                                 else "right", no_wrap=True)
            for r in rows:
                table.add_row(*[cell(r) if not (r.total and title in ("version", "tenant"))
                                else ALL for title, cell in cols],
                              style="bold" if r.total else None)
            console.print(table)
    if report.top_errors:
        console.print("\nTop error codes:")
        for e in report.top_errors:
            console.print(f"  {e.model}: {e.code} {e.count:,} ({pct(e.share)})"
                          + (f", e.g. agentfleet trace {e.example_correlation_id}"
                             if e.example_correlation_id else ""))
    if report.worst:
        console.print(f"\nWorst {span_text(report.resolution_s)} slots (failed, expired, "
                      f"dead-lettered, or over {secs(report.policy.e2e_s)}):")
        for w in report.worst:
            codes = ", ".join(f"{c} {n:,}" for c, n in sorted(w.errors.items(),
                                                                key=lambda x: -x[1])[:3])
            console.print(f"  {when(w.at)}  {w.model}: {w.bad:,} of {w.ended:,} bad, p99 "
                          f"{secs(w.p99_s)}" + (f"; {codes}" if codes else ""))
    if report.previous:
        table = Table(title=f"Against the previous {span_text(span)}", title_justify="left")
        for c in ("model", "lane", "tasks", "change", "success", "change", "p99", "change",
                  "TTFT p99", "change"):
            table.add_column(c, justify="left" if c in ("model", "lane") else "right")
        for c in report.previous:
            table.add_row(c.model, c.lane, num(c.ended), _delta(c.ended, c.ended_before),
                          pct(c.success_rate), _delta(c.success_rate, c.success_rate_before,
                                                      ratio=False),
                          secs(c.p99_s), _delta(c.p99_s, c.p99_s_before), secs(c.ttft_p99_s),
                          _delta(c.ttft_p99_s, c.ttft_p99_s_before))
        console.print()
        console.print(table)
    return console.export_text()


# ---- HTML ---------------------------------------------------------------------------------

PAGE_CSS = CHART_CSS + """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:0;color:var(--fg);
background:var(--bg)}
main{max-width:1100px;margin:0 auto;padding:1.2em 1.5em 3em}
h1{font-size:1.6em;margin:.2em 0}h2{font-size:1.25em;margin:1.6em 0 .4em;
border-bottom:1px solid var(--grid);padding-bottom:.2em}h3{font-size:1.05em;margin:1.2em 0 .3em}
.meta,.note{color:var(--muted)}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:.4em 0 1.2em;font-variant-numeric:tabular-nums}
th,td{padding:.25em .6em;border-bottom:1px solid var(--grid);text-align:right;
white-space:nowrap}
th{font-weight:600;white-space:normal;vertical-align:bottom;max-width:7em}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,460px),1fr));
gap:0 1.5em}
th.l,td.l{text-align:left}
tr.total td{font-weight:600;border-top:2px solid var(--muted)}
.met{color:var(--c2);font-weight:600}.missed{color:var(--c1);font-weight:600}
.cards{display:flex;flex-wrap:wrap;gap:.8em;margin:.6em 0}
.card{border:1px solid var(--grid);border-radius:6px;padding:.5em .8em;min-width:9em}
.card b{display:block;font-size:1.35em}
code{font:12px ui-monospace,monospace}
a{color:var(--c0)}
@media print{main{max-width:none;padding:0}.scroll{overflow:visible}
section.model{break-inside:avoid-page}}
"""


def _table(headers: list[str], rows: list[list[str]], *, left: int = 1,
           classes: list[str] | None = None) -> str:
    esc = html.escape
    out = ["<div class=scroll><table><thead><tr>"]
    out += [f"<th class=l>{esc(h)}</th>" if i < left else f"<th>{esc(h)}</th>"
            for i, h in enumerate(headers)]
    out.append("</tr></thead><tbody>")
    for j, cells in enumerate(rows):
        css = classes[j] if classes else ""
        out.append(f"<tr class={css}>" if css else "<tr>")
        for i, cell in enumerate(cells):
            out.append(f"<td class=l>{cell}</td>" if i < left else f"<td>{cell}</td>")
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _plots(report: Report, model: str) -> str:
    points: list[Point] = report.series.get(model, [])
    if not points:
        return ""
    times = [p.at for p in points]
    t0, t1 = report.since, report.until
    res = report.resolution_s
    per = f"per {span_text(res)}"
    parts = [line_chart(f"Tasks ended {per}", times, [
        Line("interactive", [p.interactive for p in points], 0),
        Line("bulk", [p.bulk for p in points], 3)], t0=t0, t1=t1)]
    parts.append(line_chart(f"Tokens {per}", times, [
        Line("output", [p.output_tokens for p in points], 2),
        Line("prompt", [p.prompt_tokens for p in points], 5)], t0=t0, t1=t1))
    parts.append(line_chart("Latency of interactive tasks (log scale)", times, [
        Line("end to end p50", [p.e2e_p50_s for p in points], 0),
        Line("end to end p99", [p.e2e_p99_s for p in points], 1),
        Line("first token p50", [p.ttft_p50_s for p in points], 4),
        Line("first token p99", [p.ttft_p99_s for p in points], 3)],
        unit="s", log=True, t0=t0, t1=t1))
    totals: dict[str, int] = {}
    for p in points:
        for code, n in p.errors.items():
            totals[code] = totals.get(code, 0) + n
    codes = sorted(totals, key=lambda c: -totals[c])
    shown = codes[:TOP_CODES_PLOTTED]
    stacks = [Line(code, [p.errors.get(code, 0) for p in points], i + 1)
              for i, code in enumerate(shown)]
    if len(codes) > len(shown):
        rest = set(codes[len(shown):])
        stacks.append(Line("other codes", [sum(n for c, n in p.errors.items() if c in rest)
                                           for p in points], 6))
    parts.append(bar_chart(f"Errors {per}, by code", times, stacks, slot_s=res, t0=t0, t1=t1))
    if any(p.depth_interactive is not None or p.depth_bulk is not None for p in points):
        parts.append(line_chart("Queue depth (lag + pending, sampled once a minute)", times, [
            Line("interactive", [p.depth_interactive for p in points], 0),
            Line("bulk", [p.depth_bulk for p in points], 3)], t0=t0, t1=t1))
    parts.append(line_chart("Queue wait, both lanes (log scale)", times, [
        Line("p50", [p.wait_p50_s for p in points], 0),
        Line("p99", [p.wait_p99_s for p in points], 1)], unit="s", log=True, t0=t0, t1=t1))
    return "<div class=plots>" + "".join(parts) + "</div>"


def render_html(report: Report, *, trace_link: Callable[[str], str] | None = None,
                embedded: bool = False) -> str:
    """The report as one self-contained HTML page (or, `embedded`, its body for the console).

    `trace_link(correlation_id)` makes example correlation ids links (the console's trace
    page); without it they are plain text, and the page links nowhere outside itself.
    """
    esc = html.escape
    span = report.until - report.since
    title = f"agentfleet report {when(report.until)}"
    body: list[str] = [
        f"<h1>{esc('agentfleet report')}</h1>",
        f"<p class=meta>{esc(when(report.since))} to {esc(when(report.until))} "
        f"({esc(span_text(span))}); one point per {esc(span_text(report.resolution_s))}; "
        + (f"tenants: {esc(', '.join(report.tenants))}" if report.tenants else "all tenants")
        + f". Times in UTC. Generated {esc(when(report.generated_at))}.</p>",
    ]
    kpis = {k.model: k for k in report.kpis}
    total_tasks = sum(k.tasks for k in report.kpis)
    total_out = sum(k.output_tokens for k in report.kpis)
    met = sum(1 for s in report.slos if s.met)
    judged = sum(1 for s in report.slos if s.met is not None)
    cost = sum(k.cost or 0 for k in report.kpis) if report.price_per_gpu_hour is not None \
        else None
    cards = [("tasks ended", num(total_tasks)), ("output tokens", num(total_out)),
             ("SLOs met", f"{met} of {judged}")]
    errors = sum(e.count for e in report.top_errors)
    cards.append(("errors", num(errors)))
    if cost is not None:
        cards.append(("cost", num(cost, 2)))
    body.append("<div class=cards>" + "".join(
        f"<div class=card>{esc(label)}<b>{esc(value)}</b></div>" for label, value in cards)
        + "</div>")
    body.append("<section id=slos><h2>Service level objectives</h2>")
    if report.slos:
        rows = [[esc(s.model), esc(s.lane), esc(_SLO_NAMES[s.name]), esc(_objective(s)),
                 esc(pct(s.attainment, 3)), esc(num(s.valid)), esc(_budget(s)),
                 f"<span class={_verdict(s)}>{esc(_verdict(s))}</span>"]
                for s in report.slos]
        body.append(_table(["model", "lane", "objective", "target", "attainment", "tasks",
                            "error budget left", "verdict"], rows, left=3))
        body.append("<p class=note>Interactive tasks: availability is succeeded of ended "
                    "(cancelled left out); time to first token and end to end count from "
                    "enqueue. Bulk-job tasks: succeeded within their job's completion window. "
                    "Error budget left: 1 - bad / allowed bad.</p>")
    else:
        body.append("<p class=note>No finished tasks in this window.</p>")
    body.append("</section>")
    if report.kpis:
        rows = []
        for k in report.kpis:
            rows.append([esc(k.model), num(k.tasks), num(k.succeeded), num(k.prompt_tokens),
                         num(k.output_tokens), num(k.tokens_per_task, 1),
                         num(k.output_tokens_per_task, 1), num(k.engine_hours, 2),
                         pct(k.busy_share, 1), num(k.output_tokens_per_engine_hour),
                         secs(k.mean_engine_s), num(k.cost, 2),
                         num(k.cost_per_million_output_tokens, 2)])
        body.append("<section id=kpis><h2>Key figures</h2>")
        body.append(_table(["model", "tasks", "succeeded", "tokens in", "tokens out",
                            "tokens/task", "out/task", "engine-hours", "busy",
                            "out tokens/engine-hour", "engine/task", "cost", "cost/1M out"],
                           rows))
        price = report.price_per_gpu_hour
        body.append("<p class=note>Engine-hours: time each model's engine was up, summed over "
                    "workers (one engine per GPU); busy: share of it with a task in flight. "
                    + (f"Cost at {esc(num(price, 2))} per GPU-hour." if price is not None else
                       "Pass --price-per-gpu-hour for the cost.") + "</p></section>")
    if report.previous:
        rows = [[esc(c.model), esc(c.lane), num(c.ended), num(c.ended_before),
                 _delta(c.ended, c.ended_before), pct(c.success_rate),
                 pct(c.success_rate_before), _delta(c.success_rate, c.success_rate_before,
                                                    ratio=False),
                 secs(c.p99_s), secs(c.p99_s_before), _delta(c.p99_s, c.p99_s_before),
                 secs(c.ttft_p99_s), secs(c.ttft_p99_s_before),
                 _delta(c.output_tokens, c.output_tokens_before)]
                for c in report.previous]
        body.append(f"<section id=previous><h2>Against the previous {esc(span_text(span))}"
                    "</h2>")
        body.append(_table(["model", "lane", "tasks", "before", "change", "success", "before",
                            "change", "p99", "before", "change", "TTFT p99", "before",
                            "tokens out change"], rows, left=2))
        body.append("</section>")
    columns = _columns(report)
    for model in report.models:
        body.append(f"<section class=model id=\"model-{esc(model)}\"><h2>{esc(model)}</h2>")
        rows_of = [r for r in report.breakdown if r.model == model]
        if not rows_of:
            body.append("<p class=note>No finished tasks in this window.</p></section>")
            continue
        body.append(_plots(report, model))
        cells = []
        classes = []
        for r in rows_of:
            cells.append([esc(ALL if r.total and t in ("version", "tenant") else cell(r))
                          for t, cell in columns])
            classes.append("total" if r.total else "")
        left = sum(1 for t, _ in columns if t in ("version", "lane", "tenant"))
        body.append(f"<h3>By {esc(', '.join(t for t, _ in columns[:left]))}</h3>")
        body.append(_table([t for t, _ in columns], cells, left=left, classes=classes))
        if any(r.tenant == OTHER for r in rows_of):
            body.append("<p class=note>(other): the tenants past the busiest of each lane, "
                        "summed.</p>")
        body.append("</section>")
    body.append("<section id=errors><h2>Top error codes</h2>")
    if report.top_errors:
        rows = []
        for e in report.top_errors:
            corr = e.example_correlation_id
            example = "-" if not corr else (
                f"<a href=\"{esc(trace_link(corr))}\"><code>{esc(corr)}</code></a>"
                if trace_link else f"<code>{esc(corr)}</code>")
            rows.append([esc(e.model), esc(e.code), num(e.count), pct(e.share), example])
        body.append(_table(["model", "code", "tasks", "of ended", "example correlation id"],
                           rows, left=2))
        if not trace_link:
            body.append("<p class=note>See one: <code>agentfleet trace CORRELATION_ID</code>"
                        ".</p>")
    else:
        body.append("<p class=note>No errors in this window.</p>")
    body.append("</section><section id=worst>"
                f"<h2>Worst {esc(span_text(report.resolution_s))} slots</h2>")
    if report.worst:
        rows = [[esc(when(w.at)), esc(w.model), num(w.bad), num(w.ended),
                 pct(w.bad / w.ended if w.ended else None, 1), secs(w.p99_s),
                 esc(", ".join(f"{c} {n:,}" for c, n in sorted(w.errors.items(),
                                                               key=lambda x: -x[1])[:3]))]
                for w in report.worst]
        body.append(_table(["slot", "model", "bad", "ended", "bad share", "p99",
                            "top codes"], rows, left=2))
        body.append(f"<p class=note>Bad: failed, expired or dead-lettered, or an interactive "
                    f"task over {esc(secs(report.policy.e2e_s))} end to end.</p>")
    else:
        body.append("<p class=note>No slot had a bad task.</p>")
    body.append("</section>")
    if embedded:
        return "".join(body)
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            "<meta name=viewport content=\"width=device-width,initial-scale=1\">"
            "<meta name=color-scheme content=\"light dark\">"
            f"<title>{esc(title)}</title><style>{PAGE_CSS}</style></head><body><main>"
            + "".join(body)
            + "<p class=note>From the per-minute aggregates the workers keep in Redis "
              "(agentfleet report).</p></main></body></html>\n")
