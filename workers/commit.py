"""The worker's scripts: every state change of a task is one atomic step with its XACK.

COMMIT_LUA, one EVALSHA per group of completions (never one round trip per task), applies
per task one of three outcomes:
  r  result: the result (first write wins: SET NX), follow-ups, trace events; the results
     for one producer go to its reply stream as one entry per commit (a msgpack array)
  d  dead letter: the result (status dead_lettered) and the dead-letter entry
  y  retry: the task, one attempt further, into the delayed set with its due time
then acknowledges it.  Every outcome is fenced by the claim: a task no longer pending on
this consumer (reclaimed by another worker while this one stalled) changes nothing, is not
acknowledged, and is counted as fenced.  A crash before the script leaves the task pending
(it is redelivered); after it, everything is written and acknowledged.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

# KEYS: 1 stats hash, 2 delayed set, 3 dead-letter stream, then per record: the stream it
#       came from (interactive or bulk lane), result key, reply stream, trace list, bulk-job
#       output stream, bulk-job counts hash (unused ones are the source stream), then one
#       task stream per follow-up.
# ARGV: 1 group, 2 consumer, 3 result ttl, 4 trace ttl, 5 reply maxlen, 6 dead maxlen, then
#       per record: entry id, outcome, v1, v2, trace event(s) ('' for none), bulk-job status
#       field ('' for none), follow-up count n, n x (task, trace event).  v1/v2: r =
#       result/'', d = result/dead letter, y = retry member (lane byte + task)/due seconds.
COMMIT_LUA = """
local group, me = ARGV[1], ARGV[2]
local result_ttl, trace_ttl, reply_maxlen, dead_maxlen = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local a, k, n = 7, 4, #ARGV
local acks = {}
local written, dups, followups, fenced, retried, dead = 0, 0, 0, 0, 0, 0
local replies = {}
local owned = {}  -- per source stream: the entries pending on this consumer, read once
while a <= n do
  local eid, outcome, v1, v2 = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local trace, bstatus, nf = ARGV[a + 4], ARGV[a + 5], tonumber(ARGV[a + 6])
  local src, rkey, reply, tkey, bout, bcounts =
    KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], KEYS[k + 5]
  a = a + 7
  k = k + 6
  local mine = owned[src]
  if mine == nil then
    mine = {}
    for _, p in ipairs(redis.call('XPENDING', src, group, '-', '+', 10000000, me)) do
      mine[p[1]] = true
    end
    owned[src] = mine
  end
  if not mine[eid] then
    fenced = fenced + 1
  else
    local events = {}
    if trace ~= '' then events[1] = trace end
    if outcome == 'y' then
      redis.call('ZADD', KEYS[2], v2, v1)
      retried = retried + 1
    elseif redis.call('SET', rkey, v1, 'NX', 'EX', result_ttl) then
      written = written + 1
      if reply ~= src then
        local list = replies[reply]
        if list == nil then
          list = {}
          replies[reply] = list
        end
        list[#list + 1] = v1
      end
      if bstatus ~= '' then
        redis.call('XADD', bout, '*', 'r', v1)
        redis.call('HINCRBY', bcounts, bstatus, 1)
      end
      if outcome == 'd' then
        redis.call('XADD', KEYS[3], 'MAXLEN', '~', dead_maxlen, '*', 'd', v2)
        dead = dead + 1
      end
      for j = 0, nf - 1 do
        redis.call('XADD', KEYS[k + j], '*', 'd', ARGV[a + 2 * j])
        if trace ~= '' then events[#events + 1] = ARGV[a + 2 * j + 1] end
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
  local header = string.char(0xdd, math.floor(count / 16777216) % 256,
    math.floor(count / 65536) % 256, math.floor(count / 256) % 256, count % 256)
  redis.call('XADD', r, 'MAXLEN', '~', reply_maxlen, '*', 'rs', header .. table.concat(list))
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


class CommitRecord(msgspec.Struct, array_like=True):
    """One task's outcome, encoded and ready for COMMIT_LUA."""

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
    for r in records:
        src = r.source
        keys += (src, r.result_key, r.reply_key or src, r.trace_key, r.batch_out or src,
                 r.batch_counts or src)
        args += (r.entry_id, r.outcome, r.v1, r.v2, r.trace, r.batch_status, len(r.followups))
        for f_stream, payload, event in r.followups:
            keys.append(f_stream)
            args += (payload, event)
    return keys, args
