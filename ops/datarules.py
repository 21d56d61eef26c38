"""Data rules per tenant: how long its data is kept, and whether its prompts and outputs may
appear in logs and Sentry.

`rules_for` is the one place the rules come from: a tenant's entry in the tenant registry
(`TenantConfig.redact`, `result_ttl_s`, `trace_ttl_s`; producer/tenants.py), read through the
gateway's registry cache (`use_registry`), else the settings'.  What follows the rules:

  traces    hold no prompt or output text for any tenant: an `Enqueued` event carries ids,
            a `Finished` event the result without its text (workers/worker.py), spans only
            ids and timings (workers/otel.py)
  logs      `RedactTextFilter` scrubs text fields and Struct reprs of a record whose `tenant`
            (passed with extra=) redacts, before any handler formats it
  Sentry    `sentry_before_send` scrubs an event unless its `tenant` keeps text
Retention: the worker's commit script keeps a tenant's results and traces for its
registry entry's TTLs (the fleet's when 0); files stay until deleted or purged.
`agentfleet purge` erases a tenant's data at once (ops/purge.py).
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable
from typing import Any

import msgspec

from agentfleet.ops.sentry import before_send, scrub, tag_from_extra
from agentfleet.schemas.settings import Settings
from agentfleet.schemas.tenants import TenantTable


class TenantRules(msgspec.Struct, kw_only=True, frozen=True):
    redact_text: bool = True  # keep prompts and outputs out of logs and Sentry
    result_ttl_s: int = 86_400
    trace_ttl_s: int = 86_400
    file_ttl_s: int = 0  # 0: files stay until deleted or purged


_overrides: dict[str, TenantRules] = {}
_registry: Callable[[], TenantTable] | None = None  # the last registry table read
# The tenant a request acts for (the gateway sets it once the key is checked), for records
# and events that do not name one.
current_tenant: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "agentfleet_tenant", default=None)


def use_registry(table: Callable[[], TenantTable] | None) -> None:
    """Read tenants' rules from the registry table `table()` returns (a process's cache)."""
    global _registry
    _registry = table


def rules_for(tenant: str, settings: Settings) -> TenantRules:
    """The rules of one tenant: its registry entry's where there is a registry, the settings'
    otherwise.  Text is redacted where the entry says so, and wherever the settings keep it
    out of Sentry (`sentry_include_text` off, the default)."""
    rules = _overrides.get(tenant)
    if rules is not None:
        return rules
    redact = not settings.sentry_include_text
    result_ttl_s, trace_ttl_s = settings.result_ttl_s, settings.trace_ttl_s
    if _registry is not None:
        config = _registry().get(tenant)
        redact = redact or config.redact
        result_ttl_s = config.result_ttl_s or result_ttl_s
        trace_ttl_s = config.trace_ttl_s or trace_ttl_s
    return TenantRules(redact_text=redact, result_ttl_s=result_ttl_s, trace_ttl_s=trace_ttl_s)


def set_rules(tenant: str, rules: TenantRules | None) -> None:
    """Give one tenant its own rules in this process (what the registry will load)."""
    if rules is None:
        _overrides.pop(tenant, None)
    else:
        _overrides[tenant] = rules


class RedactTextFilter(logging.Filter):
    """Scrub prompt and output text from records of tenants whose rules redact it: text
    fields passed with extra= and Struct reprs in the message's arguments."""

    def __init__(self, settings: Settings):
        super().__init__()
        self.settings = settings

    def filter(self, record: logging.LogRecord) -> bool:
        tenant = record.__dict__.get("tenant") or current_tenant.get()
        if tenant is None or not rules_for(tenant, self.settings).redact_text:
            return True
        for key, value in list(record.__dict__.items()):
            if isinstance(value, (str, dict, list, tuple)) and key not in _RECORD_FIELDS:
                record.__dict__[key] = scrub({key: value})[key]
        if record.args:
            args = record.args if isinstance(record.args, tuple) else (record.args,)
            record.args = tuple(scrub(a if isinstance(a, (str, dict, list, tuple)) else repr(a))
                                for a in args)
        return True


_RECORD_FIELDS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime"}


def sentry_before_send(settings: Settings):
    """A `before_send` that scrubs each event unless its tenant's rules keep text."""

    def hook(event: dict[str, Any], hint: dict[str, Any] | None = None) -> dict:
        tenant = (event.get("extra") or {}).get("tenant")
        tags = event.get("tags")
        if tenant is None and isinstance(tags, dict):
            tenant = tags.get("tenant")
        tenant = tenant or current_tenant.get()
        keep = tenant is not None and not rules_for(tenant, settings).redact_text
        return tag_from_extra(event, hint) if keep else before_send(event, hint)

    return hook
