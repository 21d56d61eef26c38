"""The async client a backend service imports: submit tasks, wait for their results.

    async with Producer.from_url("redis://localhost:6379") as p:
        task_id = await p.submit(model="smollm2-135m", prompt="Hello")
        result = await p.wait(task_id, timeout_s=30)

Every task is checked before anything is written (`ValidationError` names the field and the
limit).  Results come back on this producer's reply streams (one per model), read by one
listener task, so waiting costs no polling; a result that arrived before anybody waited
for it is kept until `wait` asks (up to `max_unclaimed`, then the oldest are dropped and
`wait` falls back to the stored result key).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from agentfleet.producer.affinity import derive_affinity_key
from agentfleet.producer.connection import connect, replicated
from agentfleet.producer.enqueue import CacheItem, Lane, enqueue_args, enqueue_lua
from agentfleet.producer.routing import Router
from agentfleet.producer.tracing import current_traceparent
from agentfleet.schemas import keys, resultcache
from agentfleet.schemas.errors import (
    AgentFleetError,
    BrokerError,
    FatalConfigError,
    QuotaExceededError,
    ResultTimeoutError,
    ServerOutOfMemoryError,
    ValidationError,
)
from agentfleet.schemas.registry import TableCache as ModelTableCache
from agentfleet.schemas.settings import Settings
from agentfleet.schemas.tenants import TableCache, TenantTable, estimate_tokens
from agentfleet.schemas.validate import TaskChecker, validate_task
from agentfleet.schemas.wire import Result, Task, TenantConfig, decode_result, decode_results, encode

log = logging.getLogger("agentfleet.producer")

_POLL_S = 1.0  # how long a wait trusts the reply stream before it also reads result keys


def _broker_error(exc: RedisError, count: int) -> BrokerError:
    text = str(exc)
    if isinstance(exc, ResponseError) and ("OOM" in text or "maxmemory" in text):
        return ServerOutOfMemoryError(
            f"the server is out of memory (maxmemory reached): {count} tasks were not "
            f"queued; drain the queues or raise maxmemory")
    return BrokerError(f"enqueue failed: {text}")


def _retry_after_s(quota: str, now: float) -> float:
    """When a refused submit may succeed: the next minute for a token quota; for queued
    tasks, a second (they end at the fleet's pace, which the producer does not know)."""
    if quota == "tokens_per_minute":
        return 60.0 - now % 60.0 + 0.05
    return 1.0


def _quota_error(lane: Lane, quota: str, limits: TenantConfig,
                 queued_ids: list[str] | None = None) -> QuotaExceededError:
    limit = limits.max_queued if quota == "max_queued" else limits.tokens_per_minute
    return QuotaExceededError(lane.tenant, lane.model, quota, limit,
                              _retry_after_s(quota, time.time()), queued_ids)


def _time_out(waker: asyncio.Future) -> None:
    if not waker.done():
        waker.set_result(False)


class _Waiting:
    """One wait call's state: results ready to hand out, and how many are still due."""

    __slots__ = ("ready", "left", "waker")

    def __init__(self) -> None:
        self.ready: list[Result] = []
        self.left = 0
        self.waker: asyncio.Future | None = None  # set when a result arrives


class Producer:
    def __init__(self, redis: aioredis.Redis, *, settings: Settings | None = None,
                 producer_id: str | None = None, chunk_size: int = 1000,
                 max_unclaimed: int = 1_000_000):
        self.settings = settings or Settings.from_env()
        self.redis = redis
        self.id = producer_id or secrets.token_hex(6)
        self.chunk_size = chunk_size
        self.max_unclaimed = max_unclaimed
        self._id_prefix = self.id + "-"
        self._seq = itertools.count(1)
        self._enqueue = replicated(redis, redis.register_script(enqueue_lua()),
                                   self.settings.wait_replicas, self.settings.wait_timeout_ms)
        self.tenants = TableCache(redis)  # quotas, reloaded when the registry changes
        # Model versions, templates and SLA classes (producer/routing.py): a model without a
        # registry entry takes the plain path below, as before the registry existed.
        self.models = ModelTableCache(redis)
        self.router = Router(redis, self.settings)
        self._listening: set[str] = set(self.settings.models)  # models whose replies we read
        self._reply_ids: dict[str, bytes | str] = {}  # reply stream -> last id read
        self._shadows: set[asyncio.Task] = set()  # shadow copies on their way out
        self._waiters: dict[str, _Waiting] = {}
        self._arrived: dict[str, Result] = {}
        self._listener: asyncio.Task | None = None
        # Listeners cancelled for a new model, awaited by close(): one dropped unawaited
        # leaves its reads pending when the loop closes.
        self._old_listeners: set[asyncio.Task] = set()
        self._last_arrival = 0.0
        self._polling = False
        self._queued: list[tuple[str, tuple, asyncio.Future]] = []  # single submits to write
        self._flusher: asyncio.Task | None = None
        self._served: set[str] = set()  # models whose workers were looked for
        self._checks: set[asyncio.Task] = set()

    @classmethod
    def from_url(cls, url: str | None = None, **kwargs) -> Producer:
        settings = kwargs.pop("settings", None) or Settings.from_env()
        url = url or settings.redis_url
        if not url:
            raise FatalConfigError("no Redis URL: set REDIS_URL or pass url= "
                                   "(`agentfleet server` starts a local one)")
        return cls(connect(url), settings=settings, **kwargs)

    async def __aenter__(self) -> Producer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._flusher is not None:  # single submits still on their way out
            await asyncio.gather(self._flusher, return_exceptions=True)
        for check in self._checks:
            check.cancel()
        await asyncio.gather(*self._checks, return_exceptions=True)
        if self._shadows:
            await asyncio.gather(*self._shadows, return_exceptions=True)
        if self._listener is not None:
            self._listener.cancel()
            self._old_listeners.add(self._listener)
            self._listener = None
        await asyncio.gather(*self._old_listeners, return_exceptions=True)
        await self.redis.aclose()

    # ---- submitting ------------------------------------------------------------------

    async def submit(self, task: Task | None = None, /, *, reply: bool = True, **fields) -> str:
        """Queue one task (a Task, or its fields as keywords); return its id.

        Concurrent calls are coalesced: every task submitted in one pass of the event loop
        (and while the previous write is in flight) goes out in one script call.
        """
        task = task if task is not None else Task(**fields)
        self._fill(task, reply, time.time(), current_traceparent())
        table = self.models.table if self.models.fresh else await self.models.current()
        if table.entries or task.version or task.sla or task.template:
            lane = await self.router.route(task, table)
            shadow = self.router.shadow(task, table)
            if shadow is not None:
                self._send_shadows([shadow])
        else:
            validate_task(task, self.settings)
            lane = self._lane(task)
        tenants = await self.tenants.current()
        if task.model not in self._served:
            self._look_for_workers([task.model])
        if reply:
            self._ensure_listener(task.model)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queued.append((lane, self._item(task, -1, tenants), fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush())
        return await fut

    async def _flush(self) -> None:
        """Write queued single submits, one script call per lane, until none are left."""
        await asyncio.sleep(0)  # let the rest of this loop pass queue theirs
        while self._queued:
            queued, self._queued = self._queued, []
            by_lane: dict[Lane, list] = {}
            for lane, item, fut in queued:
                by_lane.setdefault(lane, []).append((item, fut))
            for lane, entries in by_lane.items():
                try:
                    limits = (await self.tenants.current()).get(lane.tenant)
                    keys_, args = enqueue_args(lane, self.settings.result_ttl_s,
                                               [item for item, _ in entries], quota=limits)
                    out = await self._enqueue(keys=keys_, args=args)
                except (RedisError, BrokerError) as exc:
                    error = (BrokerError(f"enqueue failed: {exc}") if isinstance(exc, BrokerError)
                             else _broker_error(exc, len(entries)))
                    for _, fut in entries:
                        if not fut.done():
                            fut.set_exception(error)
                    continue
                if int(out[0]):  # refused by a quota: nothing of this lane's group went in
                    error = _quota_error(lane, out[1].decode(), limits)
                    for _, fut in entries:
                        if not fut.done():
                            fut.set_exception(error)
                    continue
                accepted = {int(out[j]): out[j + 1].decode() for j in range(2, len(out), 2)}
                for i, (item, fut) in enumerate(entries):
                    if not fut.done():
                        fut.set_result(accepted.get(i, item[0]))

    def _lane(self, task: Task) -> Lane:
        # Tasks of a bulk job go to the model's bulk lane, served after interactive ones;
        # each tenant has its own stream in each lane, and with affinity on, each stream its
        # partitions (docs/affinity.md).
        return Lane(task.model, "b" if task.batch_id else "i", task.tenant,
                    part=keys.affinity_partition(task.affinity_key,
                                                 self.settings.affinity_partitions))

    def _item(self, task: Task, index: int, table: TenantTable
              ) -> tuple[str, str | None, bytes, int, int, CacheItem | None]:
        idem = task.idempotency_key
        limits = self._mark_cacheable(task, table)
        payload = encode(task)
        return (task.id, keys.idempotency_key(task.model, idem) if idem else None,
                payload, index, estimate_tokens(task),
                None if limits is None else self._cache_item(task, limits))

    def _mark_cacheable(self, task: Task, table: TenantTable) -> TenantConfig | None:
        """Mark a task of a tenant that opted in to the result cache with its input's digest
        when the cache may answer it (schemas/resultcache.py), and return the tenant's
        settings; its caller's marks never count."""
        task.cache_digest, task.cache_ttl_s = "", 0
        limits = table.get(task.tenant)
        if not limits.result_cache_ttl_s or resultcache.ineligible(task):
            return None
        spec = self.settings.models.get(task.model)  # a registered model may have none
        task.cache_digest = resultcache.digest(
            task, task.version or (spec.version if spec is not None else ""))
        task.cache_ttl_s = limits.result_cache_ttl_s
        return limits

    def _cache_item(self, task: Task, limits: TenantConfig) -> CacheItem:
        s = self.settings
        m, tenant, digest = task.model, task.tenant, task.cache_digest
        traced = s.trace_enabled and bool(task.parent_id or task.correlation_id != task.id)
        waiter = resultcache.waiter(
            task_id=task.id, stub=resultcache.stub(task), result_key=keys.result_key(m, task.id),
            reply_key=keys.reply_stream(m, task.reply_to) if task.reply_to else "",
            trace_key=keys.trace_key(m, task.correlation_id) if traced else "",
            result_ttl_s=limits.result_ttl_s or s.result_ttl_s,
            trace_ttl_s=limits.trace_ttl_s or s.trace_ttl_s, reply_maxlen=s.reply_maxlen,
            stream=keys.task_stream(m, tenant, task.version),
            lanes_key=keys.tenant_lanes(m, "i", task.version),
            deadline=task.deadline)
        return CacheItem(keys.result_cache(m, tenant, digest),
                         keys.result_cache_inflight(m, tenant, digest), waiter)

    async def submit_many(self, tasks: Iterable[Task], *, reply: bool = True,
                          on_quota: str = "raise") -> list[str]:
        """Check every task, then queue them in chunks of `chunk_size`, one round trip each.

        Tasks are filled in place (id, correlation id, reply stream, enqueue time).  Returns
        their ids; a task whose idempotency key was used before gets the earlier task's id.

        Tenants' quotas: with `on_quota="raise"` a call that would pass one is refused with
        `QuotaExceededError` before anything is queued; with `"wait"` (bulk jobs) the tasks
        that do not fit are held back and queued as the quota frees, never refused.
        """
        if on_quota not in ("raise", "wait"):
            raise ValueError(f"on_quota={on_quota!r}: use 'raise' or 'wait'")
        s = self.settings
        now = time.time()
        by_lane: dict[Lane, list[tuple[str, str | None, bytes, int, int]]] = {}
        ids: list[str] = []
        traceparent = current_traceparent()
        check = TaskChecker(s)  # one per call: nothing mutates the tasks while it runs
        models = await self.models.current()
        routed = bool(models.entries)
        shadows: list[Task] = []
        table = await self.tenants.current()
        for i, task in enumerate(tasks):
            self._fill(task, reply, now, traceparent)
            try:
                if routed or task.version or task.sla or task.template:
                    lane = await self.router.route(task, models)
                    if routed and (shadow := self.router.shadow(task, models)) is not None:
                        shadows.append(shadow)
                else:
                    check(task)
                    lane = self._lane(task)
            except ValidationError as exc:
                if i or not isinstance(tasks, Sequence) or len(tasks) > 1:
                    exc.args = (f"tasks[{i}].{exc.args[0]}",)
                raise
            by_lane.setdefault(lane, []).append(self._item(task, i, table))
            ids.append(task.id)
        if not ids:
            return ids
        if on_quota == "raise":
            await self._check_quotas(by_lane, table)
        if reply:
            for model in {lane.model for lane in by_lane}:
                self._ensure_listener(model)
        self._look_for_workers(list(dict.fromkeys(
            lane.model for lane in by_lane if lane.model not in self._served)))
        if shadows:
            self._send_shadows(shadows)
        queued: list[str] = []  # ids of chunks that went in, for a refusal's report
        calls: list[tuple[asyncio.Future, list]] = []
        try:
            for lane, items in by_lane.items():
                limits = table.get(lane.tenant)
                if limits.max_queued or limits.tokens_per_minute:  # chunk by chunk, checked
                    await self._submit_limited(lane, items, limits, ids, queued, on_quota)
                    continue
                # Overlap: the next chunk is built while Redis runs the previous one.
                for start in range(0, len(items), self.chunk_size):
                    chunk = items[start:start + self.chunk_size]
                    keys_, args = enqueue_args(lane, s.result_ttl_s, chunk, now=now)
                    if len(items) <= self.chunk_size:  # one chunk: nothing to overlap
                        await self._settle(self._enqueue(keys=keys_, args=args), chunk, ids,
                                           lane, limits, queued)
                        continue
                    calls.append((asyncio.ensure_future(self._enqueue(keys=keys_, args=args)),
                                  chunk))
                    await asyncio.sleep(0)
                    if len(calls) >= 2:
                        await self._settle(*calls.pop(0), ids, lane, limits, queued)
                while calls:
                    await self._settle(*calls.pop(0), ids, lane, limits, queued)
        finally:
            for fut, _ in calls:  # after a failure: nothing left unawaited
                fut.cancel()
        return ids

    async def _submit_limited(self, lane: Lane, items: list, limits: TenantConfig,
                              ids: list[str], queued: list[str], on_quota: str) -> None:
        """A quota-limited tenant's tasks, a chunk at a time; with "wait", what does not fit
        waits for the quota (a bulk job is held back, never refused halfway)."""
        wait = on_quota == "wait"
        pending = list(items)
        while pending:
            chunk = pending[:self.chunk_size]
            keys_, args = enqueue_args(lane, self.settings.result_ttl_s, chunk, quota=limits,
                                       partial=wait)
            try:
                out = await self._enqueue(keys=keys_, args=args)
            except RedisError as exc:
                raise _broker_error(exc, len(pending)) from exc
            if int(out[0]):
                if not wait:
                    raise _quota_error(lane, out[1].decode(), limits, queued)
                await asyncio.sleep(_retry_after_s(out[1].decode(), time.time()))
                continue
            taken = int(out[1])
            self._take_dups(out, chunk, ids)
            queued.extend(ids[item[3]] for item in chunk[:taken])
            pending = pending[taken:]

    async def _check_quotas(self, by_lane: dict[Lane, list], table) -> None:
        """Refuse a call that cannot fit its tenants' quotas before anything is queued (the
        enqueue script checks again, atomically, per chunk)."""
        need: dict[tuple[str, str], list[int]] = {}  # (model, tenant) -> [tasks, tokens]
        for lane, items in by_lane.items():
            limits = table.get(lane.tenant)
            if limits.max_queued or limits.tokens_per_minute:
                want = need.setdefault((lane.model, lane.tenant), [0, 0])
                want[0] += len(items)
                want[1] += sum(item[4] for item in items)
        if not need:
            return
        minute = int(time.time() // 60) * 60
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for model, tenant in need:
                    pipe.hget(keys.queued_counts(model), tenant)
                    pipe.hget(keys.tokens_minute(model, minute), tenant)
                got = await pipe.execute()
        except RedisError as exc:
            raise _broker_error(exc, sum(n for n, _ in need.values())) from exc
        for j, ((model, tenant), (tasks, tokens)) in enumerate(need.items()):
            limits = table.get(tenant)
            queued, used = int(got[2 * j] or 0), int(got[2 * j + 1] or 0)
            lane = Lane(model, "i", tenant)
            if limits.max_queued and queued + tasks > limits.max_queued:
                raise _quota_error(lane, "max_queued", limits)
            if limits.tokens_per_minute and used + tokens > limits.tokens_per_minute:
                raise _quota_error(lane, "tokens_per_minute", limits)

    @staticmethod
    def _take_dups(out: list, chunk: list, ids: list[str]) -> None:
        for j in range(2, len(out), 2):
            ids[chunk[int(out[j])][3]] = out[j + 1].decode()

    async def _settle(self, fut: Awaitable, chunk: list, ids: list[str], lane: Lane,
                      limits: TenantConfig, queued: list[str]) -> None:
        try:
            out = await fut
        except RedisError as exc:
            raise _broker_error(exc, len(chunk)) from exc
        if int(out[0]):  # a quota set meanwhile: what went in before is reported
            raise _quota_error(lane, out[1].decode(), limits, queued)
        self._take_dups(out, chunk, ids)
        queued.extend(ids[item[3]] for item in chunk)

    def _look_for_workers(self, models: list[str]) -> None:
        """Warn once per model, beside the enqueue, when no live worker serves it."""
        if models:
            self._served.update(models)
            check = asyncio.get_running_loop().create_task(self._warn_unserved(models))
            self._checks.add(check)
            check.add_done_callback(self._checks.discard)

    async def _warn_unserved(self, models: list[str]) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for model in models:
                    pipe.hvals(keys.workers_key(model))
                beats = await pipe.execute()
        except RedisError:
            return  # the enqueue beside it reports the server's trouble
        now = time.time()
        for model, values in zip(models, beats, strict=True):
            if not keys.live_workers(values, now):
                log.warning("no live worker serves model %s: its tasks wait until one starts "
                            "(agentfleet worker --models %s)", model, model)

    async def cancel(self, task_id: str, model: str) -> None:
        """Cancel a task: if still queued it never runs; if running, the engine aborts it.

        Its result says `cancelled`, unless it finished first.
        """
        try:  # the mark first: a worker that misses the message loads the marks again
            await self.redis.zadd(keys.cancelled_key(model),
                                  {task_id: time.time() + self.settings.cancel_ttl_s})
            await self.redis.publish(keys.cancel_channel(model), task_id)
        except RedisError as exc:
            raise BrokerError(f"cancel of {task_id} failed: {exc}") from exc

    def _fill(self, task: Task, reply: bool, now: float, traceparent: str) -> None:
        if not task.id:
            task.id = self._id_prefix + format(next(self._seq), "x")
        if not task.correlation_id:
            task.correlation_id = task.id
        if reply and not task.reply_to:
            task.reply_to = self.id
        if traceparent and not task.traceparent:
            task.traceparent = traceparent
        if not task.affinity_key and self.settings.affinity_partitions and not task.template:
            # (a template's task gets its key from its rendered prompt: producer/routing.py)
            task.affinity_key = derive_affinity_key(task, self.settings.affinity_prefix_chars)
        task.enqueued_at = now

    # ---- results ---------------------------------------------------------------------

    async def wait(self, task_id: str, timeout_s: float = 60.0) -> Result:
        """The result of one task; `ResultTimeoutError` if it is not there in time."""
        return (await self.wait_many([task_id], timeout_s))[0]

    async def wait_many(self, task_ids: Sequence[str], timeout_s: float = 60.0) -> list[Result]:
        """Results in the order of `task_ids`."""
        got: dict[str, Result] = {}
        async for result in self.as_completed(task_ids, timeout_s):
            got[result.task_id] = result
        return [got[task_id] for task_id in task_ids]

    async def wait_chain(self, task_id: str, timeout_s: float = 60.0) -> list[Result]:
        """The result of a task and of every follow-up it led to, parents first (a fan-out's
        join after its children)."""
        deadline = time.monotonic() + timeout_s
        results: list[Result] = []
        frontier = [task_id]
        while frontier:
            batch = await self.wait_many(frontier, max(deadline - time.monotonic(), 0.0))
            results.extend(batch)
            frontier = [child for r in batch for child in r.followup_ids]
            frontier += [r.join_id for r in batch if r.join_id]
        return results

    async def as_completed(self, task_ids: Iterable[str],
                           timeout_s: float = 60.0) -> AsyncIterator[Result]:
        """Yield results as they arrive; `ResultTimeoutError` names the ones still missing.

        A server restart is ridden out: the listener and the poll retry until the timeout,
        which ends in `BrokerError` only if the server is still unreachable then.
        """
        self._ensure_listener()
        w = _Waiting()
        ids = list(task_ids)
        for task_id in ids:
            result = self._arrived.pop(task_id, None)
            if result is not None:
                w.ready.append(result)
            elif self._waiters.setdefault(task_id, w) is w:
                w.left += 1
        deadline = time.monotonic() + timeout_s
        unreachable = False  # the last poll failed: the server may be restarting
        try:
            while True:
                if w.ready:
                    ready, w.ready = w.ready, []
                    for result in ready:
                        yield result
                    continue
                if not w.left:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [i for i in ids if self._waiters.get(i) is w]
                    if unreachable:  # one last look; BrokerError if the server is still down
                        await self._read_stored(missing[:1000])
                        unreachable = False
                        continue
                    raise ResultTimeoutError(
                        f"{len(missing)} results missing after {timeout_s}s", missing)
                loop = asyncio.get_running_loop()
                w.waker = waker = loop.create_future()
                # A timer on the future itself: wait_for would add a future and callbacks.
                timer = loop.call_later(min(left, _POLL_S), _time_out, waker)
                try:
                    arrived = await waker
                finally:
                    timer.cancel()
                if not arrived:
                    if (time.monotonic() - self._last_arrival >= _POLL_S
                            and not self._polling):  # one poll at a time, for all waiters
                        stalled = [i for i in ids if self._waiters.get(i) is w]
                        try:
                            await self._read_stored(stalled[:1000])
                            unreachable = False
                        except BrokerError as exc:  # retried on the next pass, to the deadline
                            log.debug("producer %s: %s; retrying", self.id, exc)
                            unreachable = True
        finally:
            if w.left:
                for task_id in ids:
                    if self._waiters.get(task_id) is w:
                        del self._waiters[task_id]

    async def get_result(self, task_id: str, model: str | None = None) -> Result | None:
        """The stored result of any task (this producer's or not), or None."""
        found = await self._stored([task_id], [model] if model else self._known_models())
        return found[0] if found else None

    async def get_results(self, task_ids: Sequence[str], model: str | None = None
                          ) -> list[Result]:
        """The stored results of many tasks (those that have one), a pipeline per 10,000."""
        models = [model] if model else list(self.settings.models)
        found: list[Result] = []
        for start in range(0, len(task_ids), 10_000):
            found += await self._stored(list(task_ids[start:start + 10_000]), models)
        return found

    def _known_models(self) -> list[str]:
        """The settings' models, the registry's and any this producer submitted to."""
        return sorted(self._listening | self.settings.models.keys()
                      | self.models.table.entries.keys())

    def _send_shadows(self, shadows: list[Task]) -> None:
        """Queue shadow copies for a canary's comparison (producer/routing.py), beside the
        caller's tasks: their failure is logged, never the caller's."""
        async def send() -> None:
            try:
                await self.submit_many(shadows, reply=False)
            except (AgentFleetError, RedisError) as exc:
                log.warning("producer %s: %d shadow copies not queued (%s)", self.id,
                            len(shadows), exc)

        job = asyncio.get_running_loop().create_task(send())
        self._shadows.add(job)
        job.add_done_callback(self._shadows.discard)

    def _deliver(self, result: Result) -> None:
        w = self._waiters.pop(result.task_id, None)
        if w is not None:
            w.ready.append(result)
            w.left -= 1
            if w.waker is not None and not w.waker.done():
                w.waker.set_result(True)
            return
        arrived = self._arrived
        arrived[result.task_id] = result
        if len(arrived) > self.max_unclaimed:  # drop the oldest; wait() reads the key instead
            del arrived[next(iter(arrived))]

    async def _read_stored(self, task_ids: list[str]) -> None:
        """The reply stream is late (or was trimmed before we read it): read result keys."""
        self._polling = True
        try:
            for result in await self._stored(task_ids, self._known_models()):
                self._deliver(result)
        finally:
            self._polling = False

    async def _stored(self, task_ids: list[str], models: list[str]) -> list[Result]:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for task_id in task_ids:
                    for model in models:
                        pipe.get(keys.result_key(model, task_id))
                values = await pipe.execute()
        except RedisError as exc:
            raise BrokerError(f"reading results failed: {exc}") from exc
        return [decode_result(v) for v in values if v is not None]

    def _ensure_listener(self, model: str | None = None) -> None:
        if model is not None and model not in self._listening:
            # A model the listener does not read yet (registered since it started): read its
            # replies too, at once rather than after the current blocking read.
            self._listening.add(model)
            if self._listener is not None and not self._listener.done():
                self._listener.cancel()  # it resumes nowhere: what it read is read again
                self._old_listeners.add(self._listener)
                self._listener.add_done_callback(self._old_listeners.discard)
                self._listener = None
        if self._listener is None or self._listener.done():
            self._listener = asyncio.get_running_loop().create_task(
                self._listen(), name=f"agentfleet-producer-{self.id}")

    async def _listen(self) -> None:
        """Read this producer's reply streams and hand results to their waiters."""
        streams = self._reply_ids  # kept across restarts: nothing read twice or skipped
        for m in sorted(self._listening | self.settings.models.keys()
                        | self.models.table.entries.keys()):
            streams.setdefault(keys.reply_stream(m, self.id), "0-0")
        unread = {stream: 0 for stream in streams}  # read since the last trim
        trimmed_at = time.monotonic()
        backoff_s = 0.05
        while True:
            try:
                reply = await self.redis.xread(streams, count=1000, block=1000)
                for stream, entries in reply or ():
                    for _, fields in entries:
                        for result in decode_results(fields[b"rs"]):
                            self._deliver(result)
                    name = stream.decode()
                    streams[name] = entries[-1][0]
                    unread[name] += len(entries)
                    self._last_arrival = time.monotonic()
                # Entries read are done with: drop them so the streams stay short, in one
                # round trip per 1000 results or per second, not one per read.
                if sum(unread.values()) >= 1000 or time.monotonic() - trimmed_at > 1.0:
                    await self._trim_replies(streams, unread)
                    trimmed_at = time.monotonic()
                backoff_s = 0.05
            except RedisError as exc:
                log.warning("producer %s: reading replies failed (%s); retrying in %.2fs",
                            self.id, exc, backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)

    async def _trim_replies(self, streams: dict[str, bytes | str], unread: dict[str, int]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream, count in unread.items():
                if count:
                    last = streams[stream]
                    ms, seq = (last.decode() if isinstance(last, bytes) else last).split("-")
                    pipe.xtrim(stream, minid=f"{ms}-{int(seq) + 1}", approximate=False)
                    unread[stream] = 0
            await pipe.execute()
