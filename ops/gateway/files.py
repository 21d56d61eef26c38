"""OpenAI's Files API over a directory (a volume in a pod): upload, list, retrieve, content,
delete; and the store the Batch API writes its output and error files into.

A file's bytes live in `gateway_files_dir/<file id>`; its record (tenant, name, purpose,
size) in Redis (`keys.file_meta`), listed per tenant (`keys.tenant_files`).  An upload is
streamed to disk as it arrives (multipart parsed incrementally), never held in memory, and
refused with 413 as soon as it passes `gateway_max_file_bytes`; content is streamed back from
disk.  Another tenant's file answers 404.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from litestar.params import FromPath, FromQuery
from litestar import Request, Response, delete, get, post
from litestar.response import File
from multipart import MultipartSegment, ParserError, ParserLimitReached, PushMultipartParser
from redis.exceptions import RedisError

from agentfleet.ops.gateway.common import gateway_of, json_response
from agentfleet.ops.gateway.errors import ApiError
from agentfleet.schemas import keys
from agentfleet.schemas.errors import BrokerError
from agentfleet.schemas.settings import Settings
from agentfleet.schemas.wire import ApiKeyRecord, Role

PURPOSES = ("batch", "user_data")  # what the fleet reads; generated files are batch_output
MAX_FIELD_BYTES = 1024  # a form field other than the file (purpose)
MAX_LIST = 10_000


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


class FileStore:
    def __init__(self, redis, settings: Settings):
        self.redis = redis
        self.dir = Path(settings.gateway_files_dir or settings.home_path / "files")
        self.max_bytes = settings.gateway_max_file_bytes
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, file_id: str) -> Path:
        return self.dir / file_id

    def temp_path(self, file_id: str) -> Path:
        """Where a file is written before it is complete (renamed into place after)."""
        return self.dir / f".{file_id}.part"

    async def add(self, file_id: str, tenant: str, filename: str, purpose: str,
                  size: int) -> dict[str, object]:
        """Record a file whose bytes are complete at `temp_path(file_id)`; move them in."""
        os.replace(self.temp_path(file_id), self.path(file_id))
        now = time.time()
        meta = {"id": file_id, "tenant": tenant, "filename": filename, "purpose": purpose,
                "bytes": size, "created_at": int(now)}
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hset(keys.file_meta(file_id), mapping=meta)
                pipe.zadd(keys.tenant_files(tenant), {file_id: now})
                await pipe.execute()
        except RedisError as exc:
            self.path(file_id).unlink(missing_ok=True)
            raise BrokerError(f"recording file {file_id} failed: {exc}") from exc
        return file_object(meta)

    async def get(self, file_id: str, caller: ApiKeyRecord | None) -> dict[str, str]:
        """The file's record; 404 when unknown or another tenant's (`caller` None: anyone's)."""
        try:
            raw = await self.redis.hgetall(keys.file_meta(file_id))
        except RedisError as exc:
            raise BrokerError(f"reading file {file_id} failed: {exc}") from exc
        meta = {k.decode(): v.decode() for k, v in raw.items()}
        if not meta or (caller is not None and caller.role is not Role.ADMIN
                        and meta["tenant"] != caller.tenant):
            raise ApiError(404, f"no file {file_id!r} (unknown, deleted, or another tenant's)",
                           code="file_not_found", param="file_id")
        return meta

    async def list(self, tenant: str, *, purpose: str | None, limit: int, after: str | None,
                   newest_first: bool) -> tuple[list[dict[str, object]], bool]:
        try:
            ids = await self.redis.zrange(keys.tenant_files(tenant), 0, MAX_LIST - 1,
                                          desc=newest_first)
            ids = [i.decode() for i in ids]
            if after:
                ids = ids[ids.index(after) + 1:] if after in ids else []
            async with self.redis.pipeline(transaction=False) as pipe:
                for file_id in ids:
                    pipe.hgetall(keys.file_meta(file_id))
                metas = await pipe.execute()
        except RedisError as exc:
            raise BrokerError(f"listing files failed: {exc}") from exc
        out = []
        for raw in metas:
            meta = {k.decode(): v.decode() for k, v in raw.items()}
            if meta and (purpose is None or meta["purpose"] == purpose):
                out.append(file_object(meta))
        return out[:limit], len(out) > limit

    async def remove(self, file_id: str, tenant: str) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.delete(keys.file_meta(file_id))
                pipe.zrem(keys.tenant_files(tenant), file_id)
                await pipe.execute()
        except RedisError as exc:
            raise BrokerError(f"deleting file {file_id} failed: {exc}") from exc
        self.path(file_id).unlink(missing_ok=True)


def file_object(meta: dict) -> dict[str, object]:
    """OpenAI's File object."""
    return {"id": meta["id"], "object": "file", "bytes": int(meta["bytes"]),
            "created_at": int(meta["created_at"]), "filename": meta["filename"],
            "purpose": meta["purpose"], "status": "processed", "expires_at": None,
            "status_details": None}


@post("/v1/files", name="file_upload", status_code=200, request_max_body_size=None)
async def upload(request: Request) -> Response:
    """Upload a file (multipart/form-data: `file`, `purpose`), streamed to disk."""
    gw = gateway_of(request)
    caller = await gw.auth(request, Role.SUBMIT)
    store: FileStore = gw.files
    content_type, options = request.content_type
    if content_type != "multipart/form-data" or not options.get("boundary"):
        raise ApiError(400, "upload a file as multipart/form-data with fields `file` and "
                       "`purpose`", code="invalid_request")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > store.max_bytes + 64 * 1024:
        raise _too_large(store.max_bytes)
    file_id = new_file_id()
    temp = store.temp_path(file_id)
    try:
        fields, filename, size = await _receive(request, options["boundary"], temp,
                                                store.max_bytes)
        purpose = fields.get("purpose", "")
        if purpose not in PURPOSES:
            raise ApiError(400, f"purpose: {purpose!r} is not one of {list(PURPOSES)}",
                           param="purpose", code="invalid_purpose")
        if filename is None:
            raise ApiError(400, "no `file` part in the form", param="file",
                           code="invalid_request")
        return json_response(await store.add(file_id, caller.tenant, filename, purpose, size))
    finally:
        temp.unlink(missing_ok=True)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"file: more than the limit of {limit} bytes "
                    "(gateway_max_file_bytes)", param="file", code="file_too_large")


