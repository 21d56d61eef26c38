"""OpenAI's Batch API over agentfleet's bulk jobs (producer/batch.py): create, retrieve, list,
cancel, with real input and output file ids.

Creating a batch checks the request, records it for the caller's tenant and answers at once
(`validating`); the job's validation and submit passes then run beside the requests, reading
the input file from the store a line at a time (memory stays flat), its tasks carrying the
tenant.  Once the job has settled, the first read of it writes its output and error files
into the store, a page of results at a time, and records their ids.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from litestar.params import FromPath, FromQuery
from litestar import Request, Response, get, post
from redis.exceptions import RedisError

from agentfleet.ops.gateway import convert
from agentfleet.ops.gateway.common import gateway_of, json_response
from agentfleet.ops.gateway.errors import ApiError
from agentfleet.ops.gateway.files import new_file_id
from agentfleet.ops.gateway.types import BatchRequest
from agentfleet.producer.batch import FINAL, VALIDATING, BatchStatus, new_batch_id
from agentfleet.producer.openai_batch import ENDPOINTS, parse_window
from agentfleet.schemas import keys
from agentfleet.schemas.errors import BatchError, BrokerError, InvalidBatchFileError
from agentfleet.schemas.wire import ApiKeyRecord, Role

log = logging.getLogger("agentfleet.gateway")
MAX_LIST = 100
_writing: dict[str, asyncio.Lock] = {}  # batch id -> lock, while its files are written


async def _record(gw, batch_id: str, caller: ApiKeyRecord) -> dict[str, str]:
    try:
        raw = await gw.redis.hgetall(keys.gateway_batch(batch_id))
    except RedisError as exc:
        raise BrokerError(f"reading batch {batch_id} failed: {exc}") from exc
    record = {k.decode(): v.decode() for k, v in raw.items()}
    if not record or (caller.role is not Role.ADMIN and record["tenant"] != caller.tenant):
        raise ApiError(404, f"no batch {batch_id!r} (unknown, expired, or another tenant's)",
                       code="batch_not_found", param="batch_id")
    return record


@post("/v1/batches", name="batch_create", status_code=200)
async def create_batch(request: Request) -> Response:
    """Create a batch from an uploaded file (purpose `batch`)."""
    gw = gateway_of(request)
    caller = await gw.auth(request, Role.SUBMIT)
    body = convert.decode(await request.body(), BatchRequest)
    if body.endpoint not in ENDPOINTS:
        raise ApiError(400, f"endpoint: {body.endpoint!r} is not one of {list(ENDPOINTS)}",
                       param="endpoint", code="invalid_endpoint")
    window_s = parse_window(body.completion_window)
    meta = await gw.files.get(body.input_file_id, caller)
    if meta["purpose"] != "batch":
        raise ApiError(400, f"input_file_id: {body.input_file_id} has purpose "
                       f"{meta['purpose']!r}, not 'batch'", param="input_file_id")
    await gw.admit(caller.tenant, 1)
    batch_id = new_batch_id()
    now = time.time()
    record = {"id": batch_id, "tenant": caller.tenant, "input_file_id": body.input_file_id,
              "endpoint": body.endpoint, "completion_window": body.completion_window,
              "metadata": json.dumps(body.metadata), "created_at": repr(now)}
    try:
        async with gw.redis.pipeline(transaction=False) as pipe:
            pipe.hset(keys.gateway_batch(batch_id), mapping=record)
            pipe.expire(keys.gateway_batch(batch_id),
                        int(window_s) + gw.settings.result_ttl_s)
            pipe.zadd(keys.tenant_batches(caller.tenant), {batch_id: now})
            await pipe.execute()
    except RedisError as exc:
        raise BrokerError(f"recording batch {batch_id} failed: {exc}") from exc
    gw.spawn(_submit(gw, batch_id, record))
    return json_response(_object(record, None))


async def _submit(gw, batch_id: str, record: dict[str, str]) -> None:
    """The job's validation and submit passes (BatchClient.submit), beside the requests."""
    try:
        await gw.batches.submit(gw.files.path(record["input_file_id"]), batch_id=batch_id,
                                completion_window=record["completion_window"],
                                endpoint=record["endpoint"], input_name=record["input_file_id"],
                                tenant=record["tenant"])
    except InvalidBatchFileError as exc:  # recorded in the job: status failed, with its lines
        log.info("batch %s refused: %s", batch_id, exc, extra={"batch_id": batch_id})
    except (BatchError, BrokerError, OSError) as exc:
        log.error("batch %s: submitting failed: %s", batch_id, exc, extra={"batch_id": batch_id})
        try:
            await gw.redis.hset(keys.gateway_batch(batch_id), "submit_error", str(exc))
        except RedisError:
            pass


async def _status(gw, batch_id: str) -> BatchStatus | None:
    try:
        return await gw.batches.status(batch_id)
    except BatchError:  # the job's record is not written yet: still validating
        return None


