"""`agentfleet exporter`: the queue-wide gauges, read from Redis once per scrape.

Workers export what they did (workers/metrics.py); what the queue holds is one fact per model,
and N workers exporting it would count it N times.  So one exporter per fleet reads, on each
scrape, in two pipelines: first each lane's tenant set (the tenants that have a stream in
it), then, for every configured model:

  for each tenant's stream of each lane (interactive `tasks`, and `bulk` for bulk jobs):
    XLEN               entries kept in the stream (acknowledged ones stay until trimmed)
    XINFO GROUPS       the group's lag (never delivered) and pending (delivered, not acked)
    XPENDING summary   the oldest pending id: its millisecond part is when it was enqueued
  and once per model:
    HGETALL workers    heartbeats: a worker is live if it beat within `live_within_s`
    HGETALL stats      the fleet's counters kept by the commit script (written, retried ...)
    ZCARD delayed      retries waiting for their due time
    XLEN dead          dead letters kept
    HGETALL queued     tasks queued and not ended, per tenant (the max_queued quota's count)
    HGETALL refused    submits refused by a quota, per tenant and quota
A lane's gauges sum its tenants' streams.  Per-tenant gauges name the `TOP_TENANTS` tenants
with the most queued work of each model and sum the others as "other": labels stay bounded.
A registered model (docs/versions.md) has streams per version: the first pipeline also reads
its registry entry, a second one its versions' tenant sets, and its lanes' gauges sum every
version's streams (what autoscaling reads); `agentfleet_version_queue_lag_tasks` and
`agentfleet_version_weight_ratio` show them per version (the registry's versions: as many as
operators register).

`read_queues` is also what `agentfleet status` shows.

Backlog tokens per lane (`agentfleet_queue_backlog_tokens`, what KEDA scales bulk work on)
are an estimate from the last hour's per-minute aggregates, re-read once a minute
(ops/capacity.py).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence

import msgspec
import redis
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from redis.exceptions import RedisError

from agentfleet.ops.capacity import DEFAULT_TASK_TOKENS, BacklogEstimator
from agentfleet.producer.connection import connect_sync
from agentfleet.schemas import keys
from agentfleet.schemas.registry import SERVING, serving_weights
from agentfleet.schemas.wire import decode_model_entry

log = logging.getLogger("agentfleet.exporter")

LIVE_WITHIN_S = keys.LIVE_WITHIN_S  # heartbeats come every 2 s: five missed and it is gone
TOP_TENANTS = 10  # tenants named in per-tenant gauges, per model; the rest are "other"
_PER_STREAM = 3  # commands per tenant stream
_PER_MODEL = 6  # commands per model after its streams

# stats hash field -> counter name and meaning (fields the commit and reclaim scripts write)
FLEET_COUNTERS = {
    "written": ("agentfleet_fleet_results_written_total", "Results written (first write)."),
    "duplicates": ("agentfleet_fleet_duplicate_results_total",
                   "Results dropped because the task already had one."),
    "followups": ("agentfleet_fleet_followups_enqueued_total", "Follow-up tasks enqueued."),
    "fenced": ("agentfleet_fleet_fenced_results_total",
               "Results dropped because another worker had reclaimed the task."),
    "retried": ("agentfleet_fleet_task_retries_total",
                "Attempts that failed transiently and were scheduled again."),
    "dead_lettered": ("agentfleet_fleet_dead_letters_total",
                      "Tasks moved to the dead-letter stream."),
    "lost": ("agentfleet_fleet_tasks_lost_total",
             "Pending tasks whose stream entry vanished before they finished."),
    "cache_hits": ("agentfleet_result_cache_hits_total",
                   "Tasks answered at submit from the result cache, never run."),
    "cache_joins": ("agentfleet_result_cache_joins_total",
                    "Tasks joined to the identical task in flight, never run."),
    "cache_requeued": ("agentfleet_result_cache_requeued_total",
                       "Joined tasks queued after all because the task they joined failed."),
}


class StreamStats(msgspec.Struct, kw_only=True):
    """One of a model's task streams (its interactive or its bulk lane) at one moment."""

    entries: int = 0
    lag: float = 0.0  # NaN when the server cannot tell (entries deleted past the group)
    pending: int = 0
    oldest_pending_age_s: float = 0.0  # 0 when nothing is pending
    exists: bool = False  # False before a task or a worker created the stream


