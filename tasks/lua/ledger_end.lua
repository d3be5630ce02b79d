-- A call's end, in one round trip (after ledger_lib.lua): the reservation is replaced by the
-- real cost, recorded once with the items; the poll and "send alone" markers go; the shape's
-- highest real cost of today is raised to this one.
-- KEYS 5: the poll marker, 6: the "send alone" marker, 7: today's highest cost per shape
-- ARGV 3: account, 4: real cost (micro), 5: items JSON, 6: seconds the items are kept,
--      7: seconds a day's totals are kept, 8: today, 9: the call's shape ('': the reservation's),
--      10: seconds today's highest costs are kept, 11: seconds the billed-once marker is kept,
--      12: the marker's field (the UUID's 16 bytes: tasks/ledger.py marker_field)
-- Returns 1 when this call recorded the cost, 0 when it already was.
local cost = tonumber(ARGV[4])
local entry = reservation()
local shape = ARGV[9]
if shape == '' and entry then shape = entry.s or '' end
unreserve(entry)
redis.call('DEL', KEYS[5], KEYS[6])
if shape ~= '' and cost > tonumber(redis.call('HGET', KEYS[7], shape) or '-1') then
  redis.call('HSET', KEYS[7], shape, cost)
  redis.call('EXPIRE', KEYS[7], tonumber(ARGV[10]))
end
return record(
  entry, ARGV[3], cost, ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[11]), tonumber(ARGV[7]), ARGV[8],
  ARGV[12]
)