def _object(record: dict[str, str], st: BatchStatus | None) -> dict[str, object]:
    """OpenAI's Batch object, from the job's status and the gateway's record."""
    if st is None:
        failed = "submit_error" in record
        created = int(float(record["created_at"]))
        obj: dict[str, object] = {
            "id": record["id"], "object": "batch", "endpoint": record["endpoint"],
            "errors": {"object": "list", "data": [{"code": "submit_failed", "message":
                                                   record["submit_error"], "param": None,
                                                   "line": None}]} if failed else None,
            "input_file_id": record["input_file_id"],
            "completion_window": record["completion_window"],
            "status": "failed" if failed else VALIDATING, "output_file_id": None,
            "error_file_id": None, "created_at": created, "in_progress_at": None,
            "expires_at": None, "finalizing_at": None, "completed_at": None,
            "failed_at": created if failed else None, "expired_at": None,
            "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0}}
    else:
        obj = st.to_openai()
        obj["input_file_id"] = record["input_file_id"]
        obj["output_file_id"] = record.get("output_file_id") or None
        obj["error_file_id"] = record.get("error_file_id") or None
    obj["metadata"] = json.loads(record.get("metadata") or "null")
    return obj


async def _with_files(gw, batch_id: str, record: dict[str, str],
                      st: BatchStatus | None) -> dict[str, str]:
    """Once the job has settled, write its output and error files (once)."""
    if st is None or st.status not in FINAL or "files_written" in record:
        return record
    lock = _writing.setdefault(batch_id, asyncio.Lock())
    try:
        async with lock:
            record = await _record_raw(gw, batch_id)
            if "files_written" in record:
                return record
            ids = await _write_files(gw, batch_id, record)
            key = keys.gateway_batch(batch_id)
            try:
                won = await gw.redis.hsetnx(key, "files_written", "1")
                if won:
                    await gw.redis.hset(key, mapping=ids)
            except RedisError as exc:
                raise BrokerError(f"recording batch {batch_id}'s files failed: {exc}") from exc
            if not won:  # another gateway wrote them first: keep its files, drop ours
                for file_id in ids.values():
                    await gw.files.remove(file_id, record["tenant"])
            return await _record_raw(gw, batch_id)
    finally:
        if not lock.locked():
            _writing.pop(batch_id, None)


async def _record_raw(gw, batch_id: str) -> dict[str, str]:
    raw = await gw.redis.hgetall(keys.gateway_batch(batch_id))
    return {k.decode(): v.decode() for k, v in raw.items()}


async def _write_files(gw, batch_id: str, record: dict[str, str]) -> dict[str, str]:
    store = gw.files
    out_id, err_id = new_file_id(), new_file_id()
    counts = {out_id: 0, err_id: 0}
    sizes = {out_id: 0, err_id: 0}
    with open(store.temp_path(out_id), "wb") as out, open(store.temp_path(err_id), "wb") as err:
        async for ok, line in gw.batches.output_lines(batch_id):
            f, file_id = (out, out_id) if ok else (err, err_id)
            f.write(line + b"\n")
            counts[file_id] += 1
            sizes[file_id] += len(line) + 1
    ids: dict[str, str] = {}
    for file_id, field, name in ((out_id, "output_file_id", "output"),
                                 (err_id, "error_file_id", "errors")):
        if counts[file_id]:
            await store.add(file_id, record["tenant"], f"{batch_id}_{name}.jsonl",
                            "batch_output", sizes[file_id])
            ids[field] = file_id
        else:
            store.temp_path(file_id).unlink(missing_ok=True)
    return ids


@get("/v1/batches/{batch_id:str}", name="batch_get")
async def get_batch(request: Request, batch_id: FromPath[str]) -> Response:
    gw = gateway_of(request)
    caller = await gw.auth(request, Role.READ)
    record = await _record(gw, batch_id, caller)
    st = await _status(gw, batch_id)
    record = await _with_files(gw, batch_id, record, st)
    return json_response(_object(record, st))


@get("/v1/batches", name="batch_list")
async def list_batches(request: Request, limit: FromQuery[int] = 20,
                       after: FromQuery[str | None] = None) -> Response:
    """The caller's tenant's batches, newest first."""
    gw = gateway_of(request)
    caller = await gw.auth(request, Role.READ)
    if not 1 <= limit <= MAX_LIST:
        raise ApiError(400, f"limit: {limit} is outside 1..{MAX_LIST}", param="limit")
    try:
        ids = [i.decode() for i in await gw.redis.zrevrange(keys.tenant_batches(caller.tenant),
                                                            0, -1)]
    except RedisError as exc:
        raise BrokerError(f"listing batches failed: {exc}") from exc
    if after:
        ids = ids[ids.index(after) + 1:] if after in ids else []
    data = []
    for batch_id in ids:
        record = await _record_raw(gw, batch_id)
        if not record:  # expired: drop it from the tenant's list
            await gw.redis.zrem(keys.tenant_batches(caller.tenant), batch_id)
            continue
        st = await _status(gw, batch_id)
        data.append(_object(await _with_files(gw, batch_id, record, st), st))
        if len(data) > limit:
            break
    more = len(data) > limit
    data = data[:limit]
    return json_response({"object": "list", "data": data, "has_more": more,
                          "first_id": data[0]["id"] if data else None,
                          "last_id": data[-1]["id"] if data else None})


@post("/v1/batches/{batch_id:str}/cancel", name="batch_cancel", status_code=200)
async def cancel_batch(request: Request, batch_id: FromPath[str]) -> Response:
    """Queued requests finish as cancelled without running; running ones finish."""
    gw = gateway_of(request)
    caller = await gw.auth(request, Role.SUBMIT)
    record = await _record(gw, batch_id, caller)
    try:
        st = await gw.batches.cancel(batch_id)
    except BatchError:
        raise ApiError(409, f"batch {batch_id} is still being validated; cancel it once it is "
                       "in progress", code="batch_not_ready", param="batch_id") from None
    return json_response(_object(record, st))


ROUTES = [create_batch, get_batch, list_batches, cancel_batch]