class QueueStats(msgspec.Struct, kw_only=True):
    """One model's queue as Redis holds it at one moment."""

    model: str
    interactive: StreamStats = msgspec.field(default_factory=StreamStats)
    bulk: StreamStats = msgspec.field(default_factory=StreamStats)
    live_workers: int = 0
    delayed: int = 0
    dead_letters: int = 0
    counters: dict[str, int] = {}
    # (lane, tenant) -> its stream; lane "interactive" or "bulk"
    tenants: dict[tuple[str, str], StreamStats] = {}
    queued: dict[str, int] = {}  # tenant -> tasks queued and not ended
    refused: dict[tuple[str, str], int] = {}  # (tenant, quota) -> submits refused
    # registered models: (version, lane) -> its streams summed; version -> traffic share
    versions: dict[tuple[str, str], StreamStats] = {}
    weights: dict[str, float] = {}


LANES = ("interactive", "bulk")


# model -> [(lane name, tenant, version, affinity partition or None)]: every stream, a tenant's
# partitions beside its stream (docs/affinity.md)
Streams = dict[str, list[tuple[str, str, str, int | None]]]


def read_queues(client: redis.Redis, models: Sequence[str], *,
                live_within_s: float = LIVE_WITHIN_S) -> list[QueueStats]:
    """Every model's queue figures, in two pipelines, three with registered models (raises
    RedisError if Redis is down)."""
    with client.pipeline(transaction=False) as pipe:
        tenant_commands(pipe, models)
        streams, entries = parse_tenants(models, pipe.execute())
    if entries:
        with client.pipeline(transaction=False) as pipe:
            version_commands(pipe, entries)
            add_versions(streams, entries, pipe.execute())
    with client.pipeline(transaction=False) as pipe:
        queue_commands(pipe, models, streams)
        replies = pipe.execute(raise_on_error=False)
    return parse_queues(models, streams, replies, live_within_s=live_within_s,
                        entries=entries)


async def read_queues_async(client, models: Sequence[str], *,
                            live_within_s: float = LIVE_WITHIN_S) -> list[QueueStats]:
    """`read_queues` on an asyncio client (the console)."""
    async with client.pipeline(transaction=False) as pipe:
        tenant_commands(pipe, models)
        streams, entries = parse_tenants(models, await pipe.execute())
    if entries:
        async with client.pipeline(transaction=False) as pipe:
            version_commands(pipe, entries)
            add_versions(streams, entries, await pipe.execute())
    async with client.pipeline(transaction=False) as pipe:
        queue_commands(pipe, models, streams)
        replies = await pipe.execute(raise_on_error=False)
    return parse_queues(models, streams, replies, live_within_s=live_within_s,
                        entries=entries)


def tenant_commands(pipe, models: Sequence[str]) -> None:
    for model in models:
        for lane in keys.LANES:
            pipe.zrange(keys.tenant_lanes(model, lane), 0, -1)
        pipe.hget(keys.models(), model)
        pipe.hget(keys.affinity_config(model), "partitions")


def parse_tenants(models: Sequence[str], replies: list) -> tuple[Streams, dict]:
    """model -> (lane, tenant, "", part) of every unversioned tenant stream (the default
    tenant's always) and its affinity partitions, as many as the model's workers announce
    (docs/affinity.md); and the registry entries of the registered models."""
    out: Streams = {}
    entries = {}
    for i, model in enumerate(models):
        streams = out[model] = []
        announced = replies[4 * i + 3]
        parts = [None, *range(int(announced))] if announced else [None]
        for j, (lane, name) in enumerate(zip(keys.LANES, LANES)):
            tenants = {t.decode() for t in replies[4 * i + j]} | {keys.DEFAULT_TENANT}
            streams += [(name, t, "", p) for t in sorted(tenants) for p in parts]
        if replies[4 * i + 2] is not None:
            entries[model] = decode_model_entry(replies[4 * i + 2])
    return out, entries


def _parts(streams: list) -> list[int | None]:
    """The affinity partitions `parse_tenants` found for a model (None: the stream itself)."""
    return [None, *sorted({p for *_, p in streams if p is not None})]


def version_commands(pipe, entries: dict) -> None:
    for model, entry in entries.items():
        for version in entry.versions:
            for lane in keys.LANES:
                pipe.zrange(keys.tenant_lanes(model, lane, version), 0, -1)


