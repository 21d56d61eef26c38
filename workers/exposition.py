"""The Prometheus text format (0.0.4) of a worker's metrics, written straight from the counts.

Not prometheus_client's families and exposition: that costs about 10 us per sample, and ten
lanes hold about 2,000 samples.  Label strings and bucket prefixes are built once per runner
(`LaneMetrics.prefixes`) and reused.  Metric names: docs/observability.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from agentfleet.workers.metrics import WorkerMetrics

# name, documentation, LaneMetrics histogram attribute (exported: snapshots copy these)
HISTOGRAMS = (
    ("agentfleet_queue_wait_seconds", "From enqueue to the read by a worker "
     "(timings.read - timings.enqueued).", "queue_wait"),
    ("agentfleet_time_to_first_token_seconds", "From the engine's start of a task to its "
     "first output token (succeeded tasks).", "first_token"),
    ("agentfleet_engine_seconds", "From the engine's start of a task to its end.", "engine"),
    ("agentfleet_task_prompt_tokens", "Prompt tokens of each succeeded task.", "prompt_tokens"),
    ("agentfleet_task_output_tokens", "Output tokens of each succeeded task.", "output_tokens"),
    ("agentfleet_read_window_tasks", "Tasks per read window (one XREADGROUP, or a reclaim).",
     "read_window"),
    ("agentfleet_commit_group_tasks", "Tasks per commit (one script call).", "commit_group"),
)
# name, documentation, RunnerStats field
_LANE_COUNTERS = (
    ("agentfleet_task_retries_total", "Attempts that failed transiently and went back to the "
     "queue for another attempt.", "retried"),
    ("agentfleet_task_reclaims_total", "Tasks this worker took over from a stalled or dead "
     "worker.", "reclaimed"),
    ("agentfleet_dead_letters_total", "Tasks moved to the model's dead-letter stream.",
     "dead_lettered"),
    ("agentfleet_duplicate_results_total", "Results dropped because the task already had one "
     "(redelivered after a stall).", "duplicates"),
    ("agentfleet_fenced_results_total", "Results dropped because another worker had reclaimed "
     "the task meanwhile.", "fenced"),
    ("agentfleet_tasks_lost_total", "Pending tasks whose stream entry vanished before they "
     "finished.", "lost"),
    ("agentfleet_followups_moved_total", "Follow-ups for other models moved from this model's "
     "outbox to their own model's stream.", "moved"),
    ("agentfleet_unreplicated_writes_total", "Commits and follow-up moves that fewer than "
     "wait_replicas replicas confirmed within wait_timeout_ms.", "unreplicated"),
)


def render(metrics: WorkerMetrics) -> bytes:
    """The text a scrape of /metrics returns (Prometheus text format 0.0.4).

    Written directly rather than through prometheus_client's families and exposition:
    that costs about 10 us per sample, and ten lanes hold about 2,000 samples.  Label
    strings and bucket prefixes are built once per lane and reused.
    """
    out: list[str] = []
    lanes = [(lm, lm.labels(), lm.snapshot()) for lm in metrics.lanes]
    out.append(_HEADERS["agentfleet_tasks_total"])
    for _, lv, snap in lanes:
        for (status, code, priority), count in snap.outcomes:
            out.append(f'agentfleet_tasks_total{{{lv},status="{status}",'
                       f'error_code="{code}",priority="{priority}"}} {count}\n')
    out.append(_HEADERS["agentfleet_end_to_end_seconds"])
    for lm, _, snap in lanes:
        for priority, hist in snap.end_to_end.items():
            _histogram_lines(out, lm.prefixes("agentfleet_end_to_end_seconds",
                                              priority=priority), hist)
    for name, _, attr in HISTOGRAMS:
        out.append(_HEADERS[name])
        for lm, _, snap in lanes:
            _histogram_lines(out, lm.prefixes(name, getattr(lm, attr).bounds),
                             snap.hists[attr])
    out.append(_HEADERS["agentfleet_inflight_tasks"])
    for lm, lv, _ in lanes:
        out.append(f"agentfleet_inflight_tasks{{{lv}}} {lm.runner.busy}\n")
    for name, _, field in _LANE_COUNTERS:
        out.append(_HEADERS[name])
        for lm, lv, _ in lanes:
            out.append(f"{name}{{{lv}}} {getattr(lm.runner.stats, field)}\n")
    reporting = [(lm, lv) for lm, lv, _ in lanes if lm.kv_cache_usage is not None]
    if reporting:
        _engine_lines(out, reporting)
    _tenant_lines(out, [(lm, lv) for lm, lv, _ in lanes])
    out.append(_HEADERS["agentfleet_worker_start_time_seconds"])
    out.append(f"agentfleet_worker_start_time_seconds {floatToGoString(metrics.started_at)}\n")
    return "".join(out).encode()

TOP_TENANTS = 10  # tenants named per model; the rest are summed as "other"


def _tenant_lines(out: list[str], lanes: list) -> None:
    """Per-tenant figures of each runner's admission: the top tenants by name (by tokens
    served and tasks waiting), the rest as "other", so that labels stay bounded."""
    rows: list[tuple[str, str, str, int, int, int, float | None]] = []
    for lm, lv in lanes:
        admission = getattr(lm.runner, "admission", None)
        if admission is None:
            continue
        figures = admission.tenant_figures()
        if not figures:
            continue
        weight_of = {t: w for (_, t), (*_, w) in figures.items()}
        work: dict[str, float] = {}
        for (_, tenant), (waiting, _, served, _) in figures.items():
            work[tenant] = work.get(tenant, 0) + served + waiting
        top = set(sorted(work, key=lambda t: (-work[t], t))[:TOP_TENANTS])
        shares = lm.tenant_shares(figures, weight_of)
        merged: dict[tuple[str, str], list] = {}
        for (lane, tenant), (waiting, running, served, _) in figures.items():
            name = tenant if tenant in top else "other"
            row = merged.setdefault((lane, name), [0, 0, 0, None])
            row[0] += waiting
            row[1] += running
            row[2] += served
            if name != "other":
                row[3] = shares.get((lane, tenant))
        for (lane, name), (waiting, running, served, share) in sorted(merged.items()):
            rows.append((lv, lane, name, waiting, running, served, share))
    if not rows:
        return
    for metric, index in (("agentfleet_tenant_waiting_tasks", 3),
                          ("agentfleet_tenant_running_tasks", 4),
                          ("agentfleet_tenant_tokens_total", 5)):
        out.append(_HEADERS[metric])
        for row in rows:
            out.append(f'{metric}{{{row[0]},lane="{row[1]}",tenant="{escape_label(row[2])}"}} '
                       f"{row[index]}\n")
    out.append(_HEADERS["agentfleet_tenant_share_ratio"])
    for lv, lane, name, *_, share in rows:
        if share is not None:
            out.append(f'agentfleet_tenant_share_ratio{{{lv},lane="{lane}",'
                       f'tenant="{escape_label(name)}"}} {floatToGoString(share)}\n')


def _engine_lines(out: list[str], reporting: list) -> None:
    """The engine's own figures, for lanes whose engine reports them."""
    out.append(_HEADERS["agentfleet_engine_kv_cache_usage_ratio"])
    for lm, lv in reporting:
        out.append(f"agentfleet_engine_kv_cache_usage_ratio{{{lv}}} "
                   f"{floatToGoString(lm.kv_cache_usage)}\n")
    out.append(_HEADERS["agentfleet_engine_requests"])
    for lm, lv in reporting:
        for state, value in (("running", lm.engine_running), ("waiting", lm.engine_waiting)):
            if value is not None:
                out.append(f'agentfleet_engine_requests{{{lv},state="{state}"}} {value}\n')
    for name, attr in (("agentfleet_engine_prefix_cache_queries_total", "prefix_cache_queries"),
                       ("agentfleet_engine_prefix_cache_hits_total", "prefix_cache_hits"),
                       ("agentfleet_engine_preemptions_total", "preemptions")):
        out.append(_HEADERS[name])
        for lm, lv in reporting:
            out.append(f"{name}{{{lv}}} {getattr(lm, attr)}\n")


