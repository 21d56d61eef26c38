"""The outcome rules (workers/outcomes.py), as pure functions: no server, no engine."""

from __future__ import annotations

import msgspec
import pytest

from agentfleet.schemas.errors import ErrorCode
from agentfleet.schemas.settings import ModelSpec, Settings
from agentfleet.schemas.wire import (
    DeadLetter,
    FollowUp,
    Result,
    Status,
    Task,
    decode_event,
    decode_result,
    decode_task,
)
from agentfleet.workers.engine import EngineOutput
from agentfleet.workers.inflight import InFlight
from agentfleet.workers.outcomes import Outcomes

SETTINGS = Settings(models={"m1": ModelSpec(name="m1")}, default_model="m1", max_attempts=3,
                    retry_base_s=1.0, retry_max_s=30.0)
NOW = 1_000.0


def _outcomes(**overrides) -> Outcomes:
    s = msgspec.structs.replace(SETTINGS, **overrides)
    return Outcomes(model="m1", worker_id="w1", settings=s, model_version=lambda: "v7")


def _rec(task: Task | None, out: EngineOutput, *, bulk: bool = False) -> InFlight:
    rec = InFlight("af:{m1}:bulk" if bulk else "af:{m1}:tasks", bulk, b"7-0", NOW - 1, "w1/m1/3", 4)
    rec.task = task
    rec.output = out
    return rec


def _ok(text: str = "answer") -> EngineOutput:
    return EngineOutput(request_id="r", text=text, finish_reason="stop", prompt_tokens=3,
                        output_tokens=1, engine_start=NOW - 0.5, first_token=NOW - 0.4,
                        finished=NOW - 0.1)


def _failed(code: ErrorCode) -> EngineOutput:
    return EngineOutput(request_id="r", error_code=code, error_message="boom",
                        engine_start=NOW - 0.5, finished=NOW - 0.1)


def test_a_success_writes_the_result_with_its_window_and_version():
    task = Task(id="t1", correlation_id="t1", model="m1", prompt="hi", reply_to="p1",
                tenant="acme", enqueued_at=NOW - 2)
    record = _outcomes().record(_rec(task, _ok()), NOW, 0.0)
    assert (record.outcome, record.status, record.error_code) == (b"r", Status.SUCCEEDED, None)
    result = decode_result(record.v1)
    assert (result.text, result.tenant, result.model_version) == ("answer", "acme", "v7")
    assert (result.window_id, result.window_size) == ("w1/m1/3", 4)
    assert record.result_key == "af:{m1}:result:t1" and record.reply_key == "af:{m1}:reply:p1"
    assert record.trace == b""  # a lone task: its result is its whole trace


def test_followups_get_deterministic_ids_the_output_and_the_parents_trace():
    task = Task(id="t1", model="m1", prompt="hi", correlation_id="c1",
                followups=[FollowUp(prompt="Again: {output}"), FollowUp(model="m2", prompt="x")])
    record = _outcomes().record(_rec(task, _ok("42")), NOW, 0.0)
    f1, f2 = record.followups
    first, second = decode_task(f1.payload), decode_task(f2.payload)
    assert (first.id, first.prompt, first.parent_id, first.depth) == ("t1.1", "Again: 42", "t1", 1)
    assert (f1.stream, f2.stream, second.model) == ("af:{m1}:tasks", "af:{m2}:tasks", "m2")
    assert (f2.lanes_key, f2.queued_key, f2.tenant) == ("af:{m2}:tenants:i", "af:{m2}:queued",
                                                        "default")
    assert decode_event(f1.event).task_id == "t1.1"
    assert decode_result(record.v1).followup_ids == ["t1.1", "t1.2"]
    assert record.trace and record.trace_key == "af:{m1}:trace:c1"


def test_a_transient_failure_is_retried_with_backoff_in_its_own_lane():
    task = Task(id="t1", model="m1", prompt="hi", batch_id="job")
    low = _outcomes().record(_rec(task, _failed(ErrorCode.ENGINE_ERROR), bulk=True), NOW, 0.0)
    high = _outcomes().record(_rec(task, _failed(ErrorCode.ENGINE_ERROR), bulk=True), NOW,
                              0.999)
    assert low.outcome == b"y" and low.status is None and low.error_code is ErrorCode.ENGINE_ERROR
    assert low.v1[:1] == b"b"  # back into the bulk lane
    again = decode_task(low.v1[1:])
    assert again.attempt == 1 and "engine_error: boom" in again.history[0]
    assert float(low.v2) == pytest.approx(NOW + 0.5) and float(high.v2) < NOW + 1.0
    assert low.followups == ()


def test_the_last_attempt_is_dead_lettered_as_exhausted():
    task = Task(id="t1", model="m1", prompt="hi", attempt=2, history=["a", "b"])
    record = _outcomes().record(_rec(task, _failed(ErrorCode.ENGINE_DEAD)), NOW, 0.0)
    assert (record.outcome, record.status) == (b"d", Status.DEAD_LETTERED)
    assert record.error_code is ErrorCode.ATTEMPTS_EXHAUSTED
    dead = msgspec.msgpack.decode(record.v2, type=DeadLetter)
    assert dead.attempts == 3 and dead.history == ["a", "b"] and decode_task(dead.payload).id == "t1"


@pytest.mark.parametrize("code, status", [
    (ErrorCode.DEADLINE_EXCEEDED, Status.EXPIRED), (ErrorCode.CANCELLED, Status.CANCELLED),
    (ErrorCode.INVALID_TASK, Status.FAILED), (ErrorCode.DELIVERY_LIMIT, Status.DEAD_LETTERED)])
def test_terminal_codes_end_with_their_status_and_no_followups(code, status):
    task = Task(id="t1", model="m1", prompt="hi", followups=[FollowUp(prompt="x")])
    record = _outcomes().record(_rec(task, _failed(code)), NOW, 0.0)
    assert (record.status, record.error_code, record.followups) == (status, code, [])


def test_a_task_cancelled_while_running_ends_cancelled():
    rec = _rec(Task(id="t1", model="m1", prompt="hi"), _ok())
    rec.cancelled = True
    record = _outcomes().record(rec, NOW, 0.0)
    assert record.status is Status.CANCELLED
    assert decode_result(record.v1).error_message == "cancelled while running"


def test_an_undecodable_entry_is_dead_lettered_under_its_entry_id():
    rec = _rec(None, _failed(ErrorCode.DECODE_ERROR))
    rec.payload = b"\xc1garbage"
    record = _outcomes().record(rec, NOW, 0.0)
    assert record.status is Status.DEAD_LETTERED and record.reply_key == ""
    assert decode_result(record.v1).task_id == "entry-7-0"
    assert msgspec.msgpack.decode(record.v2, type=DeadLetter).payload == b"\xc1garbage"


def test_bulk_job_tasks_count_into_their_job():
    task = Task(id="t1", model="m1", prompt="hi", batch_id="job9")
    record = _outcomes().record(_rec(task, _ok(), bulk=True), NOW, 0.0)
    assert record.batch_out == "af:{m1}:batch:job9:out" and record.batch_status == "succeeded"
    assert isinstance(decode_result(record.v1), Result)
