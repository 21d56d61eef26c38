-- deactivate.lua: mark a tenant's lane stream drained, so that workers stop reading it until
-- a producer adds to it again (enqueue.lua sets the mark back to 1).  Only when the
-- consumer group has delivered everything the stream ever held: atomic against enqueue.lua,
-- so no task is left unread.
--
-- KEYS: 1 the lane's tenant set, then each tenant's streams (`per` of them: its stream and
--       its affinity partitions, docs/affinity.md), in the order of ARGV.
-- ARGV: 1 consumer group, 2 streams per tenant (`per`), then the tenants.
-- Returns: how many were marked drained.

local group, per = ARGV[1], tonumber(ARGV[2])

local function drained(stream)
  if redis.call('EXISTS', stream) == 0 then return true end
  local last, delivered = nil, nil
  local info = redis.call('XINFO', 'STREAM', stream)
  for j = 1, #info, 2 do
    if info[j] == 'last-generated-id' then last = info[j + 1] end
  end
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local name, at = nil, nil
    for j = 1, #g, 2 do
      if g[j] == 'name' then name = g[j + 1] end
      if g[j] == 'last-delivered-id' then at = g[j + 1] end
    end
    if name == group then delivered = at end
  end
  return delivered ~= nil and last == delivered
end

local marked = 0
for i = 3, #ARGV do
  local tenant = ARGV[i]
  if redis.call('ZSCORE', KEYS[1], tenant) == '1' then
    local all = true
    local first = 2 + (i - 3) * per
    for k = first, first + per - 1 do
      if not drained(KEYS[k]) then all = false; break end
    end
    if all then
      redis.call('ZADD', KEYS[1], 0, tenant)
      marked = marked + 1
    end
  end
end
return marked
