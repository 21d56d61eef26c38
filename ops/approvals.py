"""Approval gates: a task that needs a person's decision waits, durably, until an admin
approves it (then it is queued) or rejects it (then it gets a result: failed, `rejected`).

The store is per model, in the model's slot (schemas/keys.py):
  approvals_held(m)  a hash: task id -> the msgpack Task, exactly as it would be queued
  approvals_due(m)   a sorted set: task id scored by its deadline (+inf for none)
  approvals_log(m)   an append-only stream of decisions: task_id, tenant, decision
                     (approved | rejected | expired), by, reason, at
So holding a task is two writes any script of that slot can make: the worker's commit
script can hold a follow-up (FollowUp.needs_approval) atomically with its parent's result,
as it now queues one (docs/gateway.md says what that change must do).

Rejecting (or expiring) is one script, atomic: it checks that the task is still held exactly
as read (two admins deciding at once: one wins, the other is told), writes its result and
reply, removes it, and logs the decision.  Approving queues the task through the producer
first (its tenant's lane, quotas and bookkeeping; an idempotency key of its own, so a retry
queues nothing twice), then removes it and logs the decision with the same check; if another
decision won meanwhile, the copy just queued is cancelled (it never runs; the other
decision's result stands), and nothing is lost if the approver dies between the two steps.
A held task whose deadline passes is expired by `expire_overdue` (the gateway runs it every
few seconds; `agentfleet approvals list` too) with a result `expired`, `deadline_exceeded`.
"""

from __future__ import annotations

import logging
import time

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from agentfleet.producer.client import Producer
from agentfleet.schemas import keys
from agentfleet.schemas.errors import AgentFleetError, BrokerError, DecodeError, ErrorCode
from agentfleet.schemas.settings import Settings
from agentfleet.schemas.validate import validate_task
from agentfleet.schemas.wire import Finished, Result, Status, Task, Timings, decode_task, encode

log = logging.getLogger("agentfleet.approvals")
APPROVED, REJECTED, EXPIRED = "approved", "rejected", "expired"
APPROVED_KEY = "approved:"  # the idempotency key of an approved task: this + its id
DEADLINE = "deadline"  # `by` of a decision the deadline took


class NotHeldError(AgentFleetError):
    """Raised by approve/reject for a task that is not (or no longer) waiting for approval."""


class Decision(msgspec.Struct, kw_only=True):
    """One entry of a model's decision log."""

    task_id: str
    tenant: str
    decision: str
    by: str
    reason: str = ""
    at: float = 0.0
    model: str = ""


# Hold a task unless its idempotency key was used before (then answer the earlier task id).
# KEYS: 1 held hash, 2 due set, 3 idempotency key or the held hash again (none: a key of
# the same slot, so that a Redis Cluster sees one slot).  ARGV: 1 task id, 2 payload,
# 3 deadline score, 4 idempotency ttl.
HOLD_LUA = """
if KEYS[3] ~= KEYS[1] then
  local prior = redis.call('SET', KEYS[3], ARGV[1], 'NX', 'GET', 'EX', ARGV[4])
  if prior then return prior end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return false
"""

# Decide on a held task, if it is still held exactly as the caller read it.
# KEYS: 1 held hash, 2 due set, 3 log stream, 4 its result key (the held hash again for an
#       approval, which writes none), 5 reply stream, 6 trace list (either one the held
#       hash again where there is none: one slot on a Redis Cluster).
# ARGV: 1 task id, 2 the payload read, 3 decision, 4 the result, 5 reply entry, 6 trace
#       event, 7 result ttl, 8 trace ttl, then the log's fields.
DECIDE_LUA = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[3] ~= 'approved' then
  redis.call('SET', KEYS[4], ARGV[4], 'NX', 'EX', ARGV[7])
  if KEYS[5] ~= KEYS[1] then
    redis.call('XADD', KEYS[5], '*', 'rs', ARGV[5])
    redis.call('EXPIRE', KEYS[5], ARGV[7])
  end
end
if KEYS[6] ~= KEYS[1] then
  redis.call('RPUSH', KEYS[6], ARGV[6])
  redis.call('EXPIRE', KEYS[6], ARGV[8])
