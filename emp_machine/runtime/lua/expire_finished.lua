-- expire_finished.lua: forget jobs that finished long ago, on the machine's EMBEDDED Redis only (an external
-- Redis is the EMP API's to clean; nothing cleans the embedded one, which grew by every job's hash, progress
-- hash and result for good). One HSCAN chunk of jobs:completed or jobs:failed, or one chunk of our
-- jobs:cancelled (below), per call.
-- KEYS[1] = jobs:pending, KEYS[2] = jobs:idx:of, KEYS[3] = jobs:leases (see lib.lua; unused)
-- ARGV[1] = 'jobs:completed', 'jobs:failed' or 'jobs:cancelled', ARGV[2] = HSCAN cursor, ARGV[3] = cutoff
-- (epoch ms): what finished before it goes, ARGV[4] = HSCAN COUNT (jobs:cancelled: ids a call)
-- An entry goes when its own time (completed_at / failed_at in its JSON, else the job hash's) is before the
-- cutoff. The job hash and its progress hash go with it only when the hash's own completed_at and failed_at
-- are both before the cutoff too and it is not pending or running: an id resubmitted since (running again,
-- or finished again recently) keeps its current hash. A time that is no text (null, a number) is unreadable.
-- Returns {next cursor, entries removed}.
local key, cutoff = ARGV[1], tonumber(ARGV[3])
local field = key == 'jobs:completed' and 'completed_at' or 'failed_at'
local ACTIVE = {pending = true, assigned = true, in_progress = true}

local function text_ms(v)
  if type(v) == 'string' then return time_ms(v) end
  return nil
end

if key == 'jobs:cancelled' then
  -- Ours, a ZSET of when each cancel was seen: the cancelled jobs in no jobs:failed entry (the API's cancel
  -- writes none). A job gone before the cutoff goes with its progress hash, unless its id was resubmitted
  -- since (pending or running, or finished after the cutoff). One chunk a call; cursor '0' when it was the last.
  local ids = redis.call('ZRANGEBYSCORE', key, '-inf', '(' .. cutoff, 'LIMIT', 0, tonumber(ARGV[4]))
  local removed = 0
  for _, id in ipairs(ids) do
    redis.call('ZREM', key, id)
    local jkey = 'job:' .. id
    local hash = redis.call('TYPE', jkey).ok == 'hash'
    local f = hash and redis.call('HMGET', jkey, 'status', 'completed_at', 'failed_at') or {}
    local done, failed = text_ms(f[2]), text_ms(f[3])
    if not hash or (f[1] == 'failed' and (not done or done < cutoff) and (not failed or failed < cutoff)) then
      redis.call('DEL', jkey .. ':progress')
      if hash then
        redis.call('DEL', jkey)
        removed = removed + 1
      end
    end
  end
  return {#ids == tonumber(ARGV[4]) and '1' or '0', removed}
end

local page = redis.call('HSCAN', key, ARGV[2], 'COUNT', tonumber(ARGV[4]))
local removed = 0
local entries = page[2]
for i = 1, #entries, 2 do
  local id, raw = entries[i], entries[i + 1]
  local ok, entry = pcall(cjson.decode, raw)
  local at = ok and type(entry) == 'table' and text_ms(entry[field]) or nil
  local jkey = 'job:' .. id
  local hash = redis.call('TYPE', jkey).ok == 'hash'
  local f = hash and redis.call('HMGET', jkey, 'status', 'completed_at', 'failed_at') or {}
  at = at or text_ms(f[key == 'jobs:completed' and 2 or 3])
  if at and at < cutoff then
    redis.call('HDEL', key, id)
    removed = removed + 1
    local done, failed = text_ms(f[2]), text_ms(f[3])
    if not hash or (not ACTIVE[f[1] or ''] and (not done or done < cutoff) and (not failed or failed < cutoff)) then
      redis.call('DEL', jkey .. ':progress')
      if hash then redis.call('DEL', jkey) end
    end
  end
end
return {page[1], removed}
