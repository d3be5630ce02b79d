-- The ledger's shared part: every ledger script but ledger_claim.lua is this file followed by
-- its own.
--
-- Money is integer micro-dollars. A call reserves its estimate before it leaves; the reservation
-- stays until the call's outcome is recorded (its real cost, once) or Runware says it never
-- accepted it. No reservation expires by time: one whose job stopped following it (a killed
-- worker, a timeout, retries run out) becomes due and is reconciled with getResponse.
--
-- KEYS common to those scripts:
--   1 the task's record: "<cost micro>|<items JSON>" of a finished call, kept while a job can
--     come back for its items (its cost is counted once by the billed-once markers below)
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

-- The reservations held by each worker process (<reservations>:by:<holder>, a set), and the
-- holders that have any (<reservations>:holders): the reconciler finds a dead process's calls
-- through them, without reading every reservation.
local HOLDERS = KEYS[2] .. ':holders'
local function hold(holder)
  if holder and holder ~= '' then
    redis.call('SADD', HOLDERS, holder)
    redis.call('SADD', KEYS[2] .. ':by:' .. holder, uuid)
  end
end
local function unhold(holder)
  if holder and holder ~= '' then
    local held_by = KEYS[2] .. ':by:' .. holder
    redis.call('SREM', held_by, uuid)
    if redis.call('SCARD', held_by) == 0 then redis.call('SREM', HOLDERS, holder) end
  end
end

local function unreserve(entry)
  if entry then
    decrease('total', entry.e)
    decrease('acct:' .. entry.a, entry.e)
    redis.call('HDEL', KEYS[2], uuid)
    unhold(entry.w)
  end
  redis.call('ZREM', KEYS[3], uuid)
end

-- The billed-once markers: taskUUID -> cost, in hashes that each cover `span` seconds
-- (<prefix>:billed:<span>:<n>, n = time / span); a lookup reads the last BILLED_BUCKETS + 1, so a
-- marker counts for at least `billed_ttl` seconds, and costs a hash field, not a key. The field
-- is the UUID's 16 bytes, not its 36 characters: a marker is kept 8 days, and those 20 bytes
-- are a quarter of its memory. The caller makes it (`field`, tasks/ledger.py marker_field): made
-- here, with Lua's string functions, it was about an eighth of the end's time in Redis. The
-- bucket that leaves the window is removed with UNLINK, which frees it off Redis's main thread:
-- at a high job rate a bucket holds millions of fields, too many to free inline when a key
-- expires. Its expiry, a span later, is only the fallback for a fleet that stopped writing.
local BILLED_BUCKETS = 8
local function first_billing(cost, billed_ttl, field)
  local span = math.ceil(billed_ttl / BILLED_BUCKETS)
  local current = math.floor(now / span)
  local name = prefix .. ':billed:' .. span .. ':'
  for n = current - BILLED_BUCKETS, current do
    if redis.call('HEXISTS', name .. n, field) == 1 then return false end
  end
  redis.call('UNLINK', name .. (current - BILLED_BUCKETS - 1))
  redis.call('HSET', name .. current, field, cost)
  redis.call('EXPIREAT', name .. current, (current + BILLED_BUCKETS + 2) * span)
  return true
end

-- Record the real cost of a finished call once per taskUUID (a redelivered, retried or
-- reconciled call that ends again changes nothing but its items' lifetime), on the day its
-- reservation was made. The items stay `items_ttl` seconds (KEYS[1]: a job that comes back gets
-- them without a call); the billed-once marker, far smaller, `billed_ttl`.
local function record(entry, account, cost, items, items_ttl, billed_ttl, day_ttl, today, field)
  -- The items of a call already recorded count as its marker too (a record written before
  -- the markers existed, or under another RUNWARE_BILLED_RETENTION_S, whose buckets differ).
  local recorded = redis.call('EXISTS', KEYS[1]) == 1
  redis.call('SET', KEYS[1], cost .. '|' .. items, 'EX', items_ttl)
  if recorded or not first_billing(cost, billed_ttl, field) then return 0 end
  local day = prefix .. ':day:' .. ((entry and entry.d) or today)
  redis.call('HINCRBY', day, 'total', cost)
  redis.call('HINCRBY', day, 'tasks', 1)
  redis.call('HINCRBY', day, 'acct:' .. account, cost)
  redis.call('HINCRBY', day, 'acct_tasks:' .. account, 1)
  redis.call('EXPIRE', day, day_ttl)
  return 1
end
