"""The mover: follow-ups for other models, from this model's outbox to their own streams.

A commit writes everything in its model's hash slot (one node of a Redis Cluster, one atomic
script); a follow-up for another model lives in another slot, so commit.lua puts it in the
model's outbox (`keys.outbox_stream`), atomically with its parent's result.  Each worker
serving the model runs this loop, a consumer of the outbox's group (`keys.MOVER_GROUP`):

  read      XREADGROUP a page of entries (and, every `claim_idle_ms / 4`, XAUTOCLAIM those
            idle longer than `claim_idle_ms`: a mover that died, or a move that failed)
  move      per target stream, one call of enqueue.lua on the target's slot, with each
            follow-up's id as its idempotency key (`keys.moved_key`): a second move of the
            same follow-up (a redelivered entry, or the parent run again after a lost
            commit) adds nothing
  settle    XACK + XDEL of the entries and the `moved` counter, one transaction on the
            outbox's slot; with `wait_replicas`, only once the target's replicas have the
            move (otherwise the entries stay pending and are moved again later)

A child of a fan-out whose join is kept on another model (its parent's) leaves its place in
the outbox too (an entry with `j`, the join's state): the mover fills it with one call of
join.lua per join slot, which enqueues the join step when the last place is filled, once,
or puts it into that slot's outbox when the step is for a third model (moved from there by
that model's movers).  A second fill of the same place adds nothing.

Nothing is lost (an entry leaves the outbox only after its move) and nothing is doubled (the
move is idempotent).  On a drain the loop ends once the runner's commits are done and the
outbox holds nothing more for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from redis.exceptions import ResponseError

from agentfleet.producer.connection import replicated
from agentfleet.producer.enqueue import Lane, enqueue_args, enqueue_lua
from agentfleet.schemas import keys
from agentfleet.schemas.errors import AgentFleetError, NotReplicatedError
from agentfleet.schemas.wire import decode_task
from agentfleet.schemas.scripts import lua
from agentfleet.workers.transient import TRANSIENT, with_retries

if TYPE_CHECKING:
    from agentfleet.workers.runner import ModelRunner

log = logging.getLogger("agentfleet.worker")

MOVE_BATCH = 200  # most outbox entries one pass moves


class Mover:
    """Moves one model's outbox for its runner."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.outbox = keys.outbox_stream(runner.model)
        s = runner.settings
        self._enqueue = replicated(runner.redis, runner.redis.register_script(enqueue_lua()),
                                   s.wait_replicas, s.wait_timeout_ms)
        self._join = replicated(runner.redis, runner.redis.register_script(join_lua()),
                                s.wait_replicas, s.wait_timeout_ms)
        self._claim_at = 0.0  # monotonic time of the next XAUTOCLAIM
        self._again = 0  # entries of the last `move` whose follow-up was moved before

    async def move_loop(self, block_ms: int | None = None) -> None:
        r = self.runner
        block_ms = block_ms or r.settings.block_ms
        await with_retries(self._ensure_group, f"creating the outbox group of {r.model}")
        backoff_s = 0.05
        while True:
            finishing = r.stopping and not r.busy and not r.outbox.items
            try:
                moved = await self.move_once(0 if finishing else block_ms)
            except TRANSIENT as exc:  # first: READONLY and NOREPLICAS are ResponseErrors too
                log.warning("model %s: moving follow-ups failed (%s); retrying in %.2fs",
                            r.model, exc, backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
                continue
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self._ensure_group()  # the outbox was deleted (by hand): make it again
                continue
            backoff_s = 0.05
            if finishing and not moved:
                return

    async def move_once(self, block_ms: int = 0) -> int:
        """One pass: read (and reclaim) a page, move it, settle it; how many moved."""
        r = self.runner
        entries = await self._claim_idle()
        if not entries:
            got = await r.redis.xreadgroup(keys.MOVER_GROUP, r.worker_id, {self.outbox: ">"},
                                           count=MOVE_BATCH, block=block_ms or None)
            entries = got[0][1] if got else []
        done = await self.move(entries)
        if done:
            await self.settle(done)
        return len(done)

    async def move(self, entries: list) -> list[bytes]:
        """Move outbox entries (id, fields) to their streams, one enqueue.lua call per
        target stream; the ids of those moved (and, with wait_replicas, replicated)."""
        r = self.runner
        by_lane: dict[Lane, list[tuple]] = {}
        by_join: dict[str, list[tuple]] = {}  # join slot's hash tag -> (entry id, fields)
        for entry_id, fields in entries:
            if b"j" in fields:  # a child's place in a join kept on another model
                by_join.setdefault(keys.hash_tag(fields[b"j"].decode()), []).append(
                    (entry_id, fields))
                continue
            try:
                lane, item = self._item(entry_id, fields)
            except AgentFleetError as exc:  # e.g. written by a newer worker: left for one
                log.error("model %s: outbox entry %s cannot be moved here (%s); it stays "
                          "pending for another mover", r.model, entry_id, exc)
                continue
            by_lane.setdefault(lane, []).append(item)
        done: list[bytes] = []
        again = 0
        for lane, items in by_lane.items():
            keys_, args = enqueue_args(lane, r.settings.result_ttl_s,
                                       [(task_id, mark, payload, 0, 0, None)
                                        for _, task_id, mark, payload in items])
            try:
                reply = await self._enqueue(keys=keys_, args=args)
            except NotReplicatedError as exc:  # moved, but not yet safe: settle it later
                r.stats.unreplicated += 1
                log.warning("model %s: %d follow-ups for %s moved but %s; they stay in the "
                            "outbox and are moved again (a no-op) after claim_idle_ms",
                            r.model, len(items), lane.model, exc)
                continue
            done += [entry_id for entry_id, *_ in items]
            # {0, taken, then index and prior id of each one moved before}
            again += (len(reply) - 2) // 2
        self._again = again
        for tag, items in by_join.items():
            try:
                keys_, args = join_args(tag, items)
                await self._join(keys=keys_, args=args)
            except NotReplicatedError as exc:  # filled, but not yet safe: settle it later
                r.stats.unreplicated += 1
                log.warning("model %s: %d places in joins of %s filled but %s; they stay in "
                            "the outbox and are filled again (a no-op) after claim_idle_ms",
                            r.model, len(items), tag, exc)
                continue
            done += [entry_id for entry_id, _ in items]
        return done

    async def settle(self, done: list[bytes]) -> None:
        """Moved entries leave the outbox: XACK, XDEL and the counts (`moved`: entries;
        `moved_again`: those whose follow-up was there already, added nothing), one
        transaction."""
        r = self.runner
        async with r.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.outbox, keys.MOVER_GROUP, *done)
            pipe.xdel(self.outbox, *done)
            pipe.hincrby(keys.stats_key(r.model), "moved", len(done))
            if self._again:
                pipe.hincrby(keys.stats_key(r.model), "moved_again", self._again)
            await pipe.execute()
        r.stats.moved += len(done)

    def _item(self, entry_id: bytes, fields: dict) -> tuple[Lane, tuple]:
        """Where an entry goes (its lane) and what enqueue.lua needs of it."""
        payload = fields[b"d"]
        stream, tenant = fields[b"s"].decode(), fields[b"t"].decode()
        task = decode_task(payload)
        model, version = task.model, task.version  # a registered version's own streams
        # its affinity partition (docs/affinity.md), as the commit named it
        part = keys.affinity_partition(task.affinity_key,
                                       self.runner.settings.affinity_partitions)
        bulk = stream == keys.bulk_stream(model, tenant, version, part)
        lane = Lane(model, "b" if bulk else "i", tenant, version, part)
        if lane.stream != stream or \
                fields[b"l"].decode() != keys.tenant_lanes(model, lane.lane, version):
            raise AgentFleetError(f"stream {stream!r} is not task {task.id}'s ({lane.stream!r})")
        return lane, (entry_id, task.id, keys.moved_key(model, task.id), payload)

    async def _claim_idle(self) -> list:
        """Entries idle past claim_idle_ms (a dead mover's, or a move that failed), at most
        every claim_idle_ms / 4."""
        r = self.runner
        now = time.monotonic()
        if now < self._claim_at:
            return []
        self._claim_at = now + r.settings.claim_idle_ms / 4000
        got = await r.redis.xautoclaim(self.outbox, keys.MOVER_GROUP, r.worker_id,
                                       r.settings.claim_idle_ms, "0-0", count=MOVE_BATCH)
        return [(entry_id, fields) for entry_id, fields in got[1] if fields]

    async def _ensure_group(self) -> None:
        try:
            await self.runner.redis.xgroup_create(self.outbox, keys.MOVER_GROUP, id="0",
                                                  mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise


def join_lua() -> str:
    """join.lua: children's places in joins of another slot (contract atop the file)."""
    return lua("agentfleet.workers", "join")


def join_args(tag: str, entries: list) -> tuple[list[str], list]:
    """join.lua's keys and arguments for outbox entries (id, fields) of joins kept in the
    slot of `tag` (a model): `keys=..., args=...` of one call."""
    keys_ = [keys.stats_key(tag), keys.outbox_stream(tag)]
    args: list = [keys.GROUP]
    for _, f in entries:
        state, stream, trace = f[b"j"], f[b"s"], f[b"k"]
        here = keys.hash_tag(stream.decode()) == tag
        keys_ += (state, trace if trace and f[b"e"] else state)
        args += (b"h" if here else b"o", f[b"m"], f[b"r"], f[b"t"], f[b"e"], f[b"x"])
        if here:
            keys_ += (stream, f[b"l"], f[b"q"])
        else:
            args += (stream, f[b"l"], f[b"q"])
    return keys_, args
