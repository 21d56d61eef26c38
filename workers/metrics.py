"""What one worker saw, as Prometheus metrics, at almost no cost per task.

A lane calls `observe_read` once per read window and `observe_commit` once per commit
group; nothing else on the hot path touches a metric.  The per-task work is one Python loop
that appends six floats to plain lists.  prometheus_client's own `Histogram.observe` takes a
lock and walks the bucket bounds in Python (about 1.5 us); six of them per task would cost the
queue-layer benchmark more than its 10% budget.  The raw values are folded into cumulative
bucket counts (one sort, then a C bisect per bound) when a scrape comes or a buffer fills, and
a custom collector turns the counts into metric families at scrape time.

Gauges that the lane already knows (tasks in flight) and its `LaneStats` counters (retries,
reclaims, dead letters, duplicates, fenced) are read at scrape time, for free.  Queue-wide
gauges (stream length, lag, pending, live workers) are not here: N workers would report them
N times; `agentfleet exporter` (ops/exporter.py) reads them from Redis once per scrape.

Labels stay bounded: model, version, status, error_code, priority (0..9).  Never a task id
or a tenant.

Metric names are listed in docs/observability.md.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import msgspec
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.utils import floatToGoString
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from schemas.errors import ErrorCode
from schemas.wire import Status

if TYPE_CHECKING:
    from workers.worker import ModelLane, Worker

log = logging.getLogger("agentfleet.worker")

# Seconds: from half a millisecond (a queue hop on a fast server) to ten minutes (a long agent
# step on a busy engine).
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                     2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TOKEN_BUCKETS = tuple(float(2 ** i) for i in range(15))  # 1 .. 16384 tokens
SIZE_BUCKETS = tuple(float(2 ** i) for i in range(11))  # 1 .. 1024 tasks

# Past this many unfolded values a histogram folds on the event loop (under a millisecond),
# so memory stays bounded when nobody scrapes.
_FOLD_AT = 4096

# Failures an operator must hear about (logged at ERROR, hence sent to Sentry when it is on).
# Bad input (invalid_task, decode errors) is the producer's problem: counted, not alarmed.
_ALARMING = frozenset((ErrorCode.ENGINE_ERROR, ErrorCode.ENGINE_DEAD, ErrorCode.INTERNAL,
                       ErrorCode.ATTEMPTS_EXHAUSTED, ErrorCode.DELIVERY_LIMIT, ErrorCode.LOST))
_SUCCEEDED = (Status.SUCCEEDED.value, "")


class _Outcome(msgspec.Struct, kw_only=True):
    """The two fields of an encoded Result that the slow path needs (the rest is skipped)."""

    status: Status
    error_code: ErrorCode | None = None


_decode_outcome = msgspec.msgpack.Decoder(_Outcome).decode


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
        buckets = [(_le(b), c) for b, c in zip(self.bounds, self.cumulative)]
        buckets.append(("+Inf", self.count))
        return buckets, self.sum


def _le(bound: float) -> str:
    return floatToGoString(bound)


class LaneMetrics:
    """One lane's figures; the lane calls `observe_read` and `observe_commit`."""

    def __init__(self, lane: ModelLane):
        self.model = lane.model
        self._lane = lane
        self._lock = threading.Lock()  # the event loop appends, a scrape thread folds
        self.queue_wait = _Histogram(LATENCY_BUCKETS_S)
        self.first_token = _Histogram(LATENCY_BUCKETS_S)
        self.engine = _Histogram(LATENCY_BUCKETS_S)
        self.end_to_end: dict[int, _Histogram] = {}  # by priority
        self.prompt_tokens = _Histogram(TOKEN_BUCKETS)
        self.output_tokens = _Histogram(TOKEN_BUCKETS)
        self.read_window = _Histogram(SIZE_BUCKETS)
        self.commit_group = _Histogram(SIZE_BUCKETS)
        # (status, error code, priority) -> tasks that ended so; retries are not an end
        self.outcomes: dict[tuple[str, str, int], int] = {}
        # Written by the engine's stat logger (see `engine_stats`); None until it reports.
        self.kv_cache_usage: float | None = None
        self.engine_running: int | None = None
        self.engine_waiting: int | None = None
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.preemptions = 0

    @property
    def version(self) -> str:
        return self._lane.engine.model_version

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
        a_wait, a_e2e, a_ttft, a_eng = wait.append, e2e.append, ttft.append, eng.append
        a_ptok, a_otok = ptok.append, otok.append
        priority = done[0].task.priority if n and done[0].task is not None else 0
        for rec in done:  # the common case: every task ran and succeeded, one priority
            out, task = rec.output, rec.task
            if (out.error_code is not None or rec.cancelled or task is None
                    or task.priority != priority or not task.enqueued_at
                    or not out.first_token):
                self._observe_mixed(done, records, now)
                return
            enqueued, started = task.enqueued_at, out.engine_start
            a_wait(rec.read_at - enqueued)
            a_e2e(now - enqueued)
            a_ttft(out.first_token - started)
            a_eng(out.finished - started)
            a_ptok(out.prompt_tokens)
            a_otok(out.output_tokens)
        with self._lock:
            key = (Status.SUCCEEDED.value, "", priority)
            self.outcomes[key] = self.outcomes.get(key, 0) + n
            self.queue_wait.raw += wait
            self._e2e(priority).raw += e2e
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
        with self._lock:
            for rec, record in zip(done, records):
                out, task = rec.output, rec.task
                priority = task.priority if task is not None else 0
                enqueued = task.enqueued_at if task is not None else 0.0
                if enqueued:
                    self.queue_wait.raw.append(rec.read_at - enqueued)
                if out.engine_start:
                    self.engine.raw.append((out.finished or now) - out.engine_start)
                if record.outcome == b"y":  # back to the queue for another attempt
                    code = out.error_code.value if out.error_code else "retry"
                    _count_alarm(alarms, "warning", code, rec)
                    continue
                if out.error_code is None and not rec.cancelled:
                    status, code = _SUCCEEDED
                    if out.first_token and out.engine_start:
                        self.first_token.raw.append(out.first_token - out.engine_start)
                    self.prompt_tokens.raw.append(out.prompt_tokens)
                    self.output_tokens.raw.append(out.output_tokens)
                else:  # the final status and code are in the encoded result
                    outcome = _decode_outcome(record.v1)
                    status = outcome.status.value
                    code = outcome.error_code.value if outcome.error_code else ""
                    if outcome.error_code in _ALARMING:
                        _count_alarm(alarms, "error", code, rec)
                if enqueued:
                    self._e2e(priority).raw.append(now - enqueued)
                key = (status, code, priority)
                self.outcomes[key] = self.outcomes.get(key, 0) + 1
            self.commit_group.raw.append(len(done))
            if len(self.queue_wait.raw) > _FOLD_AT:
                self._fold()
        for (level, code), (count, rec) in alarms.items():
            self._report(level, code, count, rec)

    def _report(self, level: str, code: str, count: int, rec) -> None:
        """One log line per failure kind and group, naming its first task (logs and Sentry)."""
        task = rec.task
        extra = {"model": self.model, "worker": self._lane.worker_id, "batch_id": rec.batch_id,
                 "error_code": code}
        if task is not None:
            extra.update(task_id=task.id, correlation_id=task.correlation_id)
        what = "will be retried" if level == "warning" else "failed"
        log.log(logging.WARNING if level == "warning" else logging.ERROR,
                "model %s: %d task(s) %s with %s, first %s: %s", self.model, count, what, code,
                extra.get("task_id", "(undecodable)"), rec.output.error_message[:300],
                extra=extra)

    def _e2e(self, priority: int) -> _Histogram:
        hist = self.end_to_end.get(priority)
        if hist is None:
            hist = self.end_to_end[priority] = _Histogram(LATENCY_BUCKETS_S)
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

    def snapshot(self) -> _Snapshot:
        """Fold what is pending and copy the figures (called from the scrape thread)."""
        with self._lock:
            self._fold()
            hists = {name: getattr(self, name).sample() for name in (
                "queue_wait", "first_token", "engine", "prompt_tokens", "output_tokens",
                "read_window", "commit_group")}
            e2e = {p: h.sample() for p, h in self.end_to_end.items()}
            outcomes = dict(self.outcomes)
        return _Snapshot(hists=hists, end_to_end=e2e, outcomes=outcomes)