def add_versions(streams: Streams, entries: dict, replies: list) -> None:
    """Add every version's tenant streams: of serving versions always, of the others while
    their tenant sets hold a tenant (the canary guard moves what they hold)."""
    at = 0
    for model, entry in entries.items():
        parts = _parts(streams[model])
        for version, v in entry.versions.items():
            for name in LANES:
                tenants = {t.decode() for t in replies[at]}
                at += 1
                if v.state in SERVING:
                    tenants.add(keys.DEFAULT_TENANT)
                streams[model] += [(name, t, version, p) for t in sorted(tenants)
                                   for p in parts]


def queue_commands(pipe, models: Sequence[str], streams: Streams) -> None:
    """Queue the reads of `read_queues` on a pipeline, sync or asyncio."""
    for model in models:
        for lane, tenant, version, part in streams[model]:
            stream = keys.lane_stream(model, "b" if lane == "bulk" else "i", tenant, version,
                                      part)
            pipe.xlen(stream)
            pipe.xinfo_groups(stream)
            pipe.xpending(stream, keys.GROUP)
        pipe.hgetall(keys.workers_key(model))
        pipe.hgetall(keys.stats_key(model))
        pipe.zcard(keys.delayed_key(model))
        pipe.xlen(keys.dead_stream(model))
        pipe.hgetall(keys.queued_counts(model))
        pipe.hgetall(keys.quota_refusals(model))


def parse_queues(models: Sequence[str], streams: Streams, replies: list, *,
                 live_within_s: float = LIVE_WITHIN_S,
                 entries: dict | None = None) -> list[QueueStats]:
    """The replies of `queue_commands` as QueueStats."""
    now = time.time()
    out = []
    at = 0
    for model in models:
        per = streams[model]
        r = replies[at:at + _PER_STREAM * len(per) + _PER_MODEL]
        at += len(r)
        beats, stats, delayed, dead, queued, refused = r[_PER_STREAM * len(per):]
        for reply in (beats, stats, delayed, dead, queued, refused):
            if isinstance(reply, Exception):  # a wrong type under our key: not ours to hide
                raise reply
        q = QueueStats(
            model=model, delayed=delayed, dead_letters=dead,
            counters={k.decode(): int(v) for k, v in stats.items()},
            live_workers=keys.live_workers(beats.values(), now, live_within_s),
            queued={k.decode(): int(v) for k, v in queued.items()},
            refused={tuple(k.decode().split("|", 1)): int(v) for k, v in refused.items()})
        q.tenants, q.versions = {}, {}
        for j, (lane, tenant, version, _) in enumerate(per):  # partitions add up per tenant
            xlen = r[_PER_STREAM * j]
            if isinstance(xlen, Exception):
                raise xlen
            one = _stream_stats(*r[_PER_STREAM * j:_PER_STREAM * (j + 1)], now)
            _add(q.tenants.setdefault((lane, tenant), StreamStats()), one)
            _add(getattr(q, lane), one)
            if version:
                _add(q.versions.setdefault((version, lane), StreamStats()), one)
        if entries is not None and model in entries:
            q.weights = _shares(entries[model])
        out.append(q)
    return out


def _shares(entry) -> dict[str, float]:
    weights = serving_weights(entry)
    total = sum(weights.values()) or 1.0
    return {v: w / total for v, w in weights.items()}


def _add(total: StreamStats, one: StreamStats) -> None:
    total.entries += one.entries
    total.lag += one.lag
    total.pending += one.pending
    total.oldest_pending_age_s = max(total.oldest_pending_age_s, one.oldest_pending_age_s)
    total.exists = total.exists or one.exists


def top_tenants(q: QueueStats, n: int = TOP_TENANTS) -> set[str]:
    """The `n` tenants of a model with the most queued work: named in gauges."""
    work: dict[str, float] = {}
    for (_, tenant), st in q.tenants.items():
        lag = 0.0 if math.isnan(st.lag) else st.lag
        work[tenant] = work.get(tenant, 0.0) + lag + st.pending
    for tenant, count in q.queued.items():
        work[tenant] = max(work.get(tenant, 0.0), float(count))
    return set(sorted(work, key=lambda t: (-work[t], t))[:n])


def _stream_stats(xlen: int, groups, pending, now: float) -> StreamStats:
    q = StreamStats(entries=xlen, exists=not isinstance(groups, Exception) or xlen > 0)
    group = None
    if not isinstance(groups, Exception):  # "no such key": no stream yet
        group = next((g for g in groups if _text(g["name"]) == keys.GROUP), None)
    if group is None:
        q.lag = float(xlen)  # no group yet: nothing was ever delivered
    else:
        lag = group.get("lag")
        q.lag = float(lag) if lag is not None else math.nan
        q.pending = int(group["pending"])
    if not isinstance(pending, Exception) and pending["pending"]:
        q.pending = int(pending["pending"])
        q.oldest_pending_age_s = max(now - _id_ms(pending["min"]) / 1000, 0.0)
    return q


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _id_ms(entry_id: bytes | str) -> int:
    return int(_text(entry_id).split("-", 1)[0])


