"""`agentfleet exporter`: the queue-wide gauges, read from Redis once per scrape.

Workers export what they did (workers/metrics.py); what the queue holds is one fact per model,
and N workers exporting it would count it N times.  So one exporter per fleet reads, on each
scrape and in one pipeline per scrape, for every configured model:

  for each lane's stream (interactive `tasks`, and `bulk` for bulk jobs):
    XLEN               entries kept in the stream (acknowledged ones stay until trimmed)
    XINFO GROUPS       the group's lag (never delivered) and pending (delivered, not acked)
    XPENDING summary   the oldest pending id: its millisecond part is when it was enqueued
  and once per model:
    HGETALL workers    heartbeats: a worker is live if it beat within `live_within_s`
    HGETALL stats      the fleet's counters kept by the commit script (written, retried ...)
    ZCARD delayed      retries waiting for their due time
    XLEN dead          dead letters kept

`read_queues` is also what `agentfleet status` shows.
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

from agentfleet.producer.connection import connect_sync
from agentfleet.schemas import keys

log = logging.getLogger("agentfleet.exporter")

LIVE_WITHIN_S = 10.0  # heartbeats come every 2 s: five missed beats and a worker is gone
_COMMANDS_PER_MODEL = 10  # 3 per lane stream, 4 per model

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


LANES = ("interactive", "bulk")


def _lane_streams(model: str) -> tuple[str, str]:
    return keys.task_stream(model), keys.bulk_stream(model)


def read_queues(client: redis.Redis, models: Sequence[str], *,
                live_within_s: float = LIVE_WITHIN_S) -> list[QueueStats]:
    """Every model's queue figures, in one pipeline (raises RedisError if Redis is down)."""
    with client.pipeline(transaction=False) as pipe:
        queue_commands(pipe, models)
        replies = pipe.execute(raise_on_error=False)
    return parse_queues(models, replies, live_within_s=live_within_s)


async def read_queues_async(client, models: Sequence[str], *,
                            live_within_s: float = LIVE_WITHIN_S) -> list[QueueStats]:
    """`read_queues` on an asyncio client (the console)."""
    async with client.pipeline(transaction=False) as pipe:
        queue_commands(pipe, models)
        replies = await pipe.execute(raise_on_error=False)
    return parse_queues(models, replies, live_within_s=live_within_s)


def queue_commands(pipe, models: Sequence[str]) -> None:
    """Queue the reads of `read_queues` on a pipeline, sync or asyncio."""
    for model in models:
        for stream in _lane_streams(model):
            pipe.xlen(stream)
            pipe.xinfo_groups(stream)
            pipe.xpending(stream, keys.GROUP)
        pipe.hgetall(keys.workers_key(model))
        pipe.hgetall(keys.stats_key(model))
        pipe.zcard(keys.delayed_key(model))
        pipe.xlen(keys.dead_stream(model))


def parse_queues(models: Sequence[str], replies: list, *,
                 live_within_s: float = LIVE_WITHIN_S) -> list[QueueStats]:
    """The replies of `queue_commands` as QueueStats."""
    now = time.time()
    out = []
    for i, model in enumerate(models):
        r = replies[i * _COMMANDS_PER_MODEL:(i + 1) * _COMMANDS_PER_MODEL]
        beats, stats, delayed, dead = r[6:]
        for reply in (r[0], r[3], beats, stats, delayed, dead):
            if isinstance(reply, Exception):  # a wrong type under our key: not ours to hide
                raise reply
        out.append(QueueStats(
            model=model, interactive=_stream_stats(*r[0:3], now), bulk=_stream_stats(*r[3:6], now),
            delayed=delayed, dead_letters=dead,
            counters={k.decode(): int(v) for k, v in stats.items()},
            live_workers=sum(now - float(at) <= live_within_s for at in beats.values())))
    return out


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
                 live_within_s: float = LIVE_WITHIN_S):
        self.client = client
        self.models = list(models)
        self.live_within_s = live_within_s

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        up = GaugeMetricFamily("agentfleet_exporter_redis_up",
                               "1 if the last scrape could read Redis, else 0.")
        try:
            queues = read_queues(self.client, self.models, live_within_s=self.live_within_s)
        except RedisError as exc:
            log.warning("exporter: reading Redis failed (%s)", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from queue_families(queues)
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


def exporter_registry(client: redis.Redis, models: Sequence[str]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(QueueCollector(client, models))
    return registry


def run_exporter(url: str, models: Sequence[str], *, port: int, addr: str = "0.0.0.0",
                 once: bool = False) -> int:
    """Serve the queue gauges on `port` until SIGTERM or SIGINT (`once`: print them, exit)."""
    import signal
    import threading

    from prometheus_client import generate_latest

    from agentfleet.schemas.errors import FatalConfigError
    from agentfleet.workers.metrics import MetricsServer

    client = connect_sync(url, socket_timeout=5)
    registry = exporter_registry(client, models)
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
