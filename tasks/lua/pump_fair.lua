-- pump_fair.lua: what the grants (pump_grant.lua, next) ask: is a slot free, may the fleet
-- call now, and which account's job is next. Functions, and the slots' expiry, which runs here.

-- The fleet's threads: the live workers' own counts (a worker whose heartbeat ended is dropped).
local threads = 0
for _, w in ipairs(redis.call('ZRANGEBYSCORE', K.workers_seen, '-inf', now)) do
  redis.call('HDEL', K.workers, w)
  redis.call('ZREM', K.workers_seen, w)
end
for _, n in ipairs(redis.call('HVALS', K.workers)) do threads = threads + tonumber(n) end
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
    if redis.call('HEXISTS', K.transit, tag) == 1 then
      redis.call('ZADD', set, now + lease_s, tag)
      renewed = true
    else
      redis.call('ZREM', set, tag)
    end
  end
  if renewed then redis.call('PEXPIRE', set, math.ceil((lease_s + 60) * 1000)) end
end
expire(K.leases)
expire(K.busy)
local in_flight = redis.call('ZCARD', K.leases)
local busy = redis.call('ZCARD', K.busy)

-- Seconds until the fleet may make a call (0: now), or -2 while no slot or thread is free.
local function fleet_wait()
  if in_flight >= capacity or in_flight + busy >= threads then return -2 end
  if paused then return 1 end  -- looked at again each second (a resume also wakes the step)
  local w = 0
  local cool = tonumber(redis.call('GET', K.cooldown) or '0')
  if cool > now then w = cool - now end
  if rate > 0 then
    local due = tonumber(redis.call('GET', K.tat) or '0') - (burst - 1) / rate
    if due - now > w then w = due - now end
  end
  return w
end

local function account_conf(acct)
  local r = redis.call('HGET', K.account_rate, acct)
  local w = redis.call('HGET', K.account_weight, acct)
  return tonumber(r or default_account_rate) or 0, math.max(1, tonumber(w or '1') or 1)
end

local function account_wait(acct, arate)
  if arate <= 0 then return 0 end
  return math.max(0, (tonumber(redis.call('ZSCORE', K.account_tat, acct) or '0')) - now)
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
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', K.parked, '-inf', now, 'LIMIT', 0, 500)) do
    redis.call('ZREM', K.parked, member)
    redis.call('RPUSH', CLASS[string.sub(member, 1, 1)].ring, string.sub(member, 3))
  end
end

-- Seconds until the first parked account may call again, or nil.
local function parked_wait()
  local first = redis.call('ZRANGE', K.parked, 0, 0, 'WITHSCORES')
  if first[2] then return math.max(0, tonumber(first[2]) - now) end
  return nil
end

-- Weighted deficit round-robin over the accounts of one class: the next account's oldest job
-- (its fair list's entry), and the account's own rate. An account its own rate holds back
-- leaves the ring for the parked set (it stays active, so new jobs do not put it back) until
-- its next call is due.
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
        redis.call('ZADD', K.parked, now + aw, class .. ':' .. acct)
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
