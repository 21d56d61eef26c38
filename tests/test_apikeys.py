"""API keys: stored as digests, checked in constant time, revoked, and managed from the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from agentfleet.ops import apikeys
from agentfleet.schemas import keys
from agentfleet.schemas.errors import ValidationError
from agentfleet.schemas.wire import Role


@pytest.mark.cluster_too
async def test_a_created_key_verifies_and_its_secret_is_not_stored(redis):
    record, key = await apikeys.create(redis, tenant="acme", role="submit", name="billing")
    assert key.startswith("afk_" + record.key_id + "_")
    found = await apikeys.verify(redis, key)
    assert found is not None and (found.tenant, found.role) == ("acme", Role.SUBMIT)
    stored = await redis.hget(keys.api_keys(), record.key_id)
    assert key.split("_", 2)[2].encode() not in stored  # only the digest is kept


async def test_wrong_malformed_and_revoked_keys_do_not_verify(redis):
    record, key = await apikeys.create(redis, tenant="acme", role=Role.READ)
    assert await apikeys.verify(redis, key[:-1] + ("x" if key[-1] != "x" else "y")) is None
    assert await apikeys.verify(redis, "sk-not-ours") is None
    assert await apikeys.verify(redis, "afk_short_secret") is None
    await apikeys.revoke(redis, record.key_id)
    assert await apikeys.verify(redis, key) is None
    listed = await apikeys.list_keys(redis)
    assert [r.key_id for r in listed] == [record.key_id] and listed[0].revoked_at > 0


async def test_bad_tenant_and_role_are_refused_with_the_field_named(redis):
    with pytest.raises(ValidationError) as bad_tenant:
        await apikeys.create(redis, tenant="no spaces{}", role="read")
    assert bad_tenant.value.field == "tenant"
    with pytest.raises(ValidationError) as bad_role:
        await apikeys.create(redis, tenant="acme", role="owner")
    assert bad_role.value.field == "role"
    assert await redis.hlen(keys.api_keys()) == 0


def test_roles_include_the_ones_below():
    assert Role.ADMIN.allows(Role.SUBMIT) and Role.SUBMIT.allows(Role.READ)
    assert not Role.READ.allows(Role.SUBMIT) and not Role.SUBMIT.allows(Role.ADMIN)


async def test_key_cache_checks_redis_once_per_ttl(redis):
    _, key = await apikeys.create(redis, tenant="acme", role="admin")
    cache = apikeys.KeyCache(redis, ttl_s=60)
    assert (await cache.verify(key)).role is Role.ADMIN
    await redis.delete(keys.api_keys())  # still cached: no round trip within the ttl
    assert (await cache.verify(key)) is not None


@pytest.mark.cluster_too
def test_cli_creates_lists_and_revokes_keys(server):
    env = {**os.environ, "REDIS_URL": server.url}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "agentfleet", "keys", *args], env=env,
                              capture_output=True, text=True, timeout=60)

    made = cli("create", "--tenant", "acme", "--role", "read", "--name", "dash")
    assert made.returncode == 0, made.stderr
    key_id = made.stdout.split("key id ")[1].split(",")[0]
    listed = cli("list")
    assert key_id in listed.stdout and "acme" in listed.stdout and "live" in listed.stdout
    assert cli("revoke", key_id).returncode == 0
    assert "revoked" in cli("list").stdout
    missing = cli("revoke", "000000000000")
    assert missing.returncode == 2 and "no API key" in missing.stderr
    assert "Traceback" not in missing.stderr
