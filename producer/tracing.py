"""The producer's side of OpenTelemetry: the current span's W3C traceparent, put in tasks.

Costs nothing without the opentelemetry package or without a current span.
"""

from __future__ import annotations


def current_traceparent() -> str:
    """The W3C traceparent of the caller's current span, or "" (no SDK, or no span)."""
    try:
        from opentelemetry import trace
    except ImportError:
        return ""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return ""
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
