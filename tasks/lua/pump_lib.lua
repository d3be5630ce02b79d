-- pump_lib.lua: the dispatcher step's functions that touch no key (the first of its files,
-- pump.lua's header says which follow); tests/integration/test_pump_lib.py runs them alone.

-- What the dispatcher computes for each message it reads (tasks/messages.py, fingerprint).
local function fingerprint(raw)
  local ends = string.sub(raw, 1, 512)
  if #raw > 512 then ends = ends .. string.sub(raw, -512) end
  return #raw .. ':' .. redis.sha1hex(ends)
end

-- A fair list's entry: the moment the job entered the intake, its task id, its delivery tag
-- ('' if none) and the message, as "<since>|<id length>|<tag length>|<id><tag><message>" (ids
-- and tags are the producer's strings and may hold any byte, so they are cut by length). This
-- is the only place that writes or reads the form; a dispatcher of the previous version reads it
-- too, so the role can pass between versions during a rolling upgrade.
local function pack_entry(since, id, tag, raw)
  return since .. '|' .. #id .. '|' .. #tag .. '|' .. id .. tag .. raw
end
local function unpack_entry(entry)
  local p1 = string.find(entry, '|', 1, true)
  local p2 = string.find(entry, '|', p1 + 1, true)
  local p3 = string.find(entry, '|', p2 + 1, true)
  local id_len = tonumber(string.sub(entry, p1 + 1, p2 - 1))
  local tag_len = tonumber(string.sub(entry, p2 + 1, p3 - 1))
  return tonumber(string.sub(entry, 1, p1 - 1)), string.sub(entry, p3 + 1, p3 + id_len),
    string.sub(entry, p3 + id_len + 1, p3 + id_len + tag_len),
    string.sub(entry, p3 + id_len + tag_len + 1)
end
