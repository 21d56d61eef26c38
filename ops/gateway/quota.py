"""A hook for the gateway's own admission check, before a task reaches the producer.

Tenants' quotas (`max_queued`, `tokens_per_minute`) live in the tenant registry and are
enforced atomically by the enqueue script; a refusal (`QuotaExceededError`) becomes a 429
with `Retry-After` (errors.py).  This hook is for anything the gateway should refuse earlier
(a rate per key, say): `create_app(quota=...)` takes an object with this method, and the
gateway answers 429 with `Retry-After` whenever it returns a number.  Nothing is queued on
a 429.
"""

from __future__ import annotations


class Quota:
    """No check of its own: the registry's quotas apply at enqueue."""

    async def check(self, tenant: str, tasks: int) -> float | None:
        """Seconds until `tenant` may submit `tasks` more tasks, or None if it may now."""
        return None
