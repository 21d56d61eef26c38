"""The outcome rules (workers/outcomes.py), as pure functions: no server, no engine."""

from __future__ import annotations

import msgspec
import pytest

from agentfleet.schemas.errors import ErrorCode, JoinInputLostError
from agentfleet.schemas.settings import ModelSpec, Settings
from agentfleet.schemas.wire import (
    Condition,
    DeadLetter,
    FollowUp,
    FunctionCall,
    FunctionDef,
    JoinRef,
    JsonSchema,
    Message,
    ResponseFormat,
    Result,
    Sampling,
    Status,
    Task,
    Tool,
    ToolCall,
    decode_event,
    decode_result,
    decode_task,
    encode,
)
from agentfleet.workers.engine import EngineOutput
from agentfleet.workers.inflight import InFlight
from agentfleet.workers.outcomes import Outcomes, render_join
from agentfleet.workers.scripts import JoinWrite

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


# ---- agent steps (docs/agent-steps.md) ------------------------------------------------------

TRIAGE = {"type": "object", "required": ["category", "summary"],
          "properties": {"category": {"enum": ["refund", "bug", "other"]},
                         "summary": {"type": "string"},
                         "parts": {"type": "array", "maxItems": 5, "items": {"type": "string"}}}}


def _schema_task(**kw) -> Task:
    base = dict(id="p", correlation_id="c", model="m1", prompt="hi", reply_to="prod",
                response_format=ResponseFormat(type="json_schema",
                                               json_schema=JsonSchema(schema=TRIAGE)))
    return Task(**{**base, **kw})


def _out(text: str, finish_reason: str = "stop", **kw) -> EngineOutput:
    return EngineOutput(request_id="r", text=text, finish_reason=finish_reason,
                        prompt_tokens=3, output_tokens=9, engine_start=NOW - 0.5,
                        first_token=NOW - 0.4, finished=NOW - 0.1, **kw)


def test_a_structured_output_is_parsed_into_the_result():
    record = _outcomes().record(_rec(_schema_task(), _out(
        '{"category": "bug", "summary": "crash"}')), NOW, 0.0)
    result = decode_result(record.v1)
    assert result.ok and result.parsed == {"category": "bug", "summary": "crash"}
    assert result.text == '{"category": "bug", "summary": "crash"}'


@pytest.mark.parametrize("text, why", [
    ('{"category": "bug"', "not JSON"), ('{"category": "fun", "summary": "x"}', "fails its schema"),
    ('{"summary": "x"}', "fails its schema")])
def test_an_output_that_misses_its_schema_fails_typed_without_followups(text, why):
    task = _schema_task(followups=[FollowUp(prompt="next")])
    record = _outcomes().record(_rec(task, _out(text)), NOW, 0.0)
    result = decode_result(record.v1)
    assert (record.status, record.error_code) == (Status.FAILED, ErrorCode.OUTPUT_INVALID)
    assert why in result.error_message and record.followups == [] and result.parsed is None


def test_an_output_cut_by_max_tokens_runs_again_with_twice_the_budget_up_to_the_bound():
    task = _schema_task(sampling=Sampling(max_tokens=48), retry_max_tokens=80)
    record = _outcomes().record(_rec(task, _out('{"category": "bu', "length")), NOW, 0.0)
    assert record.outcome == b"y" and record.error_code is ErrorCode.OUTPUT_INVALID
    again = decode_task(record.v1[1:])
    assert again.sampling.max_tokens == 80 and again.attempt == 1  # 96 capped at 80
    assert "cut by max_tokens" in again.history[0] and float(record.v2) == NOW  # at once
    last = _outcomes().record(_rec(again, _out('{"category": "bu', "length")), NOW, 0.0)
    assert last.status is Status.FAILED and last.error_code is ErrorCode.OUTPUT_INVALID


def test_conditions_pick_the_branch_and_templates_read_fields_of_the_output():
    task = _schema_task(followups=[
        FollowUp(agent_id="refunds", prompt="Refund: {output.summary}",
                 when=Condition(field="category", equals="refund")),
        FollowUp(agent_id="bugs", prompt="Bug ({output.category}): {output.summary}",
                 when=Condition(field="category", one_of=["bug", "crash"])),
        FollowUp(prompt="Not a refund: {output}",
                 when=Condition(field="category", equals="refund", negate=True))])
    record = _outcomes().record(_rec(task, _out('{"category": "bug", "summary": "it broke"}')),
                                NOW, 0.0)
    kids = [decode_task(f.payload) for f in record.followups]
    assert [k.id for k in kids] == ["p.2", "p.3"]
    assert kids[0].prompt == "Bug (bug): it broke" and kids[0].agent_id == "bugs"
    assert kids[1].prompt == 'Not a refund: {"category": "bug", "summary": "it broke"}'
    result = decode_result(record.v1)
    assert result.followup_ids == ["p.2", "p.3"]
    assert result.skipped == ["1: category == 'refund'"]
    assert decode_event(record.followups[0].event).via == "when category in ['bug', 'crash']"


