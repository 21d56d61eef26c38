"""OpenTelemetry: a backend service's trace continues through the queue and the follow-ups."""

from __future__ import annotations

import msgspec
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agentfleet.schemas.wire import FollowUp, Task
from agentfleet.workers.fake_engine import FakeEngine


_EXPORTER: InMemorySpanExporter | None = None


@pytest.fixture
def spans() -> InMemorySpanExporter:
    """One in-memory exporter for the whole process: OpenTelemetry takes one global provider,
    and pytest may enter this module twice (once per server)."""
    global _EXPORTER
    if _EXPORTER is None:
        _EXPORTER = InMemorySpanExporter()
        provider = trace.get_tracer_provider()
        if not isinstance(provider, TracerProvider):
            provider = TracerProvider()
            trace.set_tracer_provider(provider)
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
    _EXPORTER.clear()
    return _EXPORTER


async def test_chain_spans_continue_the_callers_trace(spans, producer, start_worker,
                                                       settings):
    otel_settings = msgspec.structs.replace(settings, otel_enabled=True)
    await start_worker(engines={"m1": FakeEngine(), "m2": FakeEngine()},
                       worker_settings=otel_settings)
    tracer = trace.get_tracer("a backend service")
    with tracer.start_as_current_span("handle request") as request_span:
        root_id = await producer.submit(Task(model="m1", prompt="one",
                                             followups=[FollowUp(model="m2", prompt="two")]))
    await producer.wait_chain(root_id, timeout_s=5)
    finished = spans.get_finished_spans()
    trace_id = request_span.get_span_context().trace_id
    tasks = {s.attributes["agentfleet.task_id"]: s for s in finished
             if s.name.startswith("agentfleet.task")}
    assert set(tasks) == {root_id, f"{root_id}.1"}
    root, child = tasks[root_id], tasks[f"{root_id}.1"]
    assert {root.context.trace_id, child.context.trace_id} == {trace_id}
    assert root.parent.span_id == request_span.get_span_context().span_id
    assert child.parent.span_id == root.context.span_id  # the follow-up hangs off its parent
    assert root.attributes["agentfleet.model"] == "m1" and child.name == "agentfleet.task m2"
    inner = {s.name for s in finished if s.parent and s.parent.span_id == root.context.span_id
             and s.name != "agentfleet.task m2"}
    assert inner == {"agentfleet.queue_wait", "agentfleet.engine"}
    assert root.start_time <= root.end_time


async def test_no_span_no_traceparent(producer, start_worker):
    await start_worker()
    task = Task(model="m1", prompt="x")
    await producer.wait(await producer.submit(task), timeout_s=5)
    assert task.traceparent == ""
