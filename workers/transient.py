"""Errors a worker waits out (the server restarting, a network blip), and how it waits."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.exceptions import (
    ClusterError,
    NoScriptError,
    ReadOnlyError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from agentfleet.producer.connection import NoReplicasError

log = logging.getLogger("agentfleet.worker")

# The server is unreachable or slow: retry with backoff; anything else is a bug or a refusal.
# A failover looks the same: a cluster without a primary for a slot (CLUSTERDOWN, TRYAGAIN,
# a slot not covered yet), a demoted primary that refuses writes (READONLY), a promoted replica
# that lacks a script the client just loaded elsewhere (NOSCRIPT: the next call loads it), a
# primary short of in-sync replicas under min-replicas-to-write (NOREPLICAS).
TRANSIENT = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError, ClusterError,
             TryAgainError, SlotNotCoveredError, ReadOnlyError, NoScriptError, NoReplicasError)

T = TypeVar("T")


async def with_retries(step: Callable[[], Awaitable[T]], what: str) -> T:
    """Run `step`, waiting out a server that is down or still loading, with backoff."""
    backoff_s = 0.1
    while True:
        try:
            return await step()
        except TRANSIENT as exc:
            log.warning("%s failed (%s); retrying in %.1fs", what, exc, backoff_s)
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 5.0)
