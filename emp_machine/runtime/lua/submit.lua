-- submit.lua: write a job exactly as the EMP API does, and index it.
-- KEYS[1] = jobs:pending, KEYS[2] = jobs:idx:of, KEYS[3] = jobs:leases (see lib.lua)
-- ARGV[1] = job id
-- ARGV[2..] = field, value pairs of the job:{id} hash (all contract fields, strings)
-- Returns the score written to jobs:pending (as a string, 17 significant digits).
local id = ARGV[1]
local jkey = 'job:' .. id
local fields = {}
for i = 2, #ARGV do table.insert(fields, ARGV[i]) end
-- An id submitted again is a new job: the retry bookkeeping of the earlier one (fail.lua's fields) would
-- hold it back (retry_at), keep it from the worker that failed that one (last_failed_worker, failed_at) or
-- answer a stale attempt's fail as done (failed_token). The contract's submission fields are written over.
redis.call('HDEL', jkey, 'retry_at', 'last_failed_worker', 'failed_at', 'failed_token')
redis.call('HSET', jkey, unpack(fields))
enqueue(id)
local now = now_ms()
local f = redis.call('HMGET', jkey, 'service_required', 'priority', 'workflow_id', 'customer_id')
add_event(id, {t = now, ev = 'submitted', service_required = f[1]})
-- `indexed` (ours): this job is in our index already, so workers need not pass it back as a hint.
publish('job_submitted', {job_id = id, service_required = f[1], priority = finite_number(f[2]) or f[2],
  workflow_id = f[3], customer_id = f[4], timestamp = now, indexed = true})
return redis.call('ZSCORE', KEYS[1], id)
