"""Errors in OpenAI's shape, with the status codes an OpenAI client expects.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens",
               "code": "invalid_task"}}

  400  malformed JSON, a value out of bounds, something the fleet cannot serve (`n` > 1)
  401  no API key, or one that is unknown or revoked
  403  the key's role is too low for the route
  404  an unknown route, model, task, file or batch (or one of another tenant)
  413  a body over the limit (JSON requests, uploaded files)
  422  JSON that does not match the request's schema: an unknown field, a wrong type
  429  the tenant is over its quota (Retry-After says when to come back)
  503  Redis cannot be reached;  504  no result within the wait
Nothing is queued when a request fails.
"""

from __future__ import annotations

import logging
import math

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException

from agentfleet.ops.gateway.common import JSON

from agentfleet.schemas.errors import (
    AgentFleetError,
    BrokerError,
    ErrorCode,
    QuotaExceededError,
    ResultTimeoutError,
    UnknownModelError,
    ValidationError,
)
from agentfleet.schemas.wire import Result, Status

log = logging.getLogger("agentfleet.gateway")

_encode = msgspec.json.Encoder().encode
_TYPE_BY_STATUS = {401: "authentication_error", 403: "permission_error",
                   404: "invalid_request_error", 429: "rate_limit_error"}


class ApiError(AgentFleetError):
    """Raised by a route: answered with `status` and an OpenAI error body."""

    def __init__(self, status: int, message: str, *, code: str | None = None,
                 param: str | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None):
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPE_BY_STATUS.get(status, "invalid_request_error"
                                                 if status < 500 else "server_error")
        self.headers = headers
        super().__init__(message)

    def body(self) -> bytes:
        return _encode({"error": {"message": self.message, "type": self.type,
                                  "param": self.param, "code": self.code}})

    def response(self) -> Response:
        return Response(self.body(), status_code=self.status, media_type=JSON,
                        headers=self.headers)


def from_exception(exc: BaseException) -> ApiError:
    """The ApiError for anything a route raised."""
    match exc:
        case ApiError():
            return exc
        case UnknownModelError():
            return ApiError(404, str(exc), code="model_not_found", param=exc.field)
        case ValidationError():
            return ApiError(400, str(exc), code=exc.code.value, param=exc.field)
        case QuotaExceededError():
            return ApiError(429, str(exc), code="quota_exceeded", param=exc.quota,
                            headers={"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))})
        case ResultTimeoutError():
            return ApiError(504, f"no result yet: {exc}; the task goes on, GET /v1/tasks/{{id}} "
                            "reads it later", code="timeout")
        case BrokerError():
            log.warning("gateway: Redis refused or cannot be reached: %s", exc)
            return ApiError(503, "the queue is unavailable; retry", code="unavailable")
        case HTTPException():
            status = exc.status_code
            message = exc.detail if isinstance(exc.detail, str) else str(exc)
            if status == 413:
                message = "the request body is over the limit"
                return ApiError(413, message, code="request_too_large")
            return ApiError(status, message, code=None if status >= 500 else "invalid_request")
    log.error("gateway: unexpected error", exc_info=exc)
    return ApiError(500, "internal error (logged on the gateway)", code="internal")


def exception_handler(request: Request, exc: Exception) -> Response:
    return from_exception(exc).response()


# A failed result as an HTTP error: what went wrong on the worker, in OpenAI's words.
_RESULT_STATUS = {
    ErrorCode.INVALID_TASK: 400, ErrorCode.PROMPT_TOO_LONG: 400, ErrorCode.DECODE_ERROR: 400,
    ErrorCode.UNSUPPORTED_VERSION: 400, ErrorCode.UNKNOWN_MODEL: 404,
    ErrorCode.DEADLINE_EXCEEDED: 504, ErrorCode.CANCELLED: 499, ErrorCode.REJECTED: 403,
}


def from_result(result: Result) -> ApiError:
    """The error for a result that did not succeed."""
    code = result.error_code or (ErrorCode.DEADLINE_EXCEEDED if result.status is Status.EXPIRED
                                 else ErrorCode.INTERNAL)
    status = _RESULT_STATUS.get(code, 500)
    return ApiError(status, result.error_message or code.value, code=code.value,
                    type="invalid_request_error" if status < 500 else "server_error")
