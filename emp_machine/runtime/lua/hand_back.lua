-- hand_back.lua: a draining worker returns a job to the queue without counting an attempt.
-- KEYS[1] = jobs:pending, KEYS[2] = jobs:idx:of, KEYS[3] = jobs:leases (see lib.lua)
-- ARGV[1] = job id, ARGV[2] = worker id, ARGV[3] = reason,
-- ARGV[4] = claim token (the claim's assigned_at; '' or absent: none; see ownership() in lib.lua)
-- ARGV[5] = '1': the attempt ended with the worker process that ran it (a dead predecessor's job, a stray):
--           announced on job_failed too, as reap.lua announces an expired lease (status pending, can_retry
--           true, retry_count kept), so the API stops showing it on that worker. A drain's is not.
-- Returns 'ok', 'cancelled', 'lost' or 'missing'; an error reply, changing nothing, when a key it writes
-- holds another type.
local id, wid = ARGV[1], ARGV[2]
local now = now_ms()
local state = ownership_or_release(id, wid, now, ARGV[4])
if state ~= 'ok' then return state end
-- A stray key where the writes below go would leave the job pending outside jobs:pending (lib.lua's
-- wrong_types): checked before the first write.
local stray = worker_keys_wrong(wid) or wrong_types(KEYS[1], 'zset', KEYS[2], 'hash')
if stray then return stray end
local jkey = 'job:' .. id
redis.call('HSET', jkey, 'status', 'pending', 'worker_id', '', 'assigned_at', '')
release(id, wid, now, state)
enqueue(id)
add_event(id, {t = now, ev = 'handed_back', worker_id = wid, reason = ARGV[3]})
if ARGV[5] == '1' then
  publish('job_failed', {job_id = id, worker_id = wid, status = 'pending', error = 'attempt lost: ' .. ARGV[3],
    failed_at = iso(now), retry_count = finite_number(redis.call('HGET', jkey, 'retry_count')) or 0,
    can_retry = true, timestamp = now})
end
publish('job_requeued', {job_id = id, service_required = redis.call('HGET', jkey, 'service_required'),
  reason = ARGV[3], timestamp = now})
return 'ok'
