-- pump.lua: one step of the fleet's dispatcher (tasks/dispatcher.py), atomic. The step is one
-- script made of six files, joined in this order when it is registered (tasks/scripts.py,
-- PUMP): pump_lib.lua (the message fingerprint and the fair lists' entries, functions that
-- touch no key, tested alone), this one (the keys, the arguments, what the phases share), then
-- one file per phase, in the order they run:
--
-- 1. Recovery (pump_recover.lua): a granted message that no worker took custody of and that
--    is no longer in the ready queue was lost in a worker's fetch: it goes back to intake.
-- 2. Intake (pump_intake.lua): moves new Celery messages from the broker queues (and from the
--    intake list the dispatcher's blocking wait filled) into per-account, per-priority fair
--    lists; a message with an ETA or countdown goes to the delayed set until it is due;
--    delayed messages that are due join the fair lists. A message is never changed, and never
--    decoded here: the dispatcher read each one before the step (tasks/messages.py), and the
--    step checks that what it pops is what was read.
-- 3. Grants (pump_fair.lua, then pump_grant.lua): hands the next jobs, in fair order, to the
--    ready queue the worker threads consume, as far as the limits allow: global rate (GCRA),
--    in-flight cap and free worker threads (leases, named by delivery tag, given back at the
--    job's acknowledgement), shared cool-down, per-account rate; interactive first but at most
--    `max_streak` in a row while batch waits; weighted deficit round-robin between the
--    accounts of a class. pump_grant.lua ends the step with its reply.
--
-- KEYS, by name (K.<name> below; tasks/dispatcher.py reads this list and passes them in its
-- order, each name's key from its pump_keys), then the Celery queues to take jobs from (kombu's
-- lists), in consumption order.
local KEY_NAMES = {
  'intake',          -- list: messages the dispatcher's blocking wait took, and recovered ones
  'delayed',         -- zset: messages with an ETA, by due time
  'ready',           -- list: kombu's queue the worker threads consume
  'leases',          -- zset: in-flight slots, by delivery tag -> expiry
  'transit',         -- hash: delivery tag -> a granted message no worker has taken yet
  'transit_at',      -- zset: delivery tag -> its push number onto the ready queue
  'workers',         -- hash: worker -> its threads
  'workers_seen',    -- zset: worker -> when its heartbeat expires
  'dispatcher',      -- the dispatcher lock (holds its id)
  'overrides',       -- hash: rate, burst, max_in_flight; `paused`: no grant at all
  'tat',             -- the global rate's theoretical arrival time (GCRA)
  'cooldown',        -- until when the fleet pauses after a 429 or 503
  'account_rate',    -- hash: account -> calls per second
  'account_weight',  -- hash: account -> its share in the round-robin
  'account_tat',     -- zset: account -> its own rate's theoretical arrival time
  'streak',          -- interactive grants in a row
  'wake',            -- list the dispatcher's blocking wait watches
  'i_active', 'i_ring', 'i_credit', 'i_queue',  -- interactive: set, ring, credit, queue prefix
  'b_active', 'b_ring', 'b_credit', 'b_queue',  -- batch: the same
  'unacked',         -- kombu's unacknowledged hash (delivery tag -> message)
  'busy',            -- zset: jobs passed without a grant (they hold worker threads too)
  'pushed',          -- counter: pushes onto the ready queue
  'transit_left',    -- zset: records whose message left the ready queue -> when it counts lost
  'transit_legacy',  -- zset: an earlier version's records (granted at a time, place unknown)
  'parked',          -- zset: class:account -> when its own rate lets it call again
  'rejected',        -- list: messages set aside for the dispatcher (dead letters, or parked)
  'parked_polls',    -- hash: task id -> a delayed message that continues a call
  'hooked',          -- zset: task ids whose webhook brought their result -> expiry
}
-- ARGV, by name (A.<name>; read the same way, from pump_args), then the reads (below).
local ARG_NAMES = {
  'dispatcher_id', 'lock_ms',
  'rate',               -- calls per second across the fleet (0: none)
  'burst',
  'cap',                -- most calls in flight (0: none)
  'account_rate',       -- the default per-account rate (0: none)
  'lease_s',
  'max_streak',         -- most interactive grants in a row while batch waits
  'max_read',           -- most messages read per step
  'max_grants',         -- most grants per step
  'transit_age',        -- seconds a message may be out of the ready queue before it is lost
}
-- The reads, after those: what the dispatcher read of the messages waiting, for each list in
-- order (the intake list, then each Celery queue, oldest first), then for the delayed set
-- (earliest first): a count n, then n groups of six: the message's fingerprint, its code
-- (kind c/p/o/x, class i/b/-, continues 1/0), account, task id, delivery tag, due time (epoch
-- seconds or ''). A message popped here whose fingerprint differs (another consumer took the
-- one that was read) ends that list's reading for the step, and what was popped goes back.
--
-- Returns flat name/value pairs (read by name in tasks/dispatcher.py, PumpReply):
--   code      1 OK, -3 NOT_DISPATCHER (this caller does not hold the lock: nothing else)
--   wait      '0' more may be due now; > 0 seconds to the next possible grant; '-1' nobody
--             waits; '-2' the in-flight cap or every worker thread is taken
--   granted, read, recovered, rejected (messages this step set aside in K.rejected)
--   due_in    seconds until the next delayed message is due, '-1' none
--   unread    messages left to read after this step: the dispatcher reads them first
--   grants    four values per grant: account, class (i|b), seconds it waited, task id

local K, A = {}, {}
for i, name in ipairs(KEY_NAMES) do K[name] = KEYS[i] end
for i, name in ipairs(ARG_NAMES) do A[name] = ARGV[i] end
local SOURCES = {unpack(KEYS, #KEY_NAMES + 1)}

if redis.call('GET', K.dispatcher) ~= A.dispatcher_id then return {'code', -3} end
redis.call('PEXPIRE', K.dispatcher, tonumber(A.lock_ms))

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local o = redis.call('HMGET', K.overrides, 'rate', 'burst', 'max_in_flight', 'paused')
local paused = o[4] ~= false  -- Runware refused the API key: no grant until the fleet resumes
local rate = tonumber(o[1] or A.rate) or 0
local burst = math.max(1, tonumber(o[2] or A.burst) or 1)
local cap = tonumber(o[3] or A.cap) or 0
local default_account_rate = tonumber(A.account_rate) or 0
local lease_s = tonumber(A.lease_s)
local max_streak = tonumber(A.max_streak)
local max_grants = tonumber(A.max_grants)
local transit_age = tonumber(A.transit_age)
local CLASS = {
  i = {active = K.i_active, ring = K.i_ring, credit = K.i_credit, q = K.i_queue},
  b = {active = K.b_active, ring = K.b_ring, credit = K.b_credit, q = K.b_queue},
}

-- The reads: each call returns the next section's count and the index of its first group.
local at = #ARG_NAMES + 1
local function next_reads()
  local n = tonumber(ARGV[at])
  local first = at + 1
  at = first + n * 6
  return n, first
end

-- Onto the ready queue, numbered (the recovery knows by the number whether it was taken); a
-- message with a delivery tag, `recorded`, is kept in transit until a worker takes custody.
local pushed0 = tonumber(redis.call('GET', K.pushed) or '0')
local pushed = pushed0
local function to_ready(raw, tag, recorded)
  redis.call('LPUSH', K.ready, raw)
  pushed = pushed + 1
  if tag and recorded then
    redis.call('HSET', K.transit, tag, raw)
    redis.call('ZADD', K.transit_at, pushed, tag)
  end
end
