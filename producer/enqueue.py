"""The enqueue script: a chunk of tasks for one model, with their idempotency keys.

One EVALSHA per chunk, so a chunk costs one round trip.  A task whose idempotency key was
seen before is not added again; the script answers with the id of the task holding the key.
"""

from __future__ import annotations

from collections.abc import Sequence

# KEYS: 1 task stream, then one idempotency key per task that has one.
# ARGV: 1 idempotency ttl, then per task: 0 and its payload, or the index of its key in
#       KEYS, its id and its payload.
# Returns a flat list [index, prior task id, ...] of the tasks that were not added.
ENQUEUE_LUA = """
local idem_ttl = ARGV[1]
local dups = {}
local a, i, n = 2, 0, #ARGV
while a <= n do
  local k = tonumber(ARGV[a])
  if k == 0 then
    redis.call('XADD', KEYS[1], '*', 'd', ARGV[a + 1])
    a = a + 2
  else
    local prior = redis.call('SET', KEYS[k], ARGV[a + 1], 'NX', 'GET', 'EX', idem_ttl)
    if prior then
      dups[#dups + 1] = i
      dups[#dups + 1] = prior
    else
      redis.call('XADD', KEYS[1], '*', 'd', ARGV[a + 2])
    end
    a = a + 3
  end
  i = i + 1
end
return dups
"""


def enqueue_args(stream: str, idem_ttl_s: int,
                 items: Sequence[tuple]) -> tuple[list, list]:
    """KEYS and ARGV of ENQUEUE_LUA for (task id, idempotency key or None, payload, ...)."""
    keys: list = [stream]
    args: list = [idem_ttl_s]
    for task_id, idem_key, payload, *_ in items:
        if idem_key is None:
            args += (0, payload)
        else:
            keys.append(idem_key)
            args += (len(keys), task_id, payload)
    return keys, args
