"""The gateway's request bodies (msgspec Structs), decoded once per request, strictly.

Every OpenAI request field is known here, and anything else is an unknown field (422), so a
typo never passes silently.  Fields that would change the answer's shape (`n` > 1, log
probabilities, audio, the old `functions`) are known and refused with 400
(`openai_batch.request_input`); `response_format`, `tools` and `tool_choice` are agent steps
(docs/agent-steps.md, `openai_batch.apply_steps`);
those that do not (`user`, `metadata`, `store`, `service_tier`, ...) are accepted and ignored.
"""

from __future__ import annotations

import msgspec

from agentfleet.producer.openai_batch import RequestBody
from agentfleet.schemas.wire import FollowUp, Message, Sampling


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool | None = None  # a last chunk with the token counts
    include_timing: bool | None = None  # agentfleet's: each chunk says when the engine made it
    continuous_usage_stats: bool | None = None  # vLLM's: accepted, ignored


class CompletionRequest(RequestBody, kw_only=True, forbid_unknown_fields=True):
    """POST /v1/completions (and the base of chat): OpenAI's fields and vLLM's sampling ones."""

    suffix: str | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    stream_options: StreamOptions | None = None
    priority: int | None = None  # agentfleet's: 0..9, higher first


class ChatRequest(CompletionRequest, kw_only=True, forbid_unknown_fields=True):
    """POST /v1/chat/completions."""

    functions: list | None = None
    function_call: str | dict | None = None
    parallel_tool_calls: bool | None = None
    audio: dict | None = None
    modalities: list[str] | None = None
    prediction: dict | None = None
    web_search_options: dict | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    safety_identifier: str | None = None


# ---- agentfleet's task API (POST /v1/tasks) -----------------------------------------------

class TaskSampling(Sampling, kw_only=True, forbid_unknown_fields=True):
    pass


class TaskMessage(Message, kw_only=True, forbid_unknown_fields=True):
    pass


class TaskFollowUp(FollowUp, kw_only=True, forbid_unknown_fields=True):
    messages: list[TaskMessage] | None = None
    sampling: TaskSampling | None = None
    followups: list[TaskFollowUp] = []


class TaskRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A task with what OpenAI has no words for: follow-ups, a correlation id, a priority, a
    deadline, an idempotency key, an approval gate, a completion webhook."""

    model: str
    prompt: str | None = None
    messages: list[TaskMessage] | None = None
    sampling: TaskSampling | None = None
    followups: list[TaskFollowUp] = []
    correlation_id: str | None = None  # default: the task id
    agent_id: str = ""
    priority: int = 0  # 0..9, higher first
    deadline: float | None = None  # epoch seconds; past it, the task expires unrun
    idempotency_key: str | None = None  # a repeat gets the first task's id; nothing is queued
    metadata: dict[str, str] = {}
    affinity_key: str | None = None  # default: the chain's, or the prompt's leading text
    needs_approval: bool = False  # held until an admin approves (queued) or rejects it
    webhook_url: str | None = None  # POSTed the result when the task ends (signed)


class Decision(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """POST /v1/approvals/{task_id}/approve|reject."""

    reason: str = ""


class BatchRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """POST /v1/batches (OpenAI's fields)."""

    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None
    output_expires_after: dict | None = None  # OpenAI's: accepted, ignored
