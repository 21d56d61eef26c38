"""Helpers for agent steps on the producer's side (docs/agent-steps.md).

A task whose result holds `tool_calls` waits for its caller to run the tools; the answers go
back into the same conversation as a new task, a follow-up of the first one in its chain:

    result = await p.wait(task_id)
    outputs = {call.id: run_tool(call) for call in result.tool_calls}
    next_id = await p.submit(tool_reply(task, result, outputs))
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from agentfleet.schemas.errors import ValidationError
from agentfleet.schemas.wire import Message, Result, Task


def tool_reply(task: Task, result: Result, outputs: Mapping[str, str], **fields) -> Task:
    """The task that continues `task`'s conversation with its tool calls' outputs (call id ->
    text): its messages, the assistant's turn with the calls, one `tool` message per call.
    Same model, tools and sampling unless `fields` say otherwise; same correlation id, the
    first task as its parent, so that its trace shows one chain."""
    missing = [c.id for c in result.tool_calls if c.id not in outputs]
    if missing or not result.tool_calls:
        raise ValidationError("outputs", f"no output for tool calls {missing}" if missing
                              else f"result {result.task_id} made no tool calls")
    history = list(task.messages) if task.messages is not None else [
        Message(role="user", content=task.prompt or "")]
    messages = [*history, Message(role="assistant", content=result.text,
                                  tool_calls=list(result.tool_calls)),
                *(Message(role="tool", tool_call_id=c.id, content=outputs[c.id])
                  for c in result.tool_calls)]
    reply = msgspec.structs.replace(
        task, id="", prompt=None, messages=messages, parent_id=task.id, depth=task.depth + 1,
        idempotency_key=None, followups=[], join=None, attempt=0, history=[], enqueued_at=0.0)
    return msgspec.structs.replace(reply, **fields) if fields else reply
