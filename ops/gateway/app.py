"""The gateway's application: one `Gateway` per process (its Producer, key cache, file store),
and the routes of OpenAI's API and agentfleet's task API.

    create_app(settings, redis_url) -> an ASGI application (Litestar inside a metrics wrapper)

Every route authenticates first (`Authorization: Bearer afk_...`, ops/apikeys.py), checks the
role it needs (read < submit < admin) and acts for the key's tenant only: another tenant's
task, trace, file or batch answers 404, as an unknown one does.  Bodies are decoded with
msgspec into the Structs of types.py; errors come back in OpenAI's shape (errors.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import signal
import time

import msgspec
from litestar.params import FromPath
from litestar import Litestar, Request, Response, delete, get
from litestar.exceptions import HTTPException
from redis.exceptions import RedisError

from agentfleet.ops import apikeys
from agentfleet.ops import datarules
from agentfleet.ops.datarules import current_tenant
from agentfleet.ops.gateway import convert
from agentfleet.ops.gateway.common import JSON, gateway_of, json_response
from agentfleet.ops.gateway.errors import ApiError, exception_handler
from agentfleet.ops.gateway.metrics import GatewayMetrics
from agentfleet.ops.gateway.quota import Quota
from agentfleet.ops.trace import load_trace
from agentfleet.producer.batch import BatchClient
from agentfleet.producer.client import Producer
from agentfleet.producer.connection import connect
from agentfleet.schemas.errors import BrokerError
from agentfleet.schemas.settings import Settings
from agentfleet.schemas.tenants import TableCache
from agentfleet.schemas.wire import ApiKeyRecord, Finished, Result, Role, Task

log = logging.getLogger("agentfleet.gateway")

_BATCH_CHUNK_LINES = 500  # a bulk job's lines checked per await: the loop stalls < 30 ms


class Gateway:
    """What one gateway process holds: a Producer (one listener for every reply), the key
    cache, the bulk-job client, the file store, webhooks and metrics."""

    def __init__(self, settings: Settings, redis_url: str, *, quota: Quota | None = None):
        self.settings = settings
        self.redis_url = redis_url
        self.quota = quota or Quota()
        self.metrics = GatewayMetrics()
        self.started_at = int(time.time())
        self.redis = None
        self.producer: Producer | None = None
        self.keys: apikeys.KeyCache | None = None
        self.batches: BatchClient | None = None
        self.ids: convert.TaskIds | None = None
        self.files = None
        self.webhooks = None
        self.tenants: TableCache | None = None
        self._background: set[asyncio.Task] = set()

    async def start(self) -> None:
        from agentfleet.ops.gateway.files import FileStore
        from agentfleet.ops.gateway.webhooks import Webhooks

        s = self.settings
        self.redis = connect(self.redis_url)
        self.producer = Producer(self.redis, settings=s)
        self.ids = convert.TaskIds(self.producer.id)
        self.keys = apikeys.KeyCache(self.redis, ttl_s=s.gateway_key_cache_s)
        self.batches = BatchClient(self.producer, chunk_lines=_BATCH_CHUNK_LINES)
        self.files = FileStore(self.redis, s)
        self.tenants = TableCache(self.redis)  # the registry: data rules (datarules.py)
        await self.tenants.current()
        datarules.use_registry(lambda: self.tenants.table)
        self.webhooks = Webhooks(self)
        await self.webhooks.start()
        self.spawn(self._expire_held(), vital=True)
        log.info("gateway %s serving models %s", self.producer.id, sorted(s.models))

    async def stop(self) -> None:
        if self.webhooks is not None:
            await self.webhooks.stop()
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self.producer is not None:
            await self.producer.close()  # closes the Redis client too

    async def _expire_held(self, every_s: float = 5.0) -> None:
        """Held tasks whose deadline passed get their `expired` result (ops/approvals.py);
        every gateway runs this, and a decision is one atomic script, so they never clash."""
        from agentfleet.ops import approvals

        while True:
            try:
                await approvals.expire_overdue(self.redis, self.settings)
            except BrokerError as exc:
                log.warning("gateway: expiring overdue approvals failed (%s)", exc)
            await asyncio.sleep(every_s)

    def spawn(self, coro, *, vital: bool = False) -> asyncio.Task:
        """Run `coro` beside the requests; kept until done (an unowned task may be collected).
        A `vital` loop that fails stops the process (SIGTERM: the server drains, then exits
        non-zero) rather than going on without it."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(functools.partial(self._background_done, vital=vital))
        return task

    def _background_done(self, task: asyncio.Task, *, vital: bool) -> None:
        self._background.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        if vital:
            log.critical("gateway: a vital loop failed; stopping", exc_info=task.exception())
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            log.error("gateway: background task failed", exc_info=task.exception())

    # ---- per request -----------------------------------------------------------------

    async def auth(self, request: Request, needed: Role) -> ApiKeyRecord:
        """The caller's key record; 401 without a valid key, 403 when its role is too low."""
        return await self.check_key(request.headers.get("authorization"), needed)

    async def check_key(self, header: str | None, needed: Role) -> ApiKeyRecord:
        """`auth` from the Authorization header's value."""
        if not header or not header[:7].lower() == "bearer ":
            raise ApiError(401, "no API key: send `Authorization: Bearer <key>` (create one "
                           "with `agentfleet keys create`)", code="invalid_api_key")
        record = await self.keys.verify(header[7:].strip())
        if record is None:
            raise ApiError(401, "incorrect API key provided (unknown, malformed or revoked)",
                           code="invalid_api_key")
        current_tenant.set(record.tenant)  # logs and Sentry events follow its data rules
        await self.tenants.current()  # the registry, re-read at most once a second
        if not record.role.allows(needed):
            raise ApiError(403, f"this key's role is {record.role.value}; this route needs "
                           f"{needed.value}", code="insufficient_role")
        return record

    async def admit(self, tenant: str, tasks: int) -> None:
        """429 with Retry-After when the tenant is over its quota (quota.py)."""
        wait_s = await self.quota.check(tenant, tasks)
        if wait_s is not None:
            raise ApiError(429, f"tenant {tenant!r} is over its quota; retry in {wait_s:.0f} s",
                           code="quota_exceeded",
                           headers={"Retry-After": str(max(1, math.ceil(wait_s)))})

    async def wait(self, receive, task: Task) -> Result:
        """The task's result; if the client leaves first (the ASGI `receive` says so) or the
        wait times out, the task is cancelled."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_task(
            self.producer.wait(task.id, timeout_s=self.settings.gateway_wait_timeout_s))
        gone = loop.create_task(disconnected(receive))
        first = loop.create_future()  # the first of the two to end (lighter than asyncio.wait)

        def wake(_: asyncio.Future) -> None:
            if not first.done():
                first.set_result(None)

        waiter.add_done_callback(wake)
        gone.add_done_callback(wake)
        try:
            await first
        except BaseException:  # this request was cancelled (the server stops): so is the wait
            waiter.cancel()
            raise
        finally:
            gone.cancel()
        if waiter.done():
            try:
                return waiter.result()
            except BaseException:
                self.spawn(self.cancel(task.id, task.model))
                raise
        waiter.cancel()
        self.metrics.disconnects.inc()
        self.spawn(self.cancel(task.id, task.model))
        raise ApiError(499, "the client closed the connection; its task was cancelled",
                       code="client_closed")

    async def known_models(self) -> list[str]:
        """The settings' models and the model registry's (docs/versions.md)."""
        table = await self.producer.models.current()
        return sorted({*self.settings.models, *table.entries})

    async def cancel(self, task_id: str, model: str | None = None) -> None:
        for name in [model] if model else await self.known_models():
            await self.producer.cancel(task_id, name)


async def disconnected(receive) -> None:
    """Returns once the client has gone (after the body, `receive` waits for that)."""
    while (await receive())["type"] != "http.disconnect":
        pass


# ---- health, metrics -------------------------------------------------------------------

@get("/healthz", name="healthz", media_type=JSON)
async def healthz() -> Response:
    """The process is up."""
    return json_response({"status": "ok"})


@get("/readyz", name="readyz", media_type=JSON)
async def readyz(request: Request) -> Response:
    """Redis answers: the gateway can queue and read."""
    gw = gateway_of(request)
    try:
        await gw.redis.ping()
    except (RedisError, OSError) as exc:
        return json_response({"status": "unavailable", "reason": str(exc)}, 503)
    return json_response({"status": "ready"})


@get("/metrics", name="metrics")
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(gateway_of(request).metrics.registry),
                    media_type=CONTENT_TYPE_LATEST)


# ---- OpenAI: models (chat and text completions: fast.py) ---------------------------

def _model_object(name: str, created: int) -> dict[str, object]:
    return {"id": name, "object": "model", "created": created, "owned_by": "agentfleet"}


@get("/v1/models", name="models")
async def list_models(request: Request) -> Response:
    """The models this fleet serves: the settings' and the model registry's."""
    gw = gateway_of(request)
    await gw.auth(request, Role.READ)
    return json_response({"object": "list", "data": [
        _model_object(name, gw.started_at) for name in await gw.known_models()]})


@get("/v1/models/{model:str}", name="model")
async def get_model(request: Request, model: FromPath[str]) -> Response:
    gw = gateway_of(request)
    await gw.auth(request, Role.READ)
    if model not in await gw.known_models():
        raise ApiError(404, f"the model {model!r} does not exist", code="model_not_found",
                       param="model")
    return json_response(_model_object(model, gw.started_at))


# ---- agentfleet's task API -------------------------------------------------------------

@get("/v1/tasks/{task_id:str}", name="task_get")
async def get_task(request: Request, task_id: FromPath[str]) -> Response:
    """A task's state: its result once there is one (`status` is the result's), else
    `awaiting_approval` or `pending` (queued or running)."""
    from agentfleet.ops import approvals

    gw = gateway_of(request)
    caller = await gw.auth(request, Role.READ)
    admin = caller.role is Role.ADMIN
    result = await gw.producer.get_result(task_id)
    if result is not None:
        if not admin and result.tenant != caller.tenant:
            raise _no_task(task_id)
        return json_response(convert.task_view(caller.tenant, task_id, result.status.value,
                                               result=result))
    held = await approvals.find(gw.redis, gw.settings, task_id)
    if held is not None and (admin or held.tenant == caller.tenant):
        return json_response(convert.task_view(caller.tenant, task_id, "awaiting_approval",
                                               model=held.model,
                                               correlation_id=held.correlation_id))
    if admin or convert.owned_by(caller.tenant, task_id):
        return json_response(convert.task_view(caller.tenant, task_id, "pending"))
    raise _no_task(task_id)


@delete("/v1/tasks/{task_id:str}", name="task_cancel", status_code=202)
async def cancel_task(request: Request, task_id: FromPath[str]) -> Response:
    """Cancel a task: never run if still queued, aborted if running; its result says
    `cancelled` unless it finished first."""
    gw = gateway_of(request)
    caller = await gw.auth(request, Role.SUBMIT)
    result = await gw.producer.get_result(task_id)
    admin = caller.role is Role.ADMIN
    if result is not None:
        if not admin and result.tenant != caller.tenant:
            raise _no_task(task_id)
        return json_response(convert.task_view(caller.tenant, task_id, result.status.value,
                                               result=result), 200)
    if not admin and not convert.owned_by(caller.tenant, task_id):
        raise _no_task(task_id)
    await gw.cancel(task_id)
    return json_response(convert.task_view(caller.tenant, task_id, "cancelling"), 202)


def _no_task(task_id: str) -> ApiError:
    return ApiError(404, f"no task {task_id!r} (unknown, expired, or another tenant's)",
                    code="task_not_found", param="task_id")


@get("/v1/traces/{correlation_id:str}", name="trace")
async def get_trace(request: Request, correlation_id: FromPath[str]) -> Response:
    """A chain's trace events (enqueued, retried, finished), in time order."""
    gw = gateway_of(request)
    caller = await gw.auth(request, Role.READ)
    admin = caller.role is Role.ADMIN
    stored = correlation_id if admin else convert.scoped(caller.tenant, correlation_id)
    try:
        events = await load_trace(gw.redis, gw.settings, stored)
    except RedisError as exc:
        raise BrokerError(f"reading the trace failed: {exc}") from exc
    if not admin:  # belt and braces: only the tenant's own results
        events = [e for e in events
                  if not isinstance(e, Finished) or e.result.tenant == caller.tenant]
    if not events:
        raise ApiError(404, f"no trace for {correlation_id!r} (unknown, expired, or another "
                       "tenant's)", code="trace_not_found", param="correlation_id")
    return json_response({"object": "trace", "correlation_id": correlation_id,
                          "events": msgspec.to_builtins(events)})


