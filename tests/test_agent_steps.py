"""Agent steps on real servers with the fake engine (docs/agent-steps.md): structured outputs,
branches, fan-out and fan-in across models, tool calls fed back, and the worker refusing bad
steps without dying."""

from __future__ import annotations

import json

from agentfleet.ops.trace import load_trace, render
from agentfleet.producer.steps import tool_reply
from agentfleet.schemas import keys
from agentfleet.schemas.errors import ErrorCode
from agentfleet.schemas.wire import (
    Condition,
    FollowUp,
    FunctionDef,
    JoinRef,
    JsonSchema,
    Message,
    ResponseFormat,
    Sampling,
    Status,
    Task,
    Tool,
    decode_task,
    encode,
)
from agentfleet.workers.structured import schema_error

TRIAGE = {"type": "object", "required": ["category", "summary"],
          "properties": {"category": {"enum": ["refund", "bug"]},
                         "summary": {"type": "string", "maxLength": 40}}}
SPLIT = {"type": "object", "required": ["parts"],
         "properties": {"parts": {"type": "array", "minItems": 5, "maxItems": 5,
                                  "items": {"type": "string"}}}}


def _schema(schema: dict) -> ResponseFormat:
    return ResponseFormat(type="json_schema", json_schema=JsonSchema(schema=schema))


def _triage(prompt: str, **kw) -> Task:
    fields = dict(model="m1", prompt=prompt, response_format=_schema(TRIAGE),
                  sampling=Sampling(max_tokens=64), followups=[
                      FollowUp(agent_id="refunds", prompt="Refund desk: {output.summary}",
                               when=Condition(field="category", equals="refund")),
                      FollowUp(agent_id="bugs", model="m2", prompt="Bug desk: {output.summary}",
                               when=Condition(field="category", equals="bug"))])
    return Task(**{**fields, **kw})


async def test_a_triage_chain_branches_on_its_parsed_output(producer, start_worker, redis,
                                                              settings):
    await start_worker()
    refund = await producer.submit(_triage("I want a refund please", correlation_id="c-r"))
    bug = await producer.submit(_triage("The app has a bug", correlation_id="c-b"))
    first, desk = await producer.wait_chain(refund, timeout_s=10)
    assert first.parsed["category"] == "refund" and not schema_error(TRIAGE, first.parsed)
    assert (desk.agent_id, desk.model, desk.task_id) == ("refunds", "m1", refund + ".1")
    assert desk.text == "echo: " + ("Refund desk: " + first.parsed["summary"])[-40:]
    assert first.skipped == ["2: category == 'bug'"]
    first, desk = await producer.wait_chain(bug, timeout_s=10)
    assert (desk.agent_id, desk.model, desk.task_id) == ("bugs", "m2", bug + ".2")
    drawn = render("c-b", await load_trace(redis, settings, "c-b"))
    assert f"├── {bug}.2  [succeeded]  when category == 'bug'" in drawn, drawn
    assert "└── (not taken) follow-up 1: category == 'refund'" in drawn, drawn


async def test_a_fan_out_across_models_joins_once_with_every_childs_result(
        producer, start_worker, redis, settings):
    await start_worker()
    root = Task(model="m1", prompt="Split this document", correlation_id="doc",
                response_format=_schema(SPLIT), sampling=Sampling(max_tokens=128),
                followups=[FollowUp(for_each="parts", model="m2", prompt="Summarise {item}",
                                    sampling=Sampling(max_tokens=16))],
                join=FollowUp(prompt="Merge {results}", sampling=Sampling(max_tokens=32)))
    root_id = await producer.submit(root)
    chain = await producer.wait_chain(root_id, timeout_s=10)
    parent, *children, join = chain
    assert [c.task_id for c in children] == [f"{root_id}.1-{k}" for k in range(1, 6)]
    assert {c.model for c in children} == {"m2"} and all(c.ok for c in children)
    assert (join.task_id, join.parent_id, join.model, join.status) == (
        f"{root_id}.join", root_id, "m1", Status.SUCCEEDED)
    assert parent.join_id == join.task_id
    # the join's input held all five results, in order (the fake echoes the prompt's tail)
    state = await redis.hgetall(keys.join_state("m1", root_id))
    assert (state[b"n"], state[b"ended"], state[b"fired"]) == (b"5", b"5", b"1")
    assert join.text == "echo: " + ("Merge " + json.dumps([
        {"task_id": c.task_id, "status": "succeeded", "output": c.text} for c in children],
        separators=(",", ":")))[-40:]
    # fired on m1's slot: a child on m2 fills its place through m2's outbox (join.lua)
    stats = await redis.hgetall(keys.stats_key("m1"))
    assert int(stats[b"joins"]) == 1 and b"join_missed" not in stats
    drawn = render("doc", await load_trace(redis, settings, "doc"))
    assert f"└── {root_id}.join  [succeeded]  join  <- 5 children (5 succeeded)" in drawn, drawn
    assert f"├── {root_id}.1-3  [succeeded]  item 3 of 5" in drawn, drawn


