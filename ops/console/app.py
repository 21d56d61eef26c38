"""The console's routes: a Litestar `Router` over one Redis client and the settings.

    router = console_router(redis, settings)             # mount it on an app (the gateway)
    app = create_app(redis, settings)                    # or serve it alone (agentfleet console)

Log in with an API key (ops/apikeys.py): the form puts the key in an HttpOnly, SameSite=Strict
cookie; scripts may send `Authorization: Bearer <key>` instead.  Keys are checked through a
`KeyCache` (one HGET per key per 5 s).  A read or submit key sees the fleet's queues and its
own tenant's batches, dead letters, traces and report; an admin key sees every tenant and may
replay dead letters, the console's only write (a POST carrying a token derived from the
session, so another site cannot make a logged-in browser send it).

Every read is bounded, whatever the queue holds: queue figures are one pipeline of O(1)
commands per model (XLEN, XINFO GROUPS, XPENDING summary), dead letters one XREVRANGE of a
page, batches one ZREVRANGEBYSCORE of a page, a trace the lists of one correlation id, and
the report reads hour hashes (ops/report.py), its page kept for `REPORT_CACHE_S`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any
from urllib.parse import quote

from litestar import Litestar, Request, Response, Router, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import Cookie
from litestar.di import Provide
from litestar.enums import MediaType, RequestEncodingType
from litestar.exceptions import (
    HTTPException,
    NotAuthorizedException,
    NotFoundException,
    PermissionDeniedException,
)
from litestar.handlers.base import BaseRouteHandler
from litestar.params import Body
from litestar.response import Redirect, Stream
from redis.exceptions import RedisError

from agentfleet.ops import dlq
from agentfleet.ops.apikeys import KeyCache
from agentfleet.ops.console import pages
from agentfleet.ops.exporter import read_queues_async
from agentfleet.ops.report import load_report_async, load_window_async, parse_duration
from agentfleet.ops.report_render import render_html
from agentfleet.ops.status import WINDOW_S, combine
from agentfleet.ops.trace import load_trace, render as render_trace
from agentfleet.producer.batch import BatchClient, BatchStatus
from agentfleet.producer.client import Producer
from agentfleet.schemas import keys
from agentfleet.schemas.errors import AgentFleetError, BatchError
from agentfleet.schemas.settings import Settings
from agentfleet.schemas.wire import ApiKeyRecord, DeadLetter, Finished, Role, decode_dead_letter, decode_task

log = logging.getLogger("agentfleet.console")

COOKIE = "agentfleet_console"
PAGE = 50  # dead letters per page
BATCH_PAGE = 20
SCAN_LIMIT = 1000  # entries a tenant's page may look through to fill itself
REPORT_CACHE_S = 30.0
REPORT_WINDOWS = ("1h", "6h", "24h", "7d")
_ENTRY_ID = __import__("re").compile(r"^\d{1,20}-\d{1,20}$")

Form = Annotated[dict[str, str], Body(media_type=RequestEncodingType.URL_ENCODED)]


class Console:
    """What every handler needs: the client, the settings, the key cache, the page frame."""

    def __init__(self, redis, settings: Settings, *, base: str = "",
                 key_cache_ttl_s: float = 5.0):
        self.redis = redis
        self.settings = settings
        self.models = list(settings.models)
        self.keys = KeyCache(redis, ttl_s=key_cache_ttl_s)
        self.layout = pages.Layout(base)
        self.batches = BatchClient(Producer(redis, settings=settings))
        self._reports: dict[tuple[str, str], tuple[float, str]] = {}

    def csrf(self, presented: str) -> str:
        """A per-key token for forms that write: only pages of this session carry it."""
        return hashlib.sha256(b"agentfleet-console-csrf:" + presented.encode()).hexdigest()[:32]

    def html(self, title: str, body: str, request: Request, *, active: str = "",
             status: int = 200) -> Response:
        who: ApiKeyRecord | None = request.scope.get("agentfleet_key")
        presented = request.scope.get("agentfleet_presented", "")
        return Response(self.layout.page(title, body, active=active, who=who,
                                         csrf=self.csrf(presented) if presented else ""),
                        media_type=MediaType.HTML, status_code=status,
                        headers={"Cache-Control": "no-store",
                                 "Content-Security-Policy": "default-src 'none'; "
                                 "style-src 'unsafe-inline'; img-src data:; "
                                 "form-action 'self'; frame-ancestors 'none'"})


def _presented(connection: ASGIConnection) -> str:
    auth = connection.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return connection.cookies.get(COOKIE, "")


async def require_key(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    """Guard: a live API key, from the cookie or the Authorization header."""
    if handler.opt.get("public"):
        return
    console: Console = connection.scope["console"]  # set by the router's middleware
    presented = _presented(connection)
    record = await console.keys.verify(presented) if presented else None
    if record is None:
        raise NotAuthorizedException("log in with an API key")
    connection.scope["agentfleet_key"] = record
    connection.scope["agentfleet_presented"] = presented


def _who(request: Request) -> ApiKeyRecord:
    return request.scope["agentfleet_key"]


def _admin(request: Request) -> bool:
    return _who(request).role.allows(Role.ADMIN)


def _tenant_ok(request: Request, tenant: str) -> bool:
    return _admin(request) or tenant == _who(request).tenant


def _check_csrf(console: Console, request: Request, data: dict[str, str]) -> None:
    if request.headers.get("authorization", "").lower().startswith("bearer "):
        return  # not a browser's ambient cookie
    expected = console.csrf(request.cookies.get(COOKIE, ""))
    if not hmac.compare_digest(data.get("csrf", ""), expected):
        raise PermissionDeniedException("the form is stale or came from another site; "
                                        "reload the page and try again")


# ---- login ----------------------------------------------------------------------------------

@get("/login", opt={"public": True}, name="console-login")
async def login_form(console: Console, request: Request, next: str = "") -> Response:
    return Response(pages.login(console.layout, next_url=next), media_type=MediaType.HTML,
                    headers={"Cache-Control": "no-store"})


@post("/login", opt={"public": True}, status_code=303)
async def login(console: Console, request: Request, data: Form) -> Response:
    presented = data.get("key", "").strip()
    record = await console.keys.verify(presented) if presented else None
    if record is None:
        return Response(pages.login(console.layout, error="That key is unknown, revoked or "
                                    "malformed.", next_url=data.get("next", "")),
                        media_type=MediaType.HTML, status_code=401)
    target = data.get("next", "")
    if not target.startswith(console.layout.base + "/") or target.startswith("//"):
        target = console.layout.url("/")  # only paths of this console: no open redirect
    return Redirect(target, status_code=303, cookies=[
        Cookie(key=COOKIE, value=presented, httponly=True, samesite="strict",
               path=console.layout.base or "/", max_age=12 * 3600)])


@post("/logout", status_code=303)
async def logout(console: Console, request: Request, data: Form) -> Response:
    _check_csrf(console, request, data)
    return Redirect(console.layout.url("/login"), status_code=303, cookies=[
        Cookie(key=COOKIE, value="", httponly=True, samesite="strict",
               path=console.layout.base or "/", max_age=0)])


# ---- models and lanes ----------------------------------------------------------------------

@get("/")
async def models_page(console: Console, request: Request) -> Response:
    now = time.time()
    queues = await read_queues_async(console.redis, console.models)
    window = await load_window_async(console.redis, console.models, WINDOW_S, now,
                                     with_series=False)
    async with console.redis.pipeline(transaction=False) as pipe:
        for model in console.models:
            pipe.hgetall(keys.workers_key(model))
        beats = await pipe.execute()
    workers = {m: sorted(((w.decode(), float(at)) for w, at in b.items()),
                         key=lambda x: -x[1])[:50] for m, b in zip(console.models, beats)}
    body = pages.models(console.layout, combine(queues, window, now), queues, workers, now)
    return console.html("Models and lanes", body, request, active="models")


# ---- batches --------------------------------------------------------------------------------

async def _batch_tenants(console: Console, ids: list[str]) -> list[str]:
    """Each job's tenant (the `tenant` field of its record; "default" before jobs had one)."""
    async with console.redis.pipeline(transaction=False) as pipe:
        for batch_id in ids:
            pipe.hget(keys.batch_meta(batch_id), "tenant")
        found = await pipe.execute()
    return [t.decode() if t else "default" for t in found]


