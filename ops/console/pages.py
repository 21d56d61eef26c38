"""The console's pages as HTML strings: a layout, and one function per page, each from data
already read (ops/console/app.py reads it).  No template engine, no script, no build step:
every value goes through `html.escape`, numbers never wrap, wide tables scroll in their box.
"""

from __future__ import annotations

import datetime as dt
import html
import json
from collections.abc import Callable
from urllib.parse import quote, urlencode

import msgspec

from agentfleet.ops.exporter import QueueStats
from agentfleet.ops.report_render import PAGE_CSS, num, pct, secs
from agentfleet.ops.status import ModelStatus
from agentfleet.ops.svg import timeline
from agentfleet.producer.batch import BatchStatus
from agentfleet.schemas.errors import DecodeError
from agentfleet.schemas.wire import (
    ApiKeyRecord,
    DeadLetter,
    Enqueued,
    Finished,
    Result,
    Retried,
    Role,
    TraceEvent,
    decode_task,
)

esc = html.escape

CONSOLE_CSS = PAGE_CSS + """
header{display:flex;flex-wrap:wrap;align-items:center;gap:.4em 1.2em;padding:.6em 1.5em;
border-bottom:1px solid var(--grid)}
header .brand{font-weight:700}
header nav{display:flex;flex-wrap:wrap;gap:.2em 1em}
header nav a{text-decoration:none}header nav a.on{font-weight:700;text-decoration:underline}
header .who{margin-left:auto;color:var(--muted);display:flex;gap:.6em;align-items:center}
form.inline{display:inline;margin:0}
input,button,select{font:inherit;color:var(--fg);background:var(--bg);
border:1px solid var(--muted);border-radius:4px;padding:.2em .5em}
button{cursor:pointer}button.danger{border-color:var(--c1);color:var(--c1)}
.flash{border-left:4px solid var(--c2);padding:.3em .8em;margin:.8em 0}
.error{border-left:4px solid var(--c1);padding:.3em .8em;margin:.8em 0}
.bar{display:inline-block;width:10em;height:.8em;border:1px solid var(--muted);
vertical-align:middle;border-radius:2px;overflow:hidden}
.bar span{display:block;height:100%;background:var(--c2)}
pre{font:12px/1.4 ui-monospace,monospace;overflow-x:auto;border:1px solid var(--grid);
padding:.6em;border-radius:4px}
dl.kv{display:grid;grid-template-columns:max-content 1fr;gap:.2em 1em}dl.kv dt{color:var(--muted)}
dl.kv dd{margin:0;overflow-wrap:anywhere}
.pager{display:flex;gap:1em;margin:.5em 0}
.login{max-width:28em;margin:4em auto}
.login input{width:100%;box-sizing:border-box;margin:.4em 0}
"""

_NAV = (("models", "/", "Models and lanes"), ("batches", "/batches", "Batches"),
        ("dead", "/dead-letters", "Dead letters"), ("trace", "/trace", "Trace"),
        ("report", "/report", "Report"))


def when(epoch: float | None) -> str:
    if not epoch:
        return "-"
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def count(value: float) -> str:
    return "?" if value != value else f"{int(value):,}"  # NaN: the server cannot tell


def table(headers: list[str], rows: list[list[str]], *, left: int = 1,
          row_classes: list[str] | None = None) -> str:
    """Cells are HTML already (escape them first)."""
    out = ["<div class=scroll><table><thead><tr>"]
    out += [f"<th class=l>{esc(h)}</th>" if i < left else f"<th>{esc(h)}</th>"
            for i, h in enumerate(headers)]
    out.append("</tr></thead><tbody>")
    for j, cells in enumerate(rows):
        css = row_classes[j] if row_classes else ""
        out.append(f"<tr class={css}>" if css else "<tr>")
        out += [f"<td class=l>{c}</td>" if i < left else f"<td>{c}</td>"
                for i, c in enumerate(cells)]
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