async def test_failed_and_dead_lettered_children_reach_the_join_with_their_status(
        producer, start_worker):
    await start_worker()
    root_id = await producer.submit(Task(
        model="m1", prompt="three ways", followups=[
            FollowUp(prompt="fine"),
            FollowUp(prompt="bad", metadata={"fake_error": "invalid_task"}),
            FollowUp(prompt="flaky", metadata={"fake_error": "engine_error"})],
        join=FollowUp(prompt="{results}", sampling=Sampling(max_tokens=200),
                      metadata={"fake_output": "joined"})))
    *_, join = await producer.wait_chain(root_id, timeout_s=15)
    assert join.ok and join.text == "joined"
    stored = await producer.get_result(join.task_id, "m1")
    assert stored.ok
    kids = await producer.wait_many([f"{root_id}.{i}" for i in (1, 2, 3)], timeout_s=5)
    assert [k.status for k in kids] == [Status.SUCCEEDED, Status.FAILED, Status.DEAD_LETTERED]


async def test_conditions_that_leave_no_child_fire_the_join_at_once(producer, start_worker):
    await start_worker()
    root_id = await producer.submit(_triage(
        "a refund", followups=[FollowUp(prompt="x", when=Condition(field="category",
                                                                     equals="bug"))],
        join=FollowUp(prompt="nothing to merge: {results}")))
    parent, join = await producer.wait_chain(root_id, timeout_s=10)
    assert parent.followup_ids == [] and join.ok and join.text.endswith("nothing to merge: []")


async def test_an_output_cut_by_max_tokens_runs_again_with_a_larger_budget(producer,
                                                                             start_worker):
    await start_worker()
    task_id = await producer.submit(_triage("refund me", sampling=Sampling(max_tokens=8),
                                            retry_max_tokens=64, followups=[]))
    result = await producer.wait(task_id, timeout_s=10)
    assert result.ok and result.attempts == 2 and result.parsed["category"] == "refund"  # 8, 16
    cut = await producer.submit(_triage("refund me", sampling=Sampling(max_tokens=8),
                                        followups=[]))
    failed = await producer.wait(cut, timeout_s=10)
    assert failed.error_code is ErrorCode.OUTPUT_INVALID and "cut by max_tokens" in (
        failed.error_message)


async def test_a_tool_call_is_answered_back_into_the_same_conversation(producer, start_worker):
    await start_worker()
    tools = [Tool(function=FunctionDef(name="lookup_order", parameters={
        "type": "object", "properties": {"order": {"type": "integer", "minimum": 7}},
        "required": ["order"]}))]
    task = Task(model="m1", messages=[Message(role="user", content="lookup_order please")],
                tools=tools, tool_choice="required", sampling=Sampling(max_tokens=64))
    result = await producer.wait(await producer.submit(task), timeout_s=10)
    [call] = result.tool_calls
    assert call.function.name == "lookup_order" and json.loads(call.function.arguments) == {
        "order": 7}
    reply = tool_reply(task, result, {call.id: "order 7 shipped"}, tool_choice="none")
    answer = await producer.wait(await producer.submit(reply), timeout_s=10)
    assert answer.ok and answer.text == "echo: order 7 shipped"
    assert answer.parent_id == task.id and answer.correlation_id == task.correlation_id


