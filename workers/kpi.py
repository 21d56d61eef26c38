"""Per-minute aggregates of finished tasks in Redis, for `agentfleet report`, `status` and the
console.

Prometheus keeps what workers did for as long as it retains data, but without tenants (an
unbounded label); an SLA report per tenant needs them, and must not depend on a Prometheus
being there.  So each worker also keeps small hashes in Redis, three families per model:

    af:{model}:kpi:<minute start, epoch s>     detail of one minute (TTL kpi_ttl_s, 8 days)
    af:{model}:kpih:<hour start, epoch s>      the same fields summed over one hour
                                               (TTL 4 x kpi_ttl_s: week-on-week reports)
    af:{model}:kpim:<hour start, epoch s>      one hour's minutes without tenant and version,
                                               field `<minute of the hour>/<field>` (TTL
                                               kpi_ttl_s): the plots' series

A report of a day reads 24 hour hashes and 24 series hashes, not 1,440 minute hashes whose
fields multiply with tenants and versions; minutes at the window's edges, and hours written
by older workers (no hour hash), are read from the minute hashes.

Fields that end in `<lane>:<tenant>` (the tenant last, so it may hold any character; the lane
is `interactive` or `bulk`, followed by `@<model version>` when the engine has one):

      s:<status>        tasks that ended with that status
      e:<error code>    tasks that ended with that error code
      b:<i>             tasks whose end-to-end latency is <= LATENCY_BUCKETS_S[i] and above
                        the bound before (i = len: above the last)
      l                 sum of end-to-end latencies, seconds
      p, o              prompt and output tokens of succeeded tasks
      t:<i>             time to first token from enqueue, succeeded tasks, same buckets
      q:<i>             queue wait (enqueue to read), same buckets
      w                 sum of queue waits, seconds
      g                 sum of engine seconds (engine start to end)
      d                 bulk-job tasks that succeeded within their job's completion window
      y:<error code>    attempts that failed transiently and were retried (not an end: the
                        task goes on, on the stable version for a canary's): what a canary's
                        guard counts besides the errors that ended tasks (docs/versions.md)
Fields of the model as a whole:
      x:<error code>    the correlation id of one task that ended with that code (HSET)
      c:up, c:busy      engine seconds up, and up with a task in flight, summed over workers
                        (sampled once a second): the engine-hours a report prices
      z:depth:<lane>    the lane's depth (lag + pending) when a worker sampled it, once a
                        minute (HSET: the last sample wins)

Hashes written before `t`, `q`, `w`, `g`, `d`, `x`, `c`, `z` and versions existed read as
before: the missing figures are absent, nothing else changes.

The cost: the lane hands each committed group's lists (already built for the histograms) to
`KpiBuffer` by reference, no work per task; once a second the worker folds the buffer by
(minute, lane, tenant) and writes it with one pipeline of HINCRBY.  Neither the commit script
nor a round trip per commit group: a worker that dies loses at most a second of aggregates,
which a report tolerates (the task counters that alerts use are exact).
"""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_left
from collections import Counter, defaultdict
from collections.abc import Callable
from itertools import repeat

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from agentfleet.schemas import keys

log = logging.getLogger("agentfleet.worker")

_MAX_PENDING_HASHES = 10_000  # unwritten (Redis down): keep this many, drop the oldest
HOUR_TTL_FACTOR = 4  # hour hashes live this many times kpi_ttl_s
LANES = ("interactive", "bulk")
RETRIED = "retried"  # the status a retried attempt is buffered with: counted as y:, not s:
# Fields summed into the series hashes (tenant and version dropped); the others stay per tail.
_SERIES_KINDS = frozenset("sebpotqdlwg")
# Latency histogram bounds (seconds): the Prometheus histograms (workers/metrics.py) and the
# per-minute aggregates share them.  Here, not there: the client's CLI (report, canary) reads
# them without prometheus_client.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                     2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_TAIL_KINDS = frozenset("sebtqy")  # a detail (status, code, bucket index) before the tail
_BARE_KINDS = frozenset("lpowgd")  # the tail right after the kind


