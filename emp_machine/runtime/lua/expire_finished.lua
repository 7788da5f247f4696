-- expire_finished.lua: forget jobs that finished long ago, on the machine's EMBEDDED Redis only (an external
-- Redis is the EMP API's to clean; nothing cleans the embedded one, which grew by every job's hash, progress
-- hash and result for good). One HSCAN chunk of jobs:completed or jobs:failed per call.
-- KEYS[1] = jobs:pending, KEYS[2] = jobs:idx:of, KEYS[3] = jobs:leases (see lib.lua; unused)
-- ARGV[1] = 'jobs:completed' or 'jobs:failed', ARGV[2] = HSCAN cursor, ARGV[3] = cutoff (epoch ms): a job
-- that finished before it goes, ARGV[4] = HSCAN COUNT
-- Each entry's JSON holds completed_at / failed_at (ISO); the job hash's own time is used when the entry
-- cannot be read. A job that is pending or running again (resubmitted under its id) keeps its hash.
-- Returns {next cursor, removed}.
local key, cutoff = ARGV[1], tonumber(ARGV[3])
local field = key == 'jobs:completed' and 'completed_at' or 'failed_at'
local page = redis.call('HSCAN', key, ARGV[2], 'COUNT', tonumber(ARGV[4]))
local removed = 0
local entries = page[2]
for i = 1, #entries, 2 do
  local id, raw = entries[i], entries[i + 1]
  local ok, entry = pcall(cjson.decode, raw)
  local at = ok and type(entry) == 'table' and time_ms(entry[field]) or nil
  local jkey = 'job:' .. id
  local status
  if redis.call('TYPE', jkey).ok == 'hash' then
    local f = redis.call('HMGET', jkey, 'status', field)
    status = f[1]
    at = at or time_ms(f[2])
  end
  if at and at < cutoff and status ~= 'pending' and status ~= 'assigned' and status ~= 'in_progress' then
    redis.call('HDEL', key, id)
    if status then redis.call('DEL', jkey, jkey .. ':progress') end
    removed = removed + 1
  end
end
return {page[1], removed}
