-- commit.lua: every state change of a finished task, one atomic step with its XACK.
--
-- One EVALSHA per group of completions (never one round trip per task).  Per task, one of
-- three outcomes (flag 1):
--   r  result: the result (first write wins: SET NX), follow-ups, trace events; the results
--      for one producer go to its reply stream as one entry per commit (a msgpack array)
--   d  dead letter: the result (status dead_lettered) and the dead-letter entry
--   y  retry: the task, one attempt further, into the delayed set with its due time
-- then the XACK.  Every outcome is fenced by the claim: a task no longer pending on this
-- consumer (reclaimed by another worker while this one stalled) changes nothing, is not
-- acknowledged, and is counted as fenced.  The claim is read once per source stream, and
-- only between the group's lowest and highest entry id.
--
-- Fan-out and fan-in (docs/agent-steps.md): a parent whose follow-ups have a join opens
-- the join's state (keys.join_state, with the parent's model) when its result is written:
-- the children it waits for, the join step and its own result.  A child's first result
-- (whatever its status) fills its place there, once; the one that fills the last place
-- enqueues the join step, once (the `fired` mark).  A child with no place (the state
-- expired, or a task that was never a child of it) changes nothing there: join_missed.
--
-- The result cache (docs/result-cache.md; loaded after schemas/lua/resultcache.lua): a
-- record with flag C is a task the cache may answer.  When its result is written: on
-- success its answer is cached (with the tenant's TTL) and, if it still leads its input's
-- in-flight hash, every task joined to it gets a result of its own, marked "joined" (a
-- cancelled one, or one past its deadline, gets that end instead); on failure one joined
-- task is queued (its tenant's stream, counted as queued) and leads.
--
-- Each source stream is one tenant's lane: a task that ends (its result or dead letter
-- written) leaves the tenant's queued count; a follow-up joins its own tenant's count and
-- marks its stream as holding work.  Results and traces live as long as the source
-- tenant's retention says.
--
-- A follow-up for another model would be a write to another hash slot (another node of a
-- Redis Cluster): it goes into this model's outbox instead (flag O), a stream entry naming
-- its stream, lane set, queued counts and tenant, and a mover (workers/mover.py) enqueues
-- it on its own model's slot, once (enqueue.lua with the follow-up's id as idempotency key).
-- Joins keep to the same rule: a join step for another model fires into this outbox (K, N),
-- and a child of a parent on another model writes its place through this outbox (A: the
-- entry names the join's state; the mover fills the place with join.lua, in that slot).
--
-- KEYS: 1 stats hash, 2 delayed set, 3 dead-letter stream, 4 queued counts, then per record
--       only the keys it uses, in this order: its source stream (flag S), result key (not
--       for y), reply stream (flag P), trace list (flag T), bulk-job output and counts (flag
--       B), per follow-up its task stream, its lane's tenant set and its model's queued
--       counts (flag F or O), then this model's outbox (flag O), the join's state, its
--       step's task stream, lane's tenant set and model's queued counts (flag J or M), the
--       cache key, in-flight hash and the model's cancelled set (flag C); last the m reply
--       streams of the built payloads.
-- ARGV: 1 group, 2 consumer, 3 reply maxlen, 4 dead maxlen, 5 m; then per record: entry id,
--       flags, v1, v2 (not for r), with S the source's lowest and highest entry id in this
--       commit, its tenant, result ttl s and trace ttl s; trace event (T), bulk-job status
--       (B), follow-up count n and n x (task, trace event, tenant) (F or O), then for O
--       the outbox's count o and o x (task, trace event, tenant, stream, lane set, queued
--       counts); the join's tenant and its step's trace event, then for J or K (this
--       record opens the join) the join step and the count c and c ids of the children it
--       waits for, for M or N (a child of the join) its own id, for A (a child whose join
--       is in another slot) its own id, the join's state, its step's stream, lane set and
--       queued counts, and the trace list of the join's model ('' when not traced); then
--       for K and N the step's stream, lane set and queued counts; for C its id, the cache
--       TTL s, the answer's shared and bare halves, the cancelled and expired halves (''
--       unless it succeeded) and the worker's clock (epoch s, for joined tasks' deadlines);
--       last m x (result count, payload).
--   flags: seven or eight bytes, '-' where absent: 1 outcome r|d|y, 2 S new source, 3 P
--       reply to the stream named next in KEYS or p to the same one as the record before,
--       4 T, 5 B,
--       6 F follow-ups, or O follow-ups some of which go through the outbox, 7 the join:
--       J opens it, M joins it, with their step's stream in this slot (KEYS: the state, the
--       step's stream, lane set and queued counts), K and N the same with the step for
--       another model (KEYS: the state, this model's outbox), A joins one in another slot
--       through the outbox (KEYS: this model's outbox), 8 C the result cache (absent: none).
--       Records come grouped by source and by reply stream, so each is named once.
--   v1/v2: r = result/-, d = result/dead letter, y = retry member (lane byte + task)/due.
--   payloads: where every result for a stream was written (no duplicate, none fenced), its
--       entry is the worker's payload; otherwise the script joins the written ones itself.
-- Returns: {written, duplicates, fenced, retried, dead-lettered}.
-- Built by workers/scripts.py (commit_args), which tests check without a server.

local group, me = ARGV[1], ARGV[2]
local reply_maxlen, dead_maxlen = ARGV[3], ARGV[4]
local m = tonumber(ARGV[5])
local a, k, n = 6, 5, #ARGV - 2 * m
local built = {}  -- reply stream -> {result count, payload} as the worker built them
for j = 1, m do
  built[KEYS[#KEYS - m + j]] = {tonumber(ARGV[n + 2 * j - 1]), ARGV[n + 2 * j]}
end
local byte = string.byte
local R, D, Y, S, P, SAME, T, B, F, O, J, M = byte('rdySPpTBFOJM', 1, 12)
local K, N, A = byte('KNA', 1, 3)
local C = byte('C')
local acks = {}
local written, dups, followups, fenced, retried, dead = 0, 0, 0, 0, 0, 0
local joins, join_missed = 0, 0

-- Enqueue a join step once (the `fired` mark), as a follow-up is enqueued: into its stream,
-- or, for another model (`box`), into this model's outbox naming its stream.
local function fire(state, stream, lanes, queued, jtenant, box)
  if redis.call('HSETNX', state, 'fired', 1) == 0 then return false end
  local step = redis.call('HGET', state, 'task')
  if box then
    redis.call('XADD', box, '*', 's', stream, 'l', lanes, 'q', queued, 't', jtenant, 'd', step)
    joins = joins + 1
    return true
  end
  if redis.call('EXISTS', stream) == 0 then
    redis.call('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
  end
  redis.call('XADD', stream, '*', 'd', step)
  redis.call('ZADD', lanes, 1, jtenant)
  redis.call('HINCRBY', queued, jtenant, 1)
  joins = joins + 1
  return true
end

-- The result cache: a finished task's answer cached, the tasks joined to it answered; or,
-- when it failed, one of them queued in its place (the others stay joined to that one).
local cache_requeued = 0
local function resolve(ckey, running, cancelled, ca, rtenant)
  local id, ttl, shared, bare = ARGV[ca], ARGV[ca + 1], ARGV[ca + 2], ARGV[ca + 3]
  local now = tonumber(ARGV[ca + 6])
  if shared ~= '' then
    redis.call('HSET', ckey, 'r', shared, 't', bare)
    redis.call('EXPIRE', ckey, ttl)
  end
  if redis.call('HGET', running, 'leader') ~= id then return end
  local all = redis.call('HGETALL', running)
  for i = 1, #all, 2 do
    if string.sub(all[i], 1, 2) == 'w:' then
      local w = rc_waiter(all[i + 1])
      if shared ~= '' then
        if redis.call('ZSCORE', cancelled, w.id) then
          rc_answer(w, ARGV[ca + 4], ARGV[ca + 4], 'joined')
        elseif w.deadline ~= '' and tonumber(w.deadline) < now then
          rc_answer(w, ARGV[ca + 5], ARGV[ca + 5], 'joined')
        else
          rc_answer(w, shared, bare, 'joined')
        end
      else
        redis.call('HDEL', running, all[i])
        redis.call('HSET', running, 'leader', w.id)
        if redis.call('EXISTS', w.stream) == 0 then
          redis.call('XGROUP', 'CREATE', w.stream, group, '0', 'MKSTREAM')
        end
        redis.call('XADD', w.stream, '*', 'd', w.payload)
        redis.call('ZADD', w.lanes, 1, rtenant)
        redis.call('HINCRBY', KEYS[4], rtenant, 1)
        cache_requeued = cache_requeued + 1
        return
      end
    end
  end
  redis.call('DEL', running)
end

local replies = {}
local owned = {}  -- per source stream: the entries pending on this consumer, read once
local ended = {}  -- tenant -> tasks of its that ended here
local src, cur_reply, tenant, result_ttl, trace_ttl
while a <= n do
  local eid, flags, v1 = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  a = a + 3
  local outcome, fs, fp, ft, fb, ff, fj, fc = byte(flags, 1, 8)
  local v2, rkey, reply, tkey, trace, bout, bcounts, bstatus, lo, hi
  local nf = 0
  if outcome ~= R then v2 = ARGV[a]; a = a + 1 end
  if fs == S then
    src = KEYS[k]
    k = k + 1
    lo, hi = ARGV[a], ARGV[a + 1]
    tenant, result_ttl, trace_ttl = ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
    a = a + 5
  end
  if outcome ~= Y then rkey = KEYS[k]; k = k + 1 end
  if fp == P then
    cur_reply = KEYS[k]
    k = k + 1
    reply = cur_reply
  elseif fp == SAME then
    reply = cur_reply
  end
  if ft == T then tkey = KEYS[k]; k = k + 1; trace = ARGV[a]; a = a + 1 end
  if fb == B then
    bout, bcounts = KEYS[k], KEYS[k + 1]
    k = k + 2
    bstatus = ARGV[a]
    a = a + 1
  end
  local no, ob, box = 0, 0, nil  -- the outbox's follow-ups: count, first argument, key
  if ff == F or ff == O then nf = tonumber(ARGV[a]); a = a + 1 end
  -- the outbox's arguments follow the follow-ups', the join's follow both
  local ja, jk, jargs = a + 3 * nf, k + 3 * nf, 0
  if ff == O then
    no, ob, box = tonumber(ARGV[ja]), ja + 1, KEYS[jk]
    ja, jk = ja + 1 + 6 * no, jk + 1
  end
  local jkeys, jbox, js, jl, jq = 0, nil, nil, nil, nil  -- the join's keys, its step's lane
  if fj == J or fj == K then
    jargs = 4 + tonumber(ARGV[ja + 3])
  elseif fj == M or fj == N then
    jargs = 3
  elseif fj == A then
    jargs, jkeys = 8, 1
  end
  if fj == J or fj == M then
    jkeys, js, jl, jq = 4, KEYS[jk + 1], KEYS[jk + 2], KEYS[jk + 3]
  elseif fj == K or fj == N then
    jkeys, jbox = 2, KEYS[jk + 1]
    js, jl, jq = ARGV[ja + jargs], ARGV[ja + jargs + 1], ARGV[ja + jargs + 2]
    jargs = jargs + 3
  end
  local ca, ck = ja + jargs, jk + jkeys  -- the cache's arguments follow the join's
  local cargs = fc == C and 7 or 0
  local mine = owned[src]
  if mine == nil then
    mine = {}
    for _, p in ipairs(redis.call('XPENDING', src, group, lo, hi, 10000000, me)) do
      mine[p[1]] = true
    end
    owned[src] = mine
  end
  if not mine[eid] then
    fenced = fenced + 1
  else
    local events = {}
    if trace then events[1] = trace end
    if outcome == Y then
      redis.call('ZADD', KEYS[2], v2, v1)
      retried = retried + 1
    elseif redis.call('SET', rkey, v1, 'NX', 'EX', result_ttl) then
      written = written + 1
      ended[tenant] = (ended[tenant] or 0) + 1
      if reply then
        local list = replies[reply]
        if list == nil then
          list = {}
          replies[reply] = list
        end
        list[#list + 1] = v1
      end
      if bstatus then
        redis.call('XADD', bout, '*', 'r', v1)
        redis.call('HINCRBY', bcounts, bstatus, 1)
      end
      if outcome == D then
        redis.call('XADD', KEYS[3], 'MAXLEN', '~', dead_maxlen, '*', 'd', v2)
        dead = dead + 1
      end
      for j = 0, nf - 1 do
        local stream, lanes, queued = KEYS[k + 3 * j], KEYS[k + 3 * j + 1], KEYS[k + 3 * j + 2]
        local child_tenant = ARGV[a + 3 * j + 2]
        if redis.call('EXISTS', stream) == 0 then
          redis.call('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
        end
        redis.call('XADD', stream, '*', 'd', ARGV[a + 3 * j])
        redis.call('ZADD', lanes, 1, child_tenant)
        redis.call('HINCRBY', queued, child_tenant, 1)
        if trace then events[#events + 1] = ARGV[a + 3 * j + 1] end
      end
      for j = 0, no - 1 do
        local b = ob + 6 * j
        redis.call('XADD', box, '*', 's', ARGV[b + 3], 'l', ARGV[b + 4], 'q', ARGV[b + 5],
                   't', ARGV[b + 2], 'd', ARGV[b])
        if trace then events[#events + 1] = ARGV[b + 1] end
      end
      followups = followups + nf + no
      if jargs > 0 then
        local state, jtenant, jevent = KEYS[jk], ARGV[ja], ARGV[ja + 1]
        local fired = false
        if fj == A then  -- the join's slot is another: the mover fills the place
          redis.call('XADD', KEYS[jk], '*', 'j', ARGV[ja + 3], 'm', ARGV[ja + 2], 'r', v1,
                     's', ARGV[ja + 4], 'l', ARGV[ja + 5], 'q', ARGV[ja + 6], 't', jtenant,
                     'e', jevent, 'k', ARGV[ja + 7], 'x', result_ttl)
        elseif fj == J or fj == K then
          local c = tonumber(ARGV[ja + 3])
          local fields = {'n', c, 'task', ARGV[ja + 2], 'parent', v1, 'ended', 0}
          for i = 1, c do
            fields[#fields + 1] = 'r:' .. ARGV[ja + 3 + i]
            fields[#fields + 1] = ''
          end
          redis.call('HSET', state, unpack(fields))
          redis.call('EXPIRE', state, result_ttl)
          fired = c == 0 and fire(state, js, jl, jq, jtenant, jbox)
        else
          local place = 'r:' .. ARGV[ja + 2]
          if redis.call('HGET', state, place) == '' then
            redis.call('HSET', state, place, v1)
            redis.call('EXPIRE', state, result_ttl)
            local done = redis.call('HINCRBY', state, 'ended', 1)
            fired = done >= tonumber(redis.call('HGET', state, 'n'))
              and fire(state, js, jl, jq, jtenant, jbox)
          else
            join_missed = join_missed + 1
          end
        end
        if fired and jevent ~= '' and tkey then events[#events + 1] = jevent end
      end
      if cargs > 0 then
        resolve(KEYS[ck], KEYS[ck + 1], KEYS[ck + 2], ca, tenant)
      end
    else
      dups = dups + 1
      events = {}
    end
    if #events > 0 and redis.call('RPUSH', tkey, unpack(events)) == #events then
      redis.call('EXPIRE', tkey, trace_ttl)
    end
    local list = acks[src]
    if list == nil then
      list = {}
      acks[src] = list
    end
    list[#list + 1] = eid
    if #list == 1000 then
      redis.call('XACK', src, group, unpack(list))
      acks[src] = {}
    end
  end
  a = ca + cargs
  k = ck + (cargs > 0 and 3 or 0)
end
for src, list in pairs(acks) do
  if #list > 0 then redis.call('XACK', src, group, unpack(list)) end
end
-- One reply entry per producer per commit: a msgpack array of the results (array 32 header).
for r, list in pairs(replies) do
  local count = #list
  local payload
  local pre = built[r]
  if pre and pre[1] == count then
    payload = pre[2]  -- all written: the results in the same order
  else
    payload = string.char(0xdd, math.floor(count / 16777216) % 256,
      math.floor(count / 65536) % 256, math.floor(count / 256) % 256, count % 256)
      .. table.concat(list)
  end
  redis.call('XADD', r, 'MAXLEN', '~', reply_maxlen, '*', 'rs', payload)
  redis.call('EXPIRE', r, result_ttl)
end
for t, count in pairs(ended) do redis.call('HINCRBY', KEYS[4], t, -count) end
redis.call('HINCRBY', KEYS[1], 'written', written)
if dups > 0 then redis.call('HINCRBY', KEYS[1], 'duplicates', dups) end
if followups > 0 then redis.call('HINCRBY', KEYS[1], 'followups', followups) end
if fenced > 0 then redis.call('HINCRBY', KEYS[1], 'fenced', fenced) end
if retried > 0 then redis.call('HINCRBY', KEYS[1], 'retried', retried) end
if dead > 0 then redis.call('HINCRBY', KEYS[1], 'dead_lettered', dead) end
if joins > 0 then redis.call('HINCRBY', KEYS[1], 'joins', joins) end
if join_missed > 0 then redis.call('HINCRBY', KEYS[1], 'join_missed', join_missed) end
if cache_requeued > 0 then
  redis.call('HINCRBY', KEYS[1], 'cache_requeued', cache_requeued)
end
return {written, dups, fenced, retried, dead}
