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
-- KEYS: 1 the tenant's lane stream, 2 the lane's tenant set, 3 queued counts, 4 this
--       minute's token counts, 5 quota refusals, then one idempotency key per task with one.
-- ARGV: 1 idempotency ttl s, 2 tenant, 3 max_queued, 4 tokens_per_minute, 5 partial (1|0),
--       6 consumer group, then per task: its tokens, then 0 and its payload, or the index
--       of its key in KEYS, its id and its payload.
-- Returns: {0, added, index, prior task id, ...}: the tasks that went in (`added` counts the
--       ones taken, duplicates included) and those not added because their key was used;
--       or {1, quota}: refused, nothing added ("max_queued" or "tokens_per_minute").
-- Built by producer/enqueue.py (enqueue_args).

local idem_ttl, tenant = ARGV[1], ARGV[2]
local max_queued, tpm = tonumber(ARGV[3]), tonumber(ARGV[4])
local partial, group = ARGV[5] == '1', ARGV[6]
local n = #ARGV
-- How many fit, in order, within the quotas.
local take, taken_tokens = 0, 0
local count = 0
local a = 7
while a <= n do
  count = count + 1
  if tonumber(ARGV[a + 1]) == 0 then a = a + 3 else a = a + 4 end
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
    if tonumber(ARGV[a + 1]) == 0 then a = a + 3 else a = a + 4 end
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
local added, tokens_added = 0, 0
a = 7
for i = 0, take - 1 do
  local tokens, k = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local payload, prior = nil, nil
  if k == 0 then
    payload = ARGV[a + 2]
    a = a + 3
  else
    prior = redis.call('SET', KEYS[k], ARGV[a + 2], 'NX', 'GET', 'EX', idem_ttl)
    payload = ARGV[a + 3]
    a = a + 4
  end
  if prior then
    result[#result + 1] = i
    result[#result + 1] = prior
  else
    redis.call('XADD', KEYS[1], '*', 'd', payload)
    added = added + 1
    tokens_added = tokens_added + tokens
  end
end
if added > 0 then
  redis.call('HINCRBY', KEYS[3], tenant, added)
  redis.call('ZADD', KEYS[2], 1, tenant)
  if tpm > 0 then
    redis.call('HINCRBY', KEYS[4], tenant, tokens_added)
    redis.call('EXPIRE', KEYS[4], 120)
  end
end
return result
