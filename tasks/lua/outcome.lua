-- outcome.lua: how a call to Runware went, for the whole fleet (tasks/limiter.py, Limiter.note).
-- A throttled call (429 or 503) pauses every grant: the cool-down doubles per strike, and is at
-- least Retry-After. A successful call clears the strikes, so normal speed returns. (The call's
-- slot itself is given back when its job is acknowledged: config/transport.py.)
--
-- KEYS  1 cooldown   2 strikes
-- ARGV  1 outcome: ok | throttled
--       2 cool-down base s   3 cool-down max s
--       4 Retry-After s (0: none)   5 longest Retry-After honoured
-- Returns the pause started, in seconds ('0': none).
if ARGV[1] ~= 'throttled' then
  redis.call('DEL', KEYS[2])
  return '0'
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local strikes = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], 600)
local pause = math.min(tonumber(ARGV[3]), tonumber(ARGV[2]) * 2 ^ (strikes - 1))
local retry_after = tonumber(ARGV[4])
if retry_after > pause then pause = math.min(retry_after, tonumber(ARGV[5])) end
local until_ = now + pause
if until_ > tonumber(redis.call('GET', KEYS[1]) or '0') then
  redis.call('SET', KEYS[1], tostring(until_), 'PX', math.ceil(pause * 1000) + 1000)
end
return tostring(pause)
