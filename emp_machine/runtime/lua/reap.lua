-- reap.lua: return jobs whose lease expired to jobs:pending, retry count kept. Atomic, so any number of
-- machines may run it at once: a job is re-queued by exactly one of them.
-- KEYS[1] = jobs:pending, KEYS[2] = jobs:idx:of, KEYS[3] = jobs:leases (see lib.lua)
-- ARGV[1] = most jobs to reap in this call
-- Each re-queued job is announced on job_failed (can_retry true, as the contract announces a retry) and
-- on our job_requeued, which wakes idle workers. Returns the ids re-queued.
local now = now_ms()
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))) do
  redis.call('ZREM', KEYS[3], id)
  local jkey = 'job:' .. id
  local f = redis.call('HMGET', jkey, 'status', 'worker_id', 'service_required', 'retry_count')
  if f[1] == 'assigned' or f[1] == 'in_progress' then
    local wid = f[2] or ''
    redis.call('HSET', jkey, 'status', 'pending', 'worker_id', '', 'assigned_at', '')
    if wid ~= '' then
      redis.call('HDEL', 'jobs:active:' .. wid, id)
      refresh_worker(wid, now, false)
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
  elseif f[2] and f[2] ~= '' then
    redis.call('HDEL', 'jobs:active:' .. f[2], id)  -- cancelled under a worker that then died
  end
end
return out