class Layout:
    """Wraps page bodies in the console's frame; `url` makes links under the mount path."""

    def __init__(self, base: str):
        self.base = base.rstrip("/")

    def url(self, path: str, **query: str) -> str:
        q = {k: v for k, v in query.items() if v not in ("", None)}
        return self.base + path + ("?" + urlencode(q) if q else "")

    def page(self, title: str, body: str, *, active: str = "", who: ApiKeyRecord | None = None,
             csrf: str = "", status: int = 200) -> str:
        nav = "".join(f'<a href="{esc(self.url(path))}"'
                      f'{" class=on" if key == active else ""}>{esc(label)}</a>'
                      for key, path, label in _NAV) if who is not None else ""
        user = ""
        if who is not None:
            user = (f"<span class=who><span>tenant <b>{esc(who.tenant)}</b> "
                    f"({esc(who.role.value)})</span>"
                    f'<form class=inline method=post action="{esc(self.url("/logout"))}">'
                    f'<input type=hidden name=csrf value="{esc(csrf)}">'
                    f"<button>Log out</button></form></span>")
        return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
                "<meta name=viewport content=\"width=device-width,initial-scale=1\">"
                "<meta name=color-scheme content=\"light dark\">"
                f"<title>{esc(title)} · agentfleet console</title><style>{CONSOLE_CSS}</style>"
                f"</head><body><header><span class=brand>agentfleet</span><nav>{nav}</nav>"
                f"{user}</header><main>{body}</main></body></html>")


# ---- login ----------------------------------------------------------------------------------

def login(layout: Layout, *, error: str = "", next_url: str = "") -> str:
    message = f"<p class=error>{esc(error)}</p>" if error else ""
    return layout.page("Log in", (
        "<section class=login><h1>Log in</h1>"
        "<p class=note>With an API key (<code>agentfleet keys create --tenant T --role "
        "read</code>). A read key sees its tenant's batches, traces and report; an admin "
        "key sees everything and may replay dead letters.</p>" + message +
        f'<form method=post action="{esc(layout.url("/login"))}">'
        f'<input type=hidden name=next value="{esc(next_url)}">'
        "<label for=key>API key</label>"
        "<input id=key name=key type=password autocomplete=off required "
        "placeholder=\"afk_...\"><button type=submit>Log in</button></form></section>"))


# ---- models and lanes ----------------------------------------------------------------------

def models(layout: Layout, statuses: list[ModelStatus], queues: list[QueueStats],
           workers: dict[str, list[tuple[str, float]]], now: float) -> str:
    """Every model: its lanes (entries, lag, pending, oldest), retries, dead letters,
    workers, and the last five minutes' work."""
    body = ["<h1>Models and lanes</h1>",
            "<p class=note>Depth: lag and pending of both lanes plus retries waiting. Lag: "
            "tasks never delivered to a worker; pending: delivered, not yet acknowledged. "
            "Recent work over the last 5 minutes.</p>"]
    by_model = {q.model: q for q in queues}
    rows = []
    for s in statuses:
        q = by_model[s.model]
        workers_cell = f"{s.live_workers}" if s.live_workers or not s.depth else \
            f"<span class=missed>{s.live_workers}</span>"
        rows.append([f'<a href="#model-{esc(s.model)}">{esc(s.model)}</a>', num(s.depth),
                     count(q.interactive.lag), count(q.bulk.lag), num(s.pending),
                     age(s.oldest_pending_age_s) if s.pending else "-", num(s.delayed),
                     workers_cell, f"{s.tasks_per_s:,.1f}", secs(s.p50_s), secs(s.p99_s),
                     num(s.errors),
                     f'<a href="{esc(layout.url("/dead-letters", model=s.model))}">'
                     f"{num(s.dead_letters)}</a>"])
    body.append(table(["model", "depth", "lag", "bulk lag", "pending", "oldest pending",
                       "retrying", "live workers", "tasks/s", "p50", "p99", "errors",
                       "dead letters"], rows))
    for s in statuses:
        q = by_model[s.model]
        body.append(f'<h2 id="model-{esc(s.model)}">{esc(s.model)}</h2>')
        lanes = []
        for lane, st in (("interactive", q.interactive), ("bulk", q.bulk)):
            lanes.append([esc(lane), num(st.entries), count(st.lag), num(st.pending),
                          age(st.oldest_pending_age_s) if st.pending else "-",
                          "yes" if st.exists else "not yet"])
        body.append(table(["lane", "stream entries", "lag", "pending", "oldest pending",
                           "stream"], lanes))
        beats = workers.get(s.model, [])
        if beats:
            body.append(table(["worker", "last heartbeat", "state"], [
                [esc(w), f"{age(max(now - at, 0))} ago", "live" if now - at <= 10 else
                 "<span class=missed>silent</span>"] for w, at in beats]))
        else:
            body.append("<p class=note>No worker is registered for this model (none has "
                        "started, or all have stopped).</p>")
        counters = ", ".join(f"{esc(k)} {v:,}" for k, v in sorted(q.counters.items()))
        if counters:
            body.append(f"<p class=note>Fleet counters: {counters}.</p>")
    return "".join(body)


