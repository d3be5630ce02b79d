-- heartbeat.lua: a worker process says it is alive and how many threads it runs, so that the
-- dispatcher grants no more jobs than the fleet has threads to start them (tasks/dispatcher.py),
-- and learns whether the fleet has cool-down strikes to clear.
-- Timed by Redis's clock, like the dispatcher's reading of it.
--
-- KEYS  1 workers hash (id -> threads)   2 workers:seen zset (id -> expiry)   3 strikes
-- ARGV  1 worker id   2 threads (0: leaving)   3 seconds the registration lasts
-- Returns 1 while the fleet has cool-down strikes (a success must clear them), else 0.
if tonumber(ARGV[2]) <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
else
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('ZADD', KEYS[2], tonumber(t[1]) + tonumber(ARGV[3]), ARGV[1])
end
return redis.call('EXISTS', KEYS[3])