class QueueCollector:
    """A prometheus_client collector that reads Redis on every scrape."""

    def __init__(self, client: redis.Redis, models: Sequence[str], *,
                 live_within_s: float = LIVE_WITHIN_S,
                 default_task_tokens: float = DEFAULT_TASK_TOKENS,
                 registered: bool = False):
        self.client = client
        self.models = list(models)
        self.registered = registered  # also every model of the model registry, as it grows
        self.live_within_s = live_within_s
        self.backlog = BacklogEstimator(client, self.models,
                                        default_task_tokens=default_task_tokens)

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        up = GaugeMetricFamily("agentfleet_exporter_redis_up",
                               "1 if the last scrape could read Redis, else 0.")
        try:
            models = list(self.models)
            if self.registered:
                known = set(models)
                models += sorted(m.decode() for m in self.client.hkeys(keys.models())
                                 if m.decode() not in known)
                self.backlog.models = models
            queues = read_queues(self.client, models, live_within_s=self.live_within_s)
            backlog = {q.model: self.backlog.tokens(q.model, queued_tasks(q)) for q in queues}
        except RedisError as exc:
            log.warning("exporter: reading Redis failed (%s)", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from queue_families(queues)
        yield backlog_family(backlog)
        took = GaugeMetricFamily("agentfleet_exporter_scrape_duration_seconds",
                                 "How long this scrape took to read Redis.")
        took.add_metric([], time.perf_counter() - started)
        yield took


def queue_families(queues: list[QueueStats]) -> Iterator[Metric]:
    per_lane = (
        ("agentfleet_queue_stream_entries", "Entries in the lane's task stream (acknowledged "
         "ones stay until a worker trims them).", "entries"),
        ("agentfleet_queue_lag_tasks", "Tasks never delivered to a worker (consumer-group "
         "lag); NaN when the server cannot tell.", "lag"),
        ("agentfleet_queue_pending_tasks", "Tasks delivered to a worker and not yet "
         "acknowledged.", "pending"),
        ("agentfleet_queue_oldest_pending_age_seconds", "Age of the oldest pending task, from "
         "its enqueue (its stream id); 0 when none is pending.", "oldest_pending_age_s"),
    )
    for name, doc, attr in per_lane:
        family = GaugeMetricFamily(name, doc + " lane: interactive, or bulk (bulk jobs).",
                                   labels=["model", "lane"])
        for q in queues:
            for lane in LANES:
                family.add_metric([q.model, lane], getattr(getattr(q, lane), attr))
        yield family
    per_model = (
        ("agentfleet_queue_delayed_tasks", "Retries waiting for their due time.", "delayed"),
        ("agentfleet_queue_dead_letter_entries", "Entries in the model's dead-letter stream.",
         "dead_letters"),
        ("agentfleet_live_workers", "Workers serving the model whose last heartbeat is "
         "recent.", "live_workers"),
    )
    for name, doc, attr in per_model:
        family = GaugeMetricFamily(name, doc, labels=["model"])
        for q in queues:
            family.add_metric([q.model], getattr(q, attr))
        yield family
    for field, (name, doc) in FLEET_COUNTERS.items():
        family = CounterMetricFamily(name, doc + " Kept in Redis: exact across worker "
                                     "restarts.", labels=["model"])
        for q in queues:
            family.add_metric([q.model], q.counters.get(field, 0))
        yield family
    yield from tenant_families(queues)
    yield from version_families(queues)


def version_families(queues: list[QueueStats]) -> Iterator[Metric]:
    """Registered models' versions (docs/versions.md): lag per version and lane, and each
    serving version's share of the routed traffic."""
    lag = GaugeMetricFamily(
        "agentfleet_version_queue_lag_tasks", "Tasks of a model version never delivered to a "
        "worker, by lane (a version that no longer serves, until its tasks moved to the "
        "stable version).", labels=["model", "version", "lane"])
    share = GaugeMetricFamily(
        "agentfleet_version_weight_ratio", "A serving version's share of its model's routed "
        "traffic (its weight over the serving versions' weights).",
        labels=["model", "version"])
    for q in queues:
        for (version, lane), st in sorted(q.versions.items()):
            lag.add_metric([q.model, version, lane], st.lag)
        for version, ratio in sorted(q.weights.items()):
            share.add_metric([q.model, version], ratio)
    yield from (lag, share)


def tenant_families(queues: list[QueueStats]) -> Iterator[Metric]:
    """Per-tenant gauges: the top tenants of each model by name, the rest as "other"."""
    lag = GaugeMetricFamily(
        "agentfleet_tenant_queue_lag_tasks", "Tasks of a tenant never delivered to a worker, "
        "by lane; the tenants with the most queued work by name, the rest as \"other\".",
        labels=["model", "lane", "tenant"])
    queued = GaugeMetricFamily(
        "agentfleet_tenant_queued_tasks", "Tasks of a tenant queued and not yet ended (what "
        "its max_queued quota counts).", labels=["model", "tenant"])
    refused = CounterMetricFamily(
        "agentfleet_tenant_quota_refusals", "Submits refused by a tenant's quota.",
        labels=["model", "tenant", "quota"])
    for q in queues:
        top = top_tenants(q)
        lags: dict[tuple[str, str], float] = {}
        for (lane, tenant), st in q.tenants.items():
            key = (lane, tenant if tenant in top else "other")
            lags[key] = lags.get(key, 0.0) + (0.0 if math.isnan(st.lag) else st.lag)
        for (lane, tenant), value in sorted(lags.items()):
            lag.add_metric([q.model, lane, tenant], value)
        counts: dict[str, int] = {}
        for tenant, count in q.queued.items():
            name = tenant if tenant in top else "other"
            counts[name] = counts.get(name, 0) + count
        for tenant, count in sorted(counts.items()):
            queued.add_metric([q.model, tenant], count)
        refusals: dict[tuple[str, str], int] = {}
        for (tenant, quota), count in q.refused.items():
            key = (tenant if tenant in top else "other", quota)
            refusals[key] = refusals.get(key, 0) + count
        for (tenant, quota), count in sorted(refusals.items()):
            refused.add_metric([q.model, tenant, quota], count)
    yield from (lag, queued, refused)


def queued_tasks(q: QueueStats) -> dict[str, float]:
    """Tasks each lane still has to run: never delivered (lag) plus delivered, unfinished."""
    return {lane: getattr(q, lane).lag + getattr(q, lane).pending for lane in LANES}


def backlog_family(backlog: dict[str, dict[str, float]]) -> Metric:
    family = GaugeMetricFamily(
        "agentfleet_queue_backlog_tokens",
        "Prompt+output tokens the lane's queued tasks (lag + pending) will cost. An ESTIMATE: "
        "queued tasks times the lane's mean tokens per succeeded task over the last hour "
        "(else the model's, else the exporter's --default-task-tokens). lane: interactive, "
        "or bulk (bulk jobs).", labels=["model", "lane"])
    for model, lanes in backlog.items():
        for lane, tokens in lanes.items():
            family.add_metric([model, lane], tokens)
    return family


def exporter_registry(client: redis.Redis, models: Sequence[str], *,
                      default_task_tokens: float = DEFAULT_TASK_TOKENS,
                      registered: bool = False) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(QueueCollector(client, models, default_task_tokens=default_task_tokens,
                                     registered=registered))
    return registry


def run_exporter(url: str, models: Sequence[str], *, port: int, addr: str = "0.0.0.0",
                 once: bool = False, default_task_tokens: float = DEFAULT_TASK_TOKENS,
                 registered: bool = False) -> int:
    """Serve the queue gauges on `port` until SIGTERM or SIGINT (`once`: print them, exit)."""
    import signal
    import threading

    from prometheus_client import generate_latest

    from agentfleet.schemas.errors import FatalConfigError
    from agentfleet.workers.metrics import MetricsServer

    client = connect_sync(url, socket_timeout=5)
    registry = exporter_registry(client, models, default_task_tokens=default_task_tokens,
                                 registered=registered)
    try:
        if once:
            print(generate_latest(registry).decode(), end="", flush=True)
            return 0
        try:
            server = MetricsServer(lambda: generate_latest(registry), port, addr)
        except OSError as exc:  # the exporter's only job: failing to listen is fatal
            raise FatalConfigError(f"exporter: cannot listen on {addr}:{port} ({exc}); "
                                   f"pass --port") from exc
        log.info("exporter for %s on http://%s:%d/metrics", list(models), addr, server.port)
        print(f"metrics on {server.url}", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        server.close()
        return 0
    finally:
        client.close()
