-- reclaim.lua: take over tasks stalled on a silent consumer (a dead worker).
--
-- Tasks idle on any consumer for ARGV[3] ms move to us (XCLAIM counts a delivery).  A task
-- delivered twice already is a suspect (it may be what killed the workers): suspects are
-- claimed one at a time, and only when ARGV[5] is 1 (we run no other suspect), so a poison
-- task cannot drag its window-mates to their delivery limit.  Entries that vanished while
-- pending (trimmed or deleted by hand) are acknowledged and returned as lost.
--
-- KEYS: 1 task stream, 2 stats hash.
-- ARGV: 1 group, 2 consumer, 3 min idle ms, 4 count, 5 suspect allowed (1|0).
-- Returns: {{{id, fields, deliveries before this claim}...}, {lost ids}}.

local pend = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], '-', '+', ARGV[4])
if #pend == 0 then return {{}, {}} end
local ids, deliveries = {}, {}
local suspect_taken = ARGV[5] ~= '1'
for _, p in ipairs(pend) do
  if p[4] < 2 or not suspect_taken then
    if p[4] >= 2 then suspect_taken = true end
    ids[#ids + 1] = p[1]
    deliveries[p[1]] = p[4]
  end
end
if #ids == 0 then return {{}, {}} end
local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], unpack(ids))
local out, got = {}, {}
for _, e in ipairs(claimed) do
  if e and e[2] then
    got[e[1]] = true
    out[#out + 1] = {e[1], e[2], deliveries[e[1]]}
  end
end
local lost = {}
for _, id in ipairs(ids) do
  if not got[id] then lost[#lost + 1] = id end
end
if #lost > 0 then
  redis.call('XACK', KEYS[1], ARGV[1], unpack(lost))
  redis.call('HINCRBY', KEYS[2], 'lost', #lost)
end
return {out, lost}
