"""Tenants' quotas: the one place the gateway asks whether a tenant may submit now.

Shares and quotas live in the tenant registry, which another issue builds.  Until it exists
every tenant may submit; the registry fills in `Quota.check` (or passes its own object with
the same method to `create_app`), and the gateway answers 429 with `Retry-After` whenever
it returns a number.  Nothing is queued on a 429.
"""

from __future__ import annotations


class Quota:
    """No limits: every tenant may submit at any time."""

    async def check(self, tenant: str, tasks: int) -> float | None:
        """Seconds until `tenant` may submit `tasks` more tasks, or None if it may now."""
        return None