# ---- the application -------------------------------------------------------------------

def create_app(settings: Settings, redis_url: str, *, quota: Quota | None = None):
    """The gateway as an ASGI application: the hot routes (fast.py) in front of Litestar,
    every request timed and counted."""
    from agentfleet.ops.gateway import approvals_routes, batches, files
    from agentfleet.ops.gateway.fast import FAST_ROUTES, Front
    from agentfleet.ops.gateway.openapi import openapi_route

    gw = Gateway(settings, redis_url, quota=quota)
    handlers = [healthz, readyz, metrics, list_models, get_model, get_task, cancel_task,
                get_trace, *files.ROUTES, *batches.ROUTES, *approvals_routes.ROUTES]
    app = Litestar(
        route_handlers=[*handlers, openapi_route(handlers, FAST_ROUTES)],
        on_startup=[gw.start],
        on_shutdown=[gw.stop],
        exception_handlers={Exception: exception_handler, HTTPException: exception_handler},
        request_max_body_size=settings.gateway_max_body_bytes,
        openapi_config=None,  # our own document (openapi.py), from the Structs we decode
        logging_config=None,  # the process's logging (ops/logs.py)
    )
    app.state.gateway = gw
    return Front(app, gw)


def app_from_env():
    """The factory the server imports in its worker process (granian --factory)."""
    import os

    from agentfleet.ops.logs import setup_logging
    from agentfleet.ops.sentry import init_sentry

    from agentfleet.ops.datarules import RedactTextFilter, sentry_before_send

    settings = Settings.from_env()
    setup_logging(settings.log_format).addFilter(RedactTextFilter(settings))
    init_sentry(settings, component="gateway", hook=sentry_before_send(settings))
    url = settings.redis_url or os.environ.get("REDIS_URL", "")
    return create_app(settings, url)
