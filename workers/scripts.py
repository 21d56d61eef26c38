"""The worker's scripts (workers/lua/*.lua) and the arguments they take.

`commit.lua` applies a group of finished tasks in one atomic call; its KEYS/ARGV contract is
at the top of the file, and `commit_args` is the only code that builds it (tested without a
server in tests/test_scripts.py).  Follow-ups for other models go through the model's
outbox (`CommitHead.outbox_key`), which workers/mover.py empties.  `reclaim.lua`,
`renew.lua`, `promote.lua` and `deactivate.lua` are the housekeeping steps
(workers/housekeeping.py, workers/streams.py); `move.lua` hands a version's queued tasks to
another (ops/canary.py: rollbacks, retirement).
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter

import msgspec

from agentfleet.schemas import keys
from agentfleet.schemas.keys import GROUP
from agentfleet.schemas.errors import ErrorCode
from agentfleet.schemas.scripts import lua
from agentfleet.schemas.wire import Status

_PACKAGE = "agentfleet.workers"


def commit_lua() -> str:
    return lua(_PACKAGE, "commit", prelude="resultcache")


def reclaim_lua() -> str:
    return lua(_PACKAGE, "reclaim")


def renew_lua() -> str:
    return lua(_PACKAGE, "renew")


def promote_lua() -> str:
    return lua(_PACKAGE, "promote")


def deactivate_lua() -> str:
    return lua(_PACKAGE, "deactivate")


def move_lua() -> str:
    return lua(_PACKAGE, "move")


def move_args(*, source: str, target: str, target_lanes: str, source_lanes: str,
              stats_key: str, consumer: str, count: int, min_idle_ms: int,
              tenant: str) -> tuple[list, list]:
    """KEYS and ARGV of move.lua (the contract atop that file)."""
    return ([source, target, target_lanes, source_lanes, stats_key],
            [GROUP, consumer, count, min_idle_ms, tenant])


class CommitHead(msgspec.Struct, kw_only=True, frozen=True):
    """The fixed head of every commit of one model: KEYS 1-4 and ARGV 1-4 of commit.lua."""

    stats_key: str
    delayed_key: str
    dead_stream: str
    queued_key: str
    group: str
    consumer: str
    reply_maxlen: int
    dead_maxlen: int
    # This model's outbox (keys.outbox_stream): follow-ups for other models go there, for
    # the mover; "" writes them straight into their streams (one server only).
    outbox_key: str = ""


class FollowUpWrite(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """A follow-up task as commit.lua writes it: into its tenant's stream of its model."""

    stream: str
    payload: bytes
    event: bytes  # its trace event, b"" when not traced
    lanes_key: str  # its lane's tenant set (keys.tenant_lanes)
    queued_key: str  # its model's queued counts
    tenant: str


class JoinWrite(msgspec.Struct, kw_only=True, gc=False, frozen=True):
    """A fan-out's join as commit.lua keeps it (keys.join_state): opened by the parent's
    record (`payload`: the join step, `children`: the ids it waits for), joined by each
    child's record (`member`: its id).  The record that ends the last child enqueues the
    join step into `stream`, with `event` (its trace event, b"" when not traced)."""

    state_key: str
    stream: str  # the join step's task stream
    lanes_key: str  # its lane's tenant set
    queued_key: str  # its model's queued counts
    tenant: str
    event: bytes = b""
    payload: bytes = b""  # opening: the join step (a Task)
    children: tuple[str, ...] = ()  # opening: the children's ids
    member: str = ""  # a child's record: its id
    # A child's record: the trace list of the join's model, where the join's trace event
    # goes when the join is in another slot and fires there (workers/lua/join.lua)
    trace_key: str = ""


class CacheWrite(msgspec.Struct, kw_only=True, gc=False, frozen=True):
    """The result cache's side of a task the cache may answer (docs/result-cache.md): on
    success its answer is cached (`shared`, `bare`: schemas/resultcache.py) and the tasks
    joined to it are answered (those cancelled or past their deadline with that end); on
    failure one of them is queued instead."""

    cache_key: str
    inflight_key: str
    cancelled_key: str  # the model's cancelled ids (keys.cancelled_key)
    task_id: str
    ttl_s: int
    shared: bytes = b""  # b"" unless it succeeded
    bare: bytes = b""
    cancelled: bytes = b""  # the halves for a joined task cancelled, or past its deadline
    expired: bytes = b""
    now: float = 0.0  # epoch s: a joined task whose deadline is before ends expired


class CommitRecord(msgspec.Struct, kw_only=True, gc=False):
    """One task's outcome, encoded and ready for commit.lua (one per task, never in a cycle:
    untracked by the cyclic collector).  `status` and `error_code` stay in Python for the
    metrics and logs, so nobody decodes `v1` again to learn them."""

    source: str  # the stream the task was read from
    entry_id: bytes
    outcome: bytes  # b"r" result, b"d" dead letter, b"y" retry
    v1: bytes
    v2: bytes | str
    result_key: str
    reply_key: str  # "" when nobody waits on a reply stream
    trace_key: str
    trace: bytes  # b"" when not traced
    followups: Sequence[FollowUpWrite]
    status: Status | None = None  # None for a retry: not an end
    error_code: ErrorCode | None = None
    batch_out: str = ""  # bulk job's output stream; "" when not part of one
    batch_counts: str = ""
    batch_status: str = ""
    # The source tenant's retention (its registry entry, else the fleet's settings); every
    # record of one source stream is the same tenant's.
    tenant: str = "default"
    result_ttl_s: int = 86_400
    trace_ttl_s: int = 86_400
    join: JoinWrite | None = None  # a fan-out's join, opened (parent) or joined (child)
    cache: CacheWrite | None = None  # a task the result cache may answer


