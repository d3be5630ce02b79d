-- pump_recover.lua: the step's first phase (after pump.lua), recovery of lost grants.
--
-- A granted message is recorded in K.transit until the worker's broker transport takes custody
-- (it clears the record in the same transaction that writes kombu's unacked entry). One that is
-- no longer in the ready queue and still has its record after `transit_age` seconds was lost
-- in a worker's fetch: it goes back to the intake list. Whether it is still queued is known
-- without a scan: each push onto the ready queue is numbered, workers take from the other end
-- in order, so the pushes numbered up to (pushes so far - the queue's length) have been taken.
-- A message someone else put in the queue (kombu restoring an unacknowledged one) only makes
-- that estimate lower while it is there: a record is then checked later, never too early.
local recovered = 0
local taken = pushed - redis.call('LLEN', K.ready)
for _, tag in ipairs(redis.call('ZRANGEBYSCORE', K.transit_at, '-inf', taken, 'LIMIT', 0, 200)) do
  redis.call('ZREM', K.transit_at, tag)
  redis.call('ZADD', K.transit_left, now + transit_age, tag)
end
-- An earlier version's records (granted at a time, place unknown): placed once, a few a step.
for _, tag in ipairs(redis.call('ZRANGE', K.transit_legacy, 0, 9)) do
  redis.call('ZREM', K.transit_legacy, tag)
  local raw = redis.call('HGET', K.transit, tag)
  if raw then
    local position = redis.call('LPOS', K.ready, raw)
    if position then
      redis.call('ZADD', K.transit_at, pushed - position, tag)
    else
      redis.call('ZADD', K.transit_left, now + transit_age, tag)
    end
  end
end
for _, tag in ipairs(redis.call('ZRANGEBYSCORE', K.transit_left, '-inf', now, 'LIMIT', 0, 200)) do
  redis.call('ZREM', K.transit_left, tag)
  local raw = redis.call('HGET', K.transit, tag)
  if raw then
    redis.call('HDEL', K.transit, tag)
    -- In kombu's custody (a consumer whose transport did not clear the record): kombu
    -- redelivers it if need be, so it must not be queued a second time. At the intake list's
    -- head: this step's reads are at its tail; it is read in the next step.
    if redis.call('HEXISTS', K.unacked, tag) == 0 then
      redis.call('LPUSH', K.intake, raw)
      recovered = recovered + 1
    end
  end
end