@get("/batches")
async def batches_page(console: Console, request: Request, before: str = "") -> Response:
    try:
        high = f"({float(before)!r}" if before else "+inf"
    except ValueError:
        raise NotFoundException("before: not a position in the list of batches") from None
    shown: list[tuple[BatchStatus, str]] = []
    next_before = ""
    scanned = 0
    limit = BATCH_PAGE if _admin(request) else SCAN_LIMIT
    while len(shown) < BATCH_PAGE and scanned < limit:
        page = await console.redis.zrevrangebyscore(keys.batch_index(), high, "-inf", start=0,
                                                    num=BATCH_PAGE, withscores=True)
        if not page:
            next_before = ""
            break
        ids = [raw.decode() for raw, _ in page]
        tenants = await _batch_tenants(console, ids)
        for (batch_id, score), tenant in zip(((i, s) for i, (_, s) in zip(ids, page)), tenants):
            scanned += 1
            high = f"({score!r}"
            next_before = repr(score)
            if not _tenant_ok(request, tenant):
                continue
            try:
                shown.append((await console.batches.status(batch_id), tenant))
            except BatchError:
                continue  # its record expired
            if len(shown) >= BATCH_PAGE:
                break
        if len(page) < BATCH_PAGE and len(shown) < BATCH_PAGE:
            next_before = ""
            break
    body = pages.batches(console.layout, shown, next_before=next_before)
    return console.html("Batches", body, request, active="batches")


