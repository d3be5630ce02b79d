-- gauges.lua: the fleet-wide figures of the fair intake and the limits for one metrics scrape,
-- in one trip (workers/metrics.py).
--
-- KEYS  1 intake list   2 delayed zset   3 ready queue   4 leases zset
--       5 cool-down (its end, epoch s)   6 strikes   7 limit overrides hash
--       8 the dispatcher lock   9.. the Celery queues jobs are taken from (kombu's lists)
-- ARGV  1 this process's id (as in the dispatcher lock)
-- Returns {waiting in the Celery queues and intake, delayed, ready, leases,
--          cool-down seconds left, strikes, max_in_flight override ('' none), rate override
--          ('' none), 1 if this process is the dispatcher else 0, 1 if the fleet is paused
--          because Runware refused the API key else 0}
-- The waiting accounts are read apart, a chunk at a time (gauges_accounts.lua), so that no
-- one call grows with the number of accounts.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local incoming = redis.call('LLEN', KEYS[1])
for i = 9, #KEYS do incoming = incoming + redis.call('LLEN', KEYS[i]) end
local cooldown = math.max(0, tonumber(redis.call('GET', KEYS[5]) or '0') - now)
local overrides = redis.call('HMGET', KEYS[7], 'max_in_flight', 'rate', 'paused')
local reply = {
  incoming, redis.call('ZCARD', KEYS[2]), redis.call('LLEN', KEYS[3]), redis.call('ZCARD', KEYS[4]),
  tostring(cooldown), tonumber(redis.call('GET', KEYS[6]) or '0'),
  overrides[1] or '', overrides[2] or '',
  (redis.call('GET', KEYS[8]) == ARGV[1]) and 1 or 0,
  overrides[3] and 1 or 0,
}
return reply
