-- batch_seen.lua: record the custom ids of one chunk of a batch file's validation pass;
-- answer the ones seen before, with the line that first held them.
--
-- KEYS: 1 the pass's seen hash.
-- ARGV: 1 ttl s, then custom id, line number, ...
-- Returns: a flat list {index in the chunk, first line, ...}.

local dups = {}
for i = 2, #ARGV, 2 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 0 then
    dups[#dups + 1] = (i - 2) / 2
    dups[#dups + 1] = redis.call('HGET', KEYS[1], ARGV[i])
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return dups
