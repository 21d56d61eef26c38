-- enqueue.lua: a chunk of tasks for one stream, with their idempotency keys.
--
-- One EVALSHA per chunk, so a chunk costs one round trip.  A task whose idempotency key was
-- seen before is not added again; the answer names the task holding the key.
--
-- KEYS: 1 task stream, then one idempotency key per task that has one.
-- ARGV: 1 idempotency ttl s, then per task: 0 and its payload, or the index of its key in
--       KEYS, its id and its payload.
-- Returns: a flat list {index, prior task id, ...} of the tasks that were not added.
-- Built by producer/enqueue.py (enqueue_args).

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
