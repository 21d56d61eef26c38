"""What one worker saw, as Prometheus metrics, at almost no cost per task.

A lane calls `observe_read` once per read window and `observe_commit` once per commit
group; nothing else on the hot path touches a metric.  The per-task work is one Python loop
that appends six floats to plain lists.  prometheus_client's own `Histogram.observe` takes a
lock and walks the bucket bounds in Python (about 1.5 us); six of them per task would cost the
queue-layer benchmark more than its 10% budget.  The raw values are folded into cumulative
bucket counts (one sort, then a C bisect per bound) when a scrape comes or a buffer fills, and
/metrics is written straight from the counts.  The same lists, by reference, feed the
per-minute aggregates kept in Redis for `agentfleet report` (workers/kpi.py).

Gauges that the lane already knows (tasks in flight) and its `LaneStats` counters (retries,
reclaims, dead letters, duplicates, fenced) are read at scrape time, for free.  Queue-wide
gauges (stream length, lag, pending, live workers) are not here: N workers would report them
N times; `agentfleet exporter` (ops/exporter.py) reads them from Redis once per scrape.

Labels stay bounded: model, version, status, error_code, and the priority class: "0".."9"
(the task's priority) or "bulk" (a task of a bulk job, served from the model's bulk lane, whose
latency must not count against the interactive SLO).  Never a task id, a batch id or a tenant.

Metric names are listed in docs/observability.md.  This module records; the text format is
written by workers/exposition.py and served by workers/http.py (with the health endpoints).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

import msgspec
from prometheus_client.utils import floatToGoString

from agentfleet.schemas.errors import ErrorCode
from agentfleet.schemas.wire import Status
from agentfleet.workers.exposition import HISTOGRAMS, escape_label, render
from agentfleet.workers.http import MetricsServer
from agentfleet.workers.kpi import LATENCY_BUCKETS_S, RETRIED, KpiBuffer

if TYPE_CHECKING:
    from agentfleet.workers.inflight import RunnerStats

log = logging.getLogger("agentfleet.worker")

# Seconds: from half a millisecond (a queue hop on a fast server) to ten minutes (a long agent
# step on a busy engine).
TOKEN_BUCKETS = tuple(float(2 ** i) for i in range(15))  # 1 .. 16384 tokens
SIZE_BUCKETS = tuple(float(2 ** i) for i in range(11))  # 1 .. 1024 tasks

# Past this many unfolded values a histogram folds on the event loop (under a millisecond),
# so memory stays bounded when nobody scrapes.
_FOLD_AT = 2048

# Failures an operator must hear about (logged at ERROR, hence sent to Sentry when it is on).
# Bad input (invalid_task, decode errors) is the producer's problem: counted, not alarmed.
_ALARMING = frozenset((ErrorCode.ENGINE_ERROR, ErrorCode.ENGINE_DEAD, ErrorCode.INTERNAL,
                       ErrorCode.ATTEMPTS_EXHAUSTED, ErrorCode.DELIVERY_LIMIT, ErrorCode.LOST))
_SUCCEEDED = (Status.SUCCEEDED.value, "")
_PRIORITY = {p: str(p) for p in range(10)}  # priority -> its label value, made once


def _priority_class(task) -> str:
    """The priority label of a task: "bulk" for a bulk job's task, else its priority."""
    if task is None:
        return "0"
    if task.batch_id:
        return "bulk"
    return _PRIORITY.get(task.priority) or str(task.priority)


class RunnerView(Protocol):
    """What the metrics read of a model runner (workers/runner.py), at scrape time."""

    model: str
    worker_id: str
    stats: RunnerStats

    @property
    def version(self) -> str: ...

    @property
    def busy(self) -> int: ...


class _Histogram:
    """Cumulative bucket counts plus values not yet folded in."""

    __slots__ = ("bounds", "cumulative", "sum", "count", "raw")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.cumulative = [0] * len(bounds)  # values <= bound, as Prometheus' `le` wants
        self.sum = 0.0
        self.count = 0
        self.raw: list[float] = []

    def fold(self) -> None:
        raw, self.raw = self.raw, []
        if not raw:
            return
        raw.sort()
        cumulative = self.cumulative
        for i, bound in enumerate(self.bounds):
            cumulative[i] += bisect_right(raw, bound)
        self.sum += math.fsum(raw)
        self.count += len(raw)

    def sample(self) -> tuple[list[tuple[str, float]], float]:
        """[(le, cumulative count) ... ("+Inf", count)], sum: for tests and tools."""
        buckets = [(floatToGoString(b), c) for b, c in zip(self.bounds, self.cumulative)]
        buckets.append(("+Inf", self.count))
        return buckets, self.sum

    def copy(self) -> tuple[list[int], int, float]:
        return [*self.cumulative, self.count], self.count, self.sum


