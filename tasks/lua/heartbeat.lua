-- heartbeat.lua: a worker process says it is alive, how many threads it runs and what it reads
-- (its queues and tasks), so that the dispatcher grants no more jobs than the fleet has threads
-- to start them and serves every live worker's queues (tasks/dispatcher.py); and learns whether
-- the fleet has cool-down strikes to clear. Timed by Redis's clock, like the dispatcher's
-- reading of it.
--
-- KEYS  1 workers hash (id -> threads)   2 workers:seen zset (id -> expiry)   3 strikes
--       4 workers:intake hash (id -> JSON of its queues and tasks)
-- ARGV  1 worker id   2 threads (0: leaving)   3 seconds the registration lasts
--       4 this worker's intake (JSON)
-- Returns {1 while the fleet has cool-down strikes (a success must clear them) else 0,
--          then the intake of every live worker, this one's included}; an intake of a worker
--          whose registration expired is dropped here.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if tonumber(ARGV[2]) <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[4], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('ZADD', KEYS[2], tonumber(t[1]) + tonumber(ARGV[3]), ARGV[1])
  redis.call('HSET', KEYS[4], ARGV[1], ARGV[4])
end
local reply = {redis.call('EXISTS', KEYS[3])}
local all = redis.call('HGETALL', KEYS[4])
for i = 1, #all, 2 do
  local expiry = tonumber(redis.call('ZSCORE', KEYS[2], all[i]) or '0')
  if expiry > now then reply[#reply + 1] = all[i + 1] else redis.call('HDEL', KEYS[4], all[i]) end
end
return reply
