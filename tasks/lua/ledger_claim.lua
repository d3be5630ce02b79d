-- The reconciler's claim: reservations due now, each moved one period later so that no other
-- reconciler (nor the next period) takes it while its check runs.
-- KEYS 1: reservations (hash), 2: reservations by due time (zset)
-- ARGV 1: the period (seconds), 2: at most this many
-- Returns a flat list: taskUUID, its reservation (cjson), the due time it was claimed at.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local claimed = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))) do
  local raw = redis.call('HGET', KEYS[1], id)
  if raw then
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[1]), id)
    table.insert(claimed, id)
    table.insert(claimed, raw)
    table.insert(claimed, redis.call('ZSCORE', KEYS[2], id))
  else
    redis.call('ZREM', KEYS[2], id)
  end
end
return claimed
