"""Errors to Sentry when `SENTRY_DSN` is set: tagged, and without prompt or output text.

What is sent: ERROR log records (the logging integration; a worker logs one line per failure
kind and commit group, with `extra=` naming model, worker, task and correlation id) and
uncaught exceptions.  `before_send` lifts those `extra=` fields into tags, so Sentry can
search and group by them, and removes prompt and output text unless
`sentry_include_text` is true:

  - values under keys that hold text (prompt, text, content, messages, output ...), anywhere
    in the event: extra, contexts, breadcrumbs, local variables of stack frames;
  - text fields inside the repr of our Structs in local variables (`Task(... prompt='...')`),
    and every bytes literal (msgpack payloads carry the text too);
  - the value of `--prompt` in the command line (`agentfleet submit`).

A backend that imports `producer` and has its own Sentry set-up can pass `before_send` to
its own `sentry_sdk.init`.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator
from typing import Any

from agentfleet.schemas.settings import Settings

# extra= fields that become tags (bounded values only: no free text)
TAG_FIELDS = ("correlation_id", "task_id", "model", "worker", "window_id", "batch_id",
              "error_code")
TEXT_KEYS = frozenset(("prompt", "text", "content", "messages", "output", "completion",
                       "payload", "result", "v1", "v2"))
SCRUBBED = "[scrubbed]"
ARGV_TEXT_FLAGS = ("--prompt",)  # command-line options whose value is prompt text
# field='...' / field="..." inside a repr (a quote escaped inside is skipped; a value Sentry
# cut short, with no closing quote, is scrubbed to the end)
_REPR_FIELD = re.compile(
    r"""\b(prompt|text|content|output|payload|v1|v2|result)=(b?)('(?:[^'\\]|\\.)*(?:'|$)"""
    r'''|"(?:[^"\\]|\\.)*(?:"|$))''', re.DOTALL)
_BYTES = re.compile(r"""\bb('(?:[^'\\]|\\.)*(?:'|$)|"(?:[^"\\]|\\.)*(?:"|$))""", re.DOTALL)


def init_sentry(settings: Settings, *, component: str, worker_id: str = "",
                hook=None) -> bool:
    """Start the Sentry SDK if a DSN is set; True if it did.

    Auto-enabled integrations stay off: the Redis one would record every command of the hot
    path as a breadcrumb.  No performance tracing either: errors only.  `hook` replaces the
    `before_send` (the gateway's decides per tenant: ops/datarules.py).
    """
    if not settings.sentry_dsn:
        return False
    import sentry_sdk

    sentry_sdk.init(
        dsn=settings.sentry_dsn,
        before_send=hook or (before_send if not settings.sentry_include_text
                             else tag_from_extra),
        before_breadcrumb=None if settings.sentry_include_text else _scrub_breadcrumb,
        auto_enabling_integrations=False,
        traces_sample_rate=None,
        send_default_pii=False,
        server_name=worker_id or None,
    )
    sentry_sdk.set_tag("component", component)
    if worker_id:
        sentry_sdk.set_tag("worker", worker_id)
    return True


@contextlib.contextmanager
def sentry_tags(**tags: str) -> Iterator[None]:
    """Tag every event sent inside the block (a producer call: model, correlation_id)."""
    import sentry_sdk

    with sentry_sdk.new_scope() as scope:
        for key, value in tags.items():
            if value:
                scope.set_tag(key, value)
        yield


def tag_from_extra(event: dict[str, Any], hint: dict[str, Any] | None = None) -> dict:
    """Lift the context fields a log call passed with extra= into tags."""
    extra = event.get("extra") or {}
    tags = event.setdefault("tags", {})
    for field in TAG_FIELDS:
        value = extra.get(field)
        if value and isinstance(value, str):
            if isinstance(tags, dict):
                tags.setdefault(field, value)
            else:  # the protocol also allows a list of pairs
                tags.append([field, value])
    return event


def before_send(event: dict[str, Any], hint: dict[str, Any] | None = None) -> dict:
    """Tag, then scrub prompt and output text from the whole event."""
    return scrub(tag_from_extra(event, hint))


def _scrub_breadcrumb(crumb: dict[str, Any], hint: dict[str, Any] | None = None) -> dict:
    return scrub(crumb)


def scrub(value: Any) -> Any:
    """`value` with text under text keys and inside reprs replaced by SCRUBBED."""
    if isinstance(value, dict):
        return {k: SCRUBBED if isinstance(k, str) and k.lower() in TEXT_KEYS and v
                else _scrub_argv(v) if k == "sys.argv" else scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    if isinstance(value, tuple):
        return tuple(scrub(v) for v in value)
    if isinstance(value, str) and ("=" in value or "b'" in value or 'b"' in value):
        value = _REPR_FIELD.sub(lambda m: f"{m.group(1)}={m.group(2)}'{SCRUBBED}'", value)
        return _BYTES.sub(f"b'{SCRUBBED}'", value)
    return value


def report_error(exc: BaseException) -> None:
    """Send an error the CLI caught and printed; bad input (a ValidationError) is not sent."""
    from agentfleet.schemas.errors import ValidationError

    if isinstance(exc, ValidationError):
        return
    # Not imported means not initialised: no import (0.2 s, and absent from the client install).
    sentry_sdk = sys.modules.get("sentry_sdk")
    if sentry_sdk is not None and sentry_sdk.is_initialized():
        sentry_sdk.capture_exception(exc)


def _scrub_argv(argv: Any) -> Any:
    """The command line (the argv integration's extra) without the text of `--prompt`."""
    if not isinstance(argv, list):
        return scrub(argv)
    out, hide = [], False
    for arg in argv:
        if hide:
            out.append(SCRUBBED)
        elif isinstance(arg, str) and arg.startswith(ARGV_TEXT_FLAGS) and "=" in arg:
            out.append(arg.split("=", 1)[0] + "=" + SCRUBBED)
        else:
            out.append(arg)
        hide = arg in ARGV_TEXT_FLAGS
    return out