# ---- batches --------------------------------------------------------------------------------

def _progress(done: int, total: int) -> str:
    share = done / total if total else 0.0
    return (f'<span class=bar role=img aria-label="{share * 100:.0f}%">'
            f'<span style="width:{share * 100:.1f}%"></span></span> '
            f"{num(done)} / {num(total)}")


def batches(layout: Layout, rows: list[tuple[BatchStatus, str]], *, next_before: str) -> str:
    body = ["<h1>Batches</h1>"]
    if not rows:
        body.append("<p class=note>No bulk jobs to show.</p>")
    cells = []
    for st, tenant in rows:
        cells.append([f'<a href="{esc(layout.url("/batches/" + quote(st.id)))}">'
                      f"<code>{esc(st.id)}</code></a>", esc(st.status), esc(tenant),
                      _progress(st.done, st.total), num(st.completed), num(st.failed),
                      esc(when(st.created_at)), esc(st.completion_window)])
    if cells:
        body.append(table(["batch", "status", "tenant", "progress", "succeeded", "failed",
                           "created (UTC)", "window"], cells, left=3))
    if next_before:
        body.append(f'<div class=pager><a href="{esc(layout.url("/batches", before=next_before))}"'
                    ">Older batches</a></div>")
    return "".join(body)


def batch(layout: Layout, st: BatchStatus, tenant: str) -> str:
    body = [f"<h1>Batch <code>{esc(st.id)}</code></h1>",
            f"<p>{esc(st.status)}{' (finished)' if st.finished else ''}: "
            f"{_progress(st.done, st.total)}</p>"]
    facts = [("tenant", tenant), ("endpoint", st.endpoint), ("input file", st.input_file),
             ("completion window", st.completion_window), ("requests", num(st.total)),
             ("queued so far", num(st.enqueued)), ("invalid lines", num(st.invalid)),
             ("created", when(st.created_at)), ("in progress", when(st.in_progress_at)),
             ("expires", when(st.expires_at)), ("finalizing", when(st.finalizing_at)),
             ("completed", when(st.completed_at)), ("expired", when(st.expired_at)),
             ("cancelled", when(st.cancelled_at)), ("failed", when(st.failed_at))]
    body.append("<dl class=kv>" + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v or '-')}</dd>"
                                          for k, v in facts if v and v != "-") + "</dl>")
    if st.by_status:
        body.append("<h2>Finished requests by status</h2>")
        body.append(table(["status", "requests"], [[esc(k), num(v)] for k, v in
                                                     sorted(st.by_status.items())]))
    if st.models:
        body.append("<h2>By model</h2>")
        body.append(table(["model", "progress"], [[esc(m), _progress(d, t)]
                                                  for m, (t, d) in sorted(st.models.items())]))
    base = "/batches/" + quote(st.id)
    body.append("<h2>Output</h2><p>"
                f'<a href="{esc(layout.url(base + "/output.jsonl"))}" download>Output file</a>'
                " (OpenAI batch output lines of the requests that succeeded) · "
                f'<a href="{esc(layout.url(base + "/errors.jsonl"))}" download>Error file</a>'
                " (the others). Both hold what has finished so far.</p>")
    if st.errors:
        body.append("<h2>Invalid lines</h2>")
        body.append(table(["line", "reason"], [[num(line), esc(reason)]
                                               for line, reason in st.errors[:100]]))
    return "".join(body)