async def _visible_batch(console: Console, request: Request, batch_id: str) -> tuple:
    try:
        st = await console.batches.status(batch_id)
    except BatchError:
        raise NotFoundException(f"no batch {batch_id!r}") from None
    [tenant] = await _batch_tenants(console, [batch_id])
    if not _tenant_ok(request, tenant):
        raise NotFoundException(f"no batch {batch_id!r}")  # not saying whose it is
    return st, tenant


@get("/batches/{batch_id:str}")
async def batch_page(console: Console, request: Request, batch_id: str) -> Response:
    st, tenant = await _visible_batch(console, request, batch_id)
    return console.html(f"Batch {batch_id}", pages.batch(console.layout, st, tenant), request,
                        active="batches")


async def _download(console: Console, request: Request, batch_id: str, ok: bool) -> Stream:
    await _visible_batch(console, request, batch_id)

    async def lines() -> AsyncIterator[bytes]:
        chunk: list[bytes] = []
        async for good, line in console.batches.output_lines(batch_id):
            if good is ok:
                chunk.append(line + b"\n")
                if len(chunk) >= 500:
                    yield b"".join(chunk)
                    chunk = []
        if chunk:
            yield b"".join(chunk)

    name = f"{batch_id}_{'output' if ok else 'errors'}.jsonl"
    return Stream(lines(), media_type="application/jsonl",
                  headers={"Content-Disposition": f'attachment; filename="{name}"'})


@get("/batches/{batch_id:str}/output.jsonl")
async def batch_output(console: Console, request: Request, batch_id: str) -> Stream:
    return await _download(console, request, batch_id, True)


@get("/batches/{batch_id:str}/errors.jsonl")
async def batch_errors(console: Console, request: Request, batch_id: str) -> Stream:
    return await _download(console, request, batch_id, False)


# ---- dead letters ---------------------------------------------------------------------------

def _model(console: Console, model: str) -> str:
    model = model or console.settings.default_model
    if model not in console.settings.models:
        raise NotFoundException(f"model: unknown {model!r}; known {sorted(console.models)}")
    return model


def _tenant_of(d: DeadLetter) -> str:
    try:
        return decode_task(d.payload).tenant
    except AgentFleetError:
        return ""


