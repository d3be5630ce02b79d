-- The reconciler's claim: unsettled reservations (due now) that no check is under way for. A
-- claimed one stays due (it is still unsettled: it counts as such in budgets and reports) and
-- is marked as being checked until ARGV 1 seconds from now or until its check reports
-- (Ledger.checked), so that a check waiting for a slot is never queued twice.
-- KEYS 1: reservations (hash; its holder index: KEY 1 .. ':holders' and KEY 1 .. ':by:<holder>',
--      kept by ledger_lib.lua), 2: reservations by due time (zset),
--      3: checks under way (zset taskUUID -> until when)
-- ARGV 1: seconds a check may take before another may be queued, 2: at most this many,
--      3: '1' when ARGV 4... list every live worker process (from their heartbeats): the calls
--      held by any other process are unsettled now (a killed worker's calls are not waited for
--      until RUNWARE_RESERVATION_S), '0' when the live ones are not known
-- Returns a flat list: taskUUID, its reservation (cjson), the claim's time (exact, as a string).
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local stamp = clock[1] .. '.' .. string.format('%06d', tonumber(clock[2]))
local ttl, most = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - 86400)  -- marks of checks that died
if ARGV[3] == '1' then
  -- The holders with reservations (an index ledger_begin keeps), not every reservation: a dead
  -- process's calls are made due now, once, and its index goes.
  local alive = {}
  for i = 4, #ARGV do alive[ARGV[i]] = true end
  local holders = KEYS[1] .. ':holders'
  for _, holder in ipairs(redis.call('SMEMBERS', holders)) do
    if not alive[holder] then
      local held_by = KEYS[1] .. ':by:' .. holder
      for _, id in ipairs(redis.call('SMEMBERS', held_by)) do
        local score = tonumber(redis.call('ZSCORE', KEYS[2], id) or '0')
        if score > now then redis.call('ZADD', KEYS[2], now, id) end
      end
      redis.call('DEL', held_by)
      redis.call('SREM', holders, holder)
    end
  end
end
local claimed, offset, page = {}, 0, 500
while #claimed < 3 * most and offset < 20000 do
  local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', offset, page)
  for _, id in ipairs(due) do
    if #claimed >= 3 * most then break end
    local raw = redis.call('HGET', KEYS[1], id)
    if raw and tonumber(redis.call('ZSCORE', KEYS[3], id) or '0') <= now then
      redis.call('ZADD', KEYS[3], now + ttl, id)
      table.insert(claimed, id)
      table.insert(claimed, raw)
      table.insert(claimed, stamp)
    end
  end
  if #due < page then break end
  offset = offset + page
end
return claimed