# ---- dead letters ---------------------------------------------------------------------------

def _tenant_of(d: DeadLetter) -> str:
    try:
        return decode_task(d.payload).tenant
    except DecodeError:
        return ""


def dead_letters(layout: Layout, model: str, models: list[str],
                 rows: list[tuple[str, DeadLetter]], *, total: int, next_before: str,
                 flash: str = "") -> str:
    body = ["<h1>Dead letters</h1>"]
    if flash:
        body.append(f"<p class=flash>{esc(flash)}</p>")
    body.append(f'<form method=get action="{esc(layout.url("/dead-letters"))}">'
                "<label>Model <select name=model>"
                + "".join(f'<option{" selected" if m == model else ""}>{esc(m)}</option>'
                          for m in models)
                + f"</select></label> <button>Show</button></form>"
                f"<p class=note>{num(total)} dead letters kept for {esc(model)}, newest "
                "first.</p>")
    cells = []
    for eid, d in rows:
        link = layout.url(f"/dead-letters/{quote(model)}/{quote(eid)}")
        cells.append([f'<a href="{esc(link)}"><code>{esc(eid)}</code></a>',
                      f"<code>{esc(d.task_id)}</code>", esc(_tenant_of(d) or "-"),
                      esc(d.error_code.value), num(d.attempts), num(d.deliveries),
                      esc(when(d.at)), esc(d.reason[:120])])
    if cells:
        body.append(table(["entry", "task", "tenant", "code", "attempts", "deliveries",
                           "when (UTC)", "reason"], cells, left=3))
    else:
        body.append("<p class=note>None to show.</p>")
    if next_before:
        body.append('<div class=pager><a href="'
                    f'{esc(layout.url("/dead-letters", model=model, before=next_before))}">'
                    "Older dead letters</a></div>")
    return "".join(body)


def dead_letter(layout: Layout, model: str, eid: str, d: DeadLetter, *, can_replay: bool,
                csrf: str) -> str:
    body = [f"<h1>Dead letter <code>{esc(eid)}</code></h1>"]
    try:
        task = decode_task(d.payload)
        task_json = json.dumps(msgspec.to_builtins(task), indent=2, default=str)
        corr = task.correlation_id or task.id
    except DecodeError:
        task, task_json, corr = None, d.payload[:512].hex(), ""
    facts = [("model", model), ("task", d.task_id), ("error code", d.error_code.value),
             ("reason", d.reason), ("attempts", str(d.attempts)),
             ("deliveries", str(d.deliveries)), ("last worker", d.worker_id),
             ("dead-lettered (UTC)", when(d.at))]
    if task is not None:
        facts[2:2] = [("tenant", task.tenant), ("correlation id", corr)]
    body.append("<dl class=kv>" + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v or '-')}</dd>"
                                          for k, v in facts) + "</dl>")
    if corr:
        body.append(f'<p><a href="{esc(layout.url("/trace/" + quote(corr)))}">'
                    "Its trace</a></p>")
    body.append("<h2>History</h2>")
    if d.history:
        body.append(table(["attempt", "failure"], [[str(i + 1), esc(line)]
                                                   for i, line in enumerate(d.history)]))
    else:
        body.append("<p class=note>No failed attempt recorded (it died on delivery or "
                    "decoding).</p>")
    if can_replay:
        body.append(f'<form method=post action="'
                    f'{esc(layout.url(f"/dead-letters/{quote(model)}/{quote(eid)}/replay"))}">'
                    f'<input type=hidden name=csrf value="{esc(csrf)}">'
                    "<button class=danger type=submit>Replay: queue the task again</button>"
                    "</form>")
    else:
        body.append("<p class=note>Replaying takes an admin key.</p>")
    body.append(f"<h2>Task as queued</h2><pre>{esc(task_json)}</pre>")
    return "".join(body)


