"""The fair scheduler behind the fleet-wide limit: who gets the next call slot.

When every slot is free and nobody waits, a call goes at once (one script, `ENQUEUE`). Otherwise
it takes a ticket in a queue of its account and priority, and one dispatcher in the fleet
(elected by a lock in Redis; every worker process runs a candidate thread) hands out slots as the
limits allow (`TICK`):

    worker thread ──ENQUEUE──▶ q:i:<account> (interactive) ┐
                               q:b:<account> (batch)       ├─ TICK (dispatcher) ─▶ grant:<ticket>
                               ...                         ┘        │
    worker thread ◀──────────────────── BLPOP grant:<ticket> ◀──────┘

- Between priorities: interactive first, but after MAX_STREAK interactive grants in a row a
  waiting batch job goes, so batch work keeps at least 1 slot in MAX_STREAK + 1.
- Between accounts of one priority: weighted deficit round-robin over the accounts that have
  tickets (weight from `enhance-worker limits set ACCOUNT --weight N`, default 1). An account
  with nothing waiting leaves the ring, so its share flows to the others.
- Per account: an optional rate (RUNWARE_ACCOUNT_RATE_LIMIT, or a run-time override) skips an
  account until its own timeline allows it.
- Fleet-wide: the rate (GCRA timeline), in-flight cap (leases) and cool-down of tasks/limiter.py,
  all in the same scripts, so the global limit stays exact.

A waiter that is not served within RUNWARE_LIMIT_MAX_WAIT_S takes its ticket back (`CANCEL`) and
its job is re-scheduled; a ticket whose waiter died is dropped once it is older than that bound.
"""

from __future__ import annotations

MAX_STREAK = 9

# ARGV: 1 key prefix, 2 rate/s (0 none), 3 burst, 4 cap (0 none), 5 default account rate/s,
#       6 lease seconds, 7 max interactive streak
_PRELUDE = """
local P = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local o = redis.call('HMGET', P .. ':overrides', 'rate', 'burst', 'max_in_flight')
local rate = tonumber(o[1] or ARGV[2]) or 0
local burst = math.max(1, tonumber(o[2] or ARGV[3]) or 1)
local cap = tonumber(o[3] or ARGV[4]) or 0
local default_account_rate = tonumber(ARGV[5]) or 0
local lease_s = tonumber(ARGV[6])
local max_streak = tonumber(ARGV[7])

local function account_conf(acct)
  local c = redis.call('HMGET', P .. ':acct:' .. acct, 'rate', 'weight')
  return tonumber(c[1] or default_account_rate) or 0, math.max(1, tonumber(c[2] or '1') or 1)
end

-- Seconds until the fleet may make a call (0: now), or -2 while the in-flight cap is full.
local function fleet_wait()
  redis.call('ZREMRANGEBYSCORE', P .. ':leases', '-inf', now)
  if cap > 0 and redis.call('ZCARD', P .. ':leases') >= cap then return -2 end
  local w = 0
  local cool = tonumber(redis.call('GET', P .. ':cooldown') or '0')
  if cool > now then w = cool - now end
  if rate > 0 then
    local tat = tonumber(redis.call('GET', P .. ':tat') or '0')
    local due = tat - (burst - 1) / rate
    if due - now > w then w = due - now end
  end
  return w
end

local function account_wait(acct, arate)
  if arate <= 0 then return 0 end
  local tat = tonumber(redis.call('GET', P .. ':acct:tat:' .. acct) or '0')
  return math.max(0, tat - now)
end

-- One step on a timeline. A grant a little late keeps the cadence (no slot is lost to the
-- dispatcher's own delay); after a quiet spell the timeline starts again from now.
local function advance(key, r)
  local interval = 1 / r
  local tat = tonumber(redis.call('GET', key) or '0')
  local base = tat
  if tat < now - interval / 2 then base = now end
  local new = base + interval
  redis.call('SET', key, tostring(new), 'PX', math.ceil((new - now + 60) * 1000))
end

-- Take a slot for `lease`; returns 1 when the holder must release it (lease or strikes).
local function take(acct, arate, lease)
  if rate > 0 then advance(P .. ':tat', rate) end
  if arate > 0 then advance(P .. ':acct:tat:' .. acct, arate) end
  if cap > 0 then
    redis.call('ZADD', P .. ':leases', now + lease_s, lease)
    redis.call('PEXPIRE', P .. ':leases', math.ceil((lease_s + 60) * 1000))
    return 1
  end
  return redis.call('EXISTS', P .. ':strikes')
end
"""

# ARGV 8: account, 9: priority class (i|b), 10: ticket. Returns {1, needs_release} when the
# call may go now, {2, 0} when it was queued.
ENQUEUE = (
    _PRELUDE
    + """
local acct, class, ticket = ARGV[8], ARGV[9], ARGV[10]
local arate = account_conf(acct)
if redis.call('SCARD', P .. ':active:i') == 0 and redis.call('SCARD', P .. ':active:b') == 0 then
  if fleet_wait() == 0 and account_wait(acct, arate) == 0 then
    return {1, take(acct, arate, ticket)}
  end
end
redis.call('RPUSH', P .. ':q:' .. class .. ':' .. acct, ticket)
if redis.call('SADD', P .. ':active:' .. class, acct) == 1 then
  redis.call('RPUSH', P .. ':ring:' .. class, acct)
end
redis.call('HSET', P .. ':tickets', ticket, tostring(now))
redis.call('LPUSH', P .. ':wake', '1')
redis.call('LTRIM', P .. ':wake', 0, 15)
redis.call('PEXPIRE', P .. ':wake', 10000)
return {2, 0}
"""
)

