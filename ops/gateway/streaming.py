"""`stream: true`: the answer as server-sent events while the worker produces it.

The task is queued with `stream` set, so its engine publishes partial output to the task's
stream (`keys.partial_stream`, workers/streaming.py).  This reads that stream with XREAD
BLOCK (a token is sent as soon as it is there: no polling), and turns each entry into an
OpenAI chunk.  The task's result still arrives on the gateway's reply stream: it ends the
events with the finish reason and usage, and is the only source when an engine published
nothing (or when the task failed, which becomes an error event).

Entries are placed by their text offsets, so a retried attempt that starts again from the
first token sends only what the client has not seen.  A client that disconnects cancels
its task.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
from redis.exceptions import RedisError

from agentfleet.ops.gateway.errors import from_result
from agentfleet.ops.gateway.types import StreamOptions
from agentfleet.schemas import keys
from agentfleet.schemas.errors import ResultTimeoutError
from agentfleet.schemas.wire import Result, Task

log = logging.getLogger("agentfleet.gateway")
_encode = msgspec.json.Encoder().encode
_BLOCK_MS = 200  # an XREAD waits this long before the loop looks at the result again
_DONE = b"data: [DONE]\n\n"


async def stream_events(gw, task: Task, chat: bool, options: StreamOptions | None):
    """Queue the task (errors up to here are plain HTTP errors), then its events."""
    await gw.producer.submit(task)
    return _events(gw, task, chat, options or StreamOptions())


class _Chunks:
    """OpenAI's chunk objects for one answer."""

    def __init__(self, task: Task, chat: bool, timing: bool):
        self.chat = chat
        self.timing = timing
        self.head = {"id": ("chatcmpl-" if chat else "cmpl-") + task.id,
                     "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": int(time.time()), "model": task.model,
                     "system_fingerprint": None}

    def event(self, text: str | None, finish: str | None = None, *, role: bool = False,
              produced_at: float = 0.0, tokens: int = 0) -> bytes:
        if self.chat:
            delta: dict[str, object] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None,
                      "finish_reason": finish}
        chunk = {**self.head, "choices": [choice]}
        if self.timing and produced_at:
            chunk["agentfleet"] = {"produced_at": produced_at, "tokens": tokens}
        return b"data: " + _encode(chunk) + b"\n\n"

    def usage(self, result: Result) -> bytes:
        usage = {"prompt_tokens": result.prompt_tokens,
                 "completion_tokens": result.output_tokens,
                 "total_tokens": result.prompt_tokens + result.output_tokens}
        return b"data: " + _encode({**self.head, "choices": [], "usage": usage}) + b"\n\n"


async def _events(gw, task: Task, chat: bool, options: StreamOptions):
    key = keys.partial_stream(task.model, task.id)
    chunks = _Chunks(task, chat, bool(options.include_timing))
    delay = gw.metrics.stream_delay
    waiter = asyncio.ensure_future(
        gw.producer.wait(task.id, timeout_s=gw.settings.gateway_wait_timeout_s))
    last_id = "0-0"
    sent = 0  # characters the client has
    at = 0  # offset of the next entry's text in its attempt's output
    last_tokens = 0
    finish: str | None = None
    result: Result | None = None
    try:
        if chat:
            yield chunks.event(None, role=True)
        while finish is None and not waiter.done():
            try:
                reply = await gw.redis.xread({key: last_id}, count=256, block=_BLOCK_MS)
            except RedisError as exc:
                log.warning("stream of %s: reading partial output failed (%s)", task.id, exc)
                await asyncio.sleep(0.1)
                continue
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    last_id = entry_id
                    if b"f" in fields:
                        finish = fields[b"f"].decode()
                        break
                    tokens = int(fields[b"n"])
                    if tokens <= last_tokens:  # a new attempt, from its first token
                        at = 0
                    last_tokens = tokens
                    text = fields[b"d"].decode()
                    end = at + len(text)
                    if end > sent:
                        produced_at = float(fields[b"t"])
                        yield chunks.event(text[sent - at:], produced_at=produced_at,
                                           tokens=tokens)
                        delay.observe(time.time() - produced_at)
                        sent = end
                    at = end
        try:
            result = await waiter
        except ResultTimeoutError:
            result = None
        if result is None:
            yield _error_event("timeout", "no result within the gateway's wait")
        elif not result.ok:
            err = from_result(result)
            yield _error_event(err.code, err.message, err.type)
        else:
            if len(result.text) > sent:  # what no entry carried (an engine that publishes
                yield chunks.event(result.text[sent:])  # nothing, or entries past the TTL)
            yield chunks.event(None, result.finish_reason or finish or "stop")
            if options.include_usage:
                yield chunks.usage(result)
        yield _DONE
    finally:
        if not waiter.done():
            waiter.cancel()
        if result is None:  # the client left (or the wait ended): stop the work
            gw.metrics.disconnects.inc()
            gw.spawn(gw.cancel(task.id, task.model))
        gw.spawn(_drop(gw, key))


def _error_event(code: str | None, message: str, kind: str = "server_error") -> bytes:
    return b"data: " + _encode({"error": {"message": message, "type": kind, "param": None,
                                          "code": code}}) + b"\n\n"


async def _drop(gw, key: str) -> None:
    try:
        await gw.redis.unlink(key)
    except RedisError:  # its TTL removes it anyway
        pass
