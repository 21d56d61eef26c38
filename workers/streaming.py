"""Partial output of streaming tasks (`Task.stream`), for the gateway to send as it is made.

Engines call `delta` for every piece of text they produce for a streaming task and `final`
when it ends; other tasks never reach this module, so they cost nothing more.  Calls are
coalesced: everything published during one pass of the event loop goes out in one pipeline
(one entry per task, its deltas joined), and while a pipeline is in flight the next pass's
deltas wait for it, so a busy engine costs one round trip per pass, not one per token.

Each task's stream (`keys.partial_stream`, in its model's slot, expiring after
`stream_ttl_s`) holds entries `d` (text), `n` (output tokens so far), `t` (epoch seconds the
first of the joined deltas was produced), and a last entry `f` (finish reason) and `n`.
Publishing is best effort: a failed write is logged, and the result still carries the whole
text (the gateway sends what the entries missed).
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from agentfleet.schemas import keys
from agentfleet.schemas.wire import Task

log = logging.getLogger("agentfleet.worker.streaming")


class PartialPublisher:
    def __init__(self, redis: aioredis.Redis, ttl_s: int):
        self.redis = redis
        self.ttl_s = ttl_s
        # key -> [text, tokens, produced at, finish reason or None]
        self._pending: dict[str, list] = {}
        self._scheduled = False
        self._writing: asyncio.Task | None = None
        self.published = 0  # entries written (tests, metrics)

    def delta(self, task: Task, text: str, tokens: int, at: float | None = None) -> None:
        """`text` continues the task's output; `tokens` output tokens so far."""
        key = keys.partial_stream(task.model, task.id)
        entry = self._pending.get(key)
        if entry is None or entry[3] is not None:
            self._pending[key] = [text, tokens, at or time.time(), None]
        else:
            entry[0] += text
            entry[1] = tokens
        self._schedule()

    def final(self, task: Task, finish_reason: str, tokens: int) -> None:
        """The task's output ended (`finish_reason`: stop, length, abort, error)."""
        key = keys.partial_stream(task.model, task.id)
        entry = self._pending.get(key)
        if entry is None:
            self._pending[key] = ["", tokens, 0.0, finish_reason or "stop"]
        else:
            entry[3] = finish_reason or "stop"
        self._schedule()

    def _schedule(self) -> None:
        if self._scheduled or (self._writing is not None and not self._writing.done()):
            return  # the next pass, or the write in flight when it ends, takes it
        self._scheduled = True
        asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        self._writing = asyncio.get_running_loop().create_task(self._write(batch))

    async def _write(self, batch: dict[str, list]) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key, (text, tokens, at, finish) in batch.items():
                    if text:
                        pipe.xadd(key, {"d": text, "n": tokens, "t": repr(at)})
                    if finish is not None:
                        pipe.xadd(key, {"f": finish, "n": tokens})
                    pipe.expire(key, self.ttl_s)
                await pipe.execute()
            self.published += len(batch)
        except RedisError as exc:
            log.warning("publishing partial output of %d streaming tasks failed (%s)",
                        len(batch), exc)
        except Exception:  # a bug here must not pass unseen; the results still carry the text
            log.exception("publishing partial output of %d streaming tasks failed", len(batch))
        finally:
            self._writing = None
            if self._pending:
                self._schedule()

    async def close(self) -> None:
        """Wait for what is in flight or pending (a draining worker)."""
        while self._writing is not None or self._pending:
            if self._writing is not None:
                await asyncio.gather(self._writing, return_exceptions=True)
            elif self._pending:
                self._flush()


def attach(worker) -> PartialPublisher:
    """Give every engine of `worker` that can stream (has a `partials` attribute) one shared
    publisher on the worker's Redis client."""
    publisher = PartialPublisher(worker.redis, worker.settings.stream_ttl_s)
    for runner in worker.runners:
        if hasattr(runner.engine, "partials"):
            runner.engine.partials = publisher
    return publisher
