"""The hot routes, served straight from ASGI, and the front every request passes.

Chat completions, text completions and task submits are most of a gateway's traffic.  They
are served here without the framework's request and response machinery: the body is read
from `receive`, the answer sent with two `send` calls.  Measured in one process on the same
machine, 64 concurrent submits against Redis: 44 us of CPU per request this way, 215 us
through Litestar's routing, request, signature and response layers (docs/gateway.md).
Everything else (files, batches, tasks by id, traces, approvals, health, metrics, OpenAPI)
stays on Litestar, behind the same front, which times and counts every request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec

from agentfleet.ops.gateway import convert
from agentfleet.ops.gateway.errors import ApiError, from_exception, from_result
from agentfleet.ops.gateway.types import ChatRequest, CompletionRequest, TaskRequest
from agentfleet.schemas.errors import ValidationError
from agentfleet.schemas.wire import Role

log = logging.getLogger("agentfleet.gateway")
_encode = msgspec.json.Encoder().encode
_JSON_HEADERS = [(b"content-type", b"application/json")]
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]


class Call:
    """One request to a hot route: what its handler may read."""

    __slots__ = ("gw", "scope", "receive", "authorization", "length")

    def __init__(self, gw, scope, receive):
        self.gw = gw
        self.scope = scope
        self.receive = receive
        self.authorization: str | None = None
        self.length = -1
        for name, value in scope["headers"]:
            if name == b"authorization":
                self.authorization = value.decode("latin-1")
            elif name == b"content-length":
                self.length = int(value) if value.isdigit() else -1

    async def body(self) -> bytes:
        """The whole body; 413 past `gateway_max_body_bytes` (read no further)."""
        limit = self.gw.settings.gateway_max_body_bytes
        if self.length > limit:
            raise _too_large()
        message = await self.receive()
        body = message.get("body", b"")
        if not message.get("more_body"):
            return body
        parts = [body]
        size = len(body)
        while message.get("more_body"):
            message = await self.receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large()
            parts.append(chunk)
        return b"".join(parts)


def _too_large() -> ApiError:
    return ApiError(413, "the request body is over the limit (gateway_max_body_bytes)",
                    code="request_too_large")


class Reply:
    """A hot route's answer: JSON, or server-sent events from an iterator."""

    __slots__ = ("status", "body", "events")

    def __init__(self, status: int = 200, body: bytes = b"", *,
                 events: AsyncIterator[bytes] | None = None):
        self.status = status
        self.body = body
        self.events = events


async def chat(call: Call) -> Reply:
    """Create a chat completion: queued, waited for, answered in OpenAI's format (or
    streamed as server-sent events)."""
    return await _completion(call, ChatRequest, chat=True)


async def completions(call: Call) -> Reply:
    """Create a text completion."""
    return await _completion(call, CompletionRequest, chat=False)


async def _completion(call: Call, kind: type, *, chat: bool) -> Reply:
    gw = call.gw
    caller = await gw.check_key(call.authorization, Role.SUBMIT)
    body = convert.decode(await call.body(), kind)
    task = convert.completion_task(body, chat, gw.ids(caller.tenant), caller.tenant,
                                   gw.settings)
    await gw.admit(caller.tenant, 1)
    try:
        if task.stream:
            from agentfleet.ops.gateway.streaming import stream_events

            return Reply(events=await stream_events(gw, task, chat, body.stream_options))
        await gw.producer.submit(task)
    except ValidationError as exc:
        raise convert.body_error(exc, body) from None
    result = await gw.wait(call.receive, task)
    if not result.ok:
        raise from_result(result)
    return Reply(200, _encode(convert.answer(result, chat)))


