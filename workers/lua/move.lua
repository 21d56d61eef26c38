-- move.lua: hand the queued tasks of one tenant's lane stream to another stream of the same
-- model: those of a version that serves no more (retired, rolled back) to the stable
-- version, or those of a registered model's unversioned stream to its stable version.
--
-- Atomic, in the model's slot (every stream of a model shares its hash tag).  Undelivered
-- entries are taken with XREADGROUP as the mover's consumer; entries pending on another
-- consumer for `min idle ms` (a worker gone: nobody renews them) are claimed.  Each is added
-- to the target stream as it was and acknowledged in the source, in the same step: a task is
-- in exactly one stream, never two, never none.  A worker that held one of the claimed
-- entries is fenced at its commit (it no longer owns the entry), so nothing runs twice.
-- Queued counts do not change (the tasks are still queued).  When the source holds nothing
-- undelivered or pending any more, it is emptied and its tenant unmarked (score 0): a later
-- enqueue (a producer that has not seen the change yet) marks it again, and the next pass
-- moves it.
--
-- KEYS: 1 source stream, 2 target stream, 3 target lane's tenant set, 4 source lane's tenant
--       set, 5 the model's stats hash.
-- ARGV: 1 consumer group, 2 the mover's consumer name, 3 count, 4 min idle ms, 5 tenant.
-- Returns: {moved, of which claimed from a silent consumer, source drained (1|0)}.
-- Built by workers/scripts.py (move_args).

local group, me, count, idle, tenant = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0, 0, 1}
end
redis.pcall('XGROUP', 'CREATE', KEYS[1], group, '0')  -- a stream without the group: make it
local taken = {}
local got = redis.call('XREADGROUP', 'GROUP', group, me, 'COUNT', count, 'STREAMS', KEYS[1], '>')
local fresh = 0
if got then
  for _, e in ipairs(got[1][2]) do
    taken[#taken + 1] = e
    fresh = fresh + 1
  end
end
local claimed = 0
if fresh < count then
  local ids = {}
  for _, p in ipairs(redis.call('XPENDING', KEYS[1], group, 'IDLE', idle, '-', '+',
                                count - fresh)) do
    if p[2] ~= me then ids[#ids + 1] = p[1] end
  end
  if #ids > 0 then
    for _, e in ipairs(redis.call('XCLAIM', KEYS[1], group, me, idle, unpack(ids))) do
      if e and e[2] then
        taken[#taken + 1] = e
        claimed = claimed + 1
      end
    end
  end
end
if #taken > 0 then
  if redis.call('EXISTS', KEYS[2]) == 0 then
    redis.call('XGROUP', 'CREATE', KEYS[2], group, '0', 'MKSTREAM')
  end
  local ids = {}
  for i, e in ipairs(taken) do
    redis.call('XADD', KEYS[2], '*', unpack(e[2]))
    ids[i] = e[1]
  end
  redis.call('XACK', KEYS[1], group, unpack(ids))
  redis.call('ZADD', KEYS[3], 1, tenant)
  redis.call('HINCRBY', KEYS[5], 'moved', #taken)
end
-- Vanished entries (claimed ids that came back empty) stay pending on us: acknowledge them.
local left = redis.call('XPENDING', KEYS[1], group, '-', '+', 100, me)
if #left > 0 then
  local ids = {}
  for i, p in ipairs(left) do ids[i] = p[1] end
  redis.call('XACK', KEYS[1], group, unpack(ids))
end
if fresh < count and redis.call('XPENDING', KEYS[1], group)[1] == 0 then
  -- Drained: drop its acknowledged entries and unmark its tenant.  Not DEL: a runner still
  -- blocked reading it (it has not seen the change yet) would get an error, not a wait.
  redis.call('XTRIM', KEYS[1], 'MAXLEN', 0)
  if redis.call('ZSCORE', KEYS[4], tenant) then redis.call('ZADD', KEYS[4], 0, tenant) end
  return {#taken, claimed, 1}
end
return {#taken, claimed, 0}