# ARGV 8: dispatcher id, 9: lock ms, 10: most grants in one call, 11: ticket max age (s).
# Returns {wait, granted}: wait 0 (more may be due), > 0 seconds to the next possible grant,
# -1 nobody waits, -2 the cap is full, -3 this dispatcher lost its role.
TICK = (
    _PRELUDE
    + """
if redis.call('GET', P .. ':dispatcher') ~= ARGV[8] then return {'-3', 0} end
redis.call('PEXPIRE', P .. ':dispatcher', tonumber(ARGV[9]))
local max_age = tonumber(ARGV[11])

local function leave(ring, class, acct)
  redis.call('LREM', ring, 1, acct)
  redis.call('SREM', P .. ':active:' .. class, acct)
  redis.call('HDEL', P .. ':credit:' .. class, acct)
end

-- Weighted deficit round-robin over the accounts of one priority class.
local function pick(class)
  local ring = P .. ':ring:' .. class
  local soonest = nil
  for _ = 1, redis.call('LLEN', ring) do
    local acct = redis.call('LINDEX', ring, 0)
    if not acct then break end
    local q = P .. ':q:' .. class .. ':' .. acct
    local ticket = redis.call('LINDEX', q, 0)
    while ticket do  -- drop tickets whose waiters gave up or died
      local since = tonumber(redis.call('HGET', P .. ':tickets', ticket) or '0')
      if since >= now - max_age then break end
      redis.call('LPOP', q)
      redis.call('HDEL', P .. ':tickets', ticket)
      ticket = redis.call('LINDEX', q, 0)
    end
    if not ticket then
      leave(ring, class, acct)
    else
      local arate, weight = account_conf(acct)
      local aw = account_wait(acct, arate)
      if aw > 0 then
        redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
        if not soonest or aw < soonest then soonest = aw end
      else
        local credit = tonumber(redis.call('HGET', P .. ':credit:' .. class, acct) or '0')
        if credit <= 0 then credit = weight end
        credit = credit - 1
        redis.call('LPOP', q)
        if redis.call('LLEN', q) == 0 then
          leave(ring, class, acct)
        elseif credit <= 0 then
          redis.call('HDEL', P .. ':credit:' .. class, acct)
          redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
        else
          redis.call('HSET', P .. ':credit:' .. class, acct, credit)
        end
        return acct, ticket, arate, nil
      end
    end
  end
  return nil, nil, nil, soonest
end

local streak = tonumber(redis.call('GET', P .. ':streak') or '0')
local granted = 0
local answer = nil
for _ = 1, tonumber(ARGV[10]) do
  local w = fleet_wait()
  if w ~= 0 then answer = w break end
  local has_i = redis.call('SCARD', P .. ':active:i') > 0
  local has_b = redis.call('SCARD', P .. ':active:b') > 0
  if not has_i and not has_b then answer = -1 break end
  local order = {'b', 'i'}
  if has_i and (not has_b or streak < max_streak) then order = {'i', 'b'} end
  local acct, ticket, arate, class, soonest = nil, nil, nil, nil, nil
  for _, c in ipairs(order) do
    local s
    acct, ticket, arate, s = pick(c)
    if acct then class = c break end
    if s and (not soonest or s < soonest) then soonest = s end
  end
  if not acct then answer = soonest or -1 break end
  local needs = take(acct, arate, ticket)
  redis.call('HDEL', P .. ':tickets', ticket)
  redis.call('RPUSH', P .. ':grant:' .. ticket, tostring(needs))
  redis.call('EXPIRE', P .. ':grant:' .. ticket, 60)
  if class == 'i' then streak = streak + 1 else streak = 0 end
  granted = granted + 1
end
redis.call('SET', P .. ':streak', streak, 'EX', 3600)
return {tostring(answer or 0), granted}
"""
)

# KEYS none; ARGV: 1 prefix, 2 account, 3 class, 4 ticket. Returns {1, position} when the
# ticket was taken back (position: how many of its account's tickets were ahead of it), or
# {0, needs_release} when it had been granted meanwhile (the caller goes ahead).
CANCEL = """
local P, acct, class, ticket = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local q = P .. ':q:' .. class .. ':' .. acct
local position = redis.call('LPOS', q, ticket)
local removed = redis.call('LREM', q, 1, ticket)
redis.call('HDEL', P .. ':tickets', ticket)
if removed == 1 then return {1, position or 0} end
local granted = redis.call('LPOP', P .. ':grant:' .. ticket)
if granted then return {0, tonumber(granted)} end
return {1, 0}
"""
