-- release.lua: a call's slot given back when its run ends (tasks/limiter.py, Limiter.release).
-- Frees the lease (an in-flight slot and a worker thread for the dispatcher's count), wakes the
-- dispatcher, and records how the call went: a success clears the strikes; a throttled call
-- (429 or 503) pauses the whole fleet, doubling per strike, at least Retry-After.
--
-- KEYS  1 leases zset   2 cooldown   3 strikes   4 wake list
-- ARGV  1 lease (the task id)   2 outcome: ok | throttled | none
--       3 cool-down base s      4 cool-down max s
--       5 Retry-After s (0: none)   6 longest Retry-After honoured
-- Returns the pause started, in seconds ('0': none).
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('LPUSH', KEYS[4], '1')
redis.call('LTRIM', KEYS[4], 0, 15)
redis.call('PEXPIRE', KEYS[4], 10000)
if ARGV[2] == 'ok' then
  redis.call('DEL', KEYS[3])
elseif ARGV[2] == 'throttled' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  local strikes = redis.call('INCR', KEYS[3])
  redis.call('EXPIRE', KEYS[3], 600)
  local pause = math.min(tonumber(ARGV[4]), tonumber(ARGV[3]) * 2 ^ (strikes - 1))
  local retry_after = tonumber(ARGV[5])
  if retry_after > pause then pause = math.min(retry_after, tonumber(ARGV[6])) end
  local until_ = now + pause
  if until_ > tonumber(redis.call('GET', KEYS[2]) or '0') then
    redis.call('SET', KEYS[2], tostring(until_), 'PX', math.ceil(pause * 1000) + 1000)
  end
  return tostring(pause)
end
return '0'
