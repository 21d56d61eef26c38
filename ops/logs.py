"""Log set-up for every `agentfleet` command: JSON lines for machines, text for people.

    log.error("model %s: %d task(s) failed", model, n,
              extra={"model": model, "task_id": t.id, "correlation_id": t.correlation_id})

`log_format` (AGENTFLEET_LOG_FORMAT): `json` writes one JSON object per line (what a log
shipper wants), `text` the readable form, `auto` (default) text when stderr is a terminal
and JSON otherwise.  The context fields below, when a call passes them with `extra=`, become
keys of the JSON object and a `[key=value ...]` suffix of the text line; the process's worker
id is on every line.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

import msgspec

from agentfleet.schemas.errors import FatalConfigError

# Context a log call may pass with extra=; in this order on a text line.
CONTEXT_FIELDS = ("model", "worker", "correlation_id", "task_id", "window_id", "batch_id",
                  "error_code")
FORMATS = ("auto", "json", "text")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_encode = msgspec.json.Encoder().encode


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, the context fields, exc."""

    def __init__(self, static: dict[str, str] | None = None):
        super().__init__()
        self.static = static or {}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": _iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(self.static)
        for field in CONTEXT_FIELDS:
            value = record.__dict__.get(field)
            if value is not None:
                out[field] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        try:
            return _encode(out).decode()
        except (TypeError, msgspec.EncodeError):  # an odd object in extra=: its str() will do
            return _encode({k: v if isinstance(v, (str, int, float, bool)) else str(v)
                            for k, v in out.items()}).decode()


class TextFormatter(logging.Formatter):
    """The classic line, with the context fields as a `[key=value ...]` suffix."""

    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = [f"{field}={record.__dict__[field]}" for field in CONTEXT_FIELDS
                   if record.__dict__.get(field) is not None]
        if not context:
            return line
        head, sep, rest = line.partition("\n")  # keep a traceback below the suffixed line
        return f"{head} [{' '.join(context)}]{sep}{rest}"


def _iso(created: float) -> str:
    ms = int(created * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{ms:03d}Z"


def setup_logging(log_format: str = "auto", *, verbose: bool = False,
                  stream: TextIO | None = None, worker_id: str = "") -> logging.Handler:
    """Install one handler on the root logger (replacing earlier ones); return it.

    `worker_id` goes on every JSON line as `worker`: one process is one worker.
    """
    if log_format not in FORMATS:
        raise FatalConfigError(
            f"AGENTFLEET_LOG_FORMAT={log_format!r}: use one of {', '.join(FORMATS)}")
    stream = stream or sys.stderr
    if log_format == "auto":
        isatty = getattr(stream, "isatty", None)
        log_format = "text" if isatty is not None and isatty() else "json"
    static = {"worker": worker_id} if worker_id else {}
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(static) if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    return handler
