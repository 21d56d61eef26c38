-- enqueue.lua: a chunk of one tenant's tasks for one lane of a model, with their idempotency
-- keys, within the tenant's quotas.
--
-- One EVALSHA per chunk, so a chunk costs one round trip.  A task whose idempotency key was
-- seen before is not added again; the answer names the task holding the key.  Quotas (0: no
-- limit): `max_queued` tasks queued and not ended, `tokens_per_minute` tokens enqueued this
-- minute.  All or nothing unless `partial` is 1: then the tasks that fit, in order, go in.
-- The tenant is marked as having queued work in the lane's tenant set; a new stream gets its
-- consumer group here, so that no worker meets a stream without one.
--
-- The result cache (docs/result-cache.md; loaded after schemas/lua/resultcache.lua): a task
-- with a cache key is answered at once from the cached answer there (its result written,
-- marked "hit", nothing queued); else, if an identical task is in flight (the in-flight
-- hash names a leader), it joins it (its waiter kept there, nothing queued: the leader's
-- commit answers it); else it is queued as the leader.  Hits and joins are counted in the
-- stats hash and take no quota.
--
-- KEYS: 1 the tenant's lane stream, 2 the lane's tenant set, 3 queued counts, 4 this
--       minute's token counts, 5 quota refusals, 6 stats hash, then per task its idempotency
--       key (if it has one), then its cache key and in-flight hash (if it has them).
-- ARGV: 1 idempotency ttl s, 2 tenant, 3 max_queued, 4 tokens_per_minute, 5 partial (1|0),
--       6 consumer group, then per task: its tokens, the index k of its idempotency key in
--       KEYS (0: none), the index c of its cache key in KEYS (0: none), its id (if k > 0),
--       its payload, its waiter (if c > 0: schemas/resultcache.py, `waiter`; the payload is
--       appended to it here).
-- Returns: {0, added, index, prior task id, ...}: the tasks that went in (`added` counts the
--       ones taken, duplicates, hits and joins included) and those not added because their
--       key was used; or {1, quota}: refused, nothing added ("max_queued" or
--       "tokens_per_minute").
-- Built by producer/enqueue.py (enqueue_args).

local idem_ttl, tenant = ARGV[1], ARGV[2]
local max_queued, tpm = tonumber(ARGV[3]), tonumber(ARGV[4])
local partial, group = ARGV[5] == '1', ARGV[6]
local n = #ARGV
-- The next task's arguments start at a + step(a).
local function step(a)
  return 4 + (tonumber(ARGV[a + 1]) > 0 and 1 or 0) + (tonumber(ARGV[a + 2]) > 0 and 1 or 0)
end
-- How many fit, in order, within the quotas.
local take, taken_tokens = 0, 0
local count = 0
local a = 7
while a <= n do
  count = count + 1
  a = a + step(a)
end
take = count
local blocked = nil
if max_queued > 0 or tpm > 0 then
  local queued = tonumber(redis.call('HGET', KEYS[3], tenant) or '0')
  local used = tonumber(redis.call('HGET', KEYS[4], tenant) or '0')
  take, a = 0, 7
  while a <= n do
    local tokens = tonumber(ARGV[a])
    if max_queued > 0 and queued + take + 1 > max_queued then blocked = 'max_queued'; break end
    if tpm > 0 and used + taken_tokens + tokens > tpm then blocked = 'tokens_per_minute'; break end
    take = take + 1
    taken_tokens = taken_tokens + tokens
    a = a + step(a)
  end
  if take == 0 or (blocked and not partial) then
    redis.call('HINCRBY', KEYS[5], tenant .. '|' .. blocked, 1)
    return {1, blocked}
  end
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[1], group, '0', 'MKSTREAM')
end
local result = {0, take}
local added, tokens_added, hits, joins = 0, 0, 0, 0
a = 7
for i = 0, take - 1 do
  local tokens, k, c = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local at, prior = a + 3, nil
  a = a + step(a)
  if k > 0 then
    prior = redis.call('SET', KEYS[k], ARGV[at], 'NX', 'GET', 'EX', idem_ttl)
    at = at + 1
  end
  local payload, queue = ARGV[at], true
  if prior then
    result[#result + 1] = i
    result[#result + 1] = prior
    queue = false
  elseif c > 0 then
    local blob = ARGV[at + 1] .. string.format('%08d', #payload) .. payload
    local cached = redis.call('HMGET', KEYS[c], 'r', 't')
    if cached[1] then
      rc_answer(rc_waiter(blob), cached[1], cached[2], 'hit')
      hits = hits + 1
      queue = false
    else
      local running = KEYS[c + 1]
      local w = rc_waiter(blob)
      if redis.call('HSETNX', running, 'leader', w.id) == 0 then
        redis.call('HSET', running, 'w:' .. w.id, blob)
        joins = joins + 1
        queue = false
      end
      -- A backstop: a leader that never ends (its entry deleted by hand) frees the input.
      redis.call('EXPIRE', running, idem_ttl)
    end
  end
  if queue then
    redis.call('XADD', KEYS[1], '*', 'd', payload)
    added = added + 1
    tokens_added = tokens_added + tokens
  end
end
if hits > 0 then redis.call('HINCRBY', KEYS[6], 'cache_hits', hits) end
if joins > 0 then redis.call('HINCRBY', KEYS[6], 'cache_joins', joins) end
if added > 0 then
  redis.call('HINCRBY', KEYS[3], tenant, added)
  redis.call('ZADD', KEYS[2], 1, tenant)
  if tpm > 0 then
    redis.call('HINCRBY', KEYS[4], tenant, tokens_added)
    redis.call('EXPIRE', KEYS[4], 120)
  end
end
return result
