-- A call's start, in one round trip (after ledger_lib.lua).
-- KEYS 5: today's totals, 6: the task's poll marker, 7: its "send alone" marker,
--      8, 9: the highest real cost per shape seen today and yesterday (hashes)
--      10: the accounts' daily budgets set at run time (account -> micro, -1: none), which win
--          over ARGV 6
-- ARGV 3: account, 4: the configured estimate (micro), 5: the fleet's daily budget (micro, -1:
--      none), 6: the account's (micro, -1: none), 7: seconds until a reservation whose job shows
--      no sign of life is due for reconciliation, 8: today (YYYY-MM-DD), 9: the call's shape,
--      10: the worker process making the call ('' unknown: its death is noticed by time only)
-- Returns {3, record} when the task already finished (nothing reserved);
--         {1, poll marker or '', alone 0|1, estimate, now} when the call may go (reserved;
--           now: Redis's clock, which every host shares);
--         {0, 1 fleet | 2 account, spent or reserved, estimate, of which unsettled, 1 if that
--           is all of it or 0 if at least that (enough for the call to fit), the budget,
--           1 if the account's was set at run time else 0} refused.
local account, shape = ARGV[3], ARGV[9]
local done = redis.call('GET', KEYS[1])
if done then return {3, done} end
local marker = redis.call('GET', KEYS[6]) or ''
local alone = redis.call('EXISTS', KEYS[7])
local due = now + tonumber(ARGV[7])
local held = reservation()
if held then  -- a retry, poll or redelivery of a call this task already reserved for
  redis.call('ZADD', KEYS[3], due, uuid)
  if held.w ~= ARGV[10] then
    unhold(held.w)
    held.w = ARGV[10]
    redis.call('HSET', KEYS[2], uuid, cjson.encode(held))
  end
  hold(held.w)  -- (again: the claim drops the index of a holder it found missing)
  return {1, marker, alone, held.e, tostring(now)}
end

-- The estimate: the configured one, or the highest real cost of this shape seen lately.
local estimate = tonumber(ARGV[4])
for _, key in ipairs({KEYS[8], KEYS[9]}) do
  local seen = tonumber(redis.call('HGET', key, shape) or '0')
  if seen > estimate then estimate = seen end
end

-- Reservations already due count at their estimate until they are settled; when one refuses a
-- call, the caller learns whether enough of it is unsettled that the call would fit once they
-- are settled (then it waits, rather than fail). The sum stops as soon as it is enough, and
-- after UNSETTLED_READ reservations (10,000 unsettled after an outage): then the call is told
-- it may fit (`needed`), and waits for the reconciler rather than fail on a guess.
local UNSETTLED_READ = 1000
local function unsettled(only, needed)  -- {sum, 1 if it is all of it, 0 if at least}
  local sum = 0
  local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, UNSETTLED_READ)
  for i, id in ipairs(due) do
    local raw = redis.call('HGET', KEYS[2], id)
    if raw then
      local entry = cjson.decode(raw)
      if only == nil or entry.a == only then sum = sum + entry.e end
      if sum >= needed then return {sum, (i == #due and #due < UNSETTLED_READ) and 1 or 0} end
    end
  end
  -- Stopped at the limit: the fleet's calls beyond it may make it fit, so it waits. An
  -- account's may not (the rest may all be other accounts'): its sum is what was read.
  if #due >= UNSETTLED_READ then
    if only == nil then return {math.max(sum, needed), 0} end
    return {sum, 0}
  end
  return {sum, 1}
end
local fleet_budget, account_budget = tonumber(ARGV[5]), tonumber(ARGV[6])
local own = redis.call('HGET', KEYS[10], account)
if own then account_budget = tonumber(own) end
if fleet_budget >= 0 then
  local spent = tonumber(redis.call('HGET', KEYS[5], 'total') or '0')
      + tonumber(redis.call('HGET', KEYS[4], 'total') or '0')
  if spent + estimate > fleet_budget then
    local found = unsettled(nil, spent + estimate - fleet_budget)
    return {0, 1, spent, estimate, found[1], found[2], fleet_budget, 0}
  end
end
if account_budget >= 0 then
  local spent = tonumber(redis.call('HGET', KEYS[5], 'acct:' .. account) or '0')
      + tonumber(redis.call('HGET', KEYS[4], 'acct:' .. account) or '0')
  if spent + estimate > account_budget then
    local found = unsettled(account, spent + estimate - account_budget)
    return {0, 2, spent, estimate, found[1], found[2], account_budget, own and 1 or 0}
  end
end
redis.call('HSET', KEYS[2], uuid, cjson.encode({e = estimate, a = account, d = ARGV[8], s = shape, t = now, w = ARGV[10]}))
hold(ARGV[10])
redis.call('ZADD', KEYS[3], due, uuid)
redis.call('HINCRBY', KEYS[4], 'total', estimate)
redis.call('HINCRBY', KEYS[4], 'acct:' .. account, estimate)
return {1, marker, alone, estimate, tostring(now)}
