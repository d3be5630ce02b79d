-- Drop a reservation: the call was refused by Runware, or never reached it (after ledger_lib.lua).
-- ARGV 3: the due time the reconciler claimed it at ('' for none): then it is dropped only if
--      no run of its job took it up again since (a run moves its due time).
-- Returns 1 when a reservation was dropped.
local claimed = tonumber(ARGV[3])
local entry = reservation()
if not entry then return 0 end
if claimed then
  local score = tonumber(redis.call('ZSCORE', KEYS[3], uuid) or '-1')
  if math.abs(score - claimed) > 0.001 then return 0 end
end
unreserve(entry)
return 1
