-- pump_intake.lua: the step's second phase (after pump_recover.lua), the intake.
--
-- Each message the dispatcher read (the reads, pump.lua) is popped and checked against its
-- fingerprint, then goes where its code says: a call's job to its account's fair list, a job
-- that passes without a grant straight to the ready queue (holding a worker thread), one no
-- worker can run set aside for the dispatcher, one not yet due to the delayed set.
local read_count, rejected = 0, 0

-- A message whose countdown just ended and that continues a call under way (a poll, marked so
-- by the task: header enhance_continues '1') goes to the head of its account's list, so that a
-- video being polled does not wait behind its own account's backlog. A retry starts over: it
-- queues at the tail like a new job, or failing jobs could keep fresh ones from ever starting.
-- g: the index in ARGV of the message's read.
local function take_in(raw, g, was_delayed)
  read_count = read_count + 1
  local code, account, id, tag = ARGV[g + 1], ARGV[g + 2], ARGV[g + 3], ARGV[g + 4]
  local due = tonumber(ARGV[g + 5])
  local kind, class = string.sub(code, 1, 1), string.sub(code, 2, 2)
  if tag == '' then tag = nil end
  local continues = kind == 'c' and string.sub(code, 3, 3) == '1' and id ~= ''
  -- A poll whose webhook brought the result (tasks/webhooks.py): due now, and its run reads the
  -- result and makes no call, so it passes without a grant.
  local hooked = continues and redis.call('ZSCORE', K.hooked, id)
  if hooked then
    redis.call('ZREM', K.hooked, id)
    if tonumber(hooked) > now then kind, was_delayed, due = 'p', true, nil end
  end
  if not was_delayed and due and due > now + 0.001 then
    redis.call('ZADD', K.delayed, due, raw)
    -- (found by its task id when its webhook comes)
    if continues then redis.call('HSET', K.parked_polls, id, raw) end
    return
  end
  if kind == 'x' or kind == 'o' then
    -- No worker could read it, or no worker registers its task: set aside, for the dispatcher
    -- to file in the dead letters or park with the jobs of unknown tasks.
    redis.call('LPUSH', K.rejected, raw)
    rejected = rejected + 1
  elseif kind ~= 'c' then
    -- No grant, but a worker thread: counted, so that granted jobs do not queue behind these
    -- in the ready queue and then start all at once.
    if tag then
      redis.call('ZADD', K.busy, now + lease_s, tag)
      redis.call('PEXPIRE', K.busy, math.ceil((lease_s + 60) * 1000))
    end
    to_ready(raw, tag, kind == 'p')
  else
    local c = CLASS[class]
    local push = (was_delayed and string.sub(code, 3, 3) == '1') and 'LPUSH' or 'RPUSH'
    redis.call(push, c.q .. account, pack_entry(now, id, tag or '', raw))
    if redis.call('SADD', c.active, account) == 1 then redis.call('RPUSH', c.ring, account) end
  end
end

for _, key in ipairs({K.intake, unpack(SOURCES)}) do
  local n, g = next_reads()
  local batch = n > 0 and redis.call('RPOP', key, n)
  for i, raw in ipairs(batch or {}) do
    if fingerprint(raw) ~= ARGV[g] then
      for j = #batch, i, -1 do redis.call('RPUSH', key, batch[j]) end
      break
    end
    take_in(raw, g, false)
    g = g + 6
  end
end
local n_delayed, g_delayed = next_reads()
if n_delayed > 0 then
  local g = g_delayed
  for _, raw in ipairs(redis.call('ZRANGEBYSCORE', K.delayed, '-inf', now, 'LIMIT', 0, n_delayed)) do
    if fingerprint(raw) ~= ARGV[g] then break end
    redis.call('ZREM', K.delayed, raw)
    if ARGV[g + 3] ~= '' then redis.call('HDEL', K.parked_polls, ARGV[g + 3]) end
    take_in(raw, g, true)
    g = g + 6
  end
end
