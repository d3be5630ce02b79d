-- Drop a reservation: the call was refused by Runware, or never reached it (after ledger_lib.lua).
-- ARGV 3: when the reconciler claimed it ('' for none): then it is dropped only if no run of its
--      job took it up again since (a run moves its due time past the claim).
-- Returns 1 when a reservation was dropped.
local claimed = tonumber(ARGV[3])
local entry = reservation()
if not entry then return 0 end
if claimed then
  local score = tonumber(redis.call('ZSCORE', KEYS[3], uuid) or '0')
  if score > claimed then return 0 end
end
unreserve(entry)
return 1
