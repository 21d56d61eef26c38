-- renew.lua: keep our claim on tasks still in the engine, so that nobody reclaims work in
-- progress; only where we still own them (a task reclaimed meanwhile stays with its owner).
--
-- KEYS: 1 task stream.
-- ARGV: 1 group, 2 consumer, then entry ids.
-- Returns: how many claims were renewed.

local n = 0
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)[1]
  if p and p[2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    n = n + 1
  end
end
return n