def _histogram_lines(out: list[str], prefixes: tuple[list[str], str, str],
                     hist: tuple[list[int], int, float]) -> None:
    buckets, sum_prefix, count_prefix = prefixes
    counts, count, total = hist
    out.extend([f"{p}{c}\n" for p, c in zip(buckets, counts)])
    out.append(f"{sum_prefix}{floatToGoString(total)}\n{count_prefix}{count}\n")


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _header(name: str, kind: str, doc: str) -> str:
    return f"# HELP {name} {doc}\n# TYPE {name} {kind}\n"


# name -> its HELP and TYPE lines (a counter's TYPE names it without _total, as Prometheus does)
_HEADERS = {
    "agentfleet_tasks_total": _header(
        "agentfleet_tasks_total", "counter", "Tasks that reached an end on this worker, by "
        'status and error code ("" on success); a retried attempt is not an end.'),
    "agentfleet_end_to_end_seconds": _header(
        "agentfleet_end_to_end_seconds", "histogram", "From enqueue to the result committed "
        "and visible (timings.written - timings.enqueued), by priority class (0..9, bulk)."),
    "agentfleet_inflight_tasks": _header(
        "agentfleet_inflight_tasks", "gauge", "Tasks read and not yet committed (bounded by "
        "max_inflight)."),
    "agentfleet_worker_start_time_seconds": _header(
        "agentfleet_worker_start_time_seconds", "gauge", "When this worker process started, "
        "epoch seconds."),
    "agentfleet_engine_kv_cache_usage_ratio": _header(
        "agentfleet_engine_kv_cache_usage_ratio", "gauge", "Share of the engine's KV-cache "
        "blocks in use (0..1)."),
    "agentfleet_engine_requests": _header(
        "agentfleet_engine_requests", "gauge", "Requests in the engine's scheduler, by state."),
    "agentfleet_engine_prefix_cache_queries_total": _header(
        "agentfleet_engine_prefix_cache_queries_total", "counter", "Prompt tokens looked up in "
        "the prefix cache."),
    "agentfleet_engine_prefix_cache_hits_total": _header(
        "agentfleet_engine_prefix_cache_hits_total", "counter", "Prompt tokens found in the "
        "prefix cache (hit rate: rate(hits) / rate(queries))."),
    "agentfleet_tenant_waiting_tasks": _header(
        "agentfleet_tenant_waiting_tasks", "gauge", "Tasks of a tenant read and waiting for "
        "an engine slot on this worker (the top tenants by name, the rest as \"other\")."),
    "agentfleet_tenant_running_tasks": _header(
        "agentfleet_tenant_running_tasks", "gauge", "Tasks of a tenant in this worker's "
        "engine."),
    "agentfleet_tenant_tokens_total": _header(
        "agentfleet_tenant_tokens_total", "counter", "Prompt and output tokens of a tenant's "
        "tasks this worker's engine ran."),
    "agentfleet_tenant_share_ratio": _header(
        "agentfleet_tenant_share_ratio", "gauge", "Tokens a backlogged tenant got since the "
        "last scrape, as a share of all served, over the share its weight entitles it to "
        "among the tenants served or waiting (1: its fair share; below: held back)."),
    "agentfleet_engine_preemptions_total": _header(
        "agentfleet_engine_preemptions_total", "counter", "Requests the engine preempted for "
        "lack of KV-cache space."),
    **{name: _header(name, "histogram", doc) for name, doc, _ in HISTOGRAMS},
    **{name: _header(name, "counter", doc) for name, doc, _ in _LANE_COUNTERS},
}
