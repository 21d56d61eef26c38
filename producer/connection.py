"""The one way agentfleet opens a Redis client (producers and workers alike).

redis-py's asyncio connection packs commands in Python, a few microseconds per argument;
our scripts carry thousands of arguments per call, so where hiredis is installed (the `ops`
extra: workers and the CLI) we pack with its C packer.  The client install has only redis-py
and packs in Python: a producer's scripts carry far fewer arguments than a worker's.
"""

from __future__ import annotations

import redis
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection

try:
    import hiredis
except ImportError:  # the client install: redis-py's own packer
    hiredis = None


class _HiredisPackedConnection(Connection):
    def pack_command(self, *args):
        first = args[0]
        if isinstance(first, str) and " " in first:  # "XGROUP CREATE" and the like
            args = tuple(first.split()) + args[1:]
        return [hiredis.pack_command(args)]


# RESP2 on every redis-py release we support: 8.0 made RESP3 the default, whose replies are
# maps where this code reads lists (XREADGROUP of several streams, XINFO, XPENDING).
PROTOCOL = 2


def connect(url: str, **kwargs) -> aioredis.Redis:
    """A client for `url`; no socket timeout, since reads block for `block_ms` by design."""
    if hiredis is not None:
        kwargs.setdefault("connection_class", _HiredisPackedConnection)
    kwargs.setdefault("protocol", PROTOCOL)
    pool = aioredis.ConnectionPool.from_url(url, **kwargs)
    return aioredis.Redis.from_pool(pool)  # closing the client closes the pool


def connect_sync(url: str, **kwargs) -> redis.Redis:
    """The blocking client of the CLI's views (status, report, exporter), on RESP2 too."""
    kwargs.setdefault("protocol", PROTOCOL)
    return redis.Redis.from_url(url, **kwargs)
