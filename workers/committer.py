"""The write side of a model runner: commit what finished, one script call per group.

The commit loop takes every completion gathered since its last write, turns each into its
CommitRecord (workers/outcomes.py) and writes them with one call of commit.lua: results,
follow-ups, retries, dead letters, traces and the XACK, atomically.  Up to two commits are in
flight, so that building the next group overlaps the server running the previous one.  A
write that fails is retried until it lands: its tasks stay pending meanwhile, and a crash
leaves them to be redelivered, never lost.  With `wait_replicas`, each commit is followed by
WAIT on its connection; one the replicas did not confirm in time is logged and counted
(`unreplicated`), not redone: it stands on the primary.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from agentfleet.producer.connection import replicated
from agentfleet.schemas.errors import NotReplicatedError
from agentfleet.schemas.wire import Status
from agentfleet.workers.inflight import InFlight
from agentfleet.workers.scripts import CommitHead, CommitRecord, commit_args, commit_lua
from agentfleet.workers.transient import TRANSIENT

if TYPE_CHECKING:
    from agentfleet.workers.runner import ModelRunner

log = logging.getLogger("agentfleet.worker")


class Committer:
    """Commits one model runner's finished tasks."""

    def __init__(self, runner: ModelRunner, head: CommitHead):
        self.runner = runner
        self.head = head
        s = runner.settings
        self._commit = replicated(runner.redis, runner.redis.register_script(commit_lua()),
                                  s.wait_replicas, s.wait_timeout_ms)

    async def commit_loop(self, max_writes: int = 2) -> None:
        """Commit what finished until the runner stops reading and nothing is left."""
        r = self.runner
        outbox = r.outbox
        writes: set[asyncio.Task] = set()
        while True:
            if not outbox.items:
                if r.stopping and not r.inflight and not r.reading:
                    if writes:
                        await asyncio.wait(writes)
                    if not outbox.items:
                        return
                    continue
                outbox.ready.clear()
                await outbox.ready.wait()
                continue
            if len(writes) >= max_writes:
                await asyncio.wait(writes, return_when=asyncio.FIRST_COMPLETED)
                continue  # more finished meanwhile: a bigger group
            done = outbox.take()
            now = time.time()
            records = [r.outcomes.record(rec, now, random.random()) for rec in done]
            if r.settings.crash_at == "before_commit":
                os._exit(137)  # fault suite: the engine ran, the results were never written
            # A task of its own: a cancelled worker still finishes the write it started.
            write = asyncio.ensure_future(self._commit_group(done, records))
            writes.add(write)
            write.add_done_callback(writes.discard)
            await asyncio.sleep(0)  # let it go out before the next group is built

    async def _commit_group(self, done: list[InFlight], records: list[CommitRecord]) -> None:
        r = self.runner
        await self._write(records)
        r.metrics.observe_commit(done, records)
        if r.settings.crash_at == "after_commit":
            os._exit(137)  # fault suite: written and acknowledged, then gone
        r.slots.release(len(done), sum(rec.bulk for rec in done), done)
        r.slot_free.set()
        if any(rec.deliveries > 2 for rec in done):
            r.suspect_done.set()

    async def _write(self, records: list[CommitRecord]) -> None:
        r = self.runner
        keys_, args = commit_args(self.head, records)
        backoff_s = 0.05
        while True:
            try:
                written, dups, fenced, retried, dead = await self._commit(keys=keys_, args=args)
                break
            except NotReplicatedError as exc:  # committed on the primary: nothing to redo
                written, dups, fenced, retried, dead = exc.reply
                r.stats.unreplicated += 1
                log.warning("model %s: commit of %d %s", r.model, len(records), exc)
                break
            except TRANSIENT as exc:
                log.warning("model %s: commit of %d failed (%s); retrying in %.2fs",
                            r.model, len(records), exc, backoff_s)
            except RedisError as exc:  # e.g. OOM: keep the results, retry rather than lose
                log.error("model %s: commit of %d refused (%s); retrying in %.2fs",
                          r.model, len(records), exc, backoff_s)
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 5.0)
        stats = r.stats
        stats.committed += written
        stats.duplicates += dups
        stats.fenced += fenced
        stats.retried += retried
        stats.dead_lettered += dead
        stats.failed += sum(1 for rec in records
                            if rec.status is not None and rec.status is not Status.SUCCEEDED)
        stats.commits += 1
        if fenced:
            log.warning("model %s: %d results dropped: their tasks were reclaimed by another "
                        "worker while this one stalled", r.model, fenced)
