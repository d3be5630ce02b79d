-- gauges_accounts.lua: one chunk of the waiting accounts of one priority class, for a metrics
-- scrape (workers/metrics.py calls it until the cursor comes back 0: each call reads at most
-- ARGV[2] accounts, so none grows with the number of accounts).
--
-- KEYS  1 the class's active set (accounts with jobs waiting)   2 its queue key prefix
-- ARGV  1 SSCAN cursor ('0' to start)   2 accounts per call
-- Returns {next cursor, account1, depth1, oldest age1 (s), ...} (an account may come twice
-- across calls, as SSCAN may return it twice: the caller keeps one)
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local scan = redis.call('SSCAN', KEYS[1], ARGV[1], 'COUNT', tonumber(ARGV[2]))
local reply = {scan[1]}
for _, acct in ipairs(scan[2]) do
  local q = KEYS[2] .. acct
  local head = redis.call('LINDEX', q, 0)
  local age = 0
  if head then
    -- a fair list's entry starts with its intake time: "<since>|..." (pump_lib.lua)
    local since = tonumber(string.sub(head, 1, string.find(head, '|', 1, true) - 1))
    age = math.max(0, now - since)
  end
  reply[#reply + 1] = acct
  reply[#reply + 1] = redis.call('LLEN', q)
  reply[#reply + 1] = tostring(age)
end
return reply
