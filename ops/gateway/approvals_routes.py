"""Approval gates over HTTP: list held tasks, approve or reject one (admin keys only).

The store and its rules are ops/approvals.py; here, who may see what: a read key lists its
own tenant's held tasks, an admin key every tenant's and may decide.
"""

from __future__ import annotations

import msgspec
from litestar.params import FromPath
from litestar import Request, Response, get, post

from agentfleet.ops import approvals
from agentfleet.ops.gateway import convert
from agentfleet.ops.gateway.common import gateway_of, json_response
from agentfleet.ops.gateway.errors import ApiError
from agentfleet.ops.gateway.types import Decision
from agentfleet.schemas.wire import ApiKeyRecord, Role, Task


def _held_view(task: Task) -> dict[str, object]:
    return {"id": task.id, "object": "approval", "tenant": task.tenant, "model": task.model,
            "parent_id": task.parent_id or None, "requested_at": task.enqueued_at,
            "deadline": task.deadline, "prompt": task.prompt,
            "messages": msgspec.to_builtins(task.messages) if task.messages else None,
            "metadata": task.metadata}


def who(caller: ApiKeyRecord) -> str:
    """How a decision names its maker: the key id, and the key's name when it has one."""
    return f"key {caller.key_id}" + (f" ({caller.name})" if caller.name else "")


@get("/v1/approvals", name="approvals_list")
async def list_approvals(request: Request) -> Response:
    """Tasks waiting for a decision: the caller's tenant's (all tenants' for an admin)."""
    gw = gateway_of(request)
    caller = await gw.auth(request, Role.READ)
    tenant = None if caller.role is Role.ADMIN else caller.tenant
    held = await approvals.list_held(gw.redis, gw.settings, tenant)
    return json_response({"object": "list", "data": [_held_view(t) for t in held]})


@post("/v1/approvals/{task_id:str}/approve", name="approve", status_code=200)
async def approve(request: Request, task_id: FromPath[str]) -> Response:
    """Queue a held task; the decision is recorded with the key that made it and the reason."""
    gw = gateway_of(request)
    caller = await gw.auth(request, Role.ADMIN)
    body = await _decision(request)
    try:
        task = await approvals.approve(gw.producer, gw.settings, task_id, by=who(caller),
                                       reason=body.reason)
    except approvals.NotHeldError as exc:
        raise ApiError(409 if "decided" in str(exc) or "deadline" in str(exc) else 404,
                       str(exc), code="not_held", param="task_id") from None
    return json_response(convert.task_view(task.tenant, task.id, "queued", model=task.model))


@post("/v1/approvals/{task_id:str}/reject", name="reject", status_code=200)
async def reject(request: Request, task_id: FromPath[str]) -> Response:
    """Finish a held task as failed (`rejected`), recording who rejected it and why."""
    gw = gateway_of(request)
    caller = await gw.auth(request, Role.ADMIN)
    body = await _decision(request)
    try:
        result = await approvals.reject(gw.redis, gw.settings, task_id, by=who(caller),
                                        reason=body.reason)
    except approvals.NotHeldError as exc:
        raise ApiError(409 if "decided" in str(exc) else 404, str(exc), code="not_held",
                       param="task_id") from None
    return json_response(convert.task_view(result.tenant, task_id, result.status.value,
                                           result=result))


async def _decision(request: Request) -> Decision:
    raw = await request.body()
    return convert.decode(raw, Decision) if raw.strip() else Decision()


ROUTES = [list_approvals, approve, reject]