@get("/dead-letters")
async def dead_letters_page(console: Console, request: Request, model: str = "",
                            before: str = "", flash: str = "") -> Response:
    model = _model(console, model)
    if before and not _ENTRY_ID.match(before):
        raise NotFoundException("before: not a stream entry id")
    stream = keys.dead_stream(model)
    high = f"({before}" if before else "+"
    rows: list[tuple[str, DeadLetter]] = []
    scanned = 0
    next_before = ""
    limit = PAGE if _admin(request) else SCAN_LIMIT
    total = await console.redis.xlen(stream)
    while len(rows) < PAGE and scanned < limit:
        raw = await console.redis.xrevrange(stream, max=high, min="-", count=PAGE)
        for eid, fields in raw:
            scanned += 1
            entry = eid.decode()
            high = next_before = f"({entry}"
            d = decode_dead_letter(fields[b"d"])
            if _tenant_ok(request, _tenant_of(d)):
                rows.append((entry, d))
                if len(rows) >= PAGE:
                    break
        if len(raw) < PAGE:
            next_before = ""
            break
    body = pages.dead_letters(console.layout, model, console.models, rows, total=total,
                              next_before=next_before.lstrip("("), flash=flash)
    return console.html("Dead letters", body, request, active="dead")


async def _dead_letter(console: Console, request: Request, model: str,
                       entry_id: str) -> DeadLetter:
    model = _model(console, model)
    if not _ENTRY_ID.match(entry_id):
        raise NotFoundException("not a stream entry id")
    raw = await console.redis.xrange(keys.dead_stream(model), entry_id, entry_id)
    if not raw:
        raise NotFoundException(f"no dead letter {entry_id} for {model} (replayed or purged?)")
    d = decode_dead_letter(raw[0][1][b"d"])
    if not _tenant_ok(request, _tenant_of(d)):
        raise NotFoundException(f"no dead letter {entry_id} for {model}")
    return d


@get("/dead-letters/{model:str}/{entry_id:str}")
async def dead_letter_page(console: Console, request: Request, model: str,
                           entry_id: str) -> Response:
    d = await _dead_letter(console, request, model, entry_id)
    body = pages.dead_letter(console.layout, model, entry_id, d, can_replay=_admin(request),
                             csrf=console.csrf(request.scope["agentfleet_presented"]))
    return console.html(f"Dead letter {entry_id}", body, request, active="dead")


@post("/dead-letters/{model:str}/{entry_id:str}/replay", status_code=303)
async def replay_dead_letter(console: Console, request: Request, model: str, entry_id: str,
                             data: Form) -> Response:
    if not _admin(request):
        raise PermissionDeniedException("replaying dead letters takes an admin key")
    _check_csrf(console, request, data)
    await _dead_letter(console, request, model, entry_id)
    n = await dlq.replay(console.redis, model, [entry_id])
    who = _who(request)
    log.info("console: %s (tenant %s) replayed dead letter %s of %s", who.key_id, who.tenant,
             entry_id, model, extra={"model": model})
    return Redirect(console.layout.url("/dead-letters", model=model,
                                       flash=f"Replayed {n} dead letter ({entry_id}): its "
                                             "task is queued again."), status_code=303)


# ---- traces ---------------------------------------------------------------------------------

@get("/trace")
async def trace_search(console: Console, request: Request, id: str = "") -> Response:
    if id:
        return Redirect(console.layout.url("/trace/" + quote(id.strip(), safe="")))
    return console.html("Trace", pages.trace(console.layout, "", [], ""), request,
                        active="trace")


@get("/trace/{correlation_id:str}")
async def trace_page(console: Console, request: Request, correlation_id: str) -> Response:
    if len(correlation_id) > 512:
        raise NotFoundException("correlation id: longer than 512 characters")
    events = await load_trace(console.redis, console.settings, correlation_id)
    if not _admin(request):
        tenants = {e.result.tenant for e in events if isinstance(e, Finished)}
        if tenants != {_who(request).tenant}:
            events = []  # nothing finished yet, or another tenant's: shown as not found
    text = render_trace(correlation_id, events) if events else ""
    body = pages.trace(console.layout, correlation_id, events, text)
    return console.html(f"Trace {correlation_id}", body, request, active="trace",
                        status=200 if events else 404)


# ---- report ---------------------------------------------------------------------------------

