-- money_gauges.lua: the ledger's figures for one metrics scrape, in one trip (workers/metrics.py).
-- Money is integer micro-dollars.
--
-- KEYS  1 today's totals (hash: total, tasks, acct:<a>, acct_tasks:<a>)
--       2 reservations (hash taskUUID -> cjson {e = estimate micro, a = account, ...})
--       3 reservations by due time (zset)   4 reserved sums (hash: total, acct:<a>)
--       5 dead letters (list)
-- Returns {dead letters, unsettled calls, today's fleet total (flat: 'total' -> micro; the
--          per-account fields are read in chunks by the caller), reserved sums (flat),
--          unsettled by account (flat: 'total' and 'acct:<a>' -> micro)}
-- A reservation is unsettled once it is due (its job stopped following it); until the
-- reconciler settles it, it counts against the budgets at its estimate, like one in progress.
-- A scrape decodes at most the 1,000 that fell due first (after an outage there can be tens of
-- thousands): past those, the fleet's total counts the rest at their mean estimate, and the
-- per-account sums cover only those 1,000. The number of unsettled calls is always exact.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 1000)
local count = #due
if count == 1000 then count = redis.call('ZCOUNT', KEYS[3], '-inf', now) end
local sums, order = {total = 0}, {'total'}
for _, uuid in ipairs(due) do
  local raw = redis.call('HGET', KEYS[2], uuid)
  if raw then
    local entry = cjson.decode(raw)
    local field = 'acct:' .. entry.a
    if not sums[field] then
      sums[field] = 0
      order[#order + 1] = field
    end
    sums[field] = sums[field] + entry.e
    sums.total = sums.total + entry.e
  end
end
if count > #due and #due > 0 then
  sums.total = sums.total + math.floor(sums.total / #due * (count - #due) + 0.5)
end
local unsettled = {}
for _, field in ipairs(order) do
  unsettled[#unsettled + 1] = field
  unsettled[#unsettled + 1] = sums[field]
end
return {
  redis.call('LLEN', KEYS[5]), count, {'total', redis.call('HGET', KEYS[1], 'total') or 0},
  redis.call('HGETALL', KEYS[4]), unsettled,
}