# ---- traces ---------------------------------------------------------------------------------

_SEGMENTS = ((0, "queued"), (6, "read, to engine"), (4, "to first token"),
             (2, "generating"), (3, "commit"))


def trace_tree(events: list[TraceEvent]) -> tuple[list[tuple[str, int, list]], float, float]:
    """Rows (task id, depth, segments) in tree order: each task under its parent, then the
    timeline's start and end.  Segments: (start, end, style, label)."""
    tasks: dict[str, dict] = {}
    for event in events:
        match event:
            case Enqueued(task_id=tid, parent_id=parent, at=at):
                t = tasks.setdefault(tid, {"parent": parent, "enqueued": at, "result": None,
                                           "retries": []})
                t["parent"] = parent or t["parent"]
                t["enqueued"] = at
            case Finished(result=r):
                t = tasks.setdefault(r.task_id, {"parent": r.parent_id, "enqueued": 0.0,
                                                 "result": None, "retries": []})
                t["result"] = r
                t["parent"] = t["parent"] or r.parent_id
                t["enqueued"] = t["enqueued"] or r.timings.enqueued
            case Retried(task_id=tid, attempt=n, error=error, at=at, due=due):
                t = tasks.setdefault(tid, {"parent": "", "enqueued": 0.0, "result": None,
                                           "retries": []})
                t["retries"].append((at, due, n, error))
    for t in tasks.values():  # follow-ups announced by a result but not yet enqueued there
        r = t["result"]
        if r is not None:
            for child in r.followup_ids:
                tasks.setdefault(child, {"parent": r.task_id, "enqueued": 0.0, "result": None,
                                         "retries": []})
    times = [x for t in tasks.values() for x in _times(t) if x]
    start = min(times, default=0.0)
    end = max(times, default=start + 1)
    children: dict[str, list[str]] = {}
    roots = []
    for tid, t in tasks.items():
        if t["parent"] and t["parent"] in tasks:
            children.setdefault(t["parent"], []).append(tid)
        else:
            roots.append(tid)
    rows: list[tuple[str, int, list]] = []

    def visit(tid: str, depth: int) -> None:
        rows.append((tid, depth, _segments(tasks[tid], end)))
        for child in sorted(children.get(tid, []), key=lambda c: tasks[c]["enqueued"] or end):
            visit(child, depth + 1)

    for root in sorted(roots, key=lambda c: tasks[c]["enqueued"] or end):
        visit(root, 0)
    return rows, start, end


def _times(t: dict) -> list[float]:
    r: Result | None = t["result"]
    out = [t["enqueued"]] + [x for retry in t["retries"] for x in retry[:2]]
    if r is not None:
        tm = r.timings
        out += [tm.enqueued, tm.read, tm.engine_start, tm.first_token, tm.finished, tm.written]
    return out


