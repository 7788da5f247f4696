-- reap.lua: return jobs whose lease expired to jobs:pending, retry count kept. Atomic, so any number of
-- machines may run it at once: a job is re-queued by exactly one of them.
-- KEYS[1] = jobs:pending, KEYS[2] = jobs:idx:of, KEYS[3] = jobs:leases (see lib.lua)
-- ARGV[1] = most jobs to reap in this call
-- Returns the ids re-queued.
local now = now_ms()
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))) do
  redis.call('ZREM', KEYS[3], id)
  local jkey = 'job:' .. id
  local f = redis.call('HMGET', jkey, 'status', 'worker_id', 'service_required')
  if f[1] == 'assigned' or f[1] == 'in_progress' then
    local wid = f[2] or ''
    redis.call('HSET', jkey, 'status', 'pending', 'worker_id', '', 'assigned_at', '')
    if wid ~= '' then
      redis.call('HDEL', 'jobs:active:' .. wid, id)
      refresh_worker(wid, now, false)
    end
    enqueue(id)
    add_event(id, {t = now, ev = 'lease_expired', worker_id = wid})
    publish('job_requeued', {job_id = id, service_required = f[3], reason = 'lease_expired',
      worker_id = wid, timestamp = now})
    table.insert(out, id)
  elseif f[2] and f[2] ~= '' then
    redis.call('HDEL', 'jobs:active:' .. f[2], id)  -- cancelled under a worker that then died
  end
end
return out