class LaneMetrics:
    """One lane's figures; the lane calls `observe_read` and `observe_commit`."""

    def __init__(self, runner: RunnerView, kpi: KpiBuffer | None = None):
        self.model = runner.model
        self.runner = runner
        self.kpi = kpi  # per-minute aggregates in Redis (workers/kpi.py), None when off
        self.busy = lambda: runner.busy
        if kpi is not None:  # engine up/busy seconds and queue depth, sampled by the flush
            kpi.watch(runner.model, self.busy)
        self._lock = threading.Lock()  # the event loop appends, a scrape thread folds
        self.queue_wait = _Histogram(LATENCY_BUCKETS_S)
        self.first_token = _Histogram(LATENCY_BUCKETS_S)
        self.engine = _Histogram(LATENCY_BUCKETS_S)
        self.end_to_end: dict[str, _Histogram] = {}  # by priority class
        self.prompt_tokens = _Histogram(TOKEN_BUCKETS)
        self.output_tokens = _Histogram(TOKEN_BUCKETS)
        self.read_window = _Histogram(SIZE_BUCKETS)
        self.commit_group = _Histogram(SIZE_BUCKETS)
        # (status, error code, priority class) -> tasks that ended so; a retry is not an end
        self.outcomes: dict[tuple[str, str, str], int] = {}
        # Written by the engine's stat logger (see `engine_stats`); None until it reports.
        self.kv_cache_usage: float | None = None
        self.engine_running: int | None = None
        self.engine_waiting: int | None = None
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.preemptions = 0
        self._served_before: dict[tuple[str, str], int] = {}  # for tenant_shares
        self._labels = ""
        self._labels_version: str | None = None
        self._prefixes: dict[tuple[str, str | None], tuple[list[str], str, str]] = {}

    @property
    def version(self) -> str:
        return self.runner.version

    def labels(self) -> str:
        """`model="..",version=".."`, escaped; built again only when the version changes."""
        version = self.version
        if version != self._labels_version:
            self._labels = f'model="{escape_label(self.model)}",version="{escape_label(version)}"'
            self._labels_version = version
            self._prefixes = {}
        return self._labels

    def prefixes(self, name: str, bounds: tuple[float, ...] = LATENCY_BUCKETS_S,
                 priority: str | None = None) -> tuple[list[str], str, str]:
        """A histogram's line starts: every bucket's, then its _sum's and _count's."""
        key = (name, priority)
        found = self._prefixes.get(key)
        if found is None:
            lv = self._labels if priority is None else f'{self._labels},priority="{priority}"'
            buckets = [f'{name}_bucket{{{lv},le="{floatToGoString(b)}"}} ' for b in bounds]
            buckets.append(f'{name}_bucket{{{lv},le="+Inf"}} ')
            found = self._prefixes[key] = (buckets, f"{name}_sum{{{lv}}} ",
                                           f"{name}_count{{{lv}}} ")
        return found

    # ---- hot path ------------------------------------------------------------------------

    def observe_read(self, size: int) -> None:
        """One read window of `size` tasks."""
        with self._lock:
            self.read_window.raw.append(size)

    def observe_commit(self, done: Sequence, records: Sequence) -> None:
        """One committed group: `done` are the lane's in-flight records (task, output, read
        time), `records` their CommitRecords in the same order (their outcome tells a retry)."""
        now = time.time()  # the results are visible from now: end to end stops here
        n = len(done)
        wait: list[float] = []
        e2e: list[float] = []
        ttft: list[float] = []
        eng: list[float] = []
        ptok: list[int] = []
        otok: list[int] = []
        tenants: list[str] = []
        tte: list[float] = []  # first token from enqueue: the SLO's figure (KPI only)
        a_wait, a_e2e, a_ttft, a_eng = wait.append, e2e.append, ttft.append, eng.append
        a_tte = tte.append
        a_ptok, a_otok, a_tenant = ptok.append, otok.append, tenants.append
        first = done[0].task if n else None
        priority = first.priority if first is not None else 0
        batch = first.batch_id if first is not None else ""
        for rec in done:  # the common case: all ran and succeeded, one priority, one bulk job
            out, task = rec.output, rec.task
            if (out.error_code is not None or rec.cancelled or task is None
                    or task.priority != priority or task.batch_id != batch
                    or not task.enqueued_at or not out.first_token):
                self._observe_mixed(done, records, now)
                return
            enqueued, started = task.enqueued_at, out.engine_start
            a_wait(rec.read_at - enqueued)
            a_e2e(now - enqueued)
            a_ttft(out.first_token - started)
            a_tte(out.first_token - enqueued)
            a_eng(out.finished - started)
            a_ptok(out.prompt_tokens)
            a_otok(out.output_tokens)
            a_tenant(task.tenant)
        if self.kpi is not None:  # by reference: the per-task work waits for the flush
            self.kpi.groups.append((self.model, int(now // 60) * 60,
                                    "bulk" if batch else "interactive", tenants, e2e, ptok,
                                    otok, tte, wait, eng, self.version,
                                    n if batch and (first.deadline is None
                                                    or now <= first.deadline) else 0))
        with self._lock:
            klass = "bulk" if batch else _PRIORITY[priority]
            key = (Status.SUCCEEDED.value, "", klass)
            self.outcomes[key] = self.outcomes.get(key, 0) + n
            self.queue_wait.raw += wait
            self._e2e(klass).raw += e2e
            self.first_token.raw += ttft
            self.engine.raw += eng
            self.prompt_tokens.raw += ptok
            self.output_tokens.raw += otok
            self.commit_group.raw.append(n)
            if len(self.queue_wait.raw) > _FOLD_AT:
                self._fold()

    def _observe_mixed(self, done: Sequence, records: Sequence, now: float) -> None:
        """A group with failures, retries, cancellations or several priorities."""
        alarms: dict[tuple[str, str], list] = {}  # (level, code) -> [count, first record]
        kpi = self.kpi.tasks if self.kpi is not None else None
        minute = int(now // 60) * 60
        with self._lock:
            for rec, record in zip(done, records):
                out, task = rec.output, rec.task
                klass = _priority_class(task)
                enqueued = task.enqueued_at if task is not None else 0.0
                if enqueued:
                    self.queue_wait.raw.append(rec.read_at - enqueued)
                if out.engine_start:
                    self.engine.raw.append((out.finished or now) - out.engine_start)
                if record.outcome == b"y":  # back to the queue for another attempt
                    code = out.error_code.value if out.error_code else "retry"
                    _count_alarm(alarms, "warning", code, rec)
                    if kpi is not None:  # a canary's guard counts failed attempts too
                        kpi.append((self.model, minute, "bulk" if klass == "bulk" else
                                    "interactive", task.tenant if task is not None else "",
                                    RETRIED, code, None, 0, 0, None, None, None, self.version,
                                    False, ""))
                    continue
                ptok = otok = 0
                if out.error_code is None and not rec.cancelled:
                    status, code = _SUCCEEDED
                    ptok, otok = out.prompt_tokens, out.output_tokens
                    if out.first_token and out.engine_start:
                        self.first_token.raw.append(out.first_token - out.engine_start)
                    self.prompt_tokens.raw.append(out.prompt_tokens)
                    self.output_tokens.raw.append(out.output_tokens)
                else:  # the final status and code, as the outcome rules set them
                    status = record.status.value
                    code = record.error_code.value if record.error_code else ""
                    if record.error_code in _ALARMING:
                        _count_alarm(alarms, "error", code, rec)
                latency = now - enqueued if enqueued else None
                if latency is not None:
                    self._e2e(klass).raw.append(latency)
                key = (status, code, klass)
                self.outcomes[key] = self.outcomes.get(key, 0) + 1
                if kpi is not None:
                    ok = status == Status.SUCCEEDED.value
                    kpi.append((self.model, minute, "bulk" if klass == "bulk" else "interactive",
                                task.tenant if task is not None else "", status, code, latency,
                                ptok, otok,
                                out.first_token - enqueued if ok and out.first_token and enqueued
                                else None,
                                rec.read_at - enqueued if enqueued else None,
                                (out.finished or now) - out.engine_start if out.engine_start
                                else None,
                                self.version,
                                ok and klass == "bulk" and (task.deadline is None
                                                            or now <= task.deadline),
                                task.correlation_id if task is not None else ""))
            self.commit_group.raw.append(len(done))
            if len(self.queue_wait.raw) > _FOLD_AT:
                self._fold()
        for (level, code), (count, rec) in alarms.items():
            self._report(level, code, count, rec)

    def _report(self, level: str, code: str, count: int, rec) -> None:
        """One log line per failure kind and group, naming its first task (logs and Sentry)."""
        task = rec.task
        extra = {"model": self.model, "worker": self.runner.worker_id,
                 "window_id": rec.window_id, "error_code": code}
        if task is not None:
            extra.update(task_id=task.id, correlation_id=task.correlation_id)
            if task.batch_id:
                extra["batch_id"] = task.batch_id
        what = "will be retried" if level == "warning" else "failed"
        log.log(logging.WARNING if level == "warning" else logging.ERROR,
                "model %s: %d task(s) %s with %s, first %s: %s", self.model, count, what, code,
                extra.get("task_id", "(undecodable)"), rec.output.error_message[:300],
                extra=extra)

    def _e2e(self, klass: str) -> _Histogram:
        hist = self.end_to_end.get(klass)
        if hist is None:
            hist = self.end_to_end[klass] = _Histogram(LATENCY_BUCKETS_S)
        return hist

    def _fold(self) -> None:
        for hist in self._histograms():
            hist.fold()

    def _histograms(self) -> Iterator[_Histogram]:
        yield from (self.queue_wait, self.first_token, self.engine, self.prompt_tokens,
                    self.output_tokens, self.read_window, self.commit_group)
        yield from self.end_to_end.values()

    # ---- the engine's own statistics -----------------------------------------------------

    def engine_stats(self, *, kv_cache_usage: float | None = None, running: int | None = None,
                     waiting: int | None = None, prefix_cache_queries: int = 0,
                     prefix_cache_hits: int = 0, preemptions: int = 0) -> None:
        """The hook an engine calls with its scheduler's figures (vLLM: once per step).

        Gauges are set; the prefix-cache and preemption figures are increments since the
        last call, in tokens and requests, as vLLM's SchedulerStats reports them.
        """
        if kv_cache_usage is not None:
            self.kv_cache_usage = kv_cache_usage
        if running is not None:
            self.engine_running = running
        if waiting is not None:
            self.engine_waiting = waiting
        self.prefix_cache_queries += prefix_cache_queries
        self.prefix_cache_hits += prefix_cache_hits
        self.preemptions += preemptions

    # ---- scrape side ---------------------------------------------------------------------

    def tenant_shares(self, figures: dict, weight_of: dict[str, float]
                      ) -> dict[tuple[str, str], float]:
        """(lane, tenant) -> served share / entitled share since the previous call, for the
        tenants waiting now (`figures`: Admission.tenant_figures)."""
        previous = self._served_before
        now = {key: served for key, (_, _, served, _) in figures.items()}
        self._served_before = now
        out: dict[tuple[str, str], float] = {}
        for lane in ("interactive", "bulk"):
            delta = {t: now[(ln, t)] - previous.get((ln, t), 0) for (ln, t) in now if ln == lane}
            total = sum(delta.values())
            if total <= 0:
                continue
            waiting = [t for (ln, t), (w, *_) in figures.items() if ln == lane and w > 0]
            contending = {t for t, d in delta.items() if d > 0} | set(waiting)
            weights = sum(weight_of[t] for t in contending)
            for tenant in waiting:
                entitled = weight_of[tenant] / weights
                out[(lane, tenant)] = (delta[tenant] / total) / entitled
        return out

    def snapshot(self) -> _Snapshot:
        """Fold what is pending and copy the figures (called from the scrape thread)."""
        with self._lock:
            self._fold()
            hists = {attr: getattr(self, attr).copy() for _, _, attr in HISTOGRAMS}
            e2e = {p: h.copy() for p, h in sorted(self.end_to_end.items())}
            outcomes = sorted(self.outcomes.items())
        return _Snapshot(hists=hists, end_to_end=e2e, outcomes=outcomes)


class _Snapshot(msgspec.Struct):
    hists: dict[str, tuple[list[int], int, float]]  # attr -> (cumulative + [count], count, sum)
    end_to_end: dict[str, tuple[list[int], int, float]]
    outcomes: list[tuple[tuple[str, str, str], int]]


def _count_alarm(alarms: dict, level: str, code: str, rec) -> None:
    entry = alarms.get((level, code))
    if entry is None:
        alarms[(level, code)] = [1, rec]
    else:
        entry[0] += 1


class NullLaneMetrics:
    """Metrics off (metrics_port = 0): every call returns at once."""

    def observe_read(self, size: int) -> None:
        return None

    def observe_commit(self, done: Sequence, records: Sequence) -> None:
        return None

    def engine_stats(self, **figures: float) -> None:
        return None


NULL_LANE_METRICS = NullLaneMetrics()

class WorkerMetrics:
    """A worker's metrics: one `LaneMetrics` per lane, rendered on scrape.

    Not prometheus_client's global registry: several workers can live in one process (tests),
    and vLLM unregisters its own collectors from the global one at each engine start.
    """

    def __init__(self, worker_id: str, *, metrics_on: bool = True, kpi_ttl_s: int = 0):
        self.worker_id = worker_id
        # Set by the Worker: (ok, why) for /healthz and /readyz (workers/http.py).
        self.health: Callable[[], tuple[bool, str]] = lambda: (True, "ok")
        self.readiness: Callable[[], tuple[bool, str]] = lambda: (True, "ok")
        self.metrics_on = metrics_on  # metrics_port != 0
        self.kpi = KpiBuffer(kpi_ttl_s, LATENCY_BUCKETS_S) if kpi_ttl_s > 0 else None
        self.enabled = metrics_on or self.kpi is not None  # lanes observe at all
        self.lanes: list[LaneMetrics] = []
        self.started_at = time.time()
        self.server: MetricsServer | None = None

    @classmethod
    def attach(cls, worker) -> WorkerMetrics:
        """Give every runner of `worker` its metrics (null ones when metrics_port and
        kpi_ttl_s are both 0), and hand engines that take one a sink for their statistics."""
        s = worker.settings
        metrics = cls(worker.worker_id, metrics_on=s.metrics_port != 0, kpi_ttl_s=s.kpi_ttl_s)
        for runner in worker.runners:
            runner.metrics = metrics.add_runner(runner, runner.engine)
        return metrics

    def remove_runner(self, runner: RunnerView) -> None:
        """A runner retired (docs/versions.md): its series leave /metrics, its engine's up
        time stops counting."""
        for lane in [lane for lane in self.lanes if lane.runner is runner]:
            self.lanes.remove(lane)
            if self.kpi is not None:
                self.kpi.unwatch(lane.busy)

    def add_runner(self, runner: RunnerView, engine: object) -> LaneMetrics | NullLaneMetrics:
        if not self.enabled:
            return NULL_LANE_METRICS
        lane_metrics = LaneMetrics(runner, self.kpi)
        self.lanes.append(lane_metrics)
        # An engine that reports its scheduler's figures takes a sink before it starts (the
        # vLLM engine passes it to AsyncLLM as a stat logger: workers/vllm_stats.py).
        set_sink: Callable | None = getattr(engine, "set_stats_sink", None)
        if set_sink is not None:
            set_sink(lane_metrics.engine_stats)
        return lane_metrics

    def serve(self, port: int, addr: str = "0.0.0.0") -> MetricsServer | None:
        """Answer /metrics on `port` (`agentfleet worker` does; 0 or metrics off: nothing).

        A port already taken is logged as an error and the worker goes on without serving:
        tasks matter more than their metrics, and Prometheus shows the target down.
        """
        if not port or not self.metrics_on:
            return None
        try:
            self.server = MetricsServer(self.render, port, addr, health=lambda: self.health(),
                                        readiness=lambda: self.readiness())
        except OSError as exc:
            log.error("worker %s: cannot serve metrics on %s:%d (%s); set "
                      "AGENTFLEET_METRICS_PORT to a free port, or 0 to turn metrics off",
                      self.worker_id, addr, port, exc, extra={"worker": self.worker_id})
            return None
        log.info("worker %s: metrics on http://%s:%d/metrics (health: /healthz, /readyz)",
                 self.worker_id, addr, self.server.port)
        return self.server

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    async def kpi_loop(self, redis) -> None:
        """Write the per-minute aggregates once a second (workers/kpi.py); nothing when off."""
        if self.kpi is not None:
            await self.kpi.flush_loop(redis)

    def render(self) -> bytes:
        """The text a scrape of /metrics returns (workers/exposition.py)."""
        return render(self)
