"""`agentfleet dlq list | show | replay | purge`: the dead-letter streams, for SREs.

A dead letter holds the task as it was queued, the reason, the error code, the attempts and
deliveries, and one history line per failed attempt.  Replaying puts the task back in its
model's stream with its attempts reset, and removes its dead-lettered result so that the new
outcome can be written.
"""

from __future__ import annotations

import datetime as dt
import json
import re

import msgspec
import redis.asyncio as aioredis

from agentfleet.schemas import keys
from agentfleet.schemas.errors import DecodeError, UnknownIdError
from agentfleet.schemas.wire import DeadLetter, decode_dead_letter, decode_task, encode


async def entries(redis: aioredis.Redis, model: str, count: int = 100,
                  ids: list[str] | None = None) -> list[tuple[str, DeadLetter]]:
    """The newest `count` dead letters of a model (or those with the given entry ids)."""
    stream = keys.dead_stream(model)
    if ids:
        raw = []
        for entry_id in ids:
            raw += await redis.xrange(stream, entry_id, entry_id)
    else:
        raw = await redis.xrevrange(stream, count=count)
    return [(eid.decode(), decode_dead_letter(fields[b"d"])) for eid, fields in raw]


async def check_ids(redis: aioredis.Redis, model: str, ids: list[str]) -> None:
    """`UnknownIdError` unless every id is a dead letter of `model` (before anything is done)."""
    bad = [i for i in ids if not _ENTRY_ID.fullmatch(i)]
    if bad:
        raise UnknownIdError(f"not dead-letter entry ids: {', '.join(bad)} (they look like "
                             f"1764518400000-0: see `agentfleet dlq list`)")
    async with redis.pipeline(transaction=False) as pipe:
        for entry_id in ids:
            pipe.xrange(keys.dead_stream(model), entry_id, entry_id)
        found = await pipe.execute()
    missing = [i for i, rows in zip(ids, found, strict=True) if not rows]
    if missing:
        raise UnknownIdError(f"no dead letter {', '.join(missing)} for model {model}")


_ENTRY_ID = re.compile(r"\d+-\d+")


def render_list(model: str, rows: list[tuple[str, DeadLetter]]) -> str:
    if not rows:
        return f"no dead letters for {model}"
    lines = [f"{'entry':<17} {'task':<24} {'code':<19} {'tries':>5}  when (UTC)           reason"]
    for eid, d in rows:
        when = dt.datetime.fromtimestamp(d.at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        lines.append(f"{eid:<17} {d.task_id:<24} {d.error_code.value:<19} {d.attempts:>5}  "
                     f"{when}  {d.reason[:80]}")
    return "\n".join(lines)


def render_one(eid: str, d: DeadLetter) -> str:
    shown = msgspec.to_builtins(msgspec.structs.replace(d, payload=b""))
    shown.pop("payload", None)
    try:
        shown["task"] = msgspec.to_builtins(decode_task(d.payload))
    except DecodeError:
        shown["payload_hex"] = d.payload[:256].hex()
    return f"dead letter {eid}\n" + json.dumps(shown, indent=2, default=str)


async def replay(redis: aioredis.Redis, model: str, ids: list[str] | None) -> int:
    """Queue dead letters again (all when `ids` is None); returns how many."""
    rows = await entries(redis, model, count=10_000, ids=ids)
    async with redis.pipeline(transaction=True) as pipe:
        for eid, d in rows:
            tenant, lane = keys.DEFAULT_TENANT, "i"
            try:
                task = decode_task(d.payload)
                payload = encode(msgspec.structs.replace(task, attempt=0))
                tenant, lane = task.tenant, "b" if task.batch_id else "i"
            except DecodeError:
                payload = d.payload  # it will die again, with the same reason
            stream = keys.lane_stream(model, lane, tenant)
            pipe.delete(keys.result_key(model, d.task_id))
            # Into its tenant's lane, queued again: as enqueue.lua would (without quotas:
            # an operator's replay is not the tenant's submit).
            pipe.xgroup_create(stream, keys.GROUP, id="0", mkstream=True)
            pipe.xadd(stream, {"d": payload})
            pipe.zadd(keys.tenant_lanes(model, lane), {tenant: 1})
            pipe.hincrby(keys.queued_counts(model), tenant, 1)
            pipe.xdel(keys.dead_stream(model), eid)
        done = await pipe.execute(raise_on_error=False)
    for reply in done:  # BUSYGROUP only says the stream has its group already
        if isinstance(reply, Exception) and "BUSYGROUP" not in str(reply):
            raise reply
    return len(rows)


async def purge(redis: aioredis.Redis, model: str, ids: list[str] | None) -> int:
    """Delete dead letters (all when `ids` is None); returns how many."""
    stream = keys.dead_stream(model)
    if ids:
        return await redis.xdel(stream, *ids)
    count = await redis.xlen(stream)
    await redis.delete(stream)
    return count
