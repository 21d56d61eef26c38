"""The enqueue script: tasks, their idempotency keys and their first trace event, per chunk.

One EVALSHA per chunk of tasks for one model, so a chunk costs one round trip and the
trace's "enqueued" event costs none.  A task whose idempotency key was seen before is not
added again; the script answers with the id of the task that holds the key.
"""

from __future__ import annotations

from collections.abc import Sequence

# KEYS: 1 task stream, then per task: trace list, idempotency key (the stream when none).
# ARGV: 1 trace ttl, 2 idempotency ttl, then per task: task id, payload, trace event or ''.
# Returns a flat list [index, prior task id, ...] of the tasks that were not added.
ENQUEUE_LUA = """
local trace_ttl, idem_ttl = ARGV[1], ARGV[2]
local dups = {}
local k, i = 2, 0
for a = 3, #ARGV, 3 do
  local id, payload, event = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local tkey, ikey = KEYS[k], KEYS[k + 1]
  k = k + 2
  local prior = false
  if ikey ~= KEYS[1] then
    prior = redis.call('SET', ikey, id, 'NX', 'GET', 'EX', idem_ttl)
  end
  if prior then
    dups[#dups + 1] = i
    dups[#dups + 1] = prior
  else
    redis.call('XADD', KEYS[1], '*', 'd', payload)
    if event ~= '' and redis.call('RPUSH', tkey, event) == 1 then
      redis.call('EXPIRE', tkey, trace_ttl)
    end
  end
  i = i + 1
end
return dups
"""


def enqueue_args(stream: str, trace_ttl_s: int, idem_ttl_s: int,
                 items: Sequence[tuple[str, str, str | None, bytes, bytes]]) -> tuple[list, list]:
    """KEYS and ARGV of ENQUEUE_LUA for (task id, trace key, idem key, payload, event) items."""
    keys: list = [stream]
    args: list = [trace_ttl_s, idem_ttl_s]
    for task_id, trace_key, idem_key, payload, event in items:
        keys += (trace_key, idem_key or stream)
        args += (task_id, payload, event)
    return keys, args
