-- pump.lua: one step of the fleet's dispatcher (tasks/dispatcher.py), atomic.
--
-- 1. Intake: moves new Celery messages from the broker queues (and from the intake list the
--    dispatcher's blocking wait filled) into per-account, per-priority fair lists; a message
--    with an ETA or countdown goes to the delayed set until it is due; delayed messages that
--    are due join the fair lists. The message itself is never changed.
-- 2. Grants: hands the next jobs, in fair order, to the ready queue the worker threads consume,
--    as far as the limits allow: global rate (GCRA), in-flight cap and free worker threads
--    (leases, named by delivery tag, given back at the job's acknowledgement), shared
--    cool-down, per-account rate; interactive first but at most MAX_STREAK in
--    a row while batch waits; weighted deficit round-robin between the accounts of a class.
-- 3. Recovery: a granted message that no worker took custody of (its record is cleared by the
--    worker's broker transport in the same transaction that writes kombu's unacked entry) and
--    that is no longer in the ready queue was lost in a worker's fetch: it goes back to intake.
--
-- KEYS  1 intake list        2 delayed zset         3 ready queue (a kombu list)
--       4 leases zset        5 transit hash         6 transit:at zset
--       7 workers hash       8 workers:seen zset    9 dispatcher lock
--      10 overrides hash    11 tat                 12 cooldown
--      13 account rates     14 account weights     15 account timelines (zset: account -> TAT)
--      16 streak            17 wake list
--      18..21 interactive: active set, ring list, credit hash, queue key prefix
--      22..25 batch:       active set, ring list, credit hash, queue key prefix
--      26 kombu's unacknowledged hash (delivery tag -> message)
--      27 busy zset (jobs passed without a grant: they hold worker threads too)
--      28.. the Celery queues to take jobs from (kombu's lists), in consumption order
-- ARGV  1 dispatcher id     2 lock ms              3 rate/s (0: none)
--       4 burst             5 in-flight cap (0: none)
--       6 default per-account rate/s (0: none)     7 lease seconds
--       8 max interactive streak                   9 most messages read per step
--      10 most grants per step                    11 seconds before an untaken grant is checked
--      12 names of the tasks that call Runware, space-separated with spaces around
--      13 names of every task the workers know, likewise
--      14 the largest message body (bytes) decoded here: larger ones never are
-- Returns {code, wait, granted, read, recovered, due_in, account1, class1, dwell1, ...}
--   code 1 OK, -3 NOT_DISPATCHER (this caller does not hold the lock)
--   wait: '0' more may be due now; > 0 seconds to the next possible grant; '-1' nobody waits;
--         '-2' the in-flight cap or every worker thread is taken
--   due_in: seconds until the next delayed message is due, '-1' none
--   then one triple per grant: account, class (i|b), seconds it waited since intake

if redis.call('GET', KEYS[9]) ~= ARGV[1] then return {-3, '0', 0, 0, 0, '-1'} end
redis.call('PEXPIRE', KEYS[9], tonumber(ARGV[2]))

local INTAKE, DELAYED, READY, LEASES, TRANSIT, TRANSIT_AT = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local WORKERS, SEEN, OVERRIDES, TAT, COOLDOWN = KEYS[7], KEYS[8], KEYS[10], KEYS[11], KEYS[12]
local ACCT_RATE, ACCT_WEIGHT, ACCT_TAT, STREAK, WAKE = KEYS[13], KEYS[14], KEYS[15], KEYS[16], KEYS[17]
local CLASS = {
  i = {active = KEYS[18], ring = KEYS[19], credit = KEYS[20], q = KEYS[21]},
  b = {active = KEYS[22], ring = KEYS[23], credit = KEYS[24], q = KEYS[25]},
}

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local o = redis.call('HMGET', OVERRIDES, 'rate', 'burst', 'max_in_flight')
local rate = tonumber(o[1] or ARGV[3]) or 0
local burst = math.max(1, tonumber(o[2] or ARGV[4]) or 1)
local cap = tonumber(o[3] or ARGV[5]) or 0
local default_account_rate = tonumber(ARGV[6]) or 0
local lease_s = tonumber(ARGV[7])
local max_streak = tonumber(ARGV[8])
local max_read = tonumber(ARGV[9])
local max_grants = tonumber(ARGV[10])
local transit_age = tonumber(ARGV[11])
local calls_runware, known = ARGV[12], ARGV[13]
local max_decode = tonumber(ARGV[14])
local null = cjson.null

-- --- reading a kombu message ------------------------------------------------------------------
local B64 = {}
do
  local alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/'
  for i = 1, 64 do B64[string.byte(alphabet, i)] = i - 1 end
end
local floor, char, byte = math.floor, string.char, string.byte

local function b64decode(s)
  local parts, n = {}, 0
  for i = 1, #s, 4 do
    local a, b, c, d = byte(s, i, i + 3)
    local vc, vd = B64[c], B64[d]
    local v = (B64[a] or 0) * 262144 + (B64[b] or 0) * 4096 + (vc or 0) * 64 + (vd or 0)
    local b1, b2, b3 = floor(v / 65536), floor(v / 256) % 256, v % 256
    n = n + 1
    if vd then parts[n] = char(b1, b2, b3) elseif vc then parts[n] = char(b1, b2) else parts[n] = char(b1) end
  end
  return table.concat(parts)
end

local function value(x) if x == null then return nil end return x end

-- Seconds since the epoch of an ISO 8601 time (Celery's eta), or nil.
local function epoch(iso)
  if type(iso) ~= 'string' then return nil end
  local y, mo, d, h, mi, rest = string.match(iso, '^(%d%d%d%d)-(%d%d)-(%d%d)[T ](%d%d):(%d%d)(.*)$')
  if not y then return nil end
  local s = string.match(rest, '^:(%d%d%.?%d*)') or '0'
  y, mo = tonumber(y), tonumber(mo)
  if mo <= 2 then y = y - 1 end
  local era = floor(y / 400)
  local yoe = y - era * 400
  local mp = (mo + 9) % 12
  local doy = floor((153 * mp + 2) / 5) + tonumber(d) - 1
  local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
  local days = era * 146097 + doe - 719468
  local seconds = days * 86400 + tonumber(h) * 3600 + tonumber(mi) * 60 + tonumber(s)
  local sign, oh, om = string.match(iso, '([%+%-])(%d%d):?(%d%d)$')
  if sign then
    local offset = tonumber(oh) * 3600 + tonumber(om) * 60
    if sign == '+' then seconds = seconds - offset else seconds = seconds + offset end
  end
  return seconds
end

-- The envelope of a kombu message without decoding its body: kombu writes the body first, as
-- one base64 string (no quote or backslash in it), so the envelope is the text after its
-- closing quote; cjson then reads only the headers and properties. Another layout (a producer
-- that orders the fields otherwise, or a body that is not base64) is decoded whole if it is
-- small, and refused ('other': Celery reports it) if it is not.
local BODY_START = '{"body": "'
local function envelope(raw)
  if string.sub(raw, 1, #BODY_START) == BODY_START then
    local close = string.find(raw, '"', #BODY_START + 1, true)
    if close and string.byte(raw, close - 1) ~= 92 then  -- 92: a backslash, an escaped quote
      local ok, env = pcall(cjson.decode, '{"body":""' .. string.sub(raw, close + 1))
      if ok and type(env) == 'table' then return env, #BODY_START + 1, close - 1 end
    end
  end
  if #raw > max_decode then return nil end
  local ok, env = pcall(cjson.decode, raw)
  if not ok or type(env) ~= 'table' then return nil end
  local body = env['body']
  if type(body) ~= 'string' then return env, nil, nil end
  -- The body was decoded with the rest: keep it where body() looks for it.
  env['_body'] = body
  return env, nil, nil
end

-- A message's body (the task's arguments), decoded only when the task calls Runware and the
-- body is at most ARGV[14] bytes; a larger one's call is granted as the default account's.
local function body(raw, env, headers, first, last)
  if env['content-type'] ~= 'application/json' or value(headers['compression']) ~= nil then
    return nil
  end
  local text = env['_body']
  if text == nil then
    if not first or last - first + 1 > max_decode then return nil end
    text = string.sub(raw, first, last)
  end
  if #text > max_decode then return nil end
  local props = type(env['properties']) == 'table' and env['properties'] or {}
  if props['body_encoding'] == 'base64' then text = b64decode(text) end
  local ok, decoded = pcall(cjson.decode, text)
  if ok and type(decoded) == 'table' then return decoded end
  return nil
end

-- What a message is: kind 'call' (calls Runware: wait for a grant), 'pass' (a known task that
-- needs no grant, or a call that will fail its validation), 'other' (a task the workers do not
-- know: Celery reports it); its account, class, task id, delivery tag and due time.
local function read(raw)
  local env, first, last = envelope(raw)
  if not env then return 'other' end
  local headers = type(env['headers']) == 'table' and env['headers'] or {}
  local props = type(env['properties']) == 'table' and env['properties'] or {}
  local tag = value(props['delivery_tag'])
  local task, id, eta = value(headers['task']), value(headers['id']), value(headers['eta'])
  local continues = value(headers['enhance_continues']) == '1'
  local kwargs = nil
  if task == nil then  -- protocol 1: the body is the request, task name included
    local decoded = body(raw, env, headers, first, last)
    if decoded then
      task, id, eta = value(decoded['task']), value(decoded['id']), value(decoded['eta'])
      kwargs = decoded['kwargs']
    end
  end
  if type(tag) ~= 'string' then tag = nil end
  if type(id) ~= 'string' then id = nil end
  local due = epoch(eta)
  if type(task) ~= 'string' or not string.find(known, ' ' .. task .. ' ', 1, true) then
    return 'other', nil, nil, id, tag, due, continues
  end
  if not string.find(calls_runware, ' ' .. task .. ' ', 1, true) or not id then
    return 'pass', nil, nil, id, tag, due, continues
  end
  if kwargs == nil and value(headers['task']) ~= nil then
    local decoded = body(raw, env, headers, first, last)
    -- A body too large to decode here (an embedded chain or chord can make a valid call's
    -- message large) is not read: the call still waits for a grant, under account 'default'.
    if decoded then kwargs = decoded[2] end  -- protocol 2: [args, kwargs, embed]
  end
  if type(kwargs) ~= 'table' then return 'call', 'default', 'i', id, tag, due, continues end
  local account, priority = kwargs['account'], kwargs['priority']
  if account == nil then account = 'default' end
  if priority == nil then priority = 'interactive' end
  -- The same rule as the task's own validation: a label it refuses gets no grant (the job
  -- fails at once without calling Runware).
  if type(account) ~= 'string' or #account > 64 or not string.match(account, '^[%w_%.:@%-]+$') then
    return 'pass', nil, nil, id, tag, due
  end
  local class = nil
  if priority == 'interactive' then class = 'i' elseif priority == 'batch' then class = 'b' end
  if not class then return 'pass', nil, nil, id, tag, due end
  return 'call', account, class, id, tag, due, continues
end

local function to_ready(raw, tag)
  redis.call('LPUSH', READY, raw)
  if tag then
    redis.call('HSET', TRANSIT, tag, raw)
    redis.call('ZADD', TRANSIT_AT, now, tag)
  end
end

local read_count = 0
-- A message whose countdown just ended and that continues a call under way (a poll, marked so
-- by the task: header enhance_continues '1') goes to the head of its account's list, so that a
-- video being polled does not wait behind its own account's backlog. A retry starts over: it
-- queues at the tail like a new job, or failing jobs could keep fresh ones from ever starting.
local function take_in(raw, was_delayed)
  read_count = read_count + 1
  local kind, account, class, id, tag, due, continues = read(raw)
  if not was_delayed and due and due > now + 0.001 then
    redis.call('ZADD', DELAYED, due, raw)
    return
  end
  if kind == 'other' or kind == 'pass' then
    -- No grant, but a worker thread: counted, so that granted jobs do not queue behind these
    -- in the ready queue and then start all at once.
    if tag then
      redis.call('ZADD', KEYS[27], now + lease_s, tag)
      redis.call('PEXPIRE', KEYS[27], math.ceil((lease_s + 60) * 1000))
    end
    if kind == 'other' then redis.call('LPUSH', READY, raw) else to_ready(raw, tag) end
  else
    local c = CLASS[class]
    local push = (was_delayed and continues) and 'LPUSH' or 'RPUSH'
    -- "<intake time>|<id length>|<tag length>|<id><tag><message>": ids and tags are the
    -- producer's strings and may contain any character, so they are cut by length.
    tag = tag or ''
    redis.call(push, c.q .. account, now .. '|' .. #id .. '|' .. #tag .. '|' .. id .. tag .. raw)
    if redis.call('SADD', c.active, account) == 1 then redis.call('RPUSH', c.ring, account) end
  end
end

-- 3. Recovery first, so that a lost message is read again in this same step.
local recovered = 0
for _, tag in ipairs(redis.call('ZRANGEBYSCORE', TRANSIT_AT, '-inf', now - transit_age, 'LIMIT', 0, 20)) do
  local raw = redis.call('HGET', TRANSIT, tag)
  if raw and redis.call('LPOS', READY, raw) then
    redis.call('ZADD', TRANSIT_AT, now, tag)  -- still queued: every worker thread is busy
  else
    redis.call('HDEL', TRANSIT, tag)
    redis.call('ZREM', TRANSIT_AT, tag)
    -- In kombu's custody (a consumer whose transport did not clear the record): kombu
    -- redelivers it if need be, so it must not be queued a second time.
    if raw and redis.call('HEXISTS', KEYS[26], tag) == 0 then
      redis.call('RPUSH', INTAKE, raw)
      recovered = recovered + 1
    end
  end
end

-- 1. Intake.
for _, key in ipairs({INTAKE, unpack(KEYS, 28)}) do
  while read_count < max_read do
    local batch = redis.call('RPOP', key, math.min(100, max_read - read_count))
    if not batch then break end
    for _, raw in ipairs(batch) do take_in(raw, false) end
  end
end
for _, raw in ipairs(redis.call('ZRANGEBYSCORE', DELAYED, '-inf', now, 'LIMIT', 0, max_read)) do
  redis.call('ZREM', DELAYED, raw)
  take_in(raw, true)
end

-- 2. Grants.
local threads = 0
for _, w in ipairs(redis.call('ZRANGEBYSCORE', SEEN, '-inf', now)) do
  redis.call('HDEL', WORKERS, w)
  redis.call('ZREM', SEEN, w)
end
for _, n in ipairs(redis.call('HVALS', WORKERS)) do threads = threads + tonumber(n) end
local capacity = threads
if cap > 0 and cap < capacity then capacity = cap end
-- A slot (a lease, or a passed job's thread in the busy set) ends with its job's
-- acknowledgement; its expiry is the fallback for a worker that died holding the job. One whose
-- job still waits in the ready queue (its transit record is there: no worker has taken it) is
-- renewed, never released: released, it would let grants pile up behind the queue, and those
-- jobs would then start together, past the cap and the rate. At most 200 expired entries are
-- looked at per step; the rest stay counted until a later step.
-- A renewal keeps the set itself alive too: its own expiry (set when something is added) would
-- otherwise drop every slot at once while a long queue drains.
local function expire(set)
  local renewed = false
  for _, tag in ipairs(redis.call('ZRANGEBYSCORE', set, '-inf', now, 'LIMIT', 0, 200)) do
    if redis.call('HEXISTS', TRANSIT, tag) == 1 then
      redis.call('ZADD', set, now + lease_s, tag)
      renewed = true
    else
      redis.call('ZREM', set, tag)
    end
  end
  if renewed then redis.call('PEXPIRE', set, math.ceil((lease_s + 60) * 1000)) end
end
expire(LEASES)
expire(KEYS[27])
local in_flight = redis.call('ZCARD', LEASES)
local busy = redis.call('ZCARD', KEYS[27])

local function account_conf(acct)
  local r = redis.call('HGET', ACCT_RATE, acct)
  local w = redis.call('HGET', ACCT_WEIGHT, acct)
  return tonumber(r or default_account_rate) or 0, math.max(1, tonumber(w or '1') or 1)
end

-- Seconds until the fleet may make a call (0: now), or -2 while no slot or thread is free.
local function fleet_wait()
  if in_flight >= capacity or in_flight + busy >= threads then return -2 end
  local w = 0
  local cool = tonumber(redis.call('GET', COOLDOWN) or '0')
  if cool > now then w = cool - now end
  if rate > 0 then
    local due = tonumber(redis.call('GET', TAT) or '0') - (burst - 1) / rate
    if due - now > w then w = due - now end
  end
  return w
end

local function account_wait(acct, arate)
  if arate <= 0 then return 0 end
  return math.max(0, (tonumber(redis.call('ZSCORE', ACCT_TAT, acct) or '0')) - now)
end

-- A grant a little late keeps the cadence: the slots its lateness skipped are caught up at
-- once, so the dispatcher's own delays (a wake-up, the CPU) cost no rate. Lateness is forgiven
-- up to half an interval or 25 ms, whichever is more; 25 ms of catching up adds at most
-- 2.5% + 1 to any one-second window. After a longer quiet spell the timeline restarts at now.
local function advance(tat, r)
  local interval = 1 / r
  local base = tat
  if tat < now - math.max(interval / 2, 0.025) then base = now end
  return base + interval
end

local function leave(c, acct)
  redis.call('LREM', c.ring, 1, acct)
  redis.call('SREM', c.active, acct)
  redis.call('HDEL', c.credit, acct)
end

-- Weighted deficit round-robin over the accounts of one class: the next account's oldest job.
local function pick(class)
  local c = CLASS[class]
  local soonest = nil
  for _ = 1, redis.call('LLEN', c.ring) do
    local acct = redis.call('LINDEX', c.ring, 0)
    if not acct then break end
    local q = c.q .. acct
    if redis.call('LLEN', q) == 0 then
      leave(c, acct)
    else
      local arate, weight = account_conf(acct)
      local aw = account_wait(acct, arate)
      if aw > 0 then
        redis.call('LMOVE', c.ring, c.ring, 'LEFT', 'RIGHT')
        if not soonest or aw < soonest then soonest = aw end
      else
        local credit = tonumber(redis.call('HGET', c.credit, acct) or '0')
        if credit <= 0 then credit = weight end
        credit = credit - 1
        local entry = redis.call('LPOP', q)
        if redis.call('LLEN', q) == 0 then
          leave(c, acct)
        elseif credit <= 0 then
          redis.call('HDEL', c.credit, acct)
          redis.call('LMOVE', c.ring, c.ring, 'LEFT', 'RIGHT')
        else
          redis.call('HSET', c.credit, acct, credit)
        end
        return acct, entry, arate, nil
      end
    end
  end
  return nil, nil, nil, soonest
end

local streak = tonumber(redis.call('GET', STREAK) or '0')
local granted, answer, dwell = 0, nil, {}
while granted < max_grants do
  local w = fleet_wait()
  if w ~= 0 then answer = w break end
  local has_i = redis.call('SCARD', CLASS.i.active) > 0
  local has_b = redis.call('SCARD', CLASS.b.active) > 0
  if not has_i and not has_b then answer = -1 break end
  local order = {'b', 'i'}
  if has_i and (not has_b or streak < max_streak) then order = {'i', 'b'} end
  local acct, entry, arate, class, soonest = nil, nil, nil, nil, nil
  for _, c in ipairs(order) do
    local s
    acct, entry, arate, s = pick(c)
    if acct then class = c break end
    if s and (not soonest or s < soonest) then soonest = s end
  end
  if not acct then answer = soonest or -1 break end
  -- entry: "<intake time>|<id length>|<tag length>|<id><tag><message>"
  local p1 = string.find(entry, '|', 1, true)
  local p2 = string.find(entry, '|', p1 + 1, true)
  local p3 = string.find(entry, '|', p2 + 1, true)
  local since = tonumber(string.sub(entry, 1, p1 - 1))
  local id_len = tonumber(string.sub(entry, p1 + 1, p2 - 1))
  local tag_len = tonumber(string.sub(entry, p2 + 1, p3 - 1))
  local id = string.sub(entry, p3 + 1, p3 + id_len)
  local tag = string.sub(entry, p3 + id_len + 1, p3 + id_len + tag_len)
  local raw = string.sub(entry, p3 + id_len + tag_len + 1)
  if rate > 0 then
    local new = advance(tonumber(redis.call('GET', TAT) or '0'), rate)
    redis.call('SET', TAT, tostring(new), 'PX', math.ceil((new - now + 60) * 1000))
  end
  if arate > 0 then
    local tat = advance(tonumber(redis.call('ZSCORE', ACCT_TAT, acct) or '0'), arate)
    redis.call('ZADD', ACCT_TAT, tat, acct)
  end
  -- The slot is named by the delivery tag: the worker's transport gives it back in the same
  -- transaction that acknowledges the message (config/transport.py).
  if tag == '' then tag = nil end
  redis.call('ZADD', LEASES, now + lease_s, tag or id)
  in_flight = in_flight + 1
  to_ready(raw, tag)
  if class == 'i' then streak = streak + 1 else streak = 0 end
  granted = granted + 1
  dwell[#dwell + 1] = acct
  dwell[#dwell + 1] = class
  dwell[#dwell + 1] = tostring(now - since)
end
if granted > 0 then
  redis.call('SET', STREAK, streak, 'EX', 3600)
  redis.call('PEXPIRE', LEASES, math.ceil((lease_s + 60) * 1000))
  redis.call('EXPIRE', ACCT_TAT, 86400)
end
-- An account's timeline a second in the past holds nothing back any more (its next call may go
-- at once, and the timeline restarts at it): it goes, so the set holds the accounts that
-- called in about their last interval, not one entry for every account ever rate-limited.
redis.call('ZREMRANGEBYSCORE', ACCT_TAT, '-inf', now - 1)
if read_count >= max_read then answer = 0 end

local due_in = '-1'
local next_due = redis.call('ZRANGE', DELAYED, 0, 0, 'WITHSCORES')
if next_due[2] then due_in = tostring(math.max(0, tonumber(next_due[2]) - now)) end
redis.call('DEL', WAKE)
local reply = {1, tostring(answer or 0), granted, read_count, recovered, due_in}
for _, v in ipairs(dwell) do reply[#reply + 1] = v end
return reply
