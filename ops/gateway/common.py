"""What every route module shares: the process's Gateway, and JSON answers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec
from litestar import Request, Response

if TYPE_CHECKING:
    from agentfleet.ops.gateway.app import Gateway

JSON = "application/json"
_encode = msgspec.json.Encoder().encode


def gateway_of(request: Request) -> Gateway:
    return request.app.state.gateway


def json_response(body: object, status: int = 200, headers: dict | None = None) -> Response:
    return Response(_encode(body), status_code=status, media_type=JSON, headers=headers)
