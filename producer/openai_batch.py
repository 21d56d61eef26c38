"""The OpenAI Batch file format: request lines into Tasks, Results into output lines.

Input, one JSON object per line (OpenAI's "request input object"):

    {"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}],
              "max_tokens": 64}}

Output, one line per request, in the shape OpenAI's batch output and vLLM's `run-batch`
write ("request output object"):

    {"id": "batch_req_...", "custom_id": "req-1",
     "response": {"status_code": 200, "request_id": "<task id>", "body": {chat.completion}},
     "error": null}

Structured outputs and tools as OpenAI defines them: `response_format` ({"type": "text" |
"json_object" | "json_schema", "json_schema": {"name", "schema", "strict"}}), `tools`,
`tool_choice`, and messages carrying `tool_calls` and `tool_call_id`; vLLM's own
`structured_outputs` ({"regex" | "choice" | "grammar" | "json": ...}) too.  An answer that made
tool calls has them in `message.tool_calls` (content null, finish_reason "tool_calls").

A request that failed in the engine or was refused by the worker gets its HTTP-style status
and an OpenAI error body (`response.body.error`); one that expired or was cancelled gets
`response: null` and `error: {code, message}` (`batch_expired`, `batch_cancelled`).

The task of a request line has the deterministic id `<batch id>:<custom id>` (also its
idempotency key): results carry their task id, so the output needs no index from task to
custom id, and a request is queued once per batch however often its file is submitted.
"""

from __future__ import annotations

import hashlib
import re

import msgspec

from agentfleet.schemas.errors import ErrorCode, ValidationError
from agentfleet.schemas.settings import Settings
from agentfleet.schemas.steps import call_dict
from agentfleet.schemas.validate import validate_task
from agentfleet.schemas.wire import (
    JsonSchema,
    Message,
    ResponseFormat,
    Result,
    Sampling,
    Status,
    Task,
    Tool,
    ToolCall,
    ToolChoice,
)

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
ENDPOINTS = (CHAT_URL, COMPLETIONS_URL)
MAX_CUSTOM_ID_CHARS = 128  # with a batch id of 64 at most, task ids stay within 200
MAX_BATCH_ID_CHARS = 64
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's (and vLLM's) default for /v1/completions
_BATCH_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")
_ROLES = {"developer": "system"}  # OpenAI's newer name for the system role
_WINDOW = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_WINDOW_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class LineError(Exception):
    """One request line is invalid; `reason` names the field and what is wrong with it."""

    def __init__(self, reason: str, custom_id: str | None = None):
        self.reason = reason
        self.custom_id = custom_id
        super().__init__(reason)


# ---- input -------------------------------------------------------------------------------

