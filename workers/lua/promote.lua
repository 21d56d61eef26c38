-- promote.lua: move retries that are due back into their lane.  A member of the delayed
-- set is a lane byte ('i' interactive, 'b' bulk) followed by the task.
--
-- KEYS: 1 task stream, 2 delayed set, 3 bulk stream.
-- ARGV: 1 now (epoch seconds), 2 most to move.
-- Returns: how many moved.

local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(due) do
  local lane = KEYS[1]
  if string.sub(member, 1, 1) == 'b' then lane = KEYS[3] end
  redis.call('XADD', lane, '*', 'd', string.sub(member, 2))
end
if #due > 0 then redis.call('ZREM', KEYS[2], unpack(due)) end
return #due