class KpiBuffer:
    """Committed groups waiting for the next flush; fed by the lanes, flushed by the worker."""

    def __init__(self, ttl_s: int, bounds: tuple[float, ...]):
        self.ttl_s = ttl_s
        self.bounds = bounds
        # (model, minute, lane, tenants, end-to-end s, prompt tokens, output tokens,
        #  [first token from enqueue s, queue wait s, engine s, version, tasks within their
        #  deadline]): a group whose tasks all succeeded; the bracketed part may be missing
        self.groups: list[tuple] = []
        # (model, minute, lane, tenant, status, error code, end to end s | None, ptok, otok,
        #  [first token s | None, queue wait s | None, engine s | None, version,
        #  within deadline, correlation id])
        self.tasks: list[tuple] = []
        self._watched: list[tuple[str, Callable[[], int]]] = []
        self._last_tick: float | None = None
        self._capacity: defaultdict[tuple[str, int], list[float]] = defaultdict(lambda: [0.0, 0.0])
        self._depth_minute: dict[str, int] = {}  # model -> the minute whose depth was sampled
        self._unwritten: dict[str, dict[str, float | str]] = {}  # key -> fields
        self._ttl: dict[str, int] = {}  # key -> its TTL

    def watch(self, model: str, inflight: Callable[[], int]) -> None:
        """Sample a lane's tasks in flight once a flush: its engine is up, busy when > 0."""
        self._watched.append((model, inflight))
        if self._last_tick is None:
            self._last_tick = time.time()  # up from now, not from the first flush

    def unwatch(self, inflight: Callable[[], int]) -> None:
        """Stop sampling a lane (its runner was retired: docs/versions.md)."""
        self._watched = [(m, f) for m, f in self._watched if f is not inflight]

    def fold(self) -> dict[tuple[str, int], dict[str, float | str]]:
        """What the buffer holds, as minute-hash fields per (model, minute)."""
        groups, self.groups = self.groups, []
        tasks, self.tasks = self.tasks, []
        nb = len(self.bounds) + 1
        acc: defaultdict[tuple, _Row] = defaultdict(lambda: _Row(nb))
        examples: dict[tuple[str, int], dict[str, str]] = {}
        bounds = self.bounds
        for group in groups:
            model, minute, lane, tenants, e2e, ptok, otok = group[:7]
            tte, wait, eng, version, within = group[7:12] if len(group) > 7 else \
                ((), (), (), "", 0)
            tail = _tail(lane, version)
            if tenants and tenants.count(tenants[0]) == len(tenants):
                # One tenant, the common case: whole-list sums in C, not a row update per task.
                row = acc[(model, minute, tail, tenants[0])]
                row.statuses["succeeded"] = row.statuses.get("succeeded", 0) + len(tenants)
                _count_into(row.e2e, bounds, e2e)
                _count_into(row.ttft, bounds, tte)
                _count_into(row.wait, bounds, wait)
                row.e2e_sum += sum(e2e)
                row.wait_sum += sum(wait)
                row.engine_sum += sum(eng)
                row.ptok += sum(ptok)
                row.otok += sum(otok)
                row.within += within
                continue
            for i, tenant in enumerate(tenants):
                row = acc[(model, minute, tail, tenant)]
                row.statuses["succeeded"] = row.statuses.get("succeeded", 0) + 1
                row.e2e[bisect_left(bounds, e2e[i])] += 1
                row.e2e_sum += e2e[i]
                row.ptok += ptok[i]
                row.otok += otok[i]
                if tte:
                    row.ttft[bisect_left(bounds, tte[i])] += 1
                    row.wait[bisect_left(bounds, wait[i])] += 1
                    row.wait_sum += wait[i]
                    row.engine_sum += eng[i]
            if within:  # one bulk job per group: every task within its window, or none
                for tenant in set(tenants):
                    acc[(model, minute, tail, tenant)].within += tenants.count(tenant)
        for task in tasks:
            model, minute, lane, tenant, status, code, latency, p, o = task[:9]
            tte, wait, eng, version, within, corr = task[9:15] if len(task) > 9 else \
                (None, None, None, "", False, "")
            row = acc[(model, minute, _tail(lane, version), tenant)]
            if status == RETRIED:  # an attempt, not an end
                row.retries[code] = row.retries.get(code, 0) + 1
                continue
            row.statuses[status] = row.statuses.get(status, 0) + 1
            if code:
                row.codes[code] = row.codes.get(code, 0) + 1
                if corr:
                    examples.setdefault((model, minute), {}).setdefault(code, corr)
            if latency is not None:
                row.e2e[bisect_left(bounds, latency)] += 1
                row.e2e_sum += latency
            if tte is not None:
                row.ttft[bisect_left(bounds, tte)] += 1
            if wait is not None:
                row.wait[bisect_left(bounds, wait)] += 1
                row.wait_sum += wait
            if eng is not None:
                row.engine_sum += eng
            row.ptok += p
            row.otok += o
            row.within += bool(within)
        out: dict[tuple[str, int], dict[str, float | str]] = {}
        for (model, minute, lane_tail, tenant), row in acc.items():
            row.fields(out.setdefault((model, minute), {}), f"{lane_tail}:{tenant}")
        for (model, minute), codes in examples.items():
            fields = out.setdefault((model, minute), {})
            for code, corr in codes.items():
                fields[f"x:{code}"] = corr
        for (model, minute), (up, busy) in self._capacity.items():
            fields = out.setdefault((model, minute), {})
            fields["c:up"] = up
            fields["c:busy"] = busy
        self._capacity.clear()
        return out

    def tick(self, now: float) -> None:
        """Add the time since the last tick to each watched lane's up (and busy) seconds."""
        last, self._last_tick = self._last_tick, now
        if last is None or not self._watched:
            return
        elapsed = min(max(now - last, 0.0), 5.0)  # a stalled loop is not counted as up
        minute = int(now // 60) * 60
        for model, inflight in self._watched:
            cap = self._capacity[(model, minute)]
            cap[0] += elapsed
            if inflight() > 0:
                cap[1] += elapsed

    def _stage(self, minutes: dict[tuple[str, int], dict[str, float | str]]) -> None:
        """Add minute fields to the unwritten hashes of all three families."""
        long_ttl = self.ttl_s * HOUR_TTL_FACTOR
        for (model, minute), fields in minutes.items():
            hour = minute - minute % 3600
            offset = (minute - hour) // 60
            detail = keys.kpi_key(model, minute)
            hourly = keys.kpi_hour_key(model, hour)
            series = keys.kpi_series_key(model, hour)
            self._ttl[detail] = self._ttl[series] = self.ttl_s
            self._ttl[hourly] = long_ttl
            _merge(self._unwritten.setdefault(detail, {}), fields)
            hour_fields = {f: v for f, v in fields.items() if not f.startswith("z:")}
            _merge(self._unwritten.setdefault(hourly, {}), hour_fields)
            _merge(self._unwritten.setdefault(series, {}), series_fields(fields, offset))

    async def sample_depths(self, redis: aioredis.Redis, now: float) -> None:
        """Once a minute per watched model: each lane's depth (lag + pending), kept as z:
        fields of the minute (one XINFO GROUPS per lane; a failure skips the sample)."""
        minute = int(now // 60) * 60
        models = sorted({m for m, _ in self._watched if self._depth_minute.get(m) != minute})
        if not models:
            return
        for model in models:
            self._depth_minute[model] = minute
        try:
            async with redis.pipeline(transaction=False) as pipe:
                for model in models:
                    pipe.xinfo_groups(keys.task_stream(model))
                    pipe.xinfo_groups(keys.bulk_stream(model))
                replies = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            log.warning("sampling queue depth failed (%s)", exc)
            return
        staged: dict[tuple[str, int], dict[str, float | str]] = {}
        for i, model in enumerate(models):
            fields = staged.setdefault((model, minute), {})
            for lane, groups in zip(LANES, replies[2 * i:2 * i + 2]):
                depth = 0
                if not isinstance(groups, Exception):  # no stream yet: nothing queued
                    for g in groups:
                        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
                        if name == keys.GROUP:
                            depth = int(g.get("lag") or 0) + int(g["pending"])
                fields[f"z:depth:{lane}"] = str(depth)
        self._stage(staged)

    async def flush(self, redis: aioredis.Redis) -> None:
        """Write what the buffer holds (and what an earlier failed flush kept)."""
        now = time.time()
        self.tick(now)
        self._stage(self.fold())
        if self._watched:
            await self.sample_depths(redis, now)
        if not self._unwritten:
            return
        todo, self._unwritten = self._unwritten, {}
        try:
            async with redis.pipeline(transaction=False) as pipe:
                for key, fields in todo.items():
                    for field, value in fields.items():
                        if isinstance(value, str):
                            pipe.hset(key, field, value)
                        elif isinstance(value, float):
                            pipe.hincrbyfloat(key, field, value)
                        else:
                            pipe.hincrby(key, field, value)
                    pipe.expire(key, self._ttl.get(key, self.ttl_s))
                await pipe.execute()
        except (RedisError, OSError) as exc:
            # Kept for the next flush.  A pipeline is not a transaction: if part of it was
            # applied, the retry counts those fields twice, which a report tolerates better
            # than a lost minute.
            for key, fields in todo.items():
                _merge(self._unwritten.setdefault(key, {}), fields)
            while len(self._unwritten) > _MAX_PENDING_HASHES:
                del self._unwritten[next(iter(self._unwritten))]  # the oldest staged
            log.warning("writing per-minute aggregates failed (%s); kept for the next try", exc)
            return
        if len(self._ttl) > 4 * _MAX_PENDING_HASHES:
            self._ttl = {k: v for k, v in self._ttl.items() if k in self._unwritten}

    async def flush_loop(self, redis: aioredis.Redis, every_s: float = 1.0) -> None:
        """Flush every `every_s` until cancelled; then flush once more (drain included)."""
        try:
            while True:
                await asyncio.sleep(every_s)
                await self.flush(redis)
        except asyncio.CancelledError:
            try:
                await asyncio.wait_for(self.flush(redis), 5.0)
            except (TimeoutError, RedisError, OSError):
                log.warning("the last per-minute aggregates could not be written")
            raise


class _Row:
    """One (model, minute, lane, version, tenant)'s totals while folding."""

    __slots__ = ("statuses", "codes", "retries", "e2e", "ttft", "wait", "e2e_sum", "wait_sum",
                 "engine_sum", "ptok", "otok", "within")

    def __init__(self, n_buckets: int):
        self.statuses: dict[str, int] = {}
        self.codes: dict[str, int] = {}
        self.retries: dict[str, int] = {}
        self.e2e = [0] * n_buckets
        self.ttft = [0] * n_buckets
        self.wait = [0] * n_buckets
        self.e2e_sum = self.wait_sum = self.engine_sum = 0.0
        self.ptok = self.otok = self.within = 0

    def fields(self, out: dict[str, float | str], tail: str) -> None:
        for status, n in self.statuses.items():
            out[f"s:{status}:{tail}"] = n
        for code, n in self.codes.items():
            out[f"e:{code}:{tail}"] = n
        for code, n in self.retries.items():
            out[f"y:{code}:{tail}"] = n
        for kind, buckets in (("b", self.e2e), ("t", self.ttft), ("q", self.wait)):
            for i, n in enumerate(buckets):
                if n:
                    out[f"{kind}:{i}:{tail}"] = n
        for kind, value in (("l", self.e2e_sum), ("w", self.wait_sum), ("g", self.engine_sum)):
            if value:
                out[f"{kind}:{tail}"] = float(value)
        for kind, value in (("p", self.ptok), ("o", self.otok), ("d", self.within)):
            if value:
                out[f"{kind}:{tail}"] = value


def _tail(lane: str, version: str) -> str:
    """The lane part of a field: `lane`, or `lane@version` (a colon in a version would end the
    lane early, so it is written as '_')."""
    return f"{lane}@{version.replace(':', '_')}" if version else lane


def _count_into(buckets: list[int], bounds: tuple[float, ...], values) -> None:
    for i, n in Counter(map(bisect_left, repeat(bounds), values)).items():
        buckets[i] += n


def _merge(into: dict[str, float | str], fields: dict[str, float | str]) -> None:
    for field, value in fields.items():
        if isinstance(value, str):
            into[field] = value
        else:
            into[field] = into.get(field, 0) + value


def series_fields(fields: dict[str, float | str], offset: int) -> dict[str, float | str]:
    """A minute's fields as series fields: `<offset>/<field>`, tenant and version dropped
    (summed), error examples left out."""
    out: dict[str, float | str] = {}
    for field, value in fields.items():
        kind = field[:1]
        if kind in "cz":
            name = f"{offset}/{field}"
            if isinstance(value, str):
                out[name] = value
            else:
                out[name] = out.get(name, 0) + value
            continue
        if kind not in _SERIES_KINDS:
            continue
        parsed = parse_field(field)
        if parsed is None:
            continue
        kind, detail, lane, _ = parsed
        lane = lane.partition("@")[0]
        name = f"{offset}/{kind}:{detail}:{lane}:" if kind in _TAIL_KINDS else \
            f"{offset}/{kind}:{lane}:"
        out[name] = out.get(name, 0) + value
    return out


def parse_field(field: str) -> tuple[str, str, str, str] | None:
    """(kind, detail, lane, tenant) of a per-tenant field; detail is "" for kinds without one
    (l, p, o, w, g, d); the lane may carry `@version` (see `split_lane`); None for others."""
    kind, _, rest = field.partition(":")
    if kind in _TAIL_KINDS:
        detail, _, rest = rest.partition(":")
    elif kind in _BARE_KINDS:
        detail = ""
    else:
        return None
    lane, _, tenant = rest.partition(":")
    return kind, detail, lane, tenant


def split_lane(lane: str) -> tuple[str, str]:
    """(lane, model version) of a field's lane part; the version is "" when not recorded."""
    name, _, version = lane.partition("@")
    return name, version
