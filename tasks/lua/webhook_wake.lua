-- webhook_wake.lua: a webhook brought an async call's result; the job that polls it runs now.
--
-- The job's next run (a poll, parked in the delayed set by pump.lua until its countdown ends)
-- becomes due at once, and is marked so that the dispatcher passes it without a grant: it reads
-- the result the receiver stored and makes no call. A job not parked yet (its run that
-- submitted the call has not re-scheduled it) is passed the same way as soon as its poll
-- arrives. The mark expires; expired marks go here.
--
-- KEYS  1 parked polls (hash: task id -> delayed message)   2 delayed zset
--       3 hooked (zset: task id -> expiry)                  4 wake list (the dispatcher's)
-- ARGV  1 the job's task id    2 seconds the mark is kept
--       3 the parked message as the receiver read it ('' when none was parked)
--       4 the same message without its ETA (a worker would hold one with an ETA until then)
-- Returns 1 when a parked poll was made due now, else 0.

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), ARGV[1])
local woken = 0
-- Still parked as it was read (the step may have taken it since: then it is on its way).
if ARGV[3] ~= '' and redis.call('ZSCORE', KEYS[2], ARGV[3]) then
  redis.call('ZREM', KEYS[2], ARGV[3])
  redis.call('ZADD', KEYS[2], now, ARGV[4])
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
  woken = 1
end
redis.call('LPUSH', KEYS[4], '1')
redis.call('LTRIM', KEYS[4], 0, 15)
return woken