def commit_args(head: CommitHead, records: Sequence[CommitRecord]) -> tuple[list, list]:
    """Flatten records into the KEYS and ARGV of commit.lua (the contract atop that file)."""
    keys: list = [head.stats_key, head.delayed_key, head.dead_stream, head.queued_key]
    args: list = [head.group, head.consumer, head.reply_maxlen, head.dead_maxlen,
                  0]  # 0: m, set at the end
    payloads: dict[str, list[bytes]] = {}  # reply stream -> its results, in script order
    by_source: dict[str, list[CommitRecord]] = {}
    for r in records:
        group = by_source.get(r.source)
        if group is None:
            group = by_source[r.source] = []
        group.append(r)
    reply = None
    for source, group in by_source.items():
        first = True
        group.sort(key=_REPLY_OF)  # one producer's results in a row: its stream named once
        for r in group:
            outcome = r.outcome
            flags = [outcome.decode(), "-", "-", "-", "-", "-", "-"]
            args += (r.entry_id, "", r.v1)
            at = len(args) - 2
            if outcome != b"r":
                args.append(r.v2)
            if first:
                first = False
                flags[1] = "S"
                keys.append(source)
                ids = [(id_key(x.entry_id), x.entry_id) for x in group]
                args += (min(ids)[1], max(ids)[1], r.tenant, r.result_ttl_s, r.trace_ttl_s)
            if outcome != b"y":
                keys.append(r.result_key)
            if r.reply_key:
                if r.reply_key == reply:
                    flags[2] = "p"
                else:
                    reply = r.reply_key
                    flags[2] = "P"
                    keys.append(reply)
                if outcome != b"y":
                    results = payloads.get(reply)
                    if results is None:
                        results = payloads[reply] = []
                    results.append(r.v1)
            if r.trace:
                flags[3] = "T"
                keys.append(r.trace_key)
                args.append(r.trace)
            if r.batch_status:
                flags[4] = "B"
                keys += (r.batch_out, r.batch_counts)
                args.append(r.batch_status)
            if r.followups:
                flags[5] = "F"
                here, away = _by_slot(head.outbox_key, r.followups)
                args.append(len(here))
                for f in here:
                    keys += (f.stream, f.lanes_key, f.queued_key)
                    args += (f.payload, f.event, f.tenant)
                if away:
                    flags[5] = "O"
                    keys.append(head.outbox_key)
                    args.append(len(away))
                    for f in away:
                        args += (f.payload, f.event, f.tenant, f.stream, f.lanes_key,
                                 f.queued_key)
            if r.join is not None:
                flags[6] = _join_args(head.outbox_key, r.join, keys, args)
            c = r.cache
            if c is not None:
                flags.append("C")
                keys += (c.cache_key, c.inflight_key, c.cancelled_key)
                args += (c.task_id, c.ttl_s, c.shared, c.bare, c.cancelled, c.expired,
                         repr(c.now))
            args[at] = "".join(flags)
    args[4] = len(payloads)
    for reply, results in payloads.items():
        args += (len(results), reply_entry(results))
        keys.append(reply)
    return keys, args


_REPLY_OF = attrgetter("reply_key")


def _by_slot(outbox_key: str, followups: Sequence[FollowUpWrite]
             ) -> tuple[Sequence[FollowUpWrite], list[FollowUpWrite]]:
    """The follow-ups of the outbox's model (written in place) and those of other models
    (through the outbox); all in place when there is no outbox."""
    if not outbox_key:
        return followups, []
    tag = keys.hash_tag(outbox_key)
    away = [f for f in followups if keys.hash_tag(f.stream) != tag]
    if not away:
        return followups, away
    return [f for f in followups if keys.hash_tag(f.stream) == tag], away


def _join_args(outbox_key: str, j: JoinWrite, out_keys: list, args: list) -> str:
    """A record's join, added to its keys and arguments; its flag.  The join's state or its
    step's stream in another slot than the outbox's goes through the outbox (commit.lua)."""
    tag = keys.hash_tag(outbox_key) if outbox_key else ""
    if tag and j.member and keys.hash_tag(j.state_key) != tag:
        out_keys.append(outbox_key)
        args += (j.tenant, j.event, j.member, j.state_key, j.stream, j.lanes_key, j.queued_key,
                 j.trace_key if j.event else "")
        return "A"
    away = bool(tag) and keys.hash_tag(j.stream) != tag
    if away:
        out_keys += (j.state_key, outbox_key)
    else:
        out_keys += (j.state_key, j.stream, j.lanes_key, j.queued_key)
    if j.member:
        args += (j.tenant, j.event, j.member)
    else:
        args += (j.tenant, j.event, j.payload, len(j.children), *j.children)
    if away:
        args += (j.stream, j.lanes_key, j.queued_key)
    return ("N" if j.member else "K") if away else ("M" if j.member else "J")


def reply_entry(results: Sequence[bytes]) -> bytes:
    """A reply stream's entry: encoded results as one msgpack array (array 32 header, as
    commit.lua writes it when it joins them itself), read by `schemas.wire.decode_results`."""
    return b"".join((b"\xdd", len(results).to_bytes(4, "big"), *results))


def id_key(entry_id: str | bytes) -> tuple[int, int]:
    """A stream entry id ("<ms>-<seq>") as numbers, so that ids order as the stream does."""
    ms, _, seq = entry_id.partition(b"-" if isinstance(entry_id, bytes) else "-")
    return int(ms), int(seq)