class _ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class _ChatMessage(msgspec.Struct):
    role: str
    content: str | list[_ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class _StructuredOutputs(msgspec.Struct):
    """vLLM's `structured_outputs` extra parameter (one constraint of these)."""

    json: dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class RequestBody(msgspec.Struct, kw_only=True):
    """The fields of a chat or text completion request that a batch line may carry.

    Unknown fields are ignored, as OpenAI and vLLM do; fields that would change the shape of
    the answer (`n` > 1, `stream`, `logprobs`) are refused by `to_task`.
    """

    model: str
    messages: list[_ChatMessage] | None = None
    prompt: str | list[str] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    n: int | None = None
    stream: bool | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    tools: list[Tool] | None = None
    tool_choice: str | ToolChoice | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: _StructuredOutputs | None = None
    prompt_cache_key: str | None = None  # OpenAI's: the task's affinity key (docs/affinity.md)


class RequestLine(msgspec.Struct, kw_only=True):
    custom_id: str
    method: str
    url: str
    body: RequestBody


_decode_line = msgspec.json.Decoder(RequestLine).decode


class LineContext(msgspec.Struct, kw_only=True):
    """What every line of one batch shares."""

    batch_id: str
    endpoint: str | None  # None: the first line's url decides
    deadline: float  # epoch seconds: created + completion window
    settings: Settings
    model_map: dict[str, str] = {}
    tenant: str = "default"  # whose job it is: its tasks run within that tenant's share


def valid_batch_id(batch_id: str) -> bool:
    """Batch ids go into keys and task ids: letters, digits, '_' and '-', 64 at most."""
    return bool(_BATCH_ID.match(batch_id))


def parse_window(window: str) -> float:
    """'24h', '30m', '90s', '2d' (or plain seconds) into seconds above 0."""
    match = _WINDOW.match(window)
    if match:
        seconds = float(match.group(1)) * _WINDOW_UNIT_S[match.group(2)]
    else:
        try:
            seconds = float(window)
        except ValueError:
            seconds = 0.0
    if not seconds > 0:
        raise ValidationError("completion_window", f"{window!r} is not a duration such as "
                              "24h, 30m or 90s", value=window)
    return seconds


def parse_model_map(spec: str | dict[str, str] | None) -> dict[str, str]:
    """'gpt-4o-mini=m1,gpt-4o=m2' into {'gpt-4o-mini': 'm1', 'gpt-4o': 'm2'}."""
    if not spec:
        return {}
    if isinstance(spec, dict):
        return dict(spec)
    mapping: dict[str, str] = {}
    for item in spec.split(","):
        name, sep, model = item.partition("=")
        if not sep or not name.strip() or not model.strip():
            raise ValidationError("model_map", f"{item!r} is not NAME=MODEL", value=spec)
        mapping[name.strip()] = model.strip()
    return mapping


def task_id(batch_id: str, custom_id: str) -> str:
    return f"{batch_id}:{custom_id}"


def custom_id_of(task_id_: str) -> str:
    return task_id_.partition(":")[2]


def parse_line(raw: bytes | str, ctx: LineContext, *, check: bool = True) -> tuple[str, Task]:
    """Decode and check one request line; return its url and its Task.

    Raises `LineError` naming the field: the JSON shape, the method, the url, the body's
    fields mapped onto the task (checked with `schemas.validate.validate_task`, unless
    `check` is off: for a caller that validates the task itself, as `submit_many` does).
    """
    try:
        line = _decode_line(raw)
    except msgspec.ValidationError as exc:
        raise LineError(_shape_reason(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise LineError(f"not a JSON object: {exc}") from None
    custom_id = line.custom_id
    if not 0 < len(custom_id) <= MAX_CUSTOM_ID_CHARS:
        raise LineError(f"custom_id: {len(custom_id)} characters, outside "
                        f"1..{MAX_CUSTOM_ID_CHARS}")
    if line.method != "POST":
        raise LineError(f"method: {line.method!r} is not POST", custom_id)
    url = line.url
    if url not in ENDPOINTS:
        raise LineError(f"url: {url!r} is not supported; use {CHAT_URL} or {COMPLETIONS_URL}",
                        custom_id)
    if ctx.endpoint is None:
        ctx.endpoint = url
    elif url != ctx.endpoint:
        raise LineError(f"url: {url!r} differs from the batch's endpoint {ctx.endpoint!r} "
                        "(one endpoint per batch)", custom_id)
    try:
        task = to_task(line, ctx)
        if check:
            validate_task(task, ctx.settings)
    except ValidationError as exc:
        raise LineError(_body_reason(exc, line.body), custom_id) from None
    return url, task


def to_task(line: RequestLine, ctx: LineContext) -> Task:
    """The Task of a decoded request line (bounds are checked by validate_task after)."""
    body = line.body
    model = ctx.model_map.get(body.model, body.model)
    prompt, messages, sampling = request_input(body, line.url == CHAT_URL, model, ctx.settings)
    id_ = task_id(ctx.batch_id, line.custom_id)
    return apply_steps(Task(
        id=id_,
        tenant=ctx.tenant,
        model=model,
        prompt=prompt,
        messages=messages,
        sampling=sampling,
        deadline=ctx.deadline,
        idempotency_key=id_,
        metadata={"custom_id": line.custom_id, "batch_url": line.url},
        batch_id=ctx.batch_id,
    ), body)


def request_input(body: RequestBody, chat: bool, model: str, settings: Settings, *,
                  stream_ok: bool = False) -> tuple[str | None, list[Message] | None, Sampling]:
    """The prompt or messages and the sampling of a chat (`chat`) or text completion request
    body; raises `ValidationError` for what it cannot serve (`n` > 1, logprobs, ...).  Shared by
    batch lines and the gateway (ops/gateway/), which can stream (`stream_ok`)."""
    _refuse_unsupported(body, stream_ok)
    prompt: str | None = None
    messages: list[Message] | None = None
    if chat:
        if body.messages is None:
            raise ValidationError("messages", "a chat completion request needs messages")
        messages = [_message(i, m) for i, m in enumerate(body.messages)]
    else:
        if body.prompt is None:
            raise ValidationError("prompt", "a completion request needs a prompt")
        if isinstance(body.prompt, list):
            if len(body.prompt) != 1:
                raise ValidationError("prompt", f"{len(body.prompt)} prompts; one per request "
                                      "is supported", limit=1, value=len(body.prompt))
            prompt = body.prompt[0]
        else:
            prompt = body.prompt
    return prompt, messages, _sampling(body, chat, model, settings)


def apply_steps(task: Task, body: RequestBody) -> Task:
    """Agent steps from a request body onto its task (docs/agent-steps.md): the response
    format (OpenAI's `response_format`, or vLLM's `structured_outputs`), `tools` and
    `tool_choice`; and OpenAI's `prompt_cache_key` as the affinity key, which keeps the
    requests that share it on one worker's prefix cache.  Shared by batch lines and the
    gateway."""
    if body.prompt_cache_key:
        task.affinity_key = body.prompt_cache_key
    fmt = _response_format(body)
    if fmt is not None:
        task.response_format = fmt
    if body.tools:
        task.tools = body.tools
        task.tool_choice = body.tool_choice
    elif body.tool_choice is not None and body.tool_choice != "none":
        raise ValidationError("tool_choice", f"{body.tool_choice!r} without tools")
    return task


def _response_format(body: RequestBody) -> ResponseFormat | None:
    """OpenAI's response_format, or vLLM's structured_outputs, as the task's format."""
    so = body.structured_outputs
    if so is None:
        return body.response_format
    if body.response_format is not None and body.response_format.type != "text":
        raise ValidationError("structured_outputs", "give response_format or "
                              "structured_outputs, not both")
    given = [k for k in ("json", "regex", "choice", "grammar", "json_object")
             if getattr(so, k) is not None]
    if len(given) != 1:
        raise ValidationError("structured_outputs", f"one constraint of json, regex, choice, "
                              f"grammar or json_object; got {given or 'none'}")
    if so.json is not None:
        return ResponseFormat(type="json_schema", json_schema=JsonSchema(schema=so.json))
    if so.json_object:
        return ResponseFormat(type="json_object")
    if so.regex is not None:
        return ResponseFormat(type="regex", regex=so.regex)
    if so.choice is not None:
        return ResponseFormat(type="choice", choice=so.choice)
    return ResponseFormat(type="grammar", grammar=so.grammar or "")


def _refuse_unsupported(body: RequestBody, stream_ok: bool = False) -> None:
    if body.n not in (None, 1):
        raise ValidationError("n", f"{body.n} choices: one choice per request is supported",
                              limit=1, value=body.n)
    if body.best_of not in (None, 1):
        raise ValidationError("best_of", f"{body.best_of} is not supported", limit=1,
                              value=body.best_of)
    if body.stream and not stream_ok:
        raise ValidationError("stream", "streaming is not supported in a batch")
    if body.logprobs or body.top_logprobs:
        raise ValidationError("logprobs", "log probabilities are not supported")
    if body.echo:
        raise ValidationError("echo", "echo is not supported")


def _message(i: int, m: _ChatMessage) -> Message:
    content = m.content
    if content is None and m.tool_calls:
        content = ""  # an assistant turn that only called tools
    if content is None:
        raise ValidationError(f"messages[{i}].content", "is missing")
    if not isinstance(content, str):
        texts = []
        for j, part in enumerate(content):
            if part.type != "text" or part.text is None:
                raise ValidationError(f"messages[{i}].content[{j}]", f"a {part.type!r} part; "
                                      "only text parts are supported")
            texts.append(part.text)
        content = "\n".join(texts)  # what vLLM does with several text parts
    message = Message(role=_ROLES.get(m.role, m.role), content=content)
    if m.tool_calls:
        message.tool_calls = m.tool_calls
    if m.tool_call_id:
        message.tool_call_id = m.tool_call_id
    return message


def _sampling(body: RequestBody, chat: bool, model: str, settings: Settings) -> Sampling:
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None \
        else body.max_tokens
    if max_tokens is None:
        spec = settings.models.get(model)
        # Chat: up to the context, as OpenAI and vLLM do; completions: their default of 16.
        max_tokens = (spec.max_model_len if spec else 1) if chat \
            else COMPLETIONS_DEFAULT_MAX_TOKENS
    s = Sampling(max_tokens=max_tokens,
                 temperature=1.0 if body.temperature is None else body.temperature)  # OpenAI's
    # Field by field, not through a dict: this runs twice per line of a large file.
    if body.top_p is not None:
        s.top_p = body.top_p
    if body.top_k is not None:
        s.top_k = body.top_k
    if body.min_tokens is not None:
        s.min_tokens = body.min_tokens
    if body.seed is not None:
        s.seed = body.seed
    if body.presence_penalty is not None:
        s.presence_penalty = body.presence_penalty
    if body.frequency_penalty is not None:
        s.frequency_penalty = body.frequency_penalty
    if body.repetition_penalty is not None:
        s.repetition_penalty = body.repetition_penalty
    if body.ignore_eos is not None:
        s.ignore_eos = body.ignore_eos
    if body.stop is not None:
        s.stop = [body.stop] if isinstance(body.stop, str) else body.stop
    return s


def _shape_reason(message: str) -> str:
    """msgspec's "Expected `str`, got `int` - at `$.body.model`" as "body.model: ..."."""
    text, sep, where = message.partition(" - at `$")
    if not sep:
        return message[:1].lower() + message[1:]
    path = where.rstrip("`").lstrip(".")
    return f"{path}: {text[:1].lower() + text[1:]}"


def _body_reason(exc: ValidationError, body: RequestBody) -> str:
    """A task field's error as the body field the user wrote ("sampling.top_p" -> "body.top_p")."""
    field = exc.field
    message = str(exc)[len(field) + 2:]
    if field.startswith("sampling."):
        name = field[len("sampling."):]
        if name == "max_tokens" and body.max_completion_tokens is not None:
            name = "max_completion_tokens"
        field = name
    elif field in ("id", "idempotency_key"):
        return f"custom_id: {message}"
    return f"body.{field}: {message}"


# ---- output ------------------------------------------------------------------------------

_HTTP_STATUS = {
    ErrorCode.INVALID_TASK: (400, "invalid_request_error"),
    ErrorCode.PROMPT_TOO_LONG: (400, "invalid_request_error"),
    ErrorCode.UNKNOWN_MODEL: (404, "invalid_request_error"),
    ErrorCode.DECODE_ERROR: (400, "invalid_request_error"),
    ErrorCode.UNSUPPORTED_VERSION: (400, "invalid_request_error"),
}
_EXPIRED = {"code": "batch_expired",
            "message": "This request could not be executed before the completion window "
                       "expired."}
_CANCELLED = {"code": "batch_cancelled",
              "message": "This request was not executed because the batch was cancelled."}
_encode = msgspec.json.Encoder().encode


def output_line(result: Result, endpoint: str) -> tuple[bool, bytes]:
    """One result as an output line (no newline); True when it belongs in the output file,
    False when in the error file."""
    digest = hashlib.blake2b(result.task_id.encode(), digest_size=12).hexdigest()
    line: dict[str, object] = {"id": f"batch_req_{digest}",
                               "custom_id": custom_id_of(result.task_id)}
    status = result.status
    if status is Status.SUCCEEDED:
        body = completion_body(result, endpoint, digest)
        line["response"] = {"status_code": 200, "request_id": result.task_id, "body": body}
        line["error"] = None
        return True, _encode(line)
    if status is Status.EXPIRED:
        line["response"], line["error"] = None, _EXPIRED
    elif status is Status.CANCELLED:
        line["response"], line["error"] = None, _CANCELLED
    else:
        code = result.error_code or ErrorCode.INTERNAL
        status_code, kind = _HTTP_STATUS.get(code, (500, "server_error"))
        line["response"] = {
            "status_code": status_code,
            "request_id": result.task_id,
            "body": {"error": {"message": result.error_message or code.value, "type": kind,
                               "param": None, "code": code.value}},
        }
        line["error"] = None
    return False, _encode(line)


def completion_body(result: Result, endpoint: str, digest: str) -> dict[str, object]:
    """A succeeded result as OpenAI's chat.completion (or text_completion) object, its id
    made from `digest`."""
    created = int(result.timings.finished or result.timings.written)
    finish_reason = result.finish_reason or "stop"
    usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.output_tokens,
             "total_tokens": result.prompt_tokens + result.output_tokens}
    fingerprint = result.model_version or None
    if endpoint == COMPLETIONS_URL:
        return {"id": f"cmpl-{digest}", "object": "text_completion", "created": created,
                "model": result.model,
                "choices": [{"index": 0, "text": result.text, "logprobs": None,
                             "finish_reason": finish_reason}],
                "usage": usage, "service_tier": None, "system_fingerprint": fingerprint}
    message: dict[str, object] = {"role": "assistant", "content": result.text,
                                  "refusal": None}
    if result.tool_calls:
        message["content"] = result.text or None
        message["tool_calls"] = [call_dict(c) for c in result.tool_calls]
        finish_reason = "tool_calls"
    return {"id": f"chatcmpl-{digest}", "object": "chat.completion", "created": created,
            "model": result.model,
            "choices": [{"index": 0, "message": message,
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage, "service_tier": None, "system_fingerprint": fingerprint}
