-- promote.lua: move retries that are due back into their tenant's lane stream.  The worker
-- reads the due members first (ZRANGEBYSCORE) and groups them by lane and tenant; this
-- script moves one group, each member only if it is still in the delayed set (ZREM says so),
-- so that two workers promoting at once move it once.  A member is a lane byte ('i'
-- interactive, 'b' bulk) followed by the task.
--
-- KEYS: 1 delayed set, 2 the tenant's lane stream, 3 the lane's tenant set.
-- ARGV: 1 tenant, 2 consumer group, then the members.
-- Returns: how many moved.

local moved = 0
for i = 3, #ARGV do
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
    if moved == 0 and redis.call('EXISTS', KEYS[2]) == 0 then
      redis.call('XGROUP', 'CREATE', KEYS[2], ARGV[2], '0', 'MKSTREAM')
    end
    redis.call('XADD', KEYS[2], '*', 'd', string.sub(ARGV[i], 2))
    moved = moved + 1
  end
end
if moved > 0 then redis.call('ZADD', KEYS[3], 1, ARGV[1]) end
return moved
