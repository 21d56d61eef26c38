"""Optional OpenTelemetry spans: a backend service's trace continues through the queue.

The producer puts the W3C `traceparent` of the span current at submit time into the task.
With `AGENTFLEET_OTEL_ENABLED=1` the worker turns each finished task into spans after the fact, from
the timings it already has (no clock read on the hot path):

    agentfleet.task <model>          enqueued -> result written, child of the traceparent
      agentfleet.queue_wait          enqueued -> read by the worker
      agentfleet.engine              engine start -> finished (first token as an event)

and gives the task's follow-ups the task span as their parent, so a chain is one trace.
Spans go wherever the OpenTelemetry SDK is configured to send them (OTEL_EXPORTER_OTLP_*
variables; `configure_from_env` sets up OTLP over HTTP when an endpoint is set).
"""

from __future__ import annotations

import logging

from agentfleet.schemas.wire import Status, Task

log = logging.getLogger("agentfleet.otel")

_NS = 1_000_000_000


class TaskSpans:
    """Makes a finished task's spans; returns the traceparent its follow-ups carry."""

    def __init__(self, tracer=None):
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._trace = trace
        self._tracer = tracer or trace.get_tracer("agentfleet")
        self._propagator = TraceContextTextMapPropagator()

    def record(self, task: Task, status: Status, *, worker_id: str, window_id: str, read: float,
               engine_start: float, first_token: float, finished: float, written: float,
               prompt_tokens: int, output_tokens: int, error: str) -> str:
        parent = self._propagator.extract({"traceparent": task.traceparent}) \
            if task.traceparent else None
        start = int((task.enqueued_at or read) * _NS)
        span = self._tracer.start_span(
            f"agentfleet.task {task.model}", context=parent, start_time=start,
            attributes={"agentfleet.task_id": task.id,
                        "agentfleet.correlation_id": task.correlation_id,
                        "agentfleet.parent_task_id": task.parent_id,
                        "agentfleet.model": task.model, "agentfleet.agent_id": task.agent_id,
                        "agentfleet.worker_id": worker_id, "agentfleet.window_id": window_id,
                        "agentfleet.status": status.value, "agentfleet.attempt": task.attempt,
                        "gen_ai.usage.input_tokens": prompt_tokens,
                        "gen_ai.usage.output_tokens": output_tokens})
        if status is not Status.SUCCEEDED:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, error))
        ctx = self._trace.set_span_in_context(span)
        if read:
            self._tracer.start_span("agentfleet.queue_wait", context=ctx,
                                    start_time=start).end(end_time=int(read * _NS))
        if engine_start and finished:
            engine = self._tracer.start_span("agentfleet.engine", context=ctx,
                                             start_time=int(engine_start * _NS))
            if first_token:
                engine.add_event("first token", timestamp=int(first_token * _NS))
            engine.end(end_time=int(finished * _NS))
        span.end(end_time=int(written * _NS))
        sc = span.get_span_context()
        return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"


def configure_from_env(service_name: str) -> None:
    """An SDK tracer provider exporting OTLP over HTTP, when OTEL_EXPORTER_OTLP_* is set."""
    import os

    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.error("AGENTFLEET_OTEL_ENABLED=1 but opentelemetry-sdk is not installed: no spans")
        return
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