@get("/report")
async def report_page(console: Console, request: Request, since: str = "24h") -> Response:
    if since not in REPORT_WINDOWS:
        raise NotFoundException(f"since: one of {', '.join(REPORT_WINDOWS)}")
    tenant = "" if _admin(request) else _who(request).tenant
    key = (since, tenant)
    now = time.time()
    cached = console._reports.get(key)
    if cached is None or now - cached[0] > REPORT_CACHE_S:
        report = await load_report_async(console.redis, console.models, parse_duration(since),
                                         now=now, tenants={tenant} if tenant else None)
        layout = console.layout
        body = await asyncio.to_thread(
            render_html, report, embedded=True,
            trace_link=lambda corr: layout.url("/trace/" + quote(corr, safe="")))
        cached = console._reports[key] = (now, body)
    page = pages.report_page(console.layout, since, cached[1], REPORT_WINDOWS)
    return console.html("Report", page, request, active="report")


# ---- errors ---------------------------------------------------------------------------------

def _error(status: int, message: str) -> Any:
    def handler(request: Request, exc: Exception) -> Response:
        console: Console = request.scope["console"]
        text = getattr(exc, "detail", "") or str(exc) or message
        if status == 401:
            if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
                return Redirect(console.layout.url("/login", next=request.url.path),
                                status_code=303)
            return Response(f"{message}: {text}\n", media_type=MediaType.TEXT, status_code=401)
        if isinstance(exc, RedisError):
            log.error("console: Redis failed: %s", exc)
            text = f"Redis did not answer ({exc}); try again shortly"
        return console.html(message, pages.error_page(f"{message}: {text}"), request,
                            status=status)
    return handler


def console_router(redis, settings: Settings, *, path: str = "/",
                   key_cache_ttl_s: float = 5.0) -> Router:
    """The console as a Litestar Router, mounted at `path` of an app."""
    base = path.rstrip("/")
    console = Console(redis, settings, base=base, key_cache_ttl_s=key_cache_ttl_s)

    def provide() -> Console:
        return console

    def middleware(app):  # puts the console on the scope, for the guard and error handlers
        async def wrapped(scope, receive, send):
            scope["console"] = console
            await app(scope, receive, send)
        return wrapped

    return Router(
        path=path, route_handlers=[
            login_form, login, logout, models_page, batches_page, batch_page, batch_output,
            batch_errors, dead_letters_page, dead_letter_page, replay_dead_letter,
            trace_search, trace_page, report_page],
        dependencies={"console": Provide(provide, sync_to_thread=False)},
        guards=[require_key], middleware=[middleware],
        exception_handlers={
            NotAuthorizedException: _error(401, "Not logged in"),
            PermissionDeniedException: _error(403, "Not allowed"),
            NotFoundException: _error(404, "Not found"),
            RedisError: _error(503, "Unavailable"),
            AgentFleetError: _error(503, "Unavailable"),
        })


def create_app(redis, settings: Settings, *, key_cache_ttl_s: float = 5.0) -> Litestar:
    """The console alone, at the root (`agentfleet console`)."""
    return Litestar(route_handlers=[console_router(redis, settings,
                                                   key_cache_ttl_s=key_cache_ttl_s)],
                    openapi_config=None, logging_config=None)


def run_console(url: str, settings: Settings, *, port: int, addr: str = "127.0.0.1") -> int:
    """Serve the console with uvicorn until SIGTERM or SIGINT."""
    import uvicorn

    from agentfleet.producer.connection import connect

    async def serve() -> None:
        redis = connect(url)
        try:
            app = create_app(redis, settings)
            config = uvicorn.Config(app, host=addr, port=port, log_level="warning",
                                    access_log=False, lifespan="off")
            server = uvicorn.Server(config)
            log.info("console on http://%s:%d/", addr, port)
            print(f"console on http://{addr}:{port}/", flush=True)
            await server.serve()
            if not server.started:
                raise AgentFleetError(f"console: cannot listen on {addr}:{port}; pass --port")
        finally:
            await redis.aclose()

    asyncio.run(serve())
    return 0


__all__ = ["Console", "console_router", "create_app", "run_console", "HTTPException"]
