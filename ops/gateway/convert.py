"""Requests into Tasks, and results into OpenAI's answers.

Ids are namespaced by tenant: a task the gateway makes has the id `<tenant>:<gateway>-<n>`,
and a caller's correlation id and idempotency key are stored as `<tenant>:<theirs>`.  So one
tenant's idempotency key never returns another tenant's task, chains of two tenants never
share a trace, and a tenant's result, trace and idempotency keys all share a prefix that a
Redis ACL can grant (docs/gateway.md).  A pending task's tenant is the prefix of its id; a
finished one's is also in its result (`Result.tenant`).
"""

from __future__ import annotations

import itertools

import msgspec

from agentfleet.producer.openai_batch import (
    CHAT_URL,
    COMPLETIONS_URL,
    completion_body,
    apply_steps,
    request_input,
)
from agentfleet.schemas.errors import ValidationError
from agentfleet.schemas.settings import Settings
from agentfleet.schemas.wire import Result, Task
from agentfleet.ops.gateway.errors import ApiError
from agentfleet.ops.gateway.types import ChatRequest, CompletionRequest, TaskRequest

SEP = ":"


def owned_by(tenant: str, name: str) -> bool:
    """Whether an id the gateway made (task, correlation id) belongs to `tenant`."""
    return name.startswith(tenant + SEP)


def scoped(tenant: str, name: str) -> str:
    return f"{tenant}{SEP}{name}"


def unscoped(tenant: str, name: str) -> str:
    return name[len(tenant) + 1:] if owned_by(tenant, name) else name


class TaskIds:
    """Task ids of one gateway process: `<tenant>:<gateway id>-<n in hex>`."""

    def __init__(self, gateway_id: str):
        self._prefix = gateway_id + "-"
        self._seq = itertools.count(1)

    def __call__(self, tenant: str) -> str:
        return f"{tenant}{SEP}{self._prefix}{next(self._seq):x}"


_decoders: dict[type, msgspec.json.Decoder] = {}


def decode(raw: bytes, kind: type):
    """The body as `kind`: 400 for JSON that is not well formed, 422 for JSON of another
    shape (msgspec's message names the field: "Object contains unknown field `foo`")."""
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).partition(" - at `$")
        param = where.rstrip("`").lstrip(".") or None
        raise ApiError(422, message + (f" (at {param})" if param else ""), param=param,
                       code="invalid_schema") from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None


def completion_task(body: CompletionRequest, chat: bool, task_id: str, tenant: str,
                    settings: Settings) -> Task:
    """The Task of a chat or text completion request (checked by the producer on submit)."""
    if body.suffix:
        raise ValidationError("suffix", "is not supported")
    if body.logit_bias:
        raise ValidationError("logit_bias", "is not supported")
    if isinstance(body, ChatRequest):
        _refuse_chat_extras(body)
    prompt, messages, sampling = request_input(body, chat, body.model, settings, stream_ok=True)
    task = apply_steps(Task(id=task_id, tenant=tenant, model=body.model, prompt=prompt,
                            messages=messages, sampling=sampling, priority=body.priority or 0,
                            stream=bool(body.stream)), body)
    if task.stream and task.tools:
        raise ValidationError("stream", "streaming is not supported with tools (their calls "
                              "are parsed from the whole output)")
    return task


def _refuse_chat_extras(body: ChatRequest) -> None:
    if body.functions or body.function_call:
        raise ValidationError("functions", "the old function calling fields are not "
                              "supported: use tools and tool_choice")
    if body.audio or (body.modalities and body.modalities != ["text"]):
        raise ValidationError("modalities", "only text output is supported")
    if body.prediction:
        raise ValidationError("prediction", "predicted outputs are not supported")
    if body.web_search_options:
        raise ValidationError("web_search_options", "web search is not supported")


def body_error(exc: ValidationError, body: CompletionRequest) -> ValidationError:
    """A task field's error in the words of the request body ("sampling.top_p" -> "top_p")."""
    field = exc.field
    if field.startswith("sampling."):
        name = field[len("sampling."):]
        if name == "max_tokens" and body.max_completion_tokens is not None:
            name = "max_completion_tokens"
        exc.args = (name + str(exc)[len(field):],)
        exc.field = name
    return exc


def task_from_request(body: TaskRequest, task_id: str, tenant: str) -> Task:
    """The Task of POST /v1/tasks."""
    task = Task(id=task_id, tenant=tenant, model=body.model, prompt=body.prompt,
                messages=body.messages, followups=body.followups, agent_id=body.agent_id,
                priority=body.priority, deadline=body.deadline, metadata=body.metadata,
                needs_approval=body.needs_approval)
    if body.sampling is not None:
        task.sampling = body.sampling
    if body.correlation_id:
        task.correlation_id = scoped(tenant, body.correlation_id)
    if body.idempotency_key:
        task.idempotency_key = scoped(tenant, body.idempotency_key)
    if body.affinity_key:
        task.affinity_key = body.affinity_key
    return task


def answer(result: Result, chat: bool) -> dict[str, object]:
    """A succeeded result as OpenAI's chat.completion or text_completion object."""
    return completion_body(result, CHAT_URL if chat else COMPLETIONS_URL, result.task_id)


def task_view(tenant: str, task_id: str, status: str, *, model: str = "",
              result: Result | None = None, correlation_id: str = "") -> dict[str, object]:
    """GET /v1/tasks/{id}: the task's state, and its result once there is one."""
    view: dict[str, object] = {"id": task_id, "object": "task", "status": status}
    if result is not None:
        body = msgspec.to_builtins(result)
        body["correlation_id"] = unscoped(tenant, result.correlation_id)
        view["model"] = result.model
        view["correlation_id"] = body["correlation_id"]
        view["result"] = body
    else:
        view["model"] = model
        if correlation_id:
            view["correlation_id"] = unscoped(tenant, correlation_id)
    return view
