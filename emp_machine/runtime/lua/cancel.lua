-- cancel.lua: cancel a job the way the EMP API does (status=failed, error="Job cancelled by user",
-- cancel_job message). The API leaves a pending job in jobs:pending; the claim drops it.
-- KEYS[1] = jobs:pending, KEYS[2] = jobs:idx:of, KEYS[3] = jobs:leases (see lib.lua)
-- ARGV[1] = job id, ARGV[2] = reason
-- Returns 0 when there is no such job or it already finished, else 1.
local id = ARGV[1]
local jkey = 'job:' .. id
local f = redis.call('HMGET', jkey, 'status', 'worker_id')
if not f[1] or f[1] == 'completed' or f[1] == 'failed' then return 0 end
local now = now_ms()
redis.call('HSET', jkey, 'status', 'failed', 'error', 'Job cancelled by user', 'failed_at', iso(now))
add_event(id, {t = now, ev = 'cancel_requested', reason = ARGV[2]})
note_cancelled(id, now)
publish('cancel_job', {job_id = id, worker_id = f[2] or '', reason = ARGV[2], timestamp = now})
return 1
