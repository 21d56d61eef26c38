"""`agentfleet purge --tenant T`: erase one tenant's data, and record that it was done.

What goes: its results (and their entries in reply streams and bulk-job outputs), traces,
dead letters, tasks held for approval, pending webhooks, partial output, idempotency keys,
the files the gateway stored for it (records and bytes) and its bulk jobs' records.  Its
tasks still queued are cancelled (they never run; their result says `cancelled`, with no
text; their stream entries, which hold the prompt, go when the worker trims them).
Entries of its finished tasks not yet trimmed are deleted now.  Per-minute KPI aggregates
stay: they hold counts, never text.

Every purge is appended to `keys.purge_log()` (who, when, which tenant, how much), an
append-only stream that only the admin user may write (ops/acl.py).  A purge is safe to run
again: what is already gone is not counted twice.  Reading every result key costs one SCAN
and one GET per key, in pages of 1000: minutes for tens of millions of keys.
"""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from agentfleet.ops.gateway.webhooks import decode_record
from agentfleet.schemas import keys
from agentfleet.schemas.errors import AgentFleetError, BrokerError, DecodeError
from agentfleet.schemas.settings import Settings
from agentfleet.schemas.wire import (
    Finished,
    decode_dead_letter,
    decode_event,
    decode_result,
    decode_results,
    decode_task,
    encode,
)

PAGE = 1000


class PurgeReport(msgspec.Struct, kw_only=True):
    tenant: str
    by: str
    at: float = 0.0
    results: int = 0
    reply_entries: int = 0
    batch_results: int = 0
    traces: int = 0
    dead_letters: int = 0
    held: int = 0
    webhooks: int = 0
    partial: int = 0
    idempotency_keys: int = 0
    files: int = 0
    batches: int = 0
    task_entries: int = 0  # done tasks' entries not yet trimmed from the streams
    queued_cancelled: int = 0  # not finished yet: cancelled (their entries go when trimmed)


async def purge_tenant(redis: aioredis.Redis, settings: Settings, tenant: str, *,
                       by: str) -> PurgeReport:
    """Erase `tenant`'s data (see the module's doc) and append the report to the purge log."""
    if not keys.valid_tenant_name(tenant):
        raise AgentFleetError(f"--tenant {tenant!r} is not a tenant name")
    report = PurgeReport(tenant=tenant, by=by, at=time.time())
    try:
        for model in settings.models:
            await _model(redis, settings, model, tenant, report)
        await _gateway_records(redis, settings, tenant, report)
        await redis.xadd(keys.purge_log(), {"tenant": tenant, "by": by, "at": repr(report.at),
                                            "report": msgspec.json.encode(report)})
    except RedisError as exc:
        raise BrokerError(f"purging tenant {tenant} failed part way ({exc}); run it again")\
            from exc
    return report


async def purge_log(redis: aioredis.Redis, count: int = 100) -> list[PurgeReport]:
    """The newest purges first."""
    entries = await redis.xrevrange(keys.purge_log(), count=count)
    return [msgspec.json.decode(fields[b"report"], type=PurgeReport) for _, fields in entries]


def _mine(tenant: str, name: bytes | str) -> bool:
    text = name.decode() if isinstance(name, bytes) else name
    return text.startswith(tenant + ":")


async def _scan(redis: aioredis.Redis, pattern: str):
    async for key in redis.scan_iter(match=pattern, count=PAGE):
        yield key


async def _model(redis: aioredis.Redis, settings: Settings, model: str, tenant: str,
                 report: PurgeReport) -> None:
    # results: every result key is read (a task submitted straight to Redis may carry the
    # tenant without the tenant's id prefix)
    page: list[bytes] = []
    async for key in _scan(redis, keys.result_prefix(model) + "*"):
        page.append(key)
        if len(page) >= PAGE:
            report.results += await _drop_results(redis, page, tenant)
            page = []
    report.results += await _drop_results(redis, page, tenant)
    async for key in _scan(redis, keys.reply_stream(model, "*")):
        report.reply_entries += await _filter_replies(redis, key, tenant)
    async for key in _scan(redis, keys.batch_output(model, "*")):
        report.batch_results += await _filter_stream(
            redis, key, lambda f: decode_result(f[b"r"]).tenant == tenant)
    async for key in _scan(redis, keys.trace_key(model, "*")):
        corr = key.decode()[len(keys.trace_key(model, "")):]
        events = [decode_event(raw) for raw in await redis.lrange(key, 0, -1)]
        if _mine(tenant, corr) or any(isinstance(e, Finished) and e.result.tenant == tenant
                                      for e in events):
            report.traces += await redis.unlink(key)
    report.dead_letters += await _filter_stream(
        redis, keys.dead_stream(model), lambda f: _dead_tenant(f[b"d"]) == tenant)
    held = await redis.hgetall(keys.approvals_held(model))
    for task_id, raw in held.items():
        if decode_task(raw).tenant == tenant:
            async with redis.pipeline(transaction=True) as pipe:
                pipe.hdel(keys.approvals_held(model), task_id)
                pipe.zrem(keys.approvals_due(model), task_id)
                removed, _ = await pipe.execute()
            report.held += removed
    async for key in _scan(redis, keys.partial_stream(model, tenant + ":*")):
        report.partial += await redis.unlink(key)
    async for key in _scan(redis, keys.idempotency_key(model, tenant + ":*")):
        report.idempotency_keys += await redis.unlink(key)
    until = time.time() + settings.cancel_ttl_s
    for stream in (keys.task_stream(model, tenant), keys.bulk_stream(model, tenant)):
        queued, done = await _stream_tasks(redis, stream, tenant)
        for start in range(0, len(done), PAGE):
            report.task_entries += await redis.xdel(stream, *done[start:start + PAGE])
        if queued:
            async with redis.pipeline(transaction=False) as pipe:
                pipe.zadd(keys.cancelled_key(model), {task_id: until for task_id in queued})
                for task_id in queued:
                    pipe.publish(keys.cancel_channel(model), task_id)
                await pipe.execute()
            report.queued_cancelled += len(queued)


