"""The gateway's OpenAPI document (GET /openapi.json), built from its routes and from the very
Structs the routes decode, so the document and the code cannot drift apart.
"""

from __future__ import annotations

import inspect
import re

import msgspec
from litestar import Request, Response, get

from agentfleet import __version__
from agentfleet.ops.gateway.common import JSON
from agentfleet.ops.gateway.types import BatchRequest, Decision

# Litestar route name -> the Struct its JSON body decodes into (a fast route names its own).
REQUEST_BODIES: dict[str, type] = {"batch_create": BatchRequest, "approve": Decision,
                                   "reject": Decision}
PUBLIC = frozenset(("healthz", "readyz", "metrics", "openapi"))  # no API key needed
_CONVERTER = re.compile(r"\{(\w+):\w+\}")
_ERROR = {"type": "object", "properties": {"error": {"type": "object", "properties": {
    "message": {"type": "string"}, "type": {"type": "string"},
    "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def _any(t: type) -> dict[str, object]:
    """`object` fields (a JSON schema, a tool's parameters, a fan-out's items) take any JSON."""
    if t is object:
        return {"description": "any JSON value"}  # msgspec takes {} for "no schema given"
    raise NotImplementedError(t)  # msgspec's protocol for "no schema for this type here"


def build(handlers, fast_routes=()) -> dict[str, object]:
    bodies = list(dict.fromkeys([*REQUEST_BODIES.values(), *(r.body for r in fast_routes)]))
    schemas, components = msgspec.json.schema_components(
        bodies, ref_template="#/components/schemas/{name}", schema_hook=_any)
    refs = dict(zip(bodies, schemas))
    paths: dict[str, dict] = {}
    for handler in handlers:
        for path in handler.paths:
            item = paths.setdefault(_CONVERTER.sub(r"{\1}", path), {})
            for method in sorted(handler.http_methods):
                item[method.lower()] = _operation(handler, refs,
                                                  REQUEST_BODIES.get(handler.name))
    for route in fast_routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(
            _Described(route), refs, route.body)
    components["Error"] = _ERROR
    return {
        "openapi": "3.1.0",
        "info": {"title": "agentfleet gateway", "version": __version__,
                 "description": "OpenAI-compatible chat and text completions, models, files "
                                "and batches, and agentfleet's task API (docs/gateway.md)."},
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": components,
                       "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}}},
    }


def _operation(handler, refs: dict[type, dict], kind: type | None) -> dict[str, object]:
    doc = inspect.getdoc(handler.fn) or handler.name
    op: dict[str, object] = {
        "operationId": handler.name, "summary": doc.split("\n")[0],
        "responses": {"200": {"description": "OK"},
                      "default": {"description": "An error in OpenAI's shape",
                                  "content": {JSON: {"schema": {"$ref":
                                                                "#/components/schemas/Error"}}}}},
    }
    params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
              for path in handler.paths for name in _CONVERTER.findall(path)]
    if params:
        op["parameters"] = params
    if kind is not None:
        op["requestBody"] = {"required": True, "content": {JSON: {"schema": refs[kind]}}}
    elif handler.name == "file_upload":
        op["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["file", "purpose"],
            "properties": {"file": {"type": "string", "format": "binary"},
                           "purpose": {"type": "string", "enum": ["batch", "user_data"]}}}}}}
    if handler.name not in PUBLIC:
        op["security"] = [{"apiKey": []}]
    return op


class _Described:
    """A fast route (fast.py) as the document sees a handler."""

    def __init__(self, route):
        self.name = route.name
        self.fn = route.handler
        self.paths = {route.path}
        self.http_methods = {route.method}


def openapi_route(handlers, fast_routes=()):
    document = msgspec.json.encode(build(handlers, fast_routes))

    @get("/openapi.json", name="openapi", include_in_schema=False)
    async def openapi(request: Request) -> Response:
        """The OpenAPI document."""
        return Response(document, media_type=JSON)

    return openapi
