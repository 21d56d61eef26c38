"""The one way agentfleet opens a Redis client (producers, workers, the gateway, the CLI).

Three forms of URL, one client each, asyncio (`connect`) and blocking (`connect_sync`):

    redis://host:6379/0                      one server (rediss:// with TLS)
    redis+cluster://host1:6379,host2:6379    a Redis Cluster: any of its nodes, the client
                                             learns the rest (rediss+cluster:// with TLS)
    redis+sentinel://s1:26379,s2:26379/name  the primary that the Sentinels name `name`,
                                             followed across failovers (rediss+sentinel://)

Credentials and query options (`?socket_timeout=5`) apply to the data servers; for the
Sentinels' own password add `?sentinel_password=...`.  Every key of a model shares the hash
tag `{model}` and every script touches one slot, so the code above this module is the same
for all three; what differs lives here: a cluster client answers `pubsub()` and `publish`
(on one node: the cluster bus carries every PUBLISH to all) and `xread` over streams of
several slots (one read per slot, the first answer wins), which plain clients do natively.

redis-py's asyncio connection packs commands in Python, a few microseconds per argument;
our scripts carry thousands of arguments per call, so where hiredis is installed (the `ops`
extra: workers and the CLI) we pack with its C packer.  The client install has only redis-py
and packs in Python: a producer's scripts carry far fewer arguments than a worker's.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import random
from collections.abc import Iterable, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis
import redis._parsers.base
import redis.asyncio as aioredis
import redis.sentinel
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, NodesManager
from redis.asyncio.connection import Connection
from redis.asyncio.sentinel import Sentinel, SentinelManagedConnection
from redis.cluster import ClusterNode as SyncClusterNode
from redis.cluster import key_slot
from redis.sentinel import Sentinel as SyncSentinel

try:
    import hiredis
except ImportError:  # the client install: redis-py's own packer
    hiredis = None


class NoReplicasError(redis.exceptions.ResponseError):
    """NOREPLICAS: a primary with `min-replicas-to-write` and too few replicas in sync refuses
    every write (its replica is down or resyncing, or it is an old primary restarted after a
    failover, not yet demoted).  A state to wait out, like READONLY: redis-py has no class of
    its own for it, so the parsers are taught this one."""


redis._parsers.base.BaseParser.EXCEPTION_CLASSES.setdefault("NOREPLICAS", NoReplicasError)


class _ClosedTransportIsConnectionError:
    """uvloop raises RuntimeError ("... the handler is closed") for a write to a socket that
    the server closed (a restart, a failover), where asyncio's loop raises OSError, which
    redis-py turns into ConnectionError: do the same, so that callers retry it as the
    connection error it is instead of crashing on it."""

    async def send_packed_command(self, command, check_health=True):
        try:
            return await super().send_packed_command(command, check_health)
        except RuntimeError as exc:
            if "handler is closed" not in str(exc):
                raise
            raise redis.exceptions.ConnectionError(f"writing to a closed socket: {exc}") from exc


class _PlainConnection(_ClosedTransportIsConnectionError, Connection):
    pass


class _HiredisPacking(_ClosedTransportIsConnectionError):
    def pack_command(self, *args):
        first = args[0]
        if isinstance(first, str) and " " in first:  # "XGROUP CREATE" and the like
            args = tuple(first.split()) + args[1:]
        return [hiredis.pack_command(args)]


class _HiredisPackedConnection(_HiredisPacking, Connection):
    pass


class _HiredisSentinelConnection(_HiredisPacking, SentinelManagedConnection):
    pass


class _SentinelConnection(_ClosedTransportIsConnectionError, SentinelManagedConnection):
    pass


# The connection classes every client of ours uses (TLS aside): hiredis packing where installed.
_CONNECTION = _PlainConnection if hiredis is None else _HiredisPackedConnection
_SENTINEL_CONNECTION = _SentinelConnection if hiredis is None else _HiredisSentinelConnection


# RESP2 on every redis-py release we support: 8.0 made RESP3 the default, whose replies are
# maps where this code reads lists (XREADGROUP of several streams, XINFO, XPENDING).
PROTOCOL = 2

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
SENTINEL_SCHEMES = {"redis+sentinel": "redis", "rediss+sentinel": "rediss"}


class ClusterClient(aioredis.RedisCluster):
    """redis-py's asyncio cluster client, plus what agentfleet's callers use of a plain one:
    `pubsub()`, `publish` and `xread` across slots.  `sibling()` is another client of the
    same cluster with connections of its own (for callbacks of its own), closed with this
    one."""

    def __init__(self, *args, **kwargs):
        self._init = (args, dict(kwargs))
        self._siblings: list[ClusterClient] = []
        super().__init__(*args, **kwargs)
        _own_connections(self)
        _tolerate_options(self.response_callbacks)
        self.nodes_manager.__class__ = _OneObjectPerNode  # same slots: a safe swap

    def sibling(self) -> ClusterClient:
        args, kwargs = self._init
        client = type(self)(*args, **kwargs)
        self._siblings.append(client)
        return client

    async def aclose(self) -> None:
        for client in self._siblings:
            await client.aclose()
        await super().aclose()
        # redis-py skips the close while a connection error has the client marked for
        # re-initialisation (a failover, just then): close what its nodes hold anyway.
        await self.nodes_manager.aclose()
        await self.nodes_manager.aclose("startup_nodes")

    def pipeline(self, transaction=None, shard_hint=None) -> ClusterPipeline:
        if shard_hint:
            return super().pipeline(transaction, shard_hint)  # refused by redis-py
        return _ClusterPipeline(self, transaction)

    def pubsub(self, **kwargs) -> aioredis.client.PubSub:
        """Subscriptions on one node of the cluster (every node hears every PUBLISH); the
        connection is made on subscribe, to a node that was up when the call was made."""
        nodes = self.get_nodes() or self.startup_nodes
        node = random.choice(nodes)
        conn = {k: v for k, v in self.connection_kwargs.items()
                if k not in ("connection_class", "max_connections", "response_callbacks")}
        pool = aioredis.ConnectionPool(host=node.host, port=node.port, **conn)
        return _OwnPoolPubSub(pool, **kwargs)

    async def script_load(self, script) -> str:
        """SCRIPT LOAD on every node, replicas too (redis-py loads on the primaries it knows):
        a replica promoted by a failover then has every script already, and one promoted
        before this client noticed gets it on the first NOSCRIPT."""
        return await self.execute_command("SCRIPT LOAD", script, target_nodes=self.ALL_NODES)

    async def publish(self, channel, message) -> int:
        """PUBLISH (which redis-py's asyncio cluster client lacks), on any node."""
        return await self.execute_command("PUBLISH", channel, message,
                                          target_nodes=self.get_random_node())

    async def xread(self, streams, count=None, block=None):
        """XREAD of streams that may lie in several slots: one read per slot, all at once;
        blocking, the first to answer wins and the others are cancelled (their connections
        are dropped and made again on next use)."""
        groups = slot_groups(self, list(streams))
        if len(groups) <= 1:
            return await super().xread(streams, count=count, block=block)
        parts = [{k: streams[k] for k in group} for group in groups]
        got = await asyncio.gather(*(super(ClusterClient, self).xread(p, count=count)
                                     for p in parts))
        found = [entry for reply in got for entry in reply or ()]
        if found or block is None:
            return found
        reads = [asyncio.ensure_future(super(ClusterClient, self).xread(p, count=count,
                                                                        block=block))
                 for p in parts]
        try:
            done, _ = await asyncio.wait(reads, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for read in reads:
                read.cancel()
            await asyncio.gather(*reads, return_exceptions=True)
        return [entry for read in done for entry in read.result() or ()]


class _OneObjectPerNode(NodesManager):
    """redis-py's NodesManager, with one object per node after a topology refresh.

    On a refresh, redis-py 7.4 keeps each known node's old object in `nodes_cache` (with its
    old role) but routes commands through the new objects it put in `slots_cache`: their
    connections are never closed (ResourceWarnings, sockets held until collected), and
    the old objects' roles go stale after a failover (SCRIPT LOAD and INFO to "primaries"
    miss the promoted replica).  Here every slot points at the `nodes_cache` object again,
    with the role it has now."""

    __slots__ = ()

    async def initialize(self) -> None:
        await super().initialize()
        known = self.nodes_cache
        fixed: dict[int, list] = {}
        for slot, nodes in self.slots_cache.items():
            same = fixed.get(id(nodes))
            if same is None:
                same = []
                for node in nodes:
                    kept = known.get(node.name, node)
                    kept.server_type = node.server_type
                    same.append(kept)
                fixed[id(nodes)] = same
            self.slots_cache[slot] = same


class _ClusterPipeline(ClusterPipeline):
    def unlink(self, *names):
        # redis-py's is a coroutine here (and only here): queue it as `delete` does.
        return self._split_command_across_slots("UNLINK", *names)


class _OwnPoolPubSub(aioredis.client.PubSub):
    async def aclose(self) -> None:
        await super().aclose()
        await self.connection_pool.disconnect()


def _newest(answers: Sequence[tuple[object, object]], service: str, check) -> dict:
    """Of the Sentinels' views of `service`, the valid one of the highest config epoch: a
    Sentinel that has not yet heard of a failover still names the old primary, and once that
    one is back (and, until the Sentinels make it a replica, a primary again) redis-py's
    first-answer-wins sent clients to it, whose writes the resync then dropped.  None valid:
    redis-py's MasterNotFoundError, for the async and the blocking client alike."""
    best: dict | None = None
    for _, masters in answers:
        state = None if isinstance(masters, BaseException) else masters.get(service)
        if state and check(state, service) and (
                best is None or int(state.get("config-epoch", 0))
                > int(best.get("config-epoch", 0))):
            best = state
    if best is None:  # redis-py's error, with what each unreachable Sentinel said
        errors = ", ".join(f"{s} - {a!r}" for s, a in answers if isinstance(a, BaseException))
        raise redis.sentinel.MasterNotFoundError(
            f"No master found for {service!r}" + (f" : {errors}" if errors else ""))
    return best


class _NewestSentinel(Sentinel):
    """Sentinel that asks every Sentinel and follows the newest failover (`_newest`)."""

    async def discover_master(self, service_name: str):
        async def ask(sentinel):
            try:
                return await sentinel.sentinel_masters()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                return exc

        answers = list(zip(self.sentinels,
                           await asyncio.gather(*(ask(s) for s in self.sentinels))))
        state = _newest(answers, service_name, self.check_master_state)
        return self._force_master_ip or state["ip"], state["port"]


class _NewestSyncSentinel(SyncSentinel):
    """The blocking client's `_NewestSentinel`."""

    def discover_master(self, service_name: str):
        answers = []
        for sentinel in self.sentinels:
            try:
                answers.append((sentinel, sentinel.sentinel_masters()))
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                answers.append((sentinel, exc))
        state = _newest(answers, service_name, self.check_master_state)
        return self._force_master_ip or state["ip"], state["port"]


class _SentinelClient(aioredis.Redis):
    """The primary's client; closing it closes the Sentinels' clients too."""

    sentinel: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinel is not None:
            for client in self.sentinel.sentinels:
                await client.aclose()


def _tolerate_options(callbacks: dict) -> None:
    """redis-py's cluster transactions pass a command's options (`keys`) to its reply
    callback, which some callbacks (HGETALL's) do not take: wrap those, once."""
    for name, callback in list(callbacks.items()):
        try:
            params = inspect.signature(callback).parameters.values()
        except (TypeError, ValueError):
            continue
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            callbacks[name] = functools.partial(_without_options, callback)


def _without_options(callback, response, **options):
    return callback(response)


def _own_connections(client: aioredis.RedisCluster) -> None:
    # RedisCluster takes no connection_class: set it where nodes are made (the shared
    # connection kwargs) and on the startup nodes already made, before any connection.
    # TLS (its SSLConnection) keeps redis-py's class.
    if client.connection_kwargs.get("connection_class", Connection) is not Connection:
        return
    client.connection_kwargs["connection_class"] = _CONNECTION
    for node in client.startup_nodes:
        node.connection_class = _CONNECTION


def _split(url: str, schemes: dict[str, str]) -> tuple[list[tuple[str, int]], str, dict, str]:
    """(hosts, path, query options, the plain scheme) of a multi-host URL."""
    parts = urlsplit(url)
    hosts = []
    for host in parts.netloc.rpartition("@")[2].split(","):
        name, _, port = host.rpartition(":")
        if not name or not port.isdigit():
            raise ValueError(f"{parts.scheme}:// URL: {host!r} is not host:port")
        hosts.append((name.strip("[]"), int(port)))
    auth = parts.netloc.rpartition("@")[0]
    first = f"{schemes[parts.scheme]}://{auth + '@' if auth else ''}{hosts[0][0]}:{hosts[0][1]}"
    return hosts, parts.path.strip("/"), dict(parse_qsl(parts.query)), first


def _options(first: str, query: dict, path: str = "") -> dict:
    """The data servers' connection options: redis-py's own URL parser on the first host."""
    from redis.asyncio.connection import parse_url

    kwargs = dict(parse_url(f"{first}/{path}?{urlencode(query)}" if query or path else first))
    kwargs.pop("host", None)
    kwargs.pop("port", None)
    return kwargs


def _scheme(url: str) -> str:
    return urlsplit(url).scheme


def connect(url: str, **kwargs) -> aioredis.Redis:
    """A client for `url` (any of the three forms); no socket timeout, since reads block for
    `block_ms` by design."""
    kwargs.setdefault("protocol", PROTOCOL)
    scheme = _scheme(url)
    if scheme in CLUSTER_SCHEMES:
        hosts, _, query, first = _split(url, CLUSTER_SCHEMES)
        options = {**_options(first, query), **kwargs}
        if options.pop("connection_class", None) is not None:  # rediss: SSLConnection
            options["ssl"] = True
        return ClusterClient(startup_nodes=[ClusterNode(h, p) for h, p in hosts], **options)
    if scheme in SENTINEL_SCHEMES:
        hosts, service, query, first = _split(url, SENTINEL_SCHEMES)
        sentinel_password = query.pop("sentinel_password", None)
        options = {**_options(first, query), **kwargs}
        if options.pop("connection_class", None) is not None:
            options["ssl"] = True
        if not options.get("ssl"):  # TLS keeps redis-py's SentinelManagedSSLConnection
            options.setdefault("connection_class", _SENTINEL_CONNECTION)
        sentinel = _NewestSentinel(hosts, sentinel_kwargs=_sentinel_kwargs(options,
                                                                           sentinel_password))
        client = sentinel.master_for(_service(url, service), redis_class=_SentinelClient,
                                     **options)
        client.sentinel = sentinel
        return client
    if url.startswith("redis://"):  # rediss:// and unix:// keep redis-py's own classes
        kwargs.setdefault("connection_class", _CONNECTION)
    pool = aioredis.ConnectionPool.from_url(url, **kwargs)
    return aioredis.Redis.from_pool(pool)  # closing the client closes the pool


def connect_sync(url: str, **kwargs) -> redis.Redis:
    """The blocking client of the CLI's views (status, report, exporter), on RESP2 too."""
    kwargs.setdefault("protocol", PROTOCOL)
    scheme = _scheme(url)
    if scheme in CLUSTER_SCHEMES:
        hosts, _, query, first = _split(url, CLUSTER_SCHEMES)
        options = {**_options(first, query), **kwargs}
        if options.pop("connection_class", None) is not None:
            options["ssl"] = True
        return redis.RedisCluster(startup_nodes=[SyncClusterNode(h, p) for h, p in hosts],
                                  **options)
    if scheme in SENTINEL_SCHEMES:
        hosts, service, query, first = _split(url, SENTINEL_SCHEMES)
        sentinel_password = query.pop("sentinel_password", None)
        options = {**_options(first, query), **kwargs}
        if options.pop("connection_class", None) is not None:
            options["ssl"] = True
        sentinel = _NewestSyncSentinel(hosts, sentinel_kwargs=_sentinel_kwargs(
            options, sentinel_password))
        return sentinel.master_for(_service(url, service), **options)
    return redis.Redis.from_url(url, **kwargs)


def _service(url: str, service: str) -> str:
    if not service:
        raise ValueError(f"{_scheme(url)}:// URL: name the primary's service after the "
                         f"hosts, e.g. redis+sentinel://host:26379/mymaster")
    return service


def _sentinel_kwargs(options: dict, password: str | None) -> dict:
    kept = {k: v for k, v in options.items()
            if k.startswith("socket_") or k in ("ssl", "protocol")}
    if password:
        kept["password"] = password
    return kept


def is_cluster(client: object) -> bool:
    return isinstance(client, (aioredis.RedisCluster, redis.RedisCluster))


def slot_groups(client: object, names: Iterable[str]) -> list[list[str]]:
    """`names` (keys or streams) grouped by hash slot on a cluster (one group elsewhere):
    what one multi-key command may touch."""
    names = list(names)
    if not is_cluster(client):
        return [names] if names else []
    groups: dict[int, list[str]] = {}
    for name in names:
        groups.setdefault(key_slot(name.encode() if isinstance(name, str) else name),
                          []).append(name)
    return list(groups.values())


def sibling(client: aioredis.Redis) -> aioredis.Redis:
    """Another client of the same server(s) whose response callbacks may be changed without
    touching `client`'s: on one server it shares `client`'s connection pool; on a cluster it
    has connections of its own, closed when `client` is."""
    if isinstance(client, ClusterClient):
        return client.sibling()
    return aioredis.Redis(connection_pool=client.connection_pool)


async def server_infos(client: aioredis.Redis, section: str) -> list[dict]:
    """INFO `section` of every primary (one server: its own)."""
    if isinstance(client, aioredis.RedisCluster):
        got = await client.info(section, target_nodes=aioredis.RedisCluster.PRIMARIES)
        return list(got.values())
    return [await client.info(section)]


class Replicated:
    """A script whose every call is followed by WAIT for `replicas` replicas, on the same
    connection (WAIT counts the writes of its own connection only): one round trip, the
    script and the WAIT pipelined to the node that serves the script's keys.

    Returns the script's reply; raises `NotReplicatedError` (carrying that reply) when fewer
    replicas confirmed it within `timeout_ms`.  `replicated()` gives the script itself when
    `replicas` is 0."""

    def __init__(self, client, script, replicas: int, timeout_ms: int):
        self.client = client
        self.script = script  # redis-py's AsyncScript: its sha and source
        self.replicas = replicas
        self.timeout_ms = timeout_ms

    async def __call__(self, keys: Sequence = (), args: Sequence = ()):
        from redis.exceptions import NoScriptError

        from agentfleet.schemas.errors import NotReplicatedError

        client = self.client
        target = {}
        if isinstance(client, aioredis.RedisCluster):
            await client.initialize()
            target = {"target_nodes": client.get_node_from_key(keys[0])}
        for attempt in range(2):
            pipe = client.pipeline(transaction=False)
            pipe.execute_command("EVALSHA", self.script.sha, len(keys), *keys, *args)
            pipe.execute_command("WAIT", self.replicas, self.timeout_ms, **target)
            try:
                reply, acked = await pipe.execute()
                break
            except NoScriptError:
                if attempt:
                    raise
                self.script.sha = await client.script_load(self.script.script)
        if acked < self.replicas:
            raise NotReplicatedError(
                f"written on the primary, confirmed by {acked} of {self.replicas} replicas "
                f"within {self.timeout_ms} ms (AGENTFLEET_WAIT_REPLICAS): a failover now could "
                f"lose it", reply, acked, self.replicas)
        return reply


def replicated(client, script, replicas: int, timeout_ms: int):
    """`script`, followed by WAIT when `replicas` > 0 (see `Replicated`)."""
    return Replicated(client, script, replicas, timeout_ms) if replicas > 0 else script