async def _receive(request: Request, boundary: str, temp: Path,
                   max_bytes: int) -> tuple[dict[str, str], str | None, int]:
    """Parse the form as it streams in: the file part goes straight to `temp`."""
    fields: dict[str, str] = {}
    filename: str | None = None
    size = 0
    out = None
    field = bytearray()
    segment: MultipartSegment | None = None
    try:
        with PushMultipartParser(boundary, max_segment_count=16) as parser:
            async for chunk in request.stream():
                for part in parser.parse(chunk):
                    if isinstance(part, MultipartSegment):
                        segment = part
                        if part.filename is not None and part.name == "file":
                            if out is not None:
                                raise ApiError(400, "one `file` part per upload", param="file")
                            filename = os.path.basename(part.filename) or "upload"
                            out = open(temp, "wb")  # noqa: SIM115 - closed below
                    elif part:
                        if segment is not None and segment.name == "file" and out is not None:
                            size += len(part)
                            if size > max_bytes:
                                raise _too_large(max_bytes)
                            out.write(part)
                        else:
                            field += part
                            if len(field) > MAX_FIELD_BYTES:
                                raise ApiError(400, f"form field {segment.name!r}: more than "
                                               f"{MAX_FIELD_BYTES} bytes", code="invalid_request")
                    else:  # the end of a part
                        if segment is not None and segment.name != "file":
                            fields[segment.name] = field.decode("utf-8", "replace")
                        field = bytearray()
                        segment = None
                if parser.closed:
                    break
    except (ParserError, ParserLimitReached) as exc:
        raise ApiError(400, f"invalid multipart/form-data: {exc}", code="invalid_request") \
            from None
    finally:
        if out is not None:
            out.close()
    return fields, filename, size


@get("/v1/files", name="file_list")
async def list_files(request: Request, purpose: FromQuery[str | None] = None,
                     limit: FromQuery[int] = 10_000, after: FromQuery[str | None] = None,
                     order: FromQuery[str] = "desc") -> Response:
    """The caller's tenant's files."""
    gw = gateway_of(request)
    caller = await gw.auth(request, Role.READ)
    if not 1 <= limit <= MAX_LIST:
        raise ApiError(400, f"limit: {limit} is outside 1..{MAX_LIST}", param="limit")
    data, more = await gw.files.list(caller.tenant, purpose=purpose, limit=limit, after=after,
                                     newest_first=order != "asc")
    return json_response({"object": "list", "data": data, "has_more": more,
                          "first_id": data[0]["id"] if data else None,
                          "last_id": data[-1]["id"] if data else None})


@get("/v1/files/{file_id:str}", name="file_get")
async def get_file(request: Request, file_id: FromPath[str]) -> Response:
    gw = gateway_of(request)
    caller = await gw.auth(request, Role.READ)
    return json_response(file_object(await gw.files.get(file_id, caller)))


@get("/v1/files/{file_id:str}/content", name="file_content")
async def file_content(request: Request, file_id: FromPath[str]) -> File:
    """The file's bytes, streamed from disk."""
    gw = gateway_of(request)
    caller = await gw.auth(request, Role.READ)
    meta = await gw.files.get(file_id, caller)
    path = gw.files.path(file_id)
    if not path.exists():
        raise ApiError(404, f"file {file_id!r}: its bytes are gone from the store",
                       code="file_not_found", param="file_id")
    return File(path=path, filename=meta["filename"], media_type="application/octet-stream",
                content_disposition_type="attachment")


@delete("/v1/files/{file_id:str}", name="file_delete", status_code=200)
async def delete_file(request: Request, file_id: FromPath[str]) -> Response:
    gw = gateway_of(request)
    caller = await gw.auth(request, Role.SUBMIT)
    meta = await gw.files.get(file_id, caller)
    await gw.files.remove(file_id, meta["tenant"])
    return json_response({"id": file_id, "object": "file", "deleted": True})


ROUTES = [upload, list_files, get_file, file_content, delete_file]