def test_a_label_of_a_choice_and_the_text_of_a_free_step_are_tested_as_they_are():
    labeled = Task(id="p", model="m1", prompt="hi", correlation_id="p",
                   response_format=ResponseFormat(type="choice", choice=["yes", "no"]),
                   followups=[FollowUp(prompt="a", when=Condition(equals="no"))])
    record = _outcomes().record(_rec(labeled, _out("no")), NOW, 0.0)
    assert decode_result(record.v1).parsed == "no" and len(record.followups) == 1
    free = Task(id="p", model="m1", prompt="hi",
                followups=[FollowUp(prompt="a", when=Condition(equals="yes"))])
    assert len(_outcomes().record(_rec(free, _out("  yes\n")), NOW, 0.0).followups) == 1


def test_a_fan_out_makes_a_child_per_item_and_opens_its_join():
    task = _schema_task(followups=[
        FollowUp(for_each="parts", prompt="Summarise {item}", model="m2"),
        FollowUp(items=[{"n": 1}, {"n": 2}], prompt="Item {item.n} of {output.category}")],
        join=FollowUp(prompt="Merge: {results}"))
    text = '{"category": "bug", "summary": "s", "parts": ["a", "b", "c"]}'
    record = _outcomes().record(_rec(task, _out(text)), NOW, 0.0)
    kids = [decode_task(f.payload) for f in record.followups]
    assert [k.id for k in kids] == ["p.1-1", "p.1-2", "p.1-3", "p.2-1", "p.2-2"]
    assert [k.prompt for k in kids] == ["Summarise a", "Summarise b", "Summarise c",
                                        "Item 1 of bug", "Item 2 of bug"]
    assert kids[0].joins_into == JoinRef(parent="p", model="m1", join_model="m1")
    assert [decode_event(f.event).via for f in record.followups][:2] == ["item 1 of 3",
                                                                         "item 2 of 3"]
    join = record.join
    assert (join.state_key, join.stream, join.children) == (
        "af:{m1}:join:p", "af:{m1}:tasks", tuple(k.id for k in kids))
    step = decode_task(join.payload)
    assert (step.id, step.parent_id, step.prompt) == ("p.join", "p", "Merge: {results}")
    assert step.join_of == JoinRef(parent="p", model="m1", join_model="m1")
    assert decode_result(record.v1).join_id == "p.join"


def test_a_fan_out_beyond_max_children_fails_its_parent():
    task = _schema_task(followups=[FollowUp(for_each="parts", prompt="{item}")])
    text = '{"category": "bug", "summary": "s", "parts": ["a", "b", "c"]}'
    record = _outcomes(max_children=2).record(_rec(task, _out(text)), NOW, 0.0)
    assert record.error_code is ErrorCode.OUTPUT_INVALID and record.followups == []
    assert "3 children, more than max_children 2" in decode_result(record.v1).error_message


def test_a_join_with_no_child_left_by_its_conditions_opens_empty():
    task = _schema_task(followups=[FollowUp(prompt="x", when=Condition(field="category",
                                                                         equals="refund"))],
                        join=FollowUp(prompt="none came: {results}"))
    record = _outcomes().record(_rec(task, _out('{"category": "bug", "summary": "s"}')),
                                NOW, 0.0)
    assert record.followups == [] and record.join.children == ()
    assert decode_event(record.join.event).via == "join"  # commit.lua fires it at once


@pytest.mark.parametrize("out, status", [
    (_ok(), Status.SUCCEEDED), (_failed(ErrorCode.INVALID_TASK), Status.FAILED),
    (_failed(ErrorCode.DEADLINE_EXCEEDED), Status.EXPIRED),
    (_failed(ErrorCode.DELIVERY_LIMIT), Status.DEAD_LETTERED)])
