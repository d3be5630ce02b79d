-- pump_grant.lua: the step's third phase (after pump_fair.lua), the grants, and the reply.
--
-- While the limits allow and jobs wait: the next class (interactive, unless `max_streak` of
-- them went in a row while batch waits), its next account's oldest job; the global and the
-- account's timelines advance, a lease names the slot, and the message goes to the ready queue.
unpark()
local streak = tonumber(redis.call('GET', K.streak) or '0')
local granted, answer, grants = 0, nil, {}
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
  local since, id, tag, raw = unpack_entry(entry)
  if rate > 0 then
    local new = advance(tonumber(redis.call('GET', K.tat) or '0'), rate)
    redis.call('SET', K.tat, tostring(new), 'PX', math.ceil((new - now + 60) * 1000))
  end
  if arate > 0 then
    local tat = advance(tonumber(redis.call('ZSCORE', K.account_tat, acct) or '0'), arate)
    redis.call('ZADD', K.account_tat, tat, acct)
  end
  -- The slot is named by the delivery tag: the worker's transport gives it back in the same
  -- transaction that acknowledges the message (config/transport.py).
  if tag == '' then tag = nil end
  redis.call('ZADD', K.leases, now + lease_s, tag or id)
  in_flight = in_flight + 1
  to_ready(raw, tag, true)
  if class == 'i' then streak = streak + 1 else streak = 0 end
  granted = granted + 1
  for _, v in ipairs({acct, class, tostring(now - since), id}) do grants[#grants + 1] = v end
end
if pushed ~= pushed0 then redis.call('SET', K.pushed, string.format('%.0f', pushed)) end
if granted > 0 then
  redis.call('SET', K.streak, streak, 'EX', 3600)
  redis.call('PEXPIRE', K.leases, math.ceil((lease_s + 60) * 1000))
  redis.call('EXPIRE', K.account_tat, 86400)
end
-- An account's timeline a second in the past holds nothing back any more (its next call may go
-- at once, and the timeline restarts at it): it goes, so the set holds the accounts that
-- called in about their last interval, not one entry for every account ever rate-limited.
redis.call('ZREMRANGEBYSCORE', K.account_tat, '-inf', now - 1)
local unread = redis.call('LLEN', K.intake) + redis.call('ZCOUNT', K.delayed, '-inf', now)
for _, key in ipairs(SOURCES) do unread = unread + redis.call('LLEN', key) end
if unread > 0 then answer = 0 end

local due_in = '-1'
local next_due = redis.call('ZRANGE', K.delayed, 0, 0, 'WITHSCORES')
if next_due[2] then due_in = tostring(math.max(0, tonumber(next_due[2]) - now)) end
redis.call('DEL', K.wake)
return {
  'code', 1, 'wait', tostring(answer or 0), 'granted', granted, 'read', read_count,
  'recovered', recovered, 'due_in', due_in, 'rejected', rejected, 'unread', unread,
  'grants', grants,
}