class _Snapshot(msgspec.Struct):
    hists: dict[str, tuple[list[tuple[str, float]], float]]
    end_to_end: dict[int, tuple[list[tuple[str, float]], float]]
    outcomes: dict[tuple[str, str, int], int]


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

# name, documentation, LaneMetrics histogram attribute
_HISTOGRAMS = (
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
# name, documentation, LaneStats field
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
)


class WorkerMetrics:
    """A worker's metrics registry: one `LaneMetrics` per lane, collected on scrape.

    Not the global prometheus_client registry: several workers can live in one process
    (tests), and vLLM unregisters its own collectors from the global one at each engine start.
    """

    def __init__(self, worker_id: str, *, enabled: bool = True):
        self.worker_id = worker_id
        self.enabled = enabled
        self.lanes: list[LaneMetrics] = []
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self.started_at = time.time()
        self.server: MetricsServer | None = None

    @classmethod
    def attach(cls, worker: Worker) -> WorkerMetrics:
        """Give every lane of `worker` its metrics (null ones when metrics_port is 0), and
        hand engines that take one a sink for their own statistics."""
        metrics = cls(worker.worker_id, enabled=worker.settings.metrics_port != 0)
        for lane in worker.lanes:
            lane.metrics = metrics.add_lane(lane)
        return metrics

    def add_lane(self, lane: ModelLane) -> LaneMetrics | NullLaneMetrics:
        if not self.enabled:
            return NULL_LANE_METRICS
        lane_metrics = LaneMetrics(lane)
        self.lanes.append(lane_metrics)
        # An engine that reports its scheduler's figures takes a sink before it starts (the
        # vLLM engine passes it to AsyncLLM as a stat logger: workers/vllm_stats.py).
        set_sink: Callable | None = getattr(lane.engine, "set_stats_sink", None)
        if set_sink is not None:
            set_sink(lane_metrics.engine_stats)
        return lane_metrics

    def serve(self, port: int, addr: str = "0.0.0.0") -> MetricsServer | None:
        """Answer /metrics on `port` (`agentfleet worker` does; 0 or metrics off: nothing).

        A port already taken is logged as an error and the worker goes on without serving:
        tasks matter more than their metrics, and Prometheus shows the target down.
        """
        if not port or not self.enabled:
            return None
        try:
            self.server = MetricsServer(self.registry, port, addr)
        except OSError as exc:
            log.error("worker %s: cannot serve metrics on %s:%d (%s); set "
                      "AGENTFLEET_METRICS_PORT to a free port, or 0 to turn metrics off",
                      self.worker_id, addr, port, exc, extra={"worker": self.worker_id})
            return None
        log.info("worker %s: metrics on http://%s:%d/metrics", self.worker_id, addr,
                 self.server.port)
        return self.server

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def render(self) -> bytes:
        """The text a scrape of /metrics returns."""
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        lanes = [(lm, lm.version, lm.snapshot()) for lm in self.lanes]
        labels = ["model", "version"]
        tasks = CounterMetricFamily(
            "agentfleet_tasks_total", "Tasks that reached an end on this worker, by status and "
            "error code (\"\" on success); a retried attempt is not an end.",
            labels=[*labels, "status", "error_code", "priority"])
        for lm, version, snap in lanes:
            for (status, code, priority), count in sorted(snap.outcomes.items()):
                tasks.add_metric([lm.model, version, status, code, str(priority)], count)
        yield tasks
        e2e = HistogramMetricFamily(
            "agentfleet_end_to_end_seconds", "From enqueue to the result committed and visible "
            "(timings.written - timings.enqueued), by task priority.",
            labels=[*labels, "priority"])
        for lm, version, snap in lanes:
            for priority, (buckets, total) in sorted(snap.end_to_end.items()):
                e2e.add_metric([lm.model, version, str(priority)], buckets, total)
        yield e2e
        for name, doc, attr in _HISTOGRAMS:
            family = HistogramMetricFamily(name, doc, labels=labels)
            for lm, version, snap in lanes:
                buckets, total = snap.hists[attr]
                family.add_metric([lm.model, version], buckets, total)
            yield family
        inflight = GaugeMetricFamily("agentfleet_inflight_tasks", "Tasks read and not yet "
                                     "committed (bounded by max_inflight).", labels=labels)
        for lm, version, _ in lanes:
            inflight.add_metric([lm.model, version], lm._lane.busy)
        yield inflight
        for name, doc, field in _LANE_COUNTERS:
            family = CounterMetricFamily(name, doc, labels=labels)
            for lm, version, _ in lanes:
                family.add_metric([lm.model, version], getattr(lm._lane.stats, field))
            yield family
        yield from self._engine_families(lanes, labels)
        started = GaugeMetricFamily("agentfleet_worker_start_time_seconds",
                                    "When this worker process started, epoch seconds.")
        started.add_metric([], self.started_at)
        yield started

    @staticmethod
    def _engine_families(lanes: list, labels: list[str]) -> Iterator[Metric]:
        """The engine's own figures; absent for engines that do not report them."""
        reporting = [(lm, v) for lm, v, _ in lanes if lm.kv_cache_usage is not None]
        kv = GaugeMetricFamily("agentfleet_engine_kv_cache_usage_ratio", "Share of the "
                               "engine's KV-cache blocks in use (0..1).", labels=labels)
        running = GaugeMetricFamily("agentfleet_engine_requests", "Requests in the engine's "
                                    "scheduler, by state.", labels=[*labels, "state"])
        queries = CounterMetricFamily("agentfleet_engine_prefix_cache_queries_total", "Prompt "
                                      "tokens looked up in the prefix cache.", labels=labels)
        hits = CounterMetricFamily("agentfleet_engine_prefix_cache_hits_total", "Prompt tokens "
                                   "found in the prefix cache (hit rate: rate(hits) / "
                                   "rate(queries)).", labels=labels)
        preempt = CounterMetricFamily("agentfleet_engine_preemptions_total", "Requests the "
                                      "engine preempted for lack of KV-cache space.",
                                      labels=labels)
        for lm, version in reporting:
            lv = [lm.model, version]
            kv.add_metric(lv, lm.kv_cache_usage)
            if lm.engine_running is not None:
                running.add_metric([*lv, "running"], lm.engine_running)
            if lm.engine_waiting is not None:
                running.add_metric([*lv, "waiting"], lm.engine_waiting)
            queries.add_metric(lv, lm.prefix_cache_queries)
            hits.add_metric(lv, lm.prefix_cache_hits)
            preempt.add_metric(lv, lm.preemptions)
        yield from (kv, running, queries, hits, preempt)


class MetricsServer:
    """An HTTP server answering /metrics from a registry, on a daemon thread."""

    def __init__(self, registry: CollectorRegistry, port: int, addr: str = "0.0.0.0"):
        self._httpd, self._thread = start_http_server(port, addr, registry)
        self.port: int = self._httpd.server_port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
