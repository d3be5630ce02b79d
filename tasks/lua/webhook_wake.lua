-- webhook_wake.lua: a webhook brought an async call's result; the job that polls it runs now.
--
-- The job's next run (a poll, parked in the delayed set by pump.lua until its countdown ends)
-- becomes due at once, and is marked so that the dispatcher passes it without a grant: it reads
-- the result the receiver stored and makes no call (a worker runs what the intake hands it at
-- once, whatever ETA the message carries: config/transport.py). A job not parked yet (its run
-- that submitted the call has not re-scheduled it, or its poll is on its way to the intake) is
-- passed the same way as soon as its poll arrives. A mark counts until its expiry (pump.lua
-- checks it); expired marks go here. A job is woken once: a repeated wake changes nothing.
--
-- KEYS  1 parked polls (hash: task id -> delayed message)   2 delayed zset
--       3 hooked (zset: task id -> expiry)                  4 wake list (the dispatcher's)
--       5 the job's woken marker (a string, expiring)
-- ARGV  1 the job's task id    2 seconds the mark is kept
-- Returns 1 when a parked poll was made due now, 0 when none was parked (the mark waits for
-- it), -1 when the job was already woken.

if redis.call('SET', KEYS[5], '1', 'NX', 'EX', tonumber(ARGV[2])) == false then return -1 end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), ARGV[1])
local woken = 0
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if raw and redis.call('ZSCORE', KEYS[2], raw) then
  redis.call('ZADD', KEYS[2], 'XX', now, raw)
  woken = 1
end
redis.call('LPUSH', KEYS[4], '1')
redis.call('LTRIM', KEYS[4], 0, 15)
return woken
