"""Tenants as every process sees them: the registry's entries checked, looked up with the
default's settings for tenants without an entry, and what a task costs in tokens.

Producers and workers both read the registry and may not import each other, so its reader
(`load_table`, `TableCache`: a GET and, when the version moved, an HGETALL) is here, beside
the types; changing it is producer/tenants.py's job (`TenantRegistry`, audited).
"""

from __future__ import annotations

import math
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from agentfleet.schemas import keys
from agentfleet.schemas.errors import BrokerError, ValidationError
from agentfleet.schemas.wire import Task, TenantConfig, decode_tenant

DEFAULT = keys.DEFAULT_TENANT
MAX_WEIGHT = 1_000_000.0
MAX_LIMIT = 10**12
CHARS_PER_TOKEN = 4  # prompt tokens are estimated from characters until the engine counts them


def check_name(tenant: str, field: str = "tenant") -> None:
    if not keys.valid_tenant_name(tenant):
        raise ValidationError(field, f"{tenant!r}: use 1..64 letters, digits, '.', '_' or '-', "
                              "starting with a letter or digit", limit=64, value=tenant)


def check_config(config: TenantConfig) -> None:
    """Refuse impossible settings, naming the field and the limit."""
    if not (0 < config.weight <= MAX_WEIGHT) or not math.isfinite(config.weight):
        raise ValidationError("weight", f"{config.weight} is outside (0, {MAX_WEIGHT:g}]",
                              limit=(0, MAX_WEIGHT), value=config.weight)
    for name in ("max_queued", "tokens_per_minute", "max_running", "result_ttl_s",
                 "trace_ttl_s", "result_cache_ttl_s"):
        value = getattr(config, name)
        if not 0 <= value <= MAX_LIMIT:
            raise ValidationError(name, f"{value} is outside 0..{MAX_LIMIT} (0: no limit)",
                                  limit=(0, MAX_LIMIT), value=value)
    if config.cache_group and not keys.valid_tenant_name(config.cache_group):
        raise ValidationError("cache_group", f"{config.cache_group!r}: use the characters of a "
                              "tenant name", limit=64, value=config.cache_group)
    if len(config.note) > 500:
        raise ValidationError("note", f"{len(config.note)} characters, more than 500",
                              limit=500, value=len(config.note))


def estimate_tokens(task: Task) -> int:
    """Tokens a task will cost before the engine has counted them: its prompt's characters / 4
    plus its max_tokens (the fair-share charge is corrected with the real counts when done)."""
    if task.prompt is not None:
        chars = len(task.prompt)
    else:
        chars = sum(len(m.content) for m in task.messages or ())
    return chars // CHARS_PER_TOKEN + 1 + task.sampling.max_tokens


class TenantTable:
    """The registry at one version: `get` answers for any tenant, unknown ones with the
    default's settings."""

    __slots__ = ("version", "entries", "default")

    def __init__(self, entries: dict[str, TenantConfig] | None = None, version: int = 0):
        self.version = version
        self.entries = entries or {}
        self.default = self.entries.get(DEFAULT, TenantConfig())

    def get(self, tenant: str) -> TenantConfig:
        return self.entries.get(tenant, self.default)

    def cache_salt(self, tenant: str) -> str:
        """The prefix-cache salt of a tenant's requests: its own, or its cache group's."""
        group = self.get(tenant).cache_group
        return "g:" + group if group else "t:" + tenant


async def load_table(redis: aioredis.Redis) -> TenantTable:
    """Every entry of the registry and its version, in one round trip."""
    try:
        async with redis.pipeline(transaction=True) as pipe:
            pipe.get(keys.tenants_version())
            pipe.hgetall(keys.tenants())
            version, raw = await pipe.execute()
    except RedisError as exc:
        raise BrokerError(f"reading the tenant registry failed: {exc}") from exc
    entries = {name.decode(): decode_tenant(value) for name, value in raw.items()}
    return TenantTable(entries, int(version or 0))


class TableCache:
    """A `TenantTable` kept fresh: `current()` checks the version at most every `refresh_s`
    (one GET) and reloads the entries only when it moved.  The model registry's cache is the
    same with its own key, loader and table (schemas/registry.py)."""

    version_key = staticmethod(keys.tenants_version)
    loader = staticmethod(load_table)
    empty = TenantTable
    what = "the tenant registry"

    def __init__(self, redis: aioredis.Redis, refresh_s: float = 1.0):
        self.redis = redis
        self.refresh_s = refresh_s
        self._table = None
        self._checked_at = 0.0

    @property
    def table(self):
        """The last table read (an empty one before the first read)."""
        return self._table or self.empty()

    @property
    def fresh(self) -> bool:
        """Whether `table` is recent enough to use without asking Redis."""
        return self._table is not None and time.monotonic() - self._checked_at < self.refresh_s

    async def current(self):
        now = time.monotonic()
        if self._table is not None and now - self._checked_at < self.refresh_s:
            return self._table
        self._checked_at = now
        try:
            version = int(await self.redis.get(self.version_key()) or 0)
        except RedisError as exc:
            if self._table is not None:  # keep serving with what we know
                return self._table
            raise BrokerError(f"reading {self.what} failed: {exc}") from exc
        if self._table is None or version != self._table.version:
            self._table = await self.loader(self.redis)
        return self._table
