"""Plain SVG charts for the report and the console: time series as lines or stacked bars.

No plotting library: a chart is a few hundred lines of markup, written straight from the
numbers.  Colours are CSS classes (`c0` .. `c7`, `axis`, `grid`, `label`), so the page's
stylesheet decides them: `CHART_CSS` has a light palette, a dark one under
`prefers-color-scheme: dark`, and black-on-white for print.  The palette is the Okabe-Ito
set, told apart by people with the common colour-vision deficiencies; lines also differ in
dash pattern, so a greyscale print still tells them apart.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Callable, Sequence

# Okabe-Ito; on a dark background the same hues, lighter.
CHART_CSS = """
svg.chart{width:100%;height:auto;display:block;margin:.3em 0 1em}
svg.chart text{font:11px system-ui,sans-serif;fill:var(--fg)}
svg.chart .axis{stroke:var(--muted);stroke-width:1}
svg.chart .grid{stroke:var(--grid);stroke-width:1}
svg.chart .label{fill:var(--muted)}
svg.chart .title{font-weight:600}
svg.chart polyline{fill:none;stroke-width:1.6;stroke-linejoin:round}
svg.chart .d1{stroke-dasharray:5 3}svg.chart .d2{stroke-dasharray:2 2}
svg.chart .d3{stroke-dasharray:8 3 2 3}
:root{--c0:#0072b2;--c1:#d55e00;--c2:#009e73;--c3:#cc79a7;--c4:#e69f00;--c5:#56b4e9;
--c6:#7f7f7f;--c7:#f0e442;--fg:#1d1d1f;--muted:#666;--grid:#e4e4e4;--bg:#fff}
@media (prefers-color-scheme:dark){:root{--c0:#5fb3f0;--c1:#ff8a4c;--c2:#3fd0a0;
--c3:#e7a3cd;--c4:#ffc23d;--c5:#9ad5f5;--c6:#b0b0b0;--c7:#f5ec83;--fg:#e8e8e8;
--muted:#a0a0a0;--grid:#3a3a3a;--bg:#161618}}
@media print{:root{--fg:#000;--muted:#444;--grid:#ccc;--bg:#fff;--c0:#0072b2;--c1:#d55e00;
--c2:#009e73;--c3:#cc79a7;--c4:#e69f00;--c5:#56b4e9;--c6:#555;--c7:#b8a800}}
""" + "".join(f"svg.chart .s{i}{{stroke:var(--c{i})}}svg.chart .f{i}{{fill:var(--c{i})}}"
              for i in range(8))

PALETTE_SIZE = 8
_LEFT, _RIGHT, _TOP, _BOTTOM = 60, 12, 26, 24  # margins, px
_LEGEND_ROW = 16


class Line:
    """One series: values at the chart's times (None: no value there, the line breaks)."""

    __slots__ = ("name", "values", "style")

    def __init__(self, name: str, values: Sequence[float | None], style: int = 0):
        self.name = name
        self.values = values
        self.style = style


def _fmt_time(epoch: float, span_s: float) -> str:
    t = time.gmtime(epoch)
    if span_s <= 2 * 86400:
        return time.strftime("%H:%M", t)
    return time.strftime("%m-%d %H:%M", t) if span_s <= 8 * 86400 else time.strftime("%m-%d", t)


def _nice_step(span: float, ticks: int) -> float:
    raw = span / max(ticks, 1)
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _time_ticks(t0: float, t1: float) -> list[float]:
    span = max(t1 - t0, 60.0)
    for step in (300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800):
        if span / step <= 8:
            break
    first = math.ceil(t0 / step) * step
    return [t for t in range(int(first), int(t1) + 1, int(step))]


def fmt_value(value: float, unit: str) -> str:
    """A tick or tooltip value with its unit: seconds as ms/s/min, counts with k/M."""
    if unit == "s":
        if value == 0:
            return "0"
        if value < 1:
            return f"{value * 1000:.3g} ms"
        if value < 120:
            return f"{value:.3g} s"
        return f"{value / 60:.3g} min"
    if abs(value) >= 1e6:
        return f"{value / 1e6:.3g}M"
    if abs(value) >= 1e4:
        return f"{value / 1e3:.3g}k"
    return f"{value:,.0f}" if value == int(value) else f"{value:.3g}"


def _frame(title: str, width: int, height: int, legend: list[tuple[str, int, str]]) -> list[str]:
    rows = math.ceil(len(legend) / 3) if legend else 0
    total_h = height + rows * _LEGEND_ROW
    esc = html.escape
    parts = [f'<svg class="chart" viewBox="0 0 {width} {total_h}" role="img" '
             f'aria-label="{esc(title)}" xmlns="http://www.w3.org/2000/svg">'
             f"<title>{esc(title)}</title>"
             f'<text class="title" x="{_LEFT}" y="15">{esc(title)}</text>']
    for i, (name, style, kind) in enumerate(legend):
        x = _LEFT + (i % 3) * ((width - _LEFT - _RIGHT) // 3)
        y = height + (i // 3) * _LEGEND_ROW
        if kind == "bar":
            parts.append(f'<rect class="f{style % PALETTE_SIZE}" x="{x}" y="{y}" width="14" '
                         f'height="9"/>')
        else:
            parts.append(f'<line class="s{style % PALETTE_SIZE} d{style // 2 % 4}" x1="{x}" '
                         f'x2="{x + 18}" y1="{y + 5}" y2="{y + 5}" stroke-width="2"/>')
        parts.append(f'<text x="{x + 22}" y="{y + 9}">{esc(name)}</text>')
    return parts


def _axes(parts: list[str], t0: float, t1: float, width: int, height: int,
          y_ticks: list[tuple[float, str]]) -> None:
    x0, x1, y0, y1 = _LEFT, width - _RIGHT, height - _BOTTOM, _TOP
    span = max(t1 - t0, 1.0)
    for y, label in y_ticks:
        parts.append(f'<line class="grid" x1="{x0}" x2="{x1}" y1="{y:.1f}" y2="{y:.1f}"/>'
                     f'<text class="label" x="{x0 - 6}" y="{y + 4:.1f}" '
                     f'text-anchor="end">{html.escape(label)}</text>')
    parts.append(f'<line class="axis" x1="{x0}" x2="{x1}" y1="{y0}" y2="{y0}"/>'
                 f'<line class="axis" x1="{x0}" x2="{x0}" y1="{y0}" y2="{y1}"/>')
    for t in _time_ticks(t0, t1):
        x = x0 + (t - t0) / span * (x1 - x0)
        parts.append(f'<line class="axis" x1="{x:.1f}" x2="{x:.1f}" y1="{y0}" y2="{y0 + 4}"/>'
                     f'<text class="label" x="{x:.1f}" y="{y0 + 16}" '
                     f'text-anchor="middle">{_fmt_time(t, span)}</text>')


def line_chart(title: str, times: Sequence[float], lines: Sequence[Line], *, unit: str = "",
               log: bool = False, t0: float | None = None, t1: float | None = None,
               width: int = 620, height: int = 200) -> str:
    """Lines over time; `log` for latencies spanning milliseconds to minutes."""
    t0 = times[0] if t0 is None and times else (t0 or 0.0)
    t1 = times[-1] if t1 is None and times else (t1 or t0 + 60)
    t1 = max(t1, t0 + 60)
    values = [v for line in lines for v in line.values if v is not None and (v > 0 or not log)]
    parts = _frame(title, width, height, [(ln.name, ln.style, "line") for ln in lines])
    if not values:
        parts.append(f'<text class="label" x="{width / 2}" y="{height / 2}" '
                     f'text-anchor="middle">no data in this window</text></svg>')
        return "".join(parts)
    x0, x1, y0, y1 = _LEFT, width - _RIGHT, height - _BOTTOM, _TOP
    if log:
        lo = 10 ** math.floor(math.log10(min(values)))
        hi = 10 ** math.ceil(math.log10(max(values)))
        hi = max(hi, lo * 10)
        llo, lhi = math.log10(lo), math.log10(hi)

        def scale(v: float) -> float:
            return y0 - (math.log10(max(v, lo)) - llo) / (lhi - llo) * (y0 - y1)

        step = max(1, math.ceil((lhi - llo) / 5))
        ticks = [(scale(10 ** e), fmt_value(10 ** e, unit))
                 for e in range(int(llo), int(lhi) + 1, step)]
    else:
        hi = max(values) or 1.0
        step = _nice_step(hi, 4)
        hi = math.ceil(hi / step) * step

        def scale(v: float) -> float:
            return y0 - v / hi * (y0 - y1)

        ticks = [(scale(i * step), fmt_value(i * step, unit))
                 for i in range(int(round(hi / step)) + 1)]
    _axes(parts, t0, t1, width, height, ticks)
    span = t1 - t0
    xs = [x0 + (t - t0) / span * (x1 - x0) for t in times]
    for line in lines:
        cls = f"s{line.style % PALETTE_SIZE} d{line.style // 2 % 4}"
        run: list[str] = []
        for x, v in zip(xs, line.values):
            if v is None or (log and v <= 0):
                _flush_run(parts, run, cls)
                continue
            run.append(f"{x:.1f},{scale(v):.1f}")
        _flush_run(parts, run, cls)
    parts.append("</svg>")
    return "".join(parts)


def _flush_run(parts: list[str], run: list[str], cls: str) -> None:
    if len(run) == 1:  # a lone point: a dot, or it would not show
        x, y = run[0].split(",")
        parts.append(f'<circle class="{cls.split()[0]}" cx="{x}" cy="{y}" r="1.5" '
                     f'fill="none" stroke-width="2"/>')
    elif run:
        parts.append(f'<polyline class="{cls}" points="{" ".join(run)}"/>')
    run.clear()


def bar_chart(title: str, times: Sequence[float], stacks: Sequence[Line], *, unit: str = "",
              slot_s: float = 60.0, t0: float | None = None, t1: float | None = None,
              width: int = 620, height: int = 200) -> str:
    """Stacked bars, one per time slot (`slot_s` wide), one colour per series."""
    t0 = times[0] if t0 is None and times else (t0 or 0.0)
    t1 = (times[-1] + slot_s) if t1 is None and times else (t1 or t0 + slot_s)
    t1 = max(t1, t0 + 60)
    totals = [sum(s.values[i] or 0 for s in stacks) for i in range(len(times))]
    parts = _frame(title, width, height, [(s.name, s.style, "bar") for s in stacks])
    if not any(totals):
        parts.append(f'<text class="label" x="{width / 2}" y="{height / 2}" '
                     f'text-anchor="middle">none in this window</text></svg>')
        return "".join(parts)
    x0, x1, y0, y1 = _LEFT, width - _RIGHT, height - _BOTTOM, _TOP
    step = _nice_step(max(totals), 3)
    hi = math.ceil(max(totals) / step) * step
    ticks = [(y0 - i * step / hi * (y0 - y1), fmt_value(i * step, unit))
             for i in range(int(round(hi / step)) + 1)]
    _axes(parts, t0, t1, width, height, ticks)
    span = t1 - t0
    bar_w = max((x1 - x0) * slot_s / span, 1.0)
    for i, t in enumerate(times):
        if not totals[i]:
            continue
        x = x0 + (t - t0) / span * (x1 - x0)
        base = y0
        for s in stacks:
            v = s.values[i] or 0
            if not v:
                continue
            h = v / hi * (y0 - y1)
            base -= h
            parts.append(f'<rect class="f{s.style % PALETTE_SIZE}" x="{x:.1f}" y="{base:.1f}" '
                         f'width="{bar_w:.1f}" height="{h:.1f}"/>')
    parts.append("</svg>")
    return "".join(parts)


def timeline(title: str, rows: Sequence[tuple[str, int, list[tuple[float, float, int, str]]]],
             *, t0: float, t1: float, width: int = 900,
             link: Callable[[str], str] | None = None) -> str:
    """A Gantt-like chart: one row per item, indented by depth, with (start, end, style,
    label) segments; `link(name)` makes a row's name a link."""
    row_h = 22
    height = _TOP + len(rows) * row_h + _BOTTOM
    left = 220
    esc = html.escape
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{esc(title)}" xmlns="http://www.w3.org/2000/svg">'
             f"<title>{esc(title)}</title>"
             f'<text class="title" x="4" y="15">{esc(title)}</text>']
    span = max(t1 - t0, 1e-3)
    x1 = width - _RIGHT
    y_axis = _TOP + len(rows) * row_h + 4
    for i in range(6):
        x = left + i / 5 * (x1 - left)
        parts.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{_TOP}" '
                     f'y2="{y_axis}"/><text class="label" x="{x:.1f}" y="{y_axis + 14}" '
                     f'text-anchor="{"end" if i == 5 else "middle"}">'
                     f'+{fmt_value(span * i / 5, "s")}</text>')
    for r, (name, depth, segments) in enumerate(rows):
        y = _TOP + r * row_h
        label = esc(name if len(name) <= 28 else "…" + name[-27:])
        text = (f'<text x="{4 + depth * 12}" y="{y + 15}">'
                f'{"└ " if depth else ""}{label}</text>')
        if link is not None:
            text = f'<a href="{esc(link(name))}">{text}</a>'
        parts.append(text)
        for start, end, style, seg_label in segments:
            xs = left + (start - t0) / span * (x1 - left)
            xe = max(left + (end - t0) / span * (x1 - left), xs + 1.5)
            parts.append(f'<rect class="f{style % PALETTE_SIZE}" x="{xs:.1f}" y="{y + 4}" '
                         f'width="{xe - xs:.1f}" height="{row_h - 8}">'
                         f"<title>{esc(seg_label)}</title></rect>")
    parts.append("</svg>")
    return "".join(parts)
