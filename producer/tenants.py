"""The tenant registry: who shares the fleet, with what weight, limits and data rules.

    from agentfleet.producer.tenants import TenantRegistry
    registry = TenantRegistry(redis)
    await registry.set("acme", TenantConfig(weight=2, max_queued=10_000), who="ops", why="...")

Entries live in one hash (`keys.tenants()`); every change bumps `keys.tenants_version()` and
appends an `AuditEntry` (who, when, before, after, why) to `keys.audit_log()`, in one
transaction.  Producers, workers and the gateway keep a `TenantTable` through `TableCache`,
which reloads when the version moves: changes reach running processes within `refresh_s`,
without a restart.  Unknown tenants get the "default" entry's settings.
"""

from __future__ import annotations

import time

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from agentfleet.schemas import keys
from agentfleet.schemas.errors import AgentFleetError, BrokerError
from agentfleet.schemas.tenants import (
    DEFAULT,
    TableCache,
    TenantTable,
    check_config,
    check_name,
    load_table,
)
from agentfleet.schemas.wire import AuditEntry, TenantConfig, decode_audit, decode_tenant, encode

AUDIT_MAXLEN = 1_000_000  # entries kept in the audit stream (about 200 MB at most)


class UnknownTenantError(AgentFleetError):
    """Raised by `TenantRegistry.remove` for a tenant that has no entry."""


async def append_audit(pipe, entry: AuditEntry) -> None:
    """Queue an audit entry on a pipeline (the change and its record go out together)."""
    pipe.xadd(keys.audit_log(), {"d": encode(entry)}, maxlen=AUDIT_MAXLEN, approximate=True)


class TenantRegistry:
    """Reads and changes the registry; every change is audited."""

    def __init__(self, redis: aioredis.Redis):
        self.redis = redis

    async def table(self) -> TenantTable:
        """Every entry, and the version they were read at (one round trip)."""
        return await load_table(self.redis)

    async def get(self, tenant: str) -> TenantConfig | None:
        raw = await self.redis.hget(keys.tenants(), tenant)
        return decode_tenant(raw) if raw is not None else None

    async def set(self, tenant: str, config: TenantConfig, *, who: str = "",
                  why: str = "") -> TenantConfig:
        """Create or replace a tenant's entry (checked first: a typed error names the field)."""
        check_name(tenant)
        check_config(config)
        before = await self.get(tenant)
        await self._change(tenant, "set", before, config, who, why)
        return config

    async def update(self, tenant: str, *, who: str = "", why: str = "",
                     **fields) -> TenantConfig:
        """Change some fields of an entry (of the default's settings when it has none)."""
        check_name(tenant)
        before = await self.get(tenant)
        base = before or (await self.get(DEFAULT) if tenant != DEFAULT else None)
        try:
            config = msgspec.structs.replace(base or TenantConfig(), **fields)
        except TypeError as exc:
            raise AgentFleetError(f"tenant {tenant}: {exc}") from exc
        check_config(config)
        await self._change(tenant, "set", before, config, who, why)
        return config

    async def remove(self, tenant: str, *, who: str = "", why: str = "") -> TenantConfig:
        """Drop an entry: the tenant falls back to the default's settings."""
        before = await self.get(tenant)
        if before is None:
            raise UnknownTenantError(f"tenant {tenant!r} has no entry")
        await self._change(tenant, "remove", before, None, who, why)
        return before

    async def audit(self, count: int = 100, kind: str | None = None) -> list[AuditEntry]:
        """The newest audit entries, newest first."""
        raw = await self.redis.xrevrange(keys.audit_log(), count=count)
        entries = [decode_audit(fields[b"d"]) for _, fields in raw]
        return [e for e in entries if kind is None or e.kind == kind]

    async def _change(self, tenant: str, action: str, before: TenantConfig | None,
                      after: TenantConfig | None, who: str, why: str) -> None:
        entry = AuditEntry(kind="tenant", subject=tenant, action=action, who=who, why=why,
                           at=time.time(), before=_plain(before), after=_plain(after))
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                if after is None:
                    pipe.hdel(keys.tenants(), tenant)
                else:
                    pipe.hset(keys.tenants(), tenant, encode(after))
                pipe.incr(keys.tenants_version())
                await append_audit(pipe, entry)
                await pipe.execute()
        except RedisError as exc:
            raise BrokerError(f"changing tenant {tenant} failed: {exc}") from exc


def _plain(config: TenantConfig | None) -> dict | None:
    return msgspec.to_builtins(config) if config is not None else None


__all__ = ["TableCache", "TenantRegistry", "UnknownTenantError", "append_audit"]