end
redis.call('XADD', KEYS[3], '*', unpack(ARGV, 9))
return 1
"""


async def hold(redis: aioredis.Redis, task: Task, settings: Settings, *,
               reply_to: str = "") -> str:
    """Check `task` and hold it for approval instead of queueing it; return its id (or, for
    an idempotency key used before, the earlier task's id)."""
    now = time.time()
    task.needs_approval = True
    task.correlation_id = task.correlation_id or task.id
    task.reply_to = task.reply_to or reply_to
    task.enqueued_at = now
    validate_task(task, settings)
    held = keys.approvals_held(task.model)
    idem = keys.idempotency_key(task.model, task.idempotency_key) if task.idempotency_key \
        else held
    score = "+inf" if task.deadline is None else repr(task.deadline)
    try:
        prior = await redis.eval(HOLD_LUA, 3, held, keys.approvals_due(task.model), idem, task.id, encode(task),
                                 score, settings.result_ttl_s)
    except RedisError as exc:
        raise BrokerError(f"holding task {task.id} for approval failed: {exc}") from exc
    return prior.decode() if prior else task.id


async def find(redis: aioredis.Redis, settings: Settings, task_id: str) -> Task | None:
    """The held task with this id, on any model, or None."""
    try:
        async with redis.pipeline(transaction=False) as pipe:
            for model in settings.models:
                pipe.hget(keys.approvals_held(model), task_id)
            found = await pipe.execute()
    except RedisError as exc:
        raise BrokerError(f"reading held tasks failed: {exc}") from exc
    return next((decode_task(raw) for raw in found if raw is not None), None)


async def list_held(redis: aioredis.Redis, settings: Settings,
                    tenant: str | None = None) -> list[Task]:
    """Every held task (of one tenant, or all), oldest first."""
    try:
        async with redis.pipeline(transaction=False) as pipe:
            for model in settings.models:
                pipe.hvals(keys.approvals_held(model))
            per_model = await pipe.execute()
    except RedisError as exc:
        raise BrokerError(f"reading held tasks failed: {exc}") from exc
    tasks = [decode_task(raw) for values in per_model for raw in values]
    if tenant is not None:
        tasks = [t for t in tasks if t.tenant == tenant]
    return sorted(tasks, key=lambda t: t.enqueued_at)


async def decisions(redis: aioredis.Redis, settings: Settings,
                    count: int = 100) -> list[Decision]:
    """The newest decisions of every model, newest first."""
    out: list[Decision] = []
    for model in settings.models:
        try:
            entries = await redis.xrevrange(keys.approvals_log(model), count=count)
        except RedisError as exc:
            raise BrokerError(f"reading decisions failed: {exc}") from exc
        for _, fields in entries:
            f = {k.decode(): v.decode() for k, v in fields.items()}
            out.append(Decision(task_id=f["task_id"], tenant=f["tenant"],
                                decision=f["decision"], by=f["by"], reason=f.get("reason", ""),
                                at=float(f["at"]), model=model))
    out.sort(key=lambda d: d.at, reverse=True)
    return out[:count]


async def approve(producer: Producer, settings: Settings, task_id: str, *, by: str,
                  reason: str = "", tenant: str | None = None) -> Task:
    """Queue a held task through `producer`; record who approved it and why.  `tenant`: only
    that tenant's.  A quota that refuses it (QuotaExceededError) leaves it held."""
    redis = producer.redis
    task, raw = await _held(redis, settings, task_id, tenant)
    if task.deadline is not None and task.deadline < time.time():
        await _finish(redis, settings, task, raw, EXPIRED, DEADLINE, "the deadline passed "
                      "before it was approved")
        raise NotHeldError(f"task {task_id}: its deadline passed before the approval; it "
                           "expired")
    # Its own idempotency key: the caller's was claimed when the task was held.
    queued = msgspec.structs.replace(task, needs_approval=False,
                                     idempotency_key=APPROVED_KEY + task.id)
    await producer.submit(queued, reply=False)  # keeps the task's own reply_to
    try:
        await _decide(redis, settings, task, raw, APPROVED, by, reason,
                      keys.approvals_held(task.model), b"")
    except NotHeldError:
        await producer.cancel(task.id, task.model)  # the other decision stands
        raise
    return queued


async def reject(redis: aioredis.Redis, settings: Settings, task_id: str, *, by: str,
                 reason: str = "", tenant: str | None = None) -> Result:
    """Finish a held task with a failed result (`rejected`); record who rejected it and why."""
    task, raw = await _held(redis, settings, task_id, tenant)
    return await _finish(redis, settings, task, raw, REJECTED, by, reason)


async def expire_overdue(redis: aioredis.Redis, settings: Settings) -> int:
    """Expire every held task whose deadline has passed; return how many."""
    now = time.time()
    expired = 0
    for model in settings.models:
        try:
            ids = await redis.zrangebyscore(keys.approvals_due(model), "-inf", now)
        except RedisError as exc:
            raise BrokerError(f"reading approval deadlines failed: {exc}") from exc
        for raw_id in ids:
            raw = await redis.hget(keys.approvals_held(model), raw_id)
            if raw is None:
                await redis.zrem(keys.approvals_due(model), raw_id)
                continue
            try:
                task = decode_task(raw)
            except DecodeError:
                log.error("approvals of %s: held entry %r is not a task; left for an admin",
                          model, raw_id)
                continue
            try:
                await _finish(redis, settings, task, raw, EXPIRED, DEADLINE,
                              "the deadline passed while it waited for approval")
                expired += 1
            except NotHeldError:  # decided meanwhile
                continue
    return expired


async def _held(redis: aioredis.Redis, settings: Settings, task_id: str,
                tenant: str | None) -> tuple[Task, bytes]:
    try:
        async with redis.pipeline(transaction=False) as pipe:
            for model in settings.models:
                pipe.hget(keys.approvals_held(model), task_id)
            found = await pipe.execute()
    except RedisError as exc:
        raise BrokerError(f"reading held tasks failed: {exc}") from exc
    raw = next((r for r in found if r is not None), None)
    if raw is None:
        raise NotHeldError(f"task {task_id!r} is not waiting for approval")
    task = decode_task(raw)
    if tenant is not None and task.tenant != tenant:
        raise NotHeldError(f"task {task_id!r} is not waiting for approval")
    return task, raw


async def _finish(redis: aioredis.Redis, settings: Settings, task: Task, raw: bytes,
                  decision: str, by: str, reason: str) -> Result:
    now = time.time()
    expired = decision == EXPIRED
    result = Result(
        task_id=task.id, correlation_id=task.correlation_id, parent_id=task.parent_id,
        model=task.model, agent_id=task.agent_id, tenant=task.tenant,
        status=Status.EXPIRED if expired else Status.FAILED,
        error_code=ErrorCode.DEADLINE_EXCEEDED if expired else ErrorCode.REJECTED,
        error_message=(reason if expired else f"rejected by {by}" + (f": {reason}" if reason
                                                                      else "")),
        timings=Timings(enqueued=task.enqueued_at, finished=now, written=now),
        attempts=0)
    await _decide(redis, settings, task, raw, decision, by, reason,
                  keys.result_key(task.model, task.id), encode(result), result)
    return result


async def _decide(redis: aioredis.Redis, settings: Settings, task: Task, raw: bytes,
                  decision: str, by: str, reason: str, target: str, value: bytes,
                  result: Result | None = None) -> None:
    model = task.model
    held = keys.approvals_held(model)
    reply = keys.reply_stream(model, task.reply_to) if result is not None and task.reply_to \
        else held
    chained = bool(task.parent_id or task.followups or task.correlation_id != task.id)
    trace = keys.trace_key(model, task.correlation_id) if result is not None and chained \
        and settings.trace_enabled else held
    event = encode(Finished(result=result)) if trace != held else b""
    log = ["task_id", task.id, "tenant", task.tenant, "decision", decision, "by", by,
           "reason", reason, "at", repr(time.time())]
    try:
        done = await redis.eval(
            DECIDE_LUA, 6, held, keys.approvals_due(model),
            keys.approvals_log(model), target, reply, trace,
            task.id, raw, decision, value, encode([result]) if result is not None else b"",
            event, settings.result_ttl_s, settings.trace_ttl_s, *log)
    except RedisError as exc:
        raise BrokerError(f"recording the decision on {task.id} failed: {exc}") from exc
    if not done:
        raise NotHeldError(f"task {task.id!r} was decided by someone else meanwhile")
