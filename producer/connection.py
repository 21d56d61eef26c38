"""The one way agentfleet opens a Redis client (producers and workers alike).

redis-py's asyncio connection packs commands in Python, a few microseconds per argument;
our scripts carry thousands of arguments per call, so we pack with hiredis' C packer,
which the sync client already uses.
"""

from __future__ import annotations

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection


class _HiredisPackedConnection(Connection):
    def pack_command(self, *args):
        first = args[0]
        if isinstance(first, str) and " " in first:  # "XGROUP CREATE" and the like
            args = tuple(first.split()) + args[1:]
        return [hiredis.pack_command(args)]


def connect(url: str, **kwargs) -> aioredis.Redis:
    """A client for `url`; no socket timeout, since reads block for `block_ms` by design."""
    pool = aioredis.ConnectionPool.from_url(
        url, connection_class=_HiredisPackedConnection, **kwargs)
    return aioredis.Redis.from_pool(pool)  # closing the client closes the pool
