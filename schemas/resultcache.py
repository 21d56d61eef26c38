"""The result cache's contract (docs/result-cache.md): which tasks it may answer, the digest
of their input, and the pieces of a result that the Lua scripts put together.

A tenant that opts in (`TenantConfig.result_cache_ttl_s`) has its deterministic tasks
without effects answered from the result of an identical earlier task (a "hit", at submit,
by producer/lua/enqueue.lua) or of the identical task in flight ("joined", by that task's
commit, workers/lua/commit.lua), instead of running again.

The scripts never decode msgpack: a result is a msgpack map, so the script writes a map
header for the sum of two halves' field counts and concatenates them: the task's own fields
(`stub`: its id, correlation id, tenant, enqueue time, built by the producer) and the
answer's shared fields (`shared`: everything else of the result that ran, built by the
worker).  Each half travels as one count byte and its map body, without a header.
"""

from __future__ import annotations

import hashlib

import msgspec

from agentfleet.schemas.errors import ErrorCode
from agentfleet.schemas.wire import Message, ResponseFormat, Result, Sampling, Status, Task, \
    Tool, ToolChoice, encode

# The fields of a result that belong to the task it answers, never to the answer.
OWN_FIELDS = ("task_id", "correlation_id", "parent_id", "agent_id", "tenant", "timings",
              "cache", "cached_from")
# Content, kept out of traces (as workers/outcomes.py keeps it out of a Finished event).
CONTENT_FIELDS = ("text", "parsed", "tool_calls")


def ineligible(task: Task) -> str:
    """Why the cache may not answer `task` ("" when it may).

    Deterministic: greedy (temperature 0) or seeded sampling.  Without effects: a result
    that enqueues follow-ups, opens or fills a join, waits for an approval, feeds a bulk
    job's output or streams partial output does more than answer, and a copied answer must
    not repeat nor skip those effects, so such tasks always run (docs/result-cache.md)."""
    if task.sampling.temperature != 0 and task.sampling.seed is None:
        return "sampling is neither greedy nor seeded"
    if task.followups or task.join is not None:
        return "it has follow-ups"
    if task.joins_into is not None or task.join_of is not None:
        return "it is part of a fan-out"
    if task.needs_approval:
        return "it waits for an approval"
    if task.batch_id:
        return "it is part of a bulk job"
    if task.stream:
        return "it streams partial output"
    return ""


class _Input(msgspec.Struct, array_like=True, frozen=True):
    """Everything that decides a task's output, in a fixed order: the digest's input."""

    tenant: str
    model: str
    version: str
    prompt: str | None
    messages: list[Message] | None
    sampling: Sampling
    response_format: ResponseFormat | None
    tools: list[Tool]
    tool_choice: str | ToolChoice | None
    retry_max_tokens: int


_input_encoder = msgspec.msgpack.Encoder()


def digest(task: Task, version: str) -> str:
    """The digest of a task's input: tenant, model and version, prompt or messages,
    sampling, response format, tools and tool choice (32 hex digits, BLAKE2b).  Two tasks
    with one digest get one answer; metadata, priority and deadline do not count."""
    key = _Input(task.tenant, task.model, version, task.prompt, task.messages, task.sampling,
                 task.response_format, task.tools, task.tool_choice, task.retry_max_tokens)
    return hashlib.blake2b(_input_encoder.encode(key), digest_size=16).hexdigest()


def map_half(fields: dict) -> bytes:
    """One half of a result for the scripts: its field count (one byte) and its msgpack map
    body without the header."""
    raw = encode(fields)
    head = raw[0]
    skip = 1 if head & 0xF0 == 0x80 else 3 if head == 0xDE else 5
    return bytes((len(fields),)) + raw[skip:]


def stub(task: Task) -> bytes:
    """The task's own half of the result the cache answers it with."""
    own: dict[str, object] = {"task_id": task.id}
    if task.correlation_id:
        own["correlation_id"] = task.correlation_id
    if task.parent_id:
        own["parent_id"] = task.parent_id
    if task.agent_id:
        own["agent_id"] = task.agent_id
    own["tenant"] = task.tenant
    own["timings"] = {"enqueued": task.enqueued_at} if task.enqueued_at else {}
    return map_half(own)


def shared(result: Result) -> tuple[bytes, bytes]:
    """The answer's half of every result copied from `result` (a success), and the same
    without content, for trace events."""
    fields = msgspec.to_builtins(result)
    for name in OWN_FIELDS:
        fields.pop(name, None)
    fields["cached_from"] = result.task_id
    bare = {k: v for k, v in fields.items() if k not in CONTENT_FIELDS}
    return map_half(fields), map_half(bare)


def ended(result: Result) -> tuple[bytes, bytes]:
    """The halves for a task joined to `result`'s task that was cancelled, or whose deadline
    passed, while it waited: it gets that end, not the answer (docs/result-cache.md)."""
    common: dict[str, object] = {"model": result.model}
    if result.worker_id:
        common["worker_id"] = result.worker_id
    if result.model_version:
        common["model_version"] = result.model_version
    common["cached_from"] = result.task_id
    cancelled = {**common, "status": Status.CANCELLED.value,
                 "error_code": ErrorCode.CANCELLED.value,
                 "error_message": f"cancelled while joined to {result.task_id}"}
    expired = {**common, "status": Status.EXPIRED.value,
               "error_code": ErrorCode.DEADLINE_EXCEEDED.value,
               "error_message": f"deadline passed while joined to {result.task_id}"}
    return map_half(cancelled), map_half(expired)


_WAITER = b"%08d%b" * 11


def waiter(*, task_id: str, stub: bytes, result_key: str, reply_key: str, trace_key: str,
           result_ttl_s: int, trace_ttl_s: int, reply_maxlen: int, stream: str,
           lanes_key: str, deadline: float | None) -> bytes:
    """What a script needs to answer one task from the cache, or to queue it after all (kept
    in the in-flight hash while the task is joined): length-prefixed fields (8 decimal digits
    each), in this order, as `rc_waiter` (schemas/lua/resultcache.lua) reads them; enqueue.lua
    appends the task's payload, the twelfth.  The reply key and trace key are "" when nobody
    waits and no trace list is kept; `stream` and `lanes_key` are where it is queued if the
    task it joined fails; past `deadline`, a joined task ends expired."""
    parts = (task_id.encode(), stub, result_key.encode(), reply_key.encode(),
             trace_key.encode(), b"%d" % result_ttl_s, b"%d" % trace_ttl_s,
             b"%d" % reply_maxlen, stream.encode(), lanes_key.encode(),
             b"" if deadline is None else repr(deadline).encode())
    flat: list = []
    for part in parts:
        flat += (len(part), part)
    return _WAITER % tuple(flat)
