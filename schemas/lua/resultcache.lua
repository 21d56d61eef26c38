-- resultcache.lua: the result cache's shared functions, put before enqueue.lua and
-- commit.lua when they are loaded (schemas/scripts.py, `lua(..., prelude=...)`).
--
-- KEYS/ARGV: none of its own.  A cached answer (keys.result_cache) holds the shared half of
-- a result (`r`) and the same without content (`t`); a waiter (schemas/resultcache.py,
-- `waiter`) is a task that the cache answers, as length-prefixed fields.  A result is
-- put together as a msgpack map: a header for both halves' field counts plus one, the task's
-- own half, the `cache` field ("hit" or "joined"), the answer's half (docs/result-cache.md).

local RC_FIN = string.char(0x82, 0xa4) .. 'type' .. string.char(0xa3) .. 'fin'
  .. string.char(0xa6) .. 'result'  -- a Finished trace event's head: {"type": "fin", "result": ...}

local function rc_maphdr(n)
  if n < 16 then return string.char(0x80 + n) end
  return string.char(0xde, math.floor(n / 256), n % 256)
end

local function rc_str(s)  -- a msgpack fixstr (under 32 bytes)
  return string.char(0xa0 + #s) .. s
end

local function rc_waiter(blob)
  local f, at = {}, 1
  while at <= #blob do
    local len = tonumber(string.sub(blob, at, at + 7))
    f[#f + 1] = string.sub(blob, at + 8, at + 7 + len)
    at = at + 8 + len
  end
  return {id = f[1], stub = f[2], rkey = f[3], reply = f[4], tkey = f[5], result_ttl = f[6],
          trace_ttl = f[7], reply_maxlen = f[8], stream = f[9], lanes = f[10], deadline = f[11],
          payload = f[12]}
end

-- Write waiter w's result from a cached answer (its shared and bare halves), marked `mark`:
-- the result key (first write wins), its reply stream, its trace list.  True if written.
local function rc_answer(w, shared, bare, mark)
  local sn, sb = string.byte(w.stub, 1), string.sub(w.stub, 2)
  local tail = rc_str('cache') .. rc_str(mark)
  local result = rc_maphdr(sn + string.byte(shared, 1) + 1) .. sb .. tail .. string.sub(shared, 2)
  if not redis.call('SET', w.rkey, result, 'NX', 'EX', w.result_ttl) then return false end
  if w.reply ~= '' then
    redis.call('XADD', w.reply, 'MAXLEN', '~', w.reply_maxlen, '*', 'rs',
               string.char(0xdd, 0, 0, 0, 1) .. result)
    redis.call('EXPIRE', w.reply, w.result_ttl)
  end
  if w.tkey ~= '' then
    local event = RC_FIN .. rc_maphdr(sn + string.byte(bare, 1) + 1) .. sb .. tail
      .. string.sub(bare, 2)
    if redis.call('RPUSH', w.tkey, event) == 1 then redis.call('EXPIRE', w.tkey, w.trace_ttl) end
  end
  return true
end

