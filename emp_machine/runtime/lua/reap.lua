-- reap.lua: return jobs whose lease expired to jobs:pending, retry count kept. Atomic, so any number of
-- machines may run it at once: a job is re-queued by exactly one of them.
-- KEYS[1] = jobs:pending, KEYS[2] = jobs:idx:of, KEYS[3] = jobs:leases (see lib.lua)
-- ARGV[1] = most jobs to reap in this call
-- Each re-queued job is announced on job_failed (can_retry true, as the contract announces a retry) and
-- on our job_requeued, which wakes idle workers. Returns the ids re-queued.
-- The worker is set offline when its heartbeat key is gone too (it is dead), else idle / busy as usual (it
-- may be alive, its loop stalled). A lease (3 s, say) can run out long before the 60 s heartbeat key does: such
-- a worker waits in our HASH jobs:reaped_workers (worker id -> its heartbeat key's value when reaped) and is set
-- offline by a later call once the key lapsed unrenewed; a new beat (another value) takes it off the list.
-- A worker whose key lapsed while it held no job is found through jobs:worker_beats (lib.lua).
local now = now_ms()
local out = {}
local REAPED = 'jobs:reaped_workers'
-- Stray keys (lib.lua's wrong_types): a queue key of another type would fail the script with a job taken off
-- its lease but never queued again: checked first. A worker's own keys of another type are left alone (its
-- bookkeeping is skipped, the job is queued again all the same), so one stray key never holds the reaper.
local stray = wrong_types(KEYS[1], 'zset', KEYS[2], 'hash')
if stray then return stray end
local function worker_keys_ok(wid)
  return not wrong_types('jobs:active:' .. wid, 'hash', 'worker:' .. wid, 'hash')
end
local function beat_of(wid)  -- the heartbeat key's value; false when absent or holding no string
  local beat = redis.pcall('GET', 'worker:' .. wid .. ':heartbeat')
  if type(beat) ~= 'string' then return false end
  return beat
end
local watched = redis.call('HGETALL', REAPED)
for i = 1, #watched, 2 do
  local wid, seen = watched[i], watched[i + 1]
  local beat = beat_of(wid)
  if beat ~= seen then
    redis.call('HDEL', REAPED, wid)
    if not beat and worker_keys_ok(wid) then refresh_worker(wid, now, false, nil, true) end
  end
end
-- Workers whose heartbeat key lapsed while they held no lease (killed while idle, their machine gone):
-- offline, as a reaped worker is. One whose key is still there (beaten by a writer that does not note it
-- here) leaves the list until its next beat.
for _, wid in ipairs(redis.call('ZRANGEBYSCORE', BEATS, '-inf', now, 'LIMIT', 0, 100)) do
  redis.call('ZREM', BEATS, wid)
  if redis.call('EXISTS', 'worker:' .. wid .. ':heartbeat') == 0 and worker_keys_ok(wid) then
    refresh_worker(wid, now, false, nil, true)
  end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))) do
  redis.call('ZREM', KEYS[3], id)
  local jkey = 'job:' .. id
  local f = redis.pcall('HMGET', jkey, 'status', 'worker_id', 'service_required', 'retry_count')
  if f.err then f = {} end  -- job:{id} holds no hash (clobbered): nothing to queue again
  if f[1] == 'assigned' or f[1] == 'in_progress' then
    local wid = f[2] or ''
    redis.call('HSET', jkey, 'status', 'pending', 'worker_id', '', 'assigned_at', '')
    if wid ~= '' and worker_keys_ok(wid) then
      redis.call('HDEL', 'jobs:active:' .. wid, id)
      refresh_worker(wid, now, false, nil, true)
      local beat = beat_of(wid)
      if beat and redis.call('EXISTS', 'worker:' .. wid) == 1 then redis.call('HSET', REAPED, wid, beat) end
    end
    enqueue(id)
    add_event(id, {t = now, ev = 'lease_expired', worker_id = wid})
    -- The contract announces a retry as job_failed with can_retry: the API and the monitor learn that the
    -- attempt ended and the job waits again (retry_count kept: the attempt's end is not the job's fault).
    publish('job_failed', {job_id = id, worker_id = wid, status = 'pending', error = 'worker lost: lease expired',
      failed_at = iso(now), retry_count = finite_number(f[4]) or 0, can_retry = true, timestamp = now})
    publish('job_requeued', {job_id = id, service_required = f[3], reason = 'lease_expired',
      worker_id = wid, timestamp = now})
    table.insert(out, id)
  elseif f[2] and f[2] ~= '' and worker_keys_ok(f[2]) then
    redis.call('HDEL', 'jobs:active:' .. f[2], id)  -- cancelled under a worker that then died
  end
end
return out
