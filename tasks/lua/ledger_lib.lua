-- The ledger's shared part: every ledger script but ledger_claim.lua is this file followed by
-- its own.
--
-- Money is integer micro-dollars. A call reserves its estimate before it leaves; the reservation
-- stays until the call's outcome is recorded (its real cost, once) or Runware says it never
-- accepted it. No reservation expires by time: one whose job stopped following it (a killed
-- worker, a timeout, retries run out) becomes due and is reconciled with getResponse.
--
-- KEYS common to those scripts:
--   1 the task's record: "<cost micro>|<items JSON>" of a finished call (its cost is recorded)
--   2 reservations: hash taskUUID -> cjson {e = estimate micro, a = account, d = day,
--     s = shape, t = when it was made, w = the worker process that holds the call}
--   3 reservations by the time they are due for reconciliation (zset)
--   4 reserved sums: hash 'total' and 'acct:<account>' -> micro (a zero sum is removed)
-- ARGV common: 1 taskUUID, 2 the ledger's key prefix. A day's totals live at
-- <prefix>:day:<YYYY-MM-DD>; the cost of a call goes into the day its reservation was made,
-- which only the reservation knows, so that key is built here (the service does not run on
-- Redis Cluster).
local uuid, prefix = ARGV[1], ARGV[2]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000

local function decrease(field, amount)
  if redis.call('HINCRBY', KEYS[4], field, -amount) <= 0 then redis.call('HDEL', KEYS[4], field) end
end

local function reservation()
  local raw = redis.call('HGET', KEYS[2], uuid)
  if raw then return cjson.decode(raw) end
  return nil
end

local function unreserve(entry)
  if entry then
    decrease('total', entry.e)
    decrease('acct:' .. entry.a, entry.e)
    redis.call('HDEL', KEYS[2], uuid)
  end
  redis.call('ZREM', KEYS[3], uuid)
end

-- Record the real cost of a finished call once (a redelivered or reconciled call that ends
-- again changes nothing), with its items, on the day its reservation was made.
local function record(entry, account, cost, items, task_ttl, day_ttl, today)
  if not redis.call('SET', KEYS[1], cost .. '|' .. items, 'NX', 'EX', task_ttl) then return 0 end
  local day = prefix .. ':day:' .. ((entry and entry.d) or today)
  redis.call('HINCRBY', day, 'total', cost)
  redis.call('HINCRBY', day, 'tasks', 1)
  redis.call('HINCRBY', day, 'acct:' .. account, cost)
  redis.call('HINCRBY', day, 'acct_tasks:' .. account, 1)
  redis.call('EXPIRE', day, day_ttl)
  return 1
end
