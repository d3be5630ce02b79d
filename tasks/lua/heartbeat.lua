-- heartbeat.lua: a worker process says it is alive and how many threads it runs, so that the
-- dispatcher grants no more jobs than the fleet has threads to start them (tasks/dispatcher.py).
-- Timed by Redis's clock, like the dispatcher's reading of it.
--
-- KEYS  1 workers hash (id -> threads)   2 workers:seen zset (id -> expiry)
-- ARGV  1 worker id   2 threads (0: leaving)   3 seconds the registration lasts
-- Returns 1.
if tonumber(ARGV[2]) <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 1
end
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], tonumber(t[1]) + tonumber(ARGV[3]), ARGV[1])
return 1
