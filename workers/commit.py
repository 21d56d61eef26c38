"""The commit: results, follow-ups, trace events and acknowledgements of a group, in one step.

One EVALSHA per group of completions (not one round trip per task).  Redis runs a script
atomically, so a crash of the worker before it leaves the follow-ups unwritten and the tasks
pending (they are redelivered), and a crash after it leaves everything written and
acknowledged.  The first result written for a task wins (SET NX); a later duplicate writes no
effects and is only acknowledged.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

# KEYS: 1 task stream, 2 stats hash, then per record: result key, reply stream (the task
#       stream itself when the task wants no reply), trace list, one task stream per follow-up.
# ARGV: 1 group, 2 result ttl, 3 trace ttl, 4 reply maxlen, then per record: entry id,
#       result, trace event ('' when tracing is off), follow-up count n, n x (task, trace event).
COMMIT_LUA = """
local group, result_ttl, trace_ttl, reply_maxlen = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local a, k = 5, 3
local acks, n_acks = {}, 0
local written, dups, followups = 0, 0, 0
local replies = {}
while a <= #ARGV do
  local eid, result, trace, nf = ARGV[a], ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3])
  local rkey, reply, tkey = KEYS[k], KEYS[k + 1], KEYS[k + 2]
  a = a + 4
  k = k + 3
  if redis.call('SET', rkey, result, 'NX', 'EX', result_ttl) then
    written = written + 1
    if reply ~= KEYS[1] then
      redis.call('XADD', reply, 'MAXLEN', '~', reply_maxlen, '*', 'r', result)
      replies[reply] = true
    end
    local events = {}
    if trace ~= '' then events[1] = trace end
    for j = 0, nf - 1 do
      redis.call('XADD', KEYS[k + j], '*', 'd', ARGV[a + 2 * j])
      if trace ~= '' then events[#events + 1] = ARGV[a + 2 * j + 1] end
    end
    followups = followups + nf
    if #events > 0 and redis.call('RPUSH', tkey, unpack(events)) == #events then
      redis.call('EXPIRE', tkey, trace_ttl)
    end
  else
    dups = dups + 1
  end
  a = a + 2 * nf
  k = k + nf
  n_acks = n_acks + 1
  acks[n_acks] = eid
  if n_acks == 1000 then
    redis.call('XACK', KEYS[1], group, unpack(acks))
    acks, n_acks = {}, 0
  end
end
if n_acks > 0 then redis.call('XACK', KEYS[1], group, unpack(acks)) end
for reply in pairs(replies) do redis.call('EXPIRE', reply, result_ttl) end
redis.call('HINCRBY', KEYS[2], 'written', written)
if dups > 0 then redis.call('HINCRBY', KEYS[2], 'duplicates', dups) end
if followups > 0 then redis.call('HINCRBY', KEYS[2], 'followups', followups) end
return {written, dups}
"""


class CommitRecord(msgspec.Struct, array_like=True):
    """One completed task, encoded and ready for the commit script."""

    entry_id: bytes
    result_key: str
    reply_key: str  # the task stream when there is no reply stream
    trace_key: str
    result: bytes
    trace: bytes  # b"" when tracing is off
    followups: Sequence[tuple[str, bytes, bytes]]  # (stream, task payload, trace event)


def commit_args(stream: str, stats: str, group: str, result_ttl_s: int, trace_ttl_s: int,
                reply_maxlen: int, records: Sequence[CommitRecord]) -> tuple[list, list]:
    """Flatten records into the KEYS and ARGV of COMMIT_LUA."""
    keys: list = [stream, stats]
    args: list = [group, result_ttl_s, trace_ttl_s, reply_maxlen]
    for r in records:
        keys += (r.result_key, r.reply_key, r.trace_key)
        args += (r.entry_id, r.result, r.trace, len(r.followups))
        for f_stream, payload, event in r.followups:
            keys.append(f_stream)
            args += (payload, event)
    return keys, args
