"""The worker's scripts: every state change of a task is one atomic step with its XACK.

COMMIT_LUA, one EVALSHA per group of completions (never one round trip per task), applies
per task one of three outcomes:
  r  result: the result (first write wins: SET NX), follow-ups, trace events; the results
     for one producer go to its reply stream as one entry per commit (a msgpack array)
  d  dead letter: the result (status dead_lettered) and the dead-letter entry
  y  retry: the task, one attempt further, into the delayed set with its due time
then acknowledges it.  Every outcome is fenced by the claim: a task no longer pending on
this consumer (reclaimed by another worker while this one stalled) changes nothing, is not
acknowledged, and is counted as fenced.  The claim is read once per source stream and only
between the group's lowest and highest entry id, not the consumer's whole pending list.
A crash before the script leaves the task pending (it is redelivered); after it,
everything is written and acknowledged.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter

import msgspec

# KEYS: 1 stats hash, 2 delayed set, 3 dead-letter stream, then per record only the keys it
#       uses, in this order: its source stream (when it differs from the previous record's),
#       result key (not for y), reply stream, trace list, bulk-job output and counts, one task
#       stream per follow-up; last the m reply streams of the payloads (below).
# ARGV: 1 group, 2 consumer, 3 result ttl, 4 trace ttl, 5 reply maxlen, 6 dead maxlen, 7 m,
#       then per record: entry id, flags, v1, v2 (not for r), the source's lowest and highest
#       entry id in this commit (only with S), trace events, bulk-job status, follow-up
#       count n and n x (task, trace event) -- the last three only where flagged.
#       flags: 1 outcome (r result, d dead letter, y retry), 2 S new source, 3 P reply to
#       the stream named next in KEYS or p to the same one as the record before, 4 T trace,
#       5 B bulk job, 6 F follow-ups; '-' where absent.  Records come grouped by source
#       stream and by reply stream, so each is named (S, P) once.  v1/v2: r = result,
#       d = result/dead letter, y = retry member (lane byte + task)/due epoch seconds.
# Only the fields a record has travel: a lone task with a reply costs 1 key and 3 arguments.
# m is the number of reply payloads the worker built: after the records come m x (result
# count, msgpack array of the results) in ARGV, and their streams last in KEYS.  Where every
# result for a stream was written (no duplicate, none fenced), its entry is that payload;
# otherwise the script joins the written ones itself (joining a window's results in Lua
# cost about 1.5 us of server CPU per result: table.concat copies them over and over).
COMMIT_LUA = """
local group, me = ARGV[1], ARGV[2]
local result_ttl, trace_ttl, reply_maxlen, dead_maxlen = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local m = tonumber(ARGV[7])
local a, k, n = 8, 4, #ARGV - 2 * m
local built = {}  -- reply stream -> {result count, payload} as the worker built them
for j = 1, m do
  built[KEYS[#KEYS - m + j]] = {tonumber(ARGV[n + 2 * j - 1]), ARGV[n + 2 * j]}
end
local byte = string.byte
local R, D, Y, S, P, SAME, T, B, F = byte('rdySPpTBF', 1, 9)
local acks = {}
local written, dups, followups, fenced, retried, dead = 0, 0, 0, 0, 0, 0
local replies = {}
local owned = {}  -- per source stream: the entries pending on this consumer, read once
local src, cur_reply
while a <= n do
  local eid, flags, v1 = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  a = a + 3
  local outcome, fs, fp, ft, fb, ff = byte(flags, 1, 6)
  local v2, rkey, reply, tkey, trace, bout, bcounts, bstatus, lo, hi
  local nf = 0
  if outcome ~= R then v2 = ARGV[a]; a = a + 1 end
  if fs == S then
    src = KEYS[k]
    k = k + 1
    lo, hi = ARGV[a], ARGV[a + 1]
    a = a + 2
  end
  if outcome ~= Y then rkey = KEYS[k]; k = k + 1 end
  if fp == P then
    cur_reply = KEYS[k]
    k = k + 1
    reply = cur_reply
  elseif fp == SAME then
    reply = cur_reply
  end
  if ft == T then tkey = KEYS[k]; k = k + 1; trace = ARGV[a]; a = a + 1 end
  if fb == B then
    bout, bcounts = KEYS[k], KEYS[k + 1]
    k = k + 2
    bstatus = ARGV[a]
    a = a + 1
  end
  if ff == F then nf = tonumber(ARGV[a]); a = a + 1 end
  local mine = owned[src]
  if mine == nil then
    mine = {}
    for _, p in ipairs(redis.call('XPENDING', src, group, lo, hi, 10000000, me)) do
      mine[p[1]] = true
    end
    owned[src] = mine
  end
  if not mine[eid] then
    fenced = fenced + 1
  else
    local events = {}
    if trace then events[1] = trace end
    if outcome == Y then
      redis.call('ZADD', KEYS[2], v2, v1)
      retried = retried + 1
    elseif redis.call('SET', rkey, v1, 'NX', 'EX', result_ttl) then
      written = written + 1
      if reply then
        local list = replies[reply]
        if list == nil then
          list = {}
          replies[reply] = list
        end
        list[#list + 1] = v1
      end
      if bstatus then
        redis.call('XADD', bout, '*', 'r', v1)
        redis.call('HINCRBY', bcounts, bstatus, 1)
      end
      if outcome == D then
        redis.call('XADD', KEYS[3], 'MAXLEN', '~', dead_maxlen, '*', 'd', v2)
        dead = dead + 1
      end
      for j = 0, nf - 1 do
        redis.call('XADD', KEYS[k + j], '*', 'd', ARGV[a + 2 * j])
        if trace then events[#events + 1] = ARGV[a + 2 * j + 1] end
      end
      followups = followups + nf
    else
      dups = dups + 1
      events = {}
    end
    if #events > 0 and redis.call('RPUSH', tkey, unpack(events)) == #events then
      redis.call('EXPIRE', tkey, trace_ttl)
    end
    local list = acks[src]
    if list == nil then
      list = {}
      acks[src] = list
    end
    list[#list + 1] = eid
    if #list == 1000 then
      redis.call('XACK', src, group, unpack(list))
      acks[src] = {}
    end
  end
  a = a + 2 * nf
  k = k + nf
end
for src, list in pairs(acks) do
  if #list > 0 then redis.call('XACK', src, group, unpack(list)) end
end
-- One reply entry per producer per commit: a msgpack array of the results (array 32 header).
for r, list in pairs(replies) do
  local count = #list
  local payload
  local pre = built[r]
  if pre and pre[1] == count then
    payload = pre[2]  -- all written: the results in the same order
  else
    payload = string.char(0xdd, math.floor(count / 16777216) % 256,
      math.floor(count / 65536) % 256, math.floor(count / 256) % 256, count % 256)
      .. table.concat(list)
  end
  redis.call('XADD', r, 'MAXLEN', '~', reply_maxlen, '*', 'rs', payload)
  redis.call('EXPIRE', r, result_ttl)
end
redis.call('HINCRBY', KEYS[1], 'written', written)
if dups > 0 then redis.call('HINCRBY', KEYS[1], 'duplicates', dups) end
if followups > 0 then redis.call('HINCRBY', KEYS[1], 'followups', followups) end
if fenced > 0 then redis.call('HINCRBY', KEYS[1], 'fenced', fenced) end
if retried > 0 then redis.call('HINCRBY', KEYS[1], 'retried', retried) end
if dead > 0 then redis.call('HINCRBY', KEYS[1], 'dead_lettered', dead) end
return {written, dups, fenced, retried, dead}
"""

# Reclaim what stalled: tasks idle on any consumer for ARGV[3] ms move to us (XCLAIM
# counts a delivery).  A task delivered twice already is a suspect (it may be what killed
# the workers): suspects are claimed one at a time, and only when ARGV[5] is 1 (we run no
# other suspect), so a poison task cannot drag its batch-mates to their delivery limit.
# KEYS: 1 task stream, 2 stats hash.  ARGV: 1 group, 2 consumer, 3 min idle ms, 4 count,
# 5 suspect allowed.  Returns {{id, fields, deliveries before this claim}...}, {ids of
# entries that vanished while pending: lost}.
RECLAIM_LUA = """
local pend = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], '-', '+', ARGV[4])
if #pend == 0 then return {{}, {}} end
local ids, deliveries = {}, {}
local suspect_taken = ARGV[5] ~= '1'
for _, p in ipairs(pend) do
  if p[4] < 2 or not suspect_taken then
    if p[4] >= 2 then suspect_taken = true end
    ids[#ids + 1] = p[1]
    deliveries[p[1]] = p[4]
  end
end
if #ids == 0 then return {{}, {}} end
local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], unpack(ids))
local out, got = {}, {}
for _, e in ipairs(claimed) do
  if e and e[2] then
    got[e[1]] = true
    out[#out + 1] = {e[1], e[2], deliveries[e[1]]}
  end
end
local lost = {}
for _, id in ipairs(ids) do
  if not got[id] then lost[#lost + 1] = id end
end
if #lost > 0 then
  redis.call('XACK', KEYS[1], ARGV[1], unpack(lost))
  redis.call('HINCRBY', KEYS[2], 'lost', #lost)
end
return {out, lost}
"""

# Renew our claim on tasks still in the engine, so that nobody reclaims work in progress;
# only where we still own them (a task reclaimed meanwhile stays with its new owner).
# KEYS: 1 task stream.  ARGV: 1 group, 2 consumer, then entry ids.  Returns renewed count.
RENEW_LUA = """
local n = 0
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)[1]
  if p and p[2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    n = n + 1
  end
end
return n
"""

# Move retries that are due back into their lane: a member is a lane byte ('i'
# interactive, 'b' bulk) and the task.  KEYS: 1 task stream, 2 delayed set, 3 bulk stream.
# ARGV: 1 now (epoch seconds), 2 most to move.  Returns how many moved.
PROMOTE_LUA = """
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(due) do
  local lane = KEYS[1]
  if string.sub(member, 1, 1) == 'b' then lane = KEYS[3] end
  redis.call('XADD', lane, '*', 'd', string.sub(member, 2))
end
if #due > 0 then redis.call('ZREM', KEYS[2], unpack(due)) end
return #due
"""


class CommitRecord(msgspec.Struct, array_like=True, gc=False):
    """One task's outcome, encoded and ready for COMMIT_LUA (one per task, never in a cycle:
    untracked by the cyclic collector)."""

    source: str  # the stream the task was read from
    entry_id: bytes
    outcome: bytes  # b"r", b"d" or b"y"
    v1: bytes
    v2: bytes | str
    result_key: str
    reply_key: str  # "" when nobody waits on a reply stream
    trace_key: str
    trace: bytes  # b"" when not traced
    followups: Sequence[tuple[str, bytes, bytes]]  # (stream, task payload, trace event)
    batch_out: str = ""  # bulk job's output stream; "" when not part of one
    batch_counts: str = ""
    batch_status: str = ""


def commit_args(head: list, records: Sequence[CommitRecord]) -> tuple[list, list]:
    """Flatten records into the KEYS and ARGV of COMMIT_LUA.

    `head` is [stats, delayed, dead, group, consumer, result ttl, trace ttl, reply maxlen,
    dead maxlen].
    """
    keys: list = head[:3]
    args: list = head[3:]
    args.append(0)  # m, the count of reply payloads: set at the end
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
            flags = [outcome.decode(), "-", "-", "-", "-", "-"]
            args += (r.entry_id, "", r.v1)
            at = len(args) - 2
            if outcome != b"r":
                args.append(r.v2)
            if first:
                first = False
                flags[1] = "S"
                keys.append(source)
                ids = [(id_key(x.entry_id), x.entry_id) for x in group]
                args += (min(ids)[1], max(ids)[1])
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
                args.append(len(r.followups))
                for f_stream, payload, event in r.followups:
                    keys.append(f_stream)
                    args += (payload, event)
            args[at] = "".join(flags)
    args[6] = len(payloads)
    for reply, results in payloads.items():
        args += (len(results), reply_entry(results))
        keys.append(reply)
    return keys, args


_REPLY_OF = attrgetter("reply_key")


def reply_entry(results: Sequence[bytes]) -> bytes:
    """A reply stream's entry: encoded results as one msgpack array (array 32 header, as
    COMMIT_LUA writes it when it joins them itself), read by `schemas.wire.decode_results`."""
    return b"".join((b"\xdd", len(results).to_bytes(4, "big"), *results))


def id_key(entry_id: str | bytes) -> tuple[int, int]:
    """A stream entry id ("<ms>-<seq>") as numbers, so that ids order as the stream does."""
    ms, _, seq = entry_id.partition(b"-" if isinstance(entry_id, bytes) else "-")
    return int(ms), int(seq)