def _segments(t: dict, end: float) -> list[tuple[float, float, int, str]]:
    r: Result | None = t["result"]
    if r is None:  # queued, not finished (yet)
        at = t["enqueued"]
        return [(at, end, 6, "queued, not finished yet")] if at else []
    tm = r.timings
    marks = [tm.enqueued or t["enqueued"], tm.read, tm.engine_start, tm.first_token,
             tm.finished, tm.written]
    out = []
    for i, (style, label) in enumerate(_SEGMENTS):
        a, b = marks[i], marks[i + 1]
        if a and b and b >= a:
            out.append((a, b, style, f"{label}: {secs(b - a)}"))
    for at, due, n, error in t["retries"]:
        out.append((at, due, 1, f"retry {n} after {error}"))
    if r.error_code is not None and not out:
        at = tm.finished or tm.written or t["enqueued"]
        out.append((at, at, 1, f"{r.status.value}: {r.error_code.value}"))
    return out


def trace(layout: Layout, correlation_id: str, events: list[TraceEvent], text: str) -> str:
    body = ["<h1>Trace</h1>",
            f'<form method=get action="{esc(layout.url("/trace"))}">'
            f'<input name=id value="{esc(correlation_id)}" size=40 '
            'placeholder="correlation id" aria-label="correlation id"> '
            "<button>Show</button></form>"]
    if not correlation_id:
        body.append("<p class=note>Enter a correlation id (a task's own id when it has no "
                    "follow-ups). Error tables in the report link here.</p>")
        return "".join(body)
    if not events:
        body.append(f"<p class=note>No trace for <code>{esc(correlation_id)}</code> "
                    "(expired, never enqueued, or not your tenant's).</p>")
        return "".join(body)
    rows, start, end = trace_tree(events)
    results = [e.result for e in events if isinstance(e, Finished)]
    body.append(f"<p><code>{esc(correlation_id)}</code>: {len(rows)} task(s), "
                f"{len(results)} finished, {secs(end - start)} from first to last event, "
                f"starting {esc(when(start))} UTC.</p>")
    legend = " ".join(f'<span style="color:var(--c{style})">■</span> {esc(label)}'
                      for style, label in _SEGMENTS)
    body.append(timeline(f"Timeline of {correlation_id}", rows, t0=start, t1=end))
    body.append(f"<p class=note>{legend} <span style=\"color:var(--c1)\">■</span> retry "
                "wait. A follow-up is drawn under the task that made it.</p>")
    cells = []
    for r in sorted(results, key=lambda r: r.timings.enqueued):
        tm = r.timings
        cells.append([f"<code>{esc(r.task_id)}</code>", esc(r.model),
                      esc(r.model_version or "-"), esc(r.tenant or "-"),
                      f"<span class={'met' if r.ok else 'missed'}>{esc(r.status.value)}</span>",
                      secs(tm.read - tm.enqueued if tm.read and tm.enqueued else None),
                      secs(tm.first_token - tm.enqueued if tm.first_token and tm.enqueued
                           else None),
                      secs(tm.written - tm.enqueued if tm.written and tm.enqueued else None),
                      f"{num(r.prompt_tokens)} / {num(r.output_tokens)}",
                      esc(r.worker_id or "-"),
                      esc(r.error_code.value + ": " + r.error_message[:100]
                          if r.error_code else "")])
    body.append(table(["task", "model", "version", "tenant", "status", "queued",
                       "first token", "end to end", "tokens in/out", "worker", "error"],
                      cells))
    body.append(f"<details><summary>As text</summary><pre>{esc(text)}</pre></details>")
    return "".join(body)


def report_page(layout: Layout, since: str, body_html: str, choices: tuple[str, ...],
                error: str = "") -> str:
    picker = (f'<form method=get action="{esc(layout.url("/report"))}">'
              "<label>Window <select name=since>"
              + "".join(f'<option{" selected" if c == since else ""}>{esc(c)}</option>'
                        for c in choices)
              + "</select></label> <button>Show</button></form>")
    message = f"<p class=error>{esc(error)}</p>" if error else ""
    return picker + message + body_html


def error_page(message: str) -> str:
    return f"<h1>{esc(message.split(':')[0])}</h1><p>{esc(message)}</p>"


def role_allows(record: ApiKeyRecord, needed: Role) -> bool:
    return record.role.allows(needed)


Linker = Callable[[str], str]
