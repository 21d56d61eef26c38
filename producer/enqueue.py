"""The enqueue script (producer/lua/enqueue.lua): a chunk of one tenant's tasks for one lane,
with their idempotency keys, within the tenant's quotas, in one round trip."""

from __future__ import annotations

import time
from collections.abc import Sequence

import msgspec

from agentfleet.schemas import keys
from agentfleet.schemas.scripts import lua
from agentfleet.schemas.wire import TenantConfig


def enqueue_lua() -> str:
    return lua("agentfleet.producer", "enqueue", prelude="resultcache")


class CacheItem(msgspec.Struct, frozen=True, gc=False):
    """A task the result cache may answer: its tenant's cached answer to its input, the
    input's in-flight hash, and its waiter (schemas/resultcache.py, `waiter`)."""

    cache_key: str
    inflight_key: str
    waiter: bytes


class Lane(msgspec.Struct, frozen=True):
    """Where a chunk goes: one tenant's stream of one lane ("i" or "b") of a model (of one of
    its registered versions; "" for the unversioned streams)."""

    model: str
    lane: str
    tenant: str
    version: str = ""
    part: int | None = None  # its affinity partition; None: the unpartitioned stream

    @property
    def stream(self) -> str:
        return keys.lane_stream(self.model, self.lane, self.tenant, self.version, self.part)


def enqueue_args(lane: Lane, idem_ttl_s: int, items: Sequence[tuple], *,
                 quota: TenantConfig | None = None, partial: bool = False,
                 now: float | None = None) -> tuple[list, list]:
    """KEYS and ARGV of enqueue.lua for items (task id, idempotency key or None, payload,
    index, tokens, CacheItem or None)."""
    minute = int((time.time() if now is None else now) // 60) * 60
    m = lane.model
    keys_: list = [lane.stream, keys.tenant_lanes(m, lane.lane, lane.version),
                   keys.queued_counts(m), keys.tokens_minute(m, minute),
                   keys.quota_refusals(m), keys.stats_key(m)]
    args: list = [idem_ttl_s, lane.tenant, quota.max_queued if quota else 0,
                  quota.tokens_per_minute if quota else 0, 1 if partial else 0, keys.GROUP]
    for task_id, idem_key, payload, _, tokens, cache in items:
        k = c = 0
        if idem_key is not None:
            keys_.append(idem_key)
            k = len(keys_)
        if cache is not None:
            keys_ += (cache.cache_key, cache.inflight_key)
            c = len(keys_) - 1  # the cache key; its in-flight hash follows
        args += (tokens, k, c)
        if k:
            args.append(task_id)
        args.append(payload)
        if cache is not None:
            args.append(cache.waiter)
    return keys_, args
