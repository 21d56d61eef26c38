"""Per-minute aggregates of finished tasks in Redis, for `agentfleet report` and `status`.

Prometheus keeps what workers did for as long as it retains data, but without tenants (an
unbounded label); an SLA report per tenant needs them, and must not depend on a Prometheus
being there.  So each worker also keeps small per-minute hashes in Redis:

    af:{model}:kpi:<minute start, epoch s>     (TTL kpi_ttl_s, 8 days by default)
      s:<status>:<lane>:<tenant>       tasks that ended with that status
      e:<error code>:<lane>:<tenant>   tasks that ended with that error code
      b:<i>:<lane>:<tenant>            tasks whose end-to-end latency is <= LATENCY_BUCKETS_S[i]
                                       and above the bound before (i = len: above the last)
      l:<lane>:<tenant>                sum of end-to-end latencies, seconds
      p:<lane>:<tenant>, o:<lane>:<tenant>   prompt and output tokens of succeeded tasks
    lane: `interactive`, or `bulk` for tasks of bulk jobs; the tenant is last, so it may hold
    any character.

The cost: the lane hands each committed group's lists (already built for the histograms) to
`KpiBuffer` by reference, no work per task; once a second the worker folds the buffer by
(minute, lane, tenant) and writes it with one pipeline of HINCRBY.  Neither the commit script
nor a round trip per commit group: a worker that dies loses at most a second of aggregates,
which a report tolerates (the task counters that alerts use are exact).
"""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_left
from collections import Counter, defaultdict
from itertools import repeat

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from agentfleet.schemas import keys

log = logging.getLogger("agentfleet.worker")

_MAX_PENDING_HASHES = 10_000  # unwritten (Redis down): keep this many, drop the oldest


class KpiBuffer:
    """Committed groups waiting for the next flush; fed by the lanes, flushed by the worker."""

    def __init__(self, ttl_s: int, bounds: tuple[float, ...]):
        self.ttl_s = ttl_s
        self.bounds = bounds
        # (model, minute, lane, tenants, end-to-end s, prompt tokens, output tokens):
        # a group whose tasks all succeeded
        self.groups: list[tuple] = []
        # (model, minute, lane, tenant, status, error code, end to end s | None, ptok, otok)
        self.tasks: list[tuple] = []
        self._unwritten: dict[tuple[str, int], dict[str, float]] = {}

    def fold(self) -> dict[tuple[str, int], dict[str, float]]:
        """What the buffer holds, as hash increments per (model, minute)."""
        groups, self.groups = self.groups, []
        tasks, self.tasks = self.tasks, []
        n_buckets = len(self.bounds) + 1
        # (model, minute, lane, tenant) -> totals
        acc: defaultdict[tuple, list] = defaultdict(lambda: _row(n_buckets))
        bounds = self.bounds
        for model, minute, lane, tenants, e2e, ptok, otok in groups:
            if tenants and tenants.count(tenants[0]) == len(tenants):
                # One tenant, the common case: whole-list sums in C, not a row update per task.
                row = acc[(model, minute, lane, tenants[0])]
                row[0]["succeeded"] = row[0].get("succeeded", 0) + len(tenants)
                buckets = row[2]
                for i, n in Counter(map(bisect_left, repeat(bounds), e2e)).items():
                    buckets[i] += n
                row[3] += sum(e2e)
                row[4] += sum(ptok)
                row[5] += sum(otok)
                continue
            for tenant, latency, p, o in zip(tenants, e2e, ptok, otok):
                row = acc[(model, minute, lane, tenant)]
                row[0]["succeeded"] = row[0].get("succeeded", 0) + 1
                row[2][bisect_left(bounds, latency)] += 1
                row[3] += latency
                row[4] += p
                row[5] += o
        for model, minute, lane, tenant, status, code, latency, p, o in tasks:
            row = acc[(model, minute, lane, tenant)]
            row[0][status] = row[0].get(status, 0) + 1
            if code:
                row[1][code] = row[1].get(code, 0) + 1
            if latency is not None:
                row[2][bisect_left(bounds, latency)] += 1
                row[3] += latency
            row[4] += p
            row[5] += o
        out: dict[tuple[str, int], dict[str, float]] = {}
        for (model, minute, lane, tenant), (statuses, codes, buckets, lat, p, o) in acc.items():
            fields = out.setdefault((model, minute), {})
            tail = f"{lane}:{tenant}"
            for status, n in statuses.items():
                fields[f"s:{status}:{tail}"] = n
            for code, n in codes.items():
                fields[f"e:{code}:{tail}"] = n
            for i, n in enumerate(buckets):
                if n:
                    fields[f"b:{i}:{tail}"] = n
            if lat:
                fields[f"l:{tail}"] = lat
            if p:
                fields[f"p:{tail}"] = p
            if o:
                fields[f"o:{tail}"] = o
        return out

    async def flush(self, redis: aioredis.Redis) -> None:
        """Write what the buffer holds (and what an earlier failed flush kept)."""
        fresh = self.fold()
        for key, fields in fresh.items():
            kept = self._unwritten.setdefault(key, {})
            for field, value in fields.items():
                kept[field] = kept.get(field, 0) + value
        if not self._unwritten:
            return
        todo, self._unwritten = self._unwritten, {}
        try:
            async with redis.pipeline(transaction=False) as pipe:
                for (model, minute), fields in todo.items():
                    key = keys.kpi_key(model, minute)
                    for field, value in fields.items():
                        if isinstance(value, float):
                            pipe.hincrbyfloat(key, field, value)
                        else:
                            pipe.hincrby(key, field, value)
                    pipe.expire(key, self.ttl_s)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            # Kept for the next flush.  A pipeline is not a transaction: if part of it was
            # applied, the retry counts those fields twice, which a report tolerates better
            # than a lost minute.
            for key, fields in todo.items():
                kept = self._unwritten.setdefault(key, {})
                for field, value in fields.items():
                    kept[field] = kept.get(field, 0) + value
            while len(self._unwritten) > _MAX_PENDING_HASHES:
                del self._unwritten[min(self._unwritten, key=lambda k: k[1])]
            log.warning("writing per-minute aggregates failed (%s); kept for the next try", exc)

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


def _row(n_buckets: int) -> list:
    # statuses, error codes, latency buckets, latency sum, prompt tokens, output tokens
    return [{}, {}, [0] * n_buckets, 0.0, 0, 0]


def parse_field(field: str) -> tuple[str, str, str, str] | None:
    """(kind, detail, lane, tenant) of a kpi hash field; detail is "" for l, p and o."""
    kind, _, rest = field.partition(":")
    if kind in ("s", "e", "b"):
        detail, _, rest = rest.partition(":")
    elif kind in ("l", "p", "o"):
        detail = ""
    else:
        return None
    lane, _, tenant = rest.partition(":")
    return kind, detail, lane, tenant
