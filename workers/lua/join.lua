-- join.lua: children's places in fan-outs' joins, moved from their models' outboxes.
--
-- A child whose parent (and so the join's state, keys.join_state) is on another model is a
-- write to another hash slot: its commit puts its place into its own model's outbox (flag A
-- of commit.lua), and its model's mover (workers/mover.py) fills the place here, on the
-- join's slot, with one call per slot for a page of them.  As in commit.lua, a child's first
-- result fills its place once (a second move of the same entry is a join_missed, nothing
-- more); the one that fills the last place enqueues the join step once (the `fired` mark),
-- into its stream, or into this slot's outbox where the step is for another model (the
-- join's model's mover takes it on).  The join's trace event goes into the trace list of
-- the join's model.
--
-- KEYS: 1 stats hash of the join's model, 2 its outbox, then per child: the join's state,
--       its trace list (the state again when not traced), then for h its step's stream,
--       lane set and queued counts.
-- ARGV: 1 consumer group, then per child: h (step in this slot) or o (through the outbox),
--       its id, its result, tenant of the join, the join's trace event ('' when not
--       traced), result ttl s, then for o the step's stream, lane set and queued counts.
-- Returns: {joined, fired, missed}.
-- Built by workers/mover.py (join_args).

local group, box = ARGV[1], KEYS[2]
local joined, fired, missed = 0, 0, 0
local a, k = 2, 3
while a <= #ARGV do
  local here = ARGV[a] == 'h'
  local state, tkey = KEYS[k], KEYS[k + 1]
  local member, result, jtenant, jevent, ttl = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3],
    ARGV[a + 4], ARGV[a + 5]
  local stream, lanes, queued
  if here then
    stream, lanes, queued = KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]
    k = k + 5
    a = a + 6
  else
    stream, lanes, queued = ARGV[a + 6], ARGV[a + 7], ARGV[a + 8]
    k = k + 2
    a = a + 9
  end
  local place = 'r:' .. member
  if redis.call('HGET', state, place) == '' then
    redis.call('HSET', state, place, result)
    redis.call('EXPIRE', state, ttl)
    joined = joined + 1
    local done = redis.call('HINCRBY', state, 'ended', 1)
    if done >= tonumber(redis.call('HGET', state, 'n'))
        and redis.call('HSETNX', state, 'fired', 1) == 1 then
      local step = redis.call('HGET', state, 'task')
      if here then
        if redis.call('EXISTS', stream) == 0 then
          redis.call('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
        end
        redis.call('XADD', stream, '*', 'd', step)
        redis.call('ZADD', lanes, 1, jtenant)
        redis.call('HINCRBY', queued, jtenant, 1)
      else
        redis.call('XADD', box, '*', 's', stream, 'l', lanes, 'q', queued, 't', jtenant,
                   'd', step)
      end
      fired = fired + 1
      if jevent ~= '' and tkey ~= state then
        if redis.call('RPUSH', tkey, jevent) == 1 then redis.call('EXPIRE', tkey, ttl) end
      end
    end
  else
    missed = missed + 1
  end
end
if fired > 0 then redis.call('HINCRBY', KEYS[1], 'joins', fired) end
if missed > 0 then redis.call('HINCRBY', KEYS[1], 'join_missed', missed) end
return {joined, fired, missed}
