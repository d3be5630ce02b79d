-- pump.lua: one step of the fleet's dispatcher (tasks/dispatcher.py), atomic.
--
-- 1. Intake: moves new Celery messages from the broker queues (and from the intake list the
--    dispatcher's blocking wait filled) into per-account, per-priority fair lists; a message
--    with an ETA or countdown goes to the delayed set until it is due; delayed messages that
--    are due join the fair lists. The message itself is never changed, and never decoded here:
--    the dispatcher read each one before the step (ARGV 12..), and the step checks that what
--    it pops is what was read.
-- 2. Grants: hands the next jobs, in fair order, to the ready queue the worker threads consume,
--    as far as the limits allow: global rate (GCRA), in-flight cap and free worker threads
--    (leases, named by delivery tag, given back at the job's acknowledgement), shared
--    cool-down, per-account rate; interactive first but at most MAX_STREAK in
--    a row while batch waits; weighted deficit round-robin between the accounts of a class.
-- 3. Recovery: a granted message that no worker took custody of (its record is cleared by the
--    worker's broker transport in the same transaction that writes kombu's unacked entry) and
--    that is no longer in the ready queue was lost in a worker's fetch: it goes back to intake.
--    Whether it is still queued is known without a scan: each push onto the ready queue is
--    numbered, workers take from the other end in order, so the pushes numbered up to
--    (pushes so far - the queue's length) have been taken. A message someone else put in the
--    queue (kombu restoring an unacknowledged one) only makes that estimate lower while it is
--    there: a record is then checked later, never too early.
--
-- KEYS  1 intake list        2 delayed zset         3 ready queue (a kombu list)
--       4 leases zset        5 transit hash         6 transit:seq zset (tag -> push number)
--       7 workers hash       8 workers:seen zset    9 dispatcher lock
--      10 overrides hash (rate, burst, max_in_flight; `paused`: no grant at all)
--      11 tat                 12 cooldown
--      13 account rates     14 account weights     15 account timelines (zset: account -> TAT)
--      16 streak            17 wake list
--      18..21 interactive: active set, ring list, credit hash, queue key prefix
--      22..25 batch:       active set, ring list, credit hash, queue key prefix
--      26 kombu's unacknowledged hash (delivery tag -> message)
--      27 busy zset (jobs passed without a grant: they hold worker threads too)
--      28 pushes onto the ready queue (a counter)  29 records whose message left the ready queue
--      30 an earlier version's transit:at zset     31 parked accounts (zset: class:account -> TAT)
--      32 messages set aside (no worker could read them, or none registers their task), for
--         the dispatcher to file in the dead letters or to park
--      33 parked polls (hash: task id -> a delayed message that continues a call)
--      34 hooked (zset: task ids whose webhook brought their result -> expiry)
--      35.. the Celery queues to take jobs from (kombu's lists), in consumption order
-- ARGV  1 dispatcher id     2 lock ms              3 rate/s (0: none)
--       4 burst             5 in-flight cap (0: none)
--       6 default per-account rate/s (0: none)     7 lease seconds
--       8 max interactive streak                   9 most messages read per step
--      10 most grants per step                    11 seconds a message may be out of the ready
--                                                    queue before its record is cleared
--      12.. what the dispatcher read of the messages waiting (tasks/messages.py), for each list
--         in KEYS order (the intake list, then each Celery queue, oldest first), then for the
--         delayed set (earliest first): a count n, then n groups of six: the message's
--         fingerprint, its code (kind c/p/o, class i/b/-, continues 1/0), account, task id,
--         delivery tag, due time (epoch seconds or ''). A message popped here whose fingerprint
--         differs (another consumer took the one that was read) ends that list's reading for
--         the step, and what was popped goes back as it was.
-- Returns {code, wait, granted, read, recovered, due_in, rejected, unread,
--          account1, class1, dwell1, task id1, ...}
--   code 1 OK, -3 NOT_DISPATCHER (this caller does not hold the lock)
--   wait: '0' more may be due now; > 0 seconds to the next possible grant; '-1' nobody waits;
--         '-2' the in-flight cap or every worker thread is taken
--   due_in: seconds until the next delayed message is due, '-1' none
--   rejected: messages this step set aside (KEYS[32])
--   unread: messages left to read after this step (the intake list, the Celery queues, delayed
--           ones due): the dispatcher reads them before its next step, which is then due now
--   then four values per grant: account, class (i|b), seconds it waited since intake, task id

if redis.call('GET', KEYS[9]) ~= ARGV[1] then return {-3, '0', 0, 0, 0, '-1', 0, 0} end
redis.call('PEXPIRE', KEYS[9], tonumber(ARGV[2]))

local INTAKE, DELAYED, READY, LEASES, TRANSIT, TRANSIT_AT = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local WORKERS, SEEN, OVERRIDES, TAT, COOLDOWN = KEYS[7], KEYS[8], KEYS[10], KEYS[11], KEYS[12]
local ACCT_RATE, ACCT_WEIGHT, ACCT_TAT, STREAK, WAKE = KEYS[13], KEYS[14], KEYS[15], KEYS[16], KEYS[17]
local UNACKED, BUSY, PUSHED, LEFT, LEGACY, PARKED = KEYS[26], KEYS[27], KEYS[28], KEYS[29], KEYS[30], KEYS[31]
local REJECTED, PARKED_POLLS, HOOKED = KEYS[32], KEYS[33], KEYS[34]
local CLASS = {
  i = {active = KEYS[18], ring = KEYS[19], credit = KEYS[20], q = KEYS[21]},
  b = {active = KEYS[22], ring = KEYS[23], credit = KEYS[24], q = KEYS[25]},
}

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local o = redis.call('HMGET', OVERRIDES, 'rate', 'burst', 'max_in_flight', 'paused')
local paused = o[4] ~= false  -- Runware refused the API key: no grant until the fleet resumes
local rate = tonumber(o[1] or ARGV[3]) or 0
local burst = math.max(1, tonumber(o[2] or ARGV[4]) or 1)
local cap = tonumber(o[3] or ARGV[5]) or 0
local default_account_rate = tonumber(ARGV[6]) or 0
local lease_s = tonumber(ARGV[7])
local max_streak = tonumber(ARGV[8])
local max_read = tonumber(ARGV[9])
local max_grants = tonumber(ARGV[10])
local transit_age = tonumber(ARGV[11])

local function fingerprint(raw)
  local ends = string.sub(raw, 1, 512)
  if #raw > 512 then ends = ends .. string.sub(raw, -512) end
  return #raw .. ':' .. redis.sha1hex(ends)
end

-- The reads of ARGV 12..: each call returns the next section's count and its first group.
local at = 12
local function next_reads()
  local n = tonumber(ARGV[at])
  local first = at + 1
  at = first + n * 6
  return n, first
end

local pushed0 = tonumber(redis.call('GET', PUSHED) or '0')
local pushed = pushed0
local function to_ready(raw, tag, recorded)
  redis.call('LPUSH', READY, raw)
  pushed = pushed + 1
  if tag and recorded then
    redis.call('HSET', TRANSIT, tag, raw)
    redis.call('ZADD', TRANSIT_AT, pushed, tag)
  end
end

local read_count, rejected = 0, 0
-- A message whose countdown just ended and that continues a call under way (a poll, marked so
-- by the task: header enhance_continues '1') goes to the head of its account's list, so that a
-- video being polled does not wait behind its own account's backlog. A retry starts over: it
-- queues at the tail like a new job, or failing jobs could keep fresh ones from ever starting.
-- g: the index in ARGV of the message's read.
local function take_in(raw, g, was_delayed)
  read_count = read_count + 1
  local code, account, id, tag, due = ARGV[g + 1], ARGV[g + 2], ARGV[g + 3], ARGV[g + 4], tonumber(ARGV[g + 5])
  local kind, class = string.sub(code, 1, 1), string.sub(code, 2, 2)
  if tag == '' then tag = nil end
  local continues = kind == 'c' and string.sub(code, 3, 3) == '1' and id ~= ''
  -- A poll whose webhook brought the result (tasks/webhooks.py): due now, and its run reads the
  -- result and makes no call, so it passes without a grant.
  local hooked = continues and redis.call('ZSCORE', HOOKED, id)
  if hooked then
    redis.call('ZREM', HOOKED, id)
    if tonumber(hooked) > now then kind, was_delayed, due = 'p', true, nil end
  end
  if not was_delayed and due and due > now + 0.001 then
    redis.call('ZADD', DELAYED, due, raw)
    -- (found by its task id when its webhook comes)
    if continues then redis.call('HSET', PARKED_POLLS, id, raw) end
    return
  end
  if kind == 'x' or kind == 'o' then
    -- No worker could read it, or no worker registers its task: set aside, for the dispatcher
    -- to file in the dead letters or park with the jobs of unknown tasks.
    redis.call('LPUSH', REJECTED, raw)
    rejected = rejected + 1
  elseif kind ~= 'c' then
    -- No grant, but a worker thread: counted, so that granted jobs do not queue behind these
    -- in the ready queue and then start all at once.
    if tag then
      redis.call('ZADD', BUSY, now + lease_s, tag)
      redis.call('PEXPIRE', BUSY, math.ceil((lease_s + 60) * 1000))
    end
    to_ready(raw, tag, kind == 'p')
  else
    local c = CLASS[class]
    local push = (was_delayed and string.sub(code, 3, 3) == '1') and 'LPUSH' or 'RPUSH'
    -- "<intake time>|<id length>|<tag length>|<id><tag><message>": ids and tags are the
    -- producer's strings and may contain any character, so they are cut by length.
    tag = tag or ''
    redis.call(push, c.q .. account, now .. '|' .. #id .. '|' .. #tag .. '|' .. id .. tag .. raw)
    if redis.call('SADD', c.active, account) == 1 then redis.call('RPUSH', c.ring, account) end
  end
end

-- 3. Recovery first (a lost message goes back to the intake list, read in the next step).
local recovered = 0
-- A message that has left the ready queue gets transit_age seconds for its worker's custody
-- write (which clears the record) before it counts as lost.
local taken = pushed - redis.call('LLEN', READY)
local left = redis.call('ZRANGEBYSCORE', TRANSIT_AT, '-inf', taken, 'LIMIT', 0, 200)
for _, tag in ipairs(left) do
  redis.call('ZREM', TRANSIT_AT, tag)
  redis.call('ZADD', LEFT, now + transit_age, tag)
end
-- An earlier version's records (granted at a time, place unknown): placed once, a few a step.
for _, tag in ipairs(redis.call('ZRANGE', LEGACY, 0, 9)) do
  redis.call('ZREM', LEGACY, tag)
  local raw = redis.call('HGET', TRANSIT, tag)
  if raw then
    local at = redis.call('LPOS', READY, raw)
    if at then redis.call('ZADD', TRANSIT_AT, pushed - at, tag) else redis.call('ZADD', LEFT, now + transit_age, tag) end
  end
end
for _, tag in ipairs(redis.call('ZRANGEBYSCORE', LEFT, '-inf', now, 'LIMIT', 0, 200)) do
  redis.call('ZREM', LEFT, tag)
  local raw = redis.call('HGET', TRANSIT, tag)
  if raw then
    redis.call('HDEL', TRANSIT, tag)
    -- In kombu's custody (a consumer whose transport did not clear the record): kombu
    -- redelivers it if need be, so it must not be queued a second time.
    -- At the intake list's head: this step's reads are at its tail; read in the next step.
    if redis.call('HEXISTS', UNACKED, tag) == 0 then
      redis.call('LPUSH', INTAKE, raw)
      recovered = recovered + 1
    end
  end
end

-- 1. Intake.
local SOURCES = {unpack(KEYS, 35)}  -- the Celery queues' lists
for _, key in ipairs({INTAKE, unpack(SOURCES)}) do
  local n, g = next_reads()
  local batch = n > 0 and redis.call('RPOP', key, n)
  for i, raw in ipairs(batch or {}) do
    if fingerprint(raw) ~= ARGV[g] then
      for j = #batch, i, -1 do redis.call('RPUSH', key, batch[j]) end
      break
    end
    take_in(raw, g, false)
    g = g + 6
  end
end
local n, g = next_reads()
if n > 0 then
  for _, raw in ipairs(redis.call('ZRANGEBYSCORE', DELAYED, '-inf', now, 'LIMIT', 0, n)) do
    if fingerprint(raw) ~= ARGV[g] then break end
    redis.call('ZREM', DELAYED, raw)
    if ARGV[g + 3] ~= '' then redis.call('HDEL', PARKED_POLLS, ARGV[g + 3]) end
    take_in(raw, g, true)
    g = g + 6
  end
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
expire(BUSY)
local in_flight = redis.call('ZCARD', LEASES)
local busy = redis.call('ZCARD', BUSY)

local function account_conf(acct)
  local r = redis.call('HGET', ACCT_RATE, acct)
  local w = redis.call('HGET', ACCT_WEIGHT, acct)
  return tonumber(r or default_account_rate) or 0, math.max(1, tonumber(w or '1') or 1)
end

-- Seconds until the fleet may make a call (0: now), or -2 while no slot or thread is free.
local function fleet_wait()
  if in_flight >= capacity or in_flight + busy >= threads then return -2 end
  if paused then return 1 end  -- looked at again each second (a resume also wakes the step)
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

-- Accounts out of the round-robin while their own rate holds them back come back once due
-- (at most 500 a step; the rest in the next): a walk of the ring then meets only accounts that
-- may call, so a pick costs the same at any number of waiting accounts.
local function unpark()
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', PARKED, '-inf', now, 'LIMIT', 0, 500)) do
    redis.call('ZREM', PARKED, member)
    redis.call('RPUSH', CLASS[string.sub(member, 1, 1)].ring, string.sub(member, 3))
  end
end

-- Seconds until the first parked account may call again, or nil.
local function parked_wait()
  local first = redis.call('ZRANGE', PARKED, 0, 0, 'WITHSCORES')
  if first[2] then return math.max(0, tonumber(first[2]) - now) end
  return nil
end

-- Weighted deficit round-robin over the accounts of one class: the next account's oldest job.
-- An account its own rate holds back leaves the ring for the parked set (it stays active, so
-- new jobs do not put it back) until its next call is due.
local function pick(class)
  local c = CLASS[class]
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
        redis.call('LPOP', c.ring)
        redis.call('ZADD', PARKED, now + aw, class .. ':' .. acct)
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
        return acct, entry, arate
      end
    end
  end
  return nil, nil, nil
end

unpark()
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
  local acct, entry, arate, class = nil, nil, nil, nil
  for _, c in ipairs(order) do
    acct, entry, arate = pick(c)
    if acct then class = c break end
  end
  if not acct then answer = parked_wait() or -1 break end
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
  to_ready(raw, tag, true)
  if class == 'i' then streak = streak + 1 else streak = 0 end
  granted = granted + 1
  dwell[#dwell + 1] = acct
  dwell[#dwell + 1] = class
  dwell[#dwell + 1] = tostring(now - since)
  dwell[#dwell + 1] = id
end
if pushed ~= pushed0 then redis.call('SET', PUSHED, string.format('%.0f', pushed)) end
if granted > 0 then
  redis.call('SET', STREAK, streak, 'EX', 3600)
  redis.call('PEXPIRE', LEASES, math.ceil((lease_s + 60) * 1000))
  redis.call('EXPIRE', ACCT_TAT, 86400)
end
-- An account's timeline a second in the past holds nothing back any more (its next call may go
-- at once, and the timeline restarts at it): it goes, so the set holds the accounts that
-- called in about their last interval, not one entry for every account ever rate-limited.
redis.call('ZREMRANGEBYSCORE', ACCT_TAT, '-inf', now - 1)
local unread = redis.call('LLEN', INTAKE) + redis.call('ZCOUNT', DELAYED, '-inf', now)
for _, key in ipairs(SOURCES) do unread = unread + redis.call('LLEN', key) end
if unread > 0 then answer = 0 end

local due_in = '-1'
local next_due = redis.call('ZRANGE', DELAYED, 0, 0, 'WITHSCORES')
if next_due[2] then due_in = tostring(math.max(0, tonumber(next_due[2]) - now)) end
redis.call('DEL', WAKE)
local reply = {1, tostring(answer or 0), granted, read_count, recovered, due_in, rejected, unread}
for _, v in ipairs(dwell) do reply[#reply + 1] = v end
return reply