async def submit_task(call: Call) -> Reply:
    """Queue a task (follow-ups, correlation id, priority, deadline, idempotency key,
    approval gate, webhook); answer at once with its id."""
    from agentfleet.ops import approvals

    gw = call.gw
    caller = await gw.check_key(call.authorization, Role.SUBMIT)
    body = convert.decode(await call.body(), TaskRequest)
    task = convert.task_from_request(body, gw.ids(caller.tenant), caller.tenant)
    webhook = body.webhook_url
    if webhook is not None:
        gw.webhooks.check_url(webhook)
    reply = webhook is not None  # a webhook needs the result pushed to this gateway
    await gw.admit(caller.tenant, 1)
    if task.needs_approval:
        task_id = await approvals.hold(gw.redis, task, gw.settings,
                                       reply_to=gw.producer.id if reply else "")
        status = "awaiting_approval"
    else:
        task_id = await gw.producer.submit(task, reply=reply)
        status = "queued"
    if task_id != task.id:  # an idempotency key used before: that task's id, nothing queued
        return Reply(200, _encode(convert.task_view(caller.tenant, task_id, "duplicate",
                                                    model=task.model)))
    if webhook is not None:
        await gw.webhooks.register(task, webhook)
    return Reply(202, _encode(convert.task_view(caller.tenant, task.id, status,
                                                model=task.model,
                                                correlation_id=task.correlation_id)))


class FastRoute(msgspec.Struct, frozen=True):
    name: str
    method: str
    path: str
    handler: Callable[[Call], Awaitable[Reply]]
    body: type  # the Struct its JSON body decodes into (the OpenAPI document shows it)


FAST_ROUTES = (
    FastRoute("chat", "POST", "/v1/chat/completions", chat, ChatRequest),
    FastRoute("completions", "POST", "/v1/completions", completions, CompletionRequest),
    FastRoute("task_submit", "POST", "/v1/tasks", submit_task, TaskRequest),
)


class Front:
    """The ASGI application: hot routes here, the rest to Litestar; every request timed."""

    def __init__(self, app, gw):
        self.app = app  # the Litestar application
        self.gateway = gw
        self.metrics = gw.metrics
        self._routes = {(r.method, r.path): r for r in FAST_ROUTES}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        route = self._routes.get((scope["method"], scope["path"]))
        status = 500
        metrics = self.metrics
        metrics.inflight += 1
        try:
            if route is not None:
                status = await self._serve(route, scope, receive, send)
                name = route.name
            else:
                async def send_(message) -> None:
                    nonlocal status
                    if message["type"] == "http.response.start":
                        status = message["status"]
                    await send(message)

                await self.app(scope, receive, send_)
                handler = scope.get("route_handler")
                name = handler.name if handler is not None and handler.name else "unmatched"
        finally:
            metrics.inflight -= 1
        metrics.observe(name, status, time.perf_counter() - started)

    async def _serve(self, route: FastRoute, scope, receive, send) -> int:
        try:
            reply = await route.handler(Call(self.gateway, scope, receive))
        except Exception as exc:  # noqa: BLE001 - every error becomes an OpenAI error body
            error = from_exception(exc)
            headers = list(_JSON_HEADERS)
            for name, value in (error.headers or {}).items():
                headers.append((name.lower().encode(), value.encode()))
            await _send_json(send, error.status, error.body(), headers)
            return error.status
        if reply.events is None:
            await _send_json(send, reply.status, reply.body, _JSON_HEADERS)
            return reply.status
        await _send_events(send, receive, reply.events)
        return 200


async def _send_json(send, status: int, body: bytes, headers: list) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _send_events(send, receive, events: AsyncIterator[bytes]) -> None:
    """Send each event as it comes; a client that leaves stops the iterator (its `finally`
    cancels the task)."""
    from agentfleet.ops.gateway.app import disconnected

    async def pump() -> None:
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        async for event in events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    streaming = asyncio.ensure_future(pump())
    gone = asyncio.ensure_future(disconnected(receive))
    try:
        await asyncio.wait((streaming, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not streaming.done():
            streaming.cancel()
            await asyncio.gather(streaming, return_exceptions=True)
            await events.aclose()
    if streaming.done() and not streaming.cancelled() and streaming.exception() is not None:
        log.error("gateway: a stream failed", exc_info=streaming.exception())