def test_a_child_joins_its_join_whatever_its_status(out, status):
    ref = JoinRef(parent="p", model="m1", join_model="m2")
    kid = Task(id="p.1-2", parent_id="p", correlation_id="c", model="m1", prompt="x",
               tenant="acme", joins_into=ref)
    record = _outcomes().record(_rec(kid, out), NOW, 0.0)
    assert record.status is status
    assert record.join == JoinWrite(state_key="af:{m1}:join:p", stream="af:{m2}:tasks:acme",
                                    lanes_key="af:{m2}:tenants:i", queued_key="af:{m2}:queued",
                                    tenant="acme", event=record.join.event, member="p.1-2",
                                    trace_key="af:{m1}:trace:c")
    assert decode_event(record.join.event).task_id == "p.join"


def test_a_child_that_is_retried_has_not_ended_yet():
    kid = Task(id="p.1", model="m1", prompt="x",
               joins_into=JoinRef(parent="p", model="m1", join_model="m1"))
    record = _outcomes().record(_rec(kid, _failed(ErrorCode.ENGINE_ERROR)), NOW, 0.0)
    assert record.outcome == b"y" and record.join is None


TOOLS = [Tool(function=FunctionDef(name="lookup_order", parameters={
             "type": "object", "properties": {"order": {"type": "integer"}},
             "required": ["order"]})),
         Tool(function=FunctionDef(name="escalate"))]


def test_tool_calls_by_structured_outputs_get_ids_from_the_task_and_drive_branches():
    task = Task(id="p", correlation_id="c", model="m1", messages=[Message(role="user",
                content="Where is order 7?")], tools=TOOLS, tool_choice="required",
                followups=[
                    FollowUp(when=Condition(tool="lookup_order"), continue_conversation=True,
                             messages=[Message(role="tool", tool_call_id="{tool.id}",
                                               content="order {tool.arguments.order}: shipped")]),
                    FollowUp(when=Condition(tool="escalate"), prompt="escalate")])
    text = '[{"name": "lookup_order", "parameters": {"order": 7}}]'
    record = _outcomes().record(_rec(task, _out(text)), NOW, 0.0)
    result = decode_result(record.v1)
    [call] = result.tool_calls
    assert call.function.name == "lookup_order" and call.function.arguments == '{"order":7}'
    again = _outcomes().record(_rec(task, _out(text)), NOW, 0.0)
    assert decode_result(again.v1).tool_calls[0].id == call.id  # the same calls twice
    assert result.text == "" and result.skipped == ["2: tool escalate"]
    [kid] = [decode_task(f.payload) for f in record.followups]
    assert [m.role for m in kid.messages] == ["user", "assistant", "tool"]
    assert kid.messages[1].tool_calls == [call]
    assert (kid.messages[2].tool_call_id, kid.messages[2].content) == (call.id, "order 7: shipped")
    trace = decode_event(record.trace).result  # traces hold no content
    assert trace.tool_calls[0].function.arguments == "" and trace.parsed is None


def test_calls_read_by_the_models_tool_parser_are_taken_as_they_are():
    task = Task(id="p", model="m1", prompt="x", tools=TOOLS)
    found = [ToolCall(id="chatcmpl-tool-1", function=FunctionCall(name="escalate"))]
    record = _outcomes().record(_rec(task, _out("On it.", tool_calls=found)), NOW, 0.0)
    result = decode_result(record.v1)
    assert result.tool_calls == found and result.text == "On it."


def test_a_join_step_is_filled_with_its_childrens_results_in_their_order():
    parent = Result(task_id="p", status=Status.SUCCEEDED, text='{"category": "bug"}',
                    parsed={"category": "bug"}, followup_ids=["p.1-1", "p.1-2"])
    state = {b"parent": encode(parent),
             b"r:p.1-2": encode(Result(task_id="p.1-2", status=Status.FAILED,
                                       error_code=ErrorCode.OUTPUT_INVALID, error_message="x")),
             b"r:p.1-1": encode(Result(task_id="p.1-1", status=Status.SUCCEEDED, text="one"))}
    step = Task(id="p.join", model="m1", prompt="{output.category}: {results}",
                join_of=JoinRef(parent="p", model="m1", join_model="m1"))
    filled = render_join(step, state, 123.0)
    assert filled.enqueued_at == 123.0 and filled.join_of is None  # a retry is not filled again
    assert filled.prompt == (
        'bug: [{"task_id":"p.1-1","status":"succeeded","output":"one"},'
        '{"task_id":"p.1-2","status":"failed","output":"","error":"output_invalid: x"}]')
    with pytest.raises(JoinInputLostError):
        render_join(step, {}, 123.0)
