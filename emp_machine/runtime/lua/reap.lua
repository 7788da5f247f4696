-- reap.lua: return jobs whose lease expired to jobs:pending, retry count kept. Atomic, so any number of
-- machines may run it at once: a job is re-queued by exactly one of them.
-- KEYS[1] = jobs:pending, KEYS[2] = jobs:idx:of, KEYS[3] = jobs:leases (see lib.lua)
-- ARGV[1] = most jobs to reap in this call, ARGV[2] = confirm: ms an expired lease must stay expired, seen
-- so by an earlier call, before it is reaped (jobs.py passes one renewal interval of its lease and half of one,
-- at least 0.5 s; 0 or absent: at first sight, as before)
-- Two phases. Leases hold absolute Redis TIME, so a step forward of the Redis host's clock (a VM resumed, an
-- NTP step) by more than the time left on them made every running job look expired: all re-queued while
-- their workers were alive and beating, each run twice. Now an expired lease seen the first time is only
-- noted in our ZSET jobs:reap_seen (job id -> Redis time first seen expired); a later call reaps it if it is
-- still that lease (score <= the note: any renewal or new claim since writes a later one) and still expired,
-- `confirm` ms after the note. A live worker beats in between: its lease is no longer expired and the note
-- goes. Notes of jobs no longer leased, or leased unexpired, are dropped on every call.
-- Cost: a dead worker's job goes back to the queue one confirm later than its lease says (1.5 s more for a
-- 3 s lease, 30 s more for 60 s leases), rounded up to the next reaper call.
-- Limits: the confirm is the caller's: a reaper of a shorter-lease group (shorter interval) may still reap,
-- after a step, the job of a longer-lease worker that beats less often; a reaper of an older version (rolling
-- deploy) reaps at first sight as before, and leaves notes the next call here drops. A step BACK delays
-- reaping by the step (the lease and the note's age read the same clock): low severity, a dead worker's job
-- just waits that much longer.
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
local SEEN = 'jobs:reap_seen'
local stray = wrong_types(KEYS[1], 'zset', KEYS[2], 'hash', SEEN, 'zset')
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
    if not beat and worker_keys_ok(wid) then refresh_worker(wid, now, false, true) end
  end
end
-- Workers whose heartbeat key lapsed while they held no lease (killed while idle, their machine gone):
-- offline, as a reaped worker is. One whose key is still there (beaten by a writer that does not note it
-- here) leaves the list until its next beat.
for _, wid in ipairs(redis.call('ZRANGEBYSCORE', BEATS, '-inf', now, 'LIMIT', 0, 100)) do
  redis.call('ZREM', BEATS, wid)
  if redis.call('EXISTS', 'worker:' .. wid .. ':heartbeat') == 0 and worker_keys_ok(wid) then
    refresh_worker(wid, now, false, true)
  end
end
local limit, confirm = tonumber(ARGV[1]), tonumber(ARGV[2]) or 0
local window = math.max(limit, 100) * 10  -- expired leases looked at per call, waiting ones included
for _, id in ipairs(redis.call('ZRANGE', SEEN, 0, window - 1)) do
  local lease = tonumber(redis.call('ZSCORE', KEYS[3], id))
  if not lease or lease > now then redis.call('ZREM', SEEN, id) end  -- reaped elsewhere, finished, renewed
end
local function reap(id)
  redis.call('ZREM', KEYS[3], id)
  redis.call('ZREM', SEEN, id)
  local jkey = 'job:' .. id
  local f = redis.pcall('HMGET', jkey, 'status', 'worker_id', 'service_required', 'retry_count')
  if f.err then f = {} end  -- job:{id} holds no hash (clobbered): nothing to queue again
  if f[1] == 'assigned' or f[1] == 'in_progress' then
    local wid = f[2] or ''
    redis.call('HSET', jkey, 'status', 'pending', 'worker_id', '', 'assigned_at', '')
    if wid ~= '' and worker_keys_ok(wid) then
      redis.call('HDEL', 'jobs:active:' .. wid, id)
      refresh_worker(wid, now, false, true)
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
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'WITHSCORES', 'LIMIT', 0, window)
for i = 1, #expired, 2 do
  local id, lease = expired[i], tonumber(expired[i + 1])
  local seen = tonumber(redis.call('ZSCORE', SEEN, id))
  if not seen or lease > seen then  -- first seen expired, or renewed since the note and expired again
    seen = now
    redis.call('ZADD', SEEN, now, id)
  end
  if #out < limit and now - seen >= confirm then reap(id) end
end
return out