async def test_the_worker_refuses_bad_steps_and_stray_joins_without_dying(
        producer, start_worker, redis):
    await start_worker()
    stream = keys.task_stream("m1")
    bad = Task(id="bad-schema", model="m1", prompt="x", reply_to=producer.id,
               response_format=_schema({"type": "objekt"}))
    stray = Task(id="stray", model="m1", prompt="x", reply_to=producer.id,
                 joins_into=JoinRef(parent="nobody", model="m1", join_model="m1"))
    lost = Task(id="nobody.join", model="m1", prompt="{results}", reply_to=producer.id,
                join_of=JoinRef(parent="nobody", model="m1", join_model="m1"))
    producer._ensure_listener()
    for t in (bad, stray, lost):  # past the producer's checks, as a broken client might
        await redis.xadd(stream, {"d": encode(t)})
    bad_r, stray_r, lost_r = await producer.wait_many(["bad-schema", "stray", "nobody.join"],
                                                      timeout_s=10)
    assert bad_r.error_code is ErrorCode.INVALID_TASK and "json_schema.schema" in (
        bad_r.error_message)
    assert stray_r.ok  # it ran; it had no place in any join
    assert lost_r.error_code is ErrorCode.JOIN_INPUT_LOST
    stats = await redis.hgetall(keys.stats_key("m1"))
    assert int(stats[b"join_missed"]) == 1 and b"joins" not in stats
    ok = await producer.wait(await producer.submit(model="m1", prompt="still here"), 5)
    assert ok.ok


async def test_commit_script_enqueues_the_join_with_its_last_childs_result_once(redis, settings):
    """commit.lua on its own, one commit per record: the join waits for the last child,
    whatever order they end in; a child committed again (a second run) changes nothing."""
    from agentfleet.workers.engine import EngineOutput
    from agentfleet.workers.inflight import InFlight
    from agentfleet.workers.outcomes import Outcomes
    from agentfleet.workers.scripts import CommitHead, commit_args, commit_lua

    source = keys.task_stream("m1")
    await redis.xgroup_create(source, keys.GROUP, id="0", mkstream=True)
    script = redis.register_script(commit_lua())
    head = CommitHead(stats_key=keys.stats_key("m1"), delayed_key=keys.delayed_key("m1"),
                      dead_stream=keys.dead_stream("m1"), queued_key=keys.queued_counts("m1"),
                      group=keys.GROUP, consumer="me", reply_maxlen=100, dead_maxlen=100)
    outcomes = Outcomes(model="m1", worker_id="me", settings=settings,
                        model_version=lambda: "v")

    async def commit(task: Task, text: str = "ok") -> None:
        entry = await redis.xadd(source, {"d": encode(task)})
        await redis.xreadgroup(keys.GROUP, "me", {source: ">"})
        rec = InFlight(source, False, entry, 1.0, "w", 1)
        rec.task = task
        rec.output = EngineOutput(request_id="r", text=text, finish_reason="stop")
        keys_, args = commit_args(head, [outcomes.record(rec, 2.0, 0.0)])
        await script(keys=keys_, args=args)

    parent = Task(id="p", correlation_id="p", model="m1", prompt="x",
                  followups=[FollowUp(items=[1, 2, 3], prompt="{item}")],
                  join=FollowUp(prompt="{results}"))
    await commit(parent)
    kids = [decode_task_payload(e) for e in await redis.xrange(source)][1:]
    assert [k.id for k in kids] == ["p.1-1", "p.1-2", "p.1-3"]
    seen = []
    for kid in (kids[2], kids[0], kids[0], kids[1], kids[1]):  # out of order, twice
        await commit(kid)
        seen.append(sum(1 for e in await redis.xrange(source)
                        if decode_task_payload(e).id == "p.join"))
    assert seen == [0, 0, 0, 1, 1]
    state = await redis.hgetall(keys.join_state("m1", "p"))
    assert (state[b"ended"], state[b"fired"]) == (b"3", b"1")
    stats = await redis.hgetall(keys.stats_key("m1"))
    assert (int(stats[b"joins"]), int(stats[b"duplicates"])) == (1, 2)


def decode_task_payload(entry) -> Task:
    return decode_task(entry[1][b"d"])
