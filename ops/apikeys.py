"""API keys of the gateway and the console: created, checked, listed and revoked here only.

A key reads `afk_<key id>_<secret>`.  Redis holds one hash (`keys.api_keys()`) from key id to
an `ApiKeyRecord` with the SHA-256 digest of the secret, its tenant and its role, never the
secret itself: a copy of the database grants nothing.  Checking a key is one HGET and a
constant-time compare; callers that check many requests keep a short cache (`KeyCache`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from agentfleet.schemas import keys
from agentfleet.schemas.errors import AgentFleetError, BrokerError, ValidationError
from agentfleet.schemas.wire import ApiKeyRecord, Role, decode_api_key, encode

KEY_PREFIX = "afk_"
_ID_BYTES = 6  # 12 hex characters: the public part, shown by `keys list`
_SECRET_BYTES = 24


class UnknownKeyError(AgentFleetError):
    """Raised by `revoke` when no key has that id."""


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def parse_role(text: str) -> Role:
    try:
        return Role(text)
    except ValueError:
        raise ValidationError("role", f"{text!r} is not one of "
                              f"{[r.value for r in Role]}", limit=[r.value for r in Role],
                              value=text) from None


async def create(redis: aioredis.Redis, *, tenant: str, role: Role | str, name: str = "",
                 created_by: str = "") -> tuple[ApiKeyRecord, str]:
    """A new key: its record and the full key, which is shown once and never stored."""
    if not keys.valid_tenant_name(tenant):
        raise ValidationError("tenant", f"{tenant!r}: use 1..64 letters, digits, '.', '_' "
                              "or '-'", limit=64, value=tenant)
    role = role if isinstance(role, Role) else parse_role(role)
    if len(name) > 200:
        raise ValidationError("name", f"{len(name)} characters, more than 200", limit=200)
    key_id = secrets.token_hex(_ID_BYTES)
    secret = secrets.token_urlsafe(_SECRET_BYTES)
    record = ApiKeyRecord(key_id=key_id, digest=_digest(secret), tenant=tenant, role=role,
                          name=name, created_at=time.time(), created_by=created_by)
    try:
        await redis.hset(keys.api_keys(), key_id, encode(record))
    except RedisError as exc:
        raise BrokerError(f"storing the key failed: {exc}") from exc
    return record, f"{KEY_PREFIX}{key_id}_{secret}"


async def verify(redis: aioredis.Redis, presented: str) -> ApiKeyRecord | None:
    """The live record of a presented key, or None for a malformed, unknown or revoked one."""
    key_id, secret = _split(presented)
    if not key_id:
        return None
    try:
        raw = await redis.hget(keys.api_keys(), key_id)
    except RedisError as exc:
        raise BrokerError(f"checking the key failed: {exc}") from exc
    if raw is None:
        return None
    record = decode_api_key(raw)
    if record.revoked_at or not hmac.compare_digest(record.digest, _digest(secret)):
        return None
    return record


async def list_keys(redis: aioredis.Redis) -> list[ApiKeyRecord]:
    """Every key, revoked ones included, oldest first."""
    raw = await redis.hgetall(keys.api_keys())
    return sorted((decode_api_key(v) for v in raw.values()), key=lambda r: r.created_at)


async def revoke(redis: aioredis.Redis, key_id: str) -> ApiKeyRecord:
    """Revoke a key by its id (kept, marked revoked, so that audits still find it)."""
    raw = await redis.hget(keys.api_keys(), key_id)
    if raw is None:
        raise UnknownKeyError(f"no API key with id {key_id!r}")
    record = decode_api_key(raw)
    if not record.revoked_at:
        record.revoked_at = time.time()
        await redis.hset(keys.api_keys(), key_id, encode(record))
    return record


def _split(presented: str) -> tuple[str, str]:
    if not presented.startswith(KEY_PREFIX):
        return "", ""
    key_id, sep, secret = presented[len(KEY_PREFIX):].partition("_")
    if not sep or len(key_id) != 2 * _ID_BYTES or not secret:
        return "", ""
    return key_id, secret


class KeyCache:
    """Checked keys remembered for `ttl_s`, so a busy gateway does one HGET per key per
    `ttl_s`, not one per request; a revocation takes effect within `ttl_s`."""

    def __init__(self, redis: aioredis.Redis, ttl_s: float = 5.0, max_entries: int = 10_000):
        self.redis = redis
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._seen: dict[str, tuple[float, ApiKeyRecord | None]] = {}

    async def verify(self, presented: str) -> ApiKeyRecord | None:
        now = time.monotonic()
        hit = self._seen.get(presented)
        if hit is not None and hit[0] > now:
            return hit[1]
        record = await verify(self.redis, presented)
        if len(self._seen) >= self.max_entries:
            self._seen.clear()
        self._seen[presented] = (now + self.ttl_s, record)
        return record