async def _drop_results(redis: aioredis.Redis, page: list[bytes], tenant: str) -> int:
    if not page:
        return 0
    values = await redis.mget(page)
    doomed = [key for key, raw in zip(page, values) if raw is not None
              and decode_result(raw).tenant == tenant]
    return await redis.unlink(*doomed) if doomed else 0


async def _filter_replies(redis: aioredis.Redis, stream: bytes, tenant: str) -> int:
    """Drop the tenant's results from a reply stream's entries (an entry holds a commit's
    results for one producer, of any tenant: the others are written back in a new entry)."""
    dropped = 0
    async for entry_id, fields in _entries(redis, stream):
        results = decode_results(fields[b"rs"])
        keep = [r for r in results if r.tenant != tenant]
        if len(keep) == len(results):
            continue
        async with redis.pipeline(transaction=True) as pipe:
            pipe.xdel(stream, entry_id)
            if keep:
                pipe.xadd(stream, {"rs": encode(keep)})
            await pipe.execute()
        dropped += len(results) - len(keep)
    return dropped


async def _filter_stream(redis: aioredis.Redis, stream: bytes | str, doomed) -> int:
    ids = [entry_id async for entry_id, fields in _entries(redis, stream) if doomed(fields)]
    removed = 0
    for start in range(0, len(ids), PAGE):
        removed += await redis.xdel(stream, *ids[start:start + PAGE])
    return removed


async def _entries(redis: aioredis.Redis, stream: bytes | str):
    start = "-"
    while True:
        page = await redis.xrange(stream, min=start, max="+", count=PAGE)
        for entry in page:
            yield entry
        if len(page) < PAGE:
            return
        start = "(" + page[-1][0].decode()


def _dead_tenant(raw: bytes) -> str | None:
    try:
        return decode_task(decode_dead_letter(raw).payload).tenant
    except (DecodeError, msgspec.DecodeError):
        return None


async def _stream_tasks(redis: aioredis.Redis, stream: str,
                        tenant: str) -> tuple[list[str], list[bytes]]:
    """The tenant's tasks in a stream: ids of those not finished (undelivered, or pending on
    a worker: they get cancelled) and entry ids of those done (acknowledged, not yet trimmed:
    deleted now; deleting a pending entry would make it look lost)."""
    try:
        groups = await redis.xinfo_groups(stream)
    except RedisError:  # no stream, or no group yet: nothing was delivered
        groups = []
    group = next((g for g in groups if g["name"] in (keys.GROUP, keys.GROUP.encode())), None)
    last = group["last-delivered-id"] if group else b"0-0"
    last_key = id_key(last if isinstance(last, bytes) else last.encode())
    pending = set()
    if group and group["pending"]:
        pending = {p["message_id"] for p in await redis.xpending_range(
            stream, keys.GROUP, min="-", max="+", count=group["pending"])}
    unfinished: list[str] = []
    done: list[bytes] = []
    async for entry_id, fields in _entries(redis, stream):
        try:
            task = decode_task(fields[b"d"])
        except (DecodeError, KeyError):
            continue
        if task.tenant != tenant:
            continue
        if id_key(entry_id) > last_key or entry_id in pending:
            unfinished.append(task.id)
        else:
            done.append(entry_id)
    return unfinished, done


def id_key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq)


async def _gateway_records(redis: aioredis.Redis, settings: Settings, tenant: str,
                           report: PurgeReport) -> None:
    files_dir = Path(settings.gateway_files_dir or settings.home_path / "files")
    for file_id in [f.decode() for f in await redis.zrange(keys.tenant_files(tenant), 0, -1)]:
        (files_dir / file_id).unlink(missing_ok=True)
        report.files += await redis.unlink(keys.file_meta(file_id))
    await redis.unlink(keys.tenant_files(tenant))
    for batch_id in [b.decode() for b in await redis.zrange(keys.tenant_batches(tenant), 0, -1)]:
        meta = await redis.hgetall(keys.batch_meta(batch_id))
        models = [m for m in meta.get(b"models", b"").decode().split(",") if m]
        doomed = [keys.batch_meta(batch_id), keys.gateway_batch(batch_id)]
        doomed += [keys.batch_output(m, batch_id) for m in models]
        doomed += [keys.batch_counts(m, batch_id) for m in models]
        await redis.unlink(*doomed)
        await redis.zrem(keys.batch_index(), batch_id)
        report.batches += 1
    await redis.unlink(keys.tenant_batches(tenant))
    for task_id, raw in (await redis.hgetall(keys.webhooks())).items():
        if decode_record(raw).tenant == tenant:
            report.webhooks += await redis.hdel(keys.webhooks(), task_id)
