-- fail.lua: the job failed. Retryable failures go back to the queue with the submission score until
-- max_retries; otherwise the failure is final. job_failed always carries can_retry.
-- KEYS[1] = jobs:pending, KEYS[2] = jobs:idx:of, KEYS[3] = jobs:leases (see lib.lua)
-- ARGV[1] = job id, ARGV[2] = worker id, ARGV[3] = error message, ARGV[4] = '1' when retryable,
-- ARGV[5] = step timings JSON ({step: ms} measured by the worker; '' for none), kept in the timeline,
-- ARGV[6] = claim token (the claim's assigned_at; '' or absent: none; see ownership() in lib.lua)
-- ARGV[7] = retry delay in ms ('' or absent: none): a retry is not claimed by any worker before it, kept as
--           our field retry_at (Redis clock, epoch ms; see claim.lua), e.g. a service's Retry-After
-- ARGV[8] = '<trace id>:<span id>' of the attempt's job.execution span ('' or absent: none): written as the
--           job's job_trace_id / job_span_id when the job carries no trace context of its producer, so a
--           retry joins the failed attempt's trace (a failed trace is always exported) and `emp-machine job`
--           names it; each attempt was a trace of its own, and the job's hash never said which
-- Returns {outcome, retry_count}: outcome 'retried', 'failed', 'cancelled', 'lost' or 'missing'. The
-- attempt's token is kept in failed_token (our field), so a retry of a fail that already landed returns
-- what it did ('retried' or 'failed' and the count) and changes nothing. An error reply, changing nothing,
-- when a key it writes holds another type (see wrong_types in lib.lua).
local id, wid, err = ARGV[1], ARGV[2], ARGV[3]
local token = ARGV[6] or ''
local delay = finite_number(ARGV[7])
if delay and delay <= 0 then delay = nil end
local retryable = ARGV[4] == '1'
local steps = nil
if ARGV[5] and ARGV[5] ~= '' then steps = cjson.decode(ARGV[5]) end
local now = now_ms()
local state, newer = ownership(id, wid, token)
if state ~= 'ok' then
  local before = finished_before(id, wid, token)
  if before == 'failed' or before == 'retried' then
    return {before, finite_number(redis.call('HGET', 'job:' .. id, 'retry_count')) or 0}
  end
  if not newer then release_not_owned(id, wid, now, state) end
  return {state, 0}
end
local jkey = 'job:' .. id
local at = iso(now)
local f = redis.call('HMGET', jkey, 'retry_count', 'max_retries')
local new = (finite_number(f[1]) or 0) + 1
local max = finite_number(f[2]) or 3
local retry = retryable and new < max
-- A stray key where the writes below go would fail the script halfway: the job out of jobs:active and
-- the leases but still in_progress, or pending outside jobs:pending (see wrong_types in lib.lua).
local stray = worker_keys_wrong(wid)
if not stray and retry then stray = wrong_types(KEYS[1], 'zset', KEYS[2], 'hash') end
if not stray and not retry then stray = wrong_types('jobs:failed', 'hash') end
if stray then return stray end
release(id, wid, now, state)
local trace, span = string.match(ARGV[8] or '', '^(%x+):(%x+)$')
if trace then
  -- the producer's context as the reader (context.extract_job_context) takes it: a W3C traceparent, or both
  -- ids as hex of their size, not all zero; a placeholder (temp-trace-id) or half of it is none
  local function id(v, size)
    return type(v) == 'string' and #v == size and string.match(v, '^%x+$') and string.match(v, '[1-9a-fA-F]')
  end
  local had = redis.call('HMGET', jkey, 'job_trace_id', 'job_span_id', 'traceparent')
  local t, s = string.match(had[3] or '', '^%s*%x%x%-(%x+)%-(%x+)%-%x%x%s*$')
  if not ((id(had[1], 32) and id(had[2], 16)) or (id(t, 32) and id(s, 16))) then
    redis.call('HSET', jkey, 'job_trace_id', trace, 'job_span_id', span)
  end
end
if retry then
  redis.call('HSET', jkey, 'status', 'pending', 'worker_id', '', 'assigned_at', '', 'retry_count', new,
    'last_failed_worker', wid, 'failed_at', at, 'error', err, 'failed_token', token)
  if delay then
    delay = math.floor(delay)
    redis.call('HSET', jkey, 'retry_at', now + delay)
    enqueue(id, now + delay)  -- into its class queue only once due (see index_delay in lib.lua)
  else
    redis.call('HDEL', jkey, 'retry_at')
    enqueue(id)
  end
  add_event(id, {t = now, ev = 'failed', worker_id = wid, error = err, retry_count = new, can_retry = true,
    retry_in_ms = delay, steps = steps})
  publish('job_failed', {job_id = id, worker_id = wid, status = 'pending', error = err, failed_at = at,
    retry_count = new, can_retry = true, timestamp = now})
  publish('job_requeued', {job_id = id, service_required = redis.call('HGET', jkey, 'service_required'),
    reason = 'retry', timestamp = now})
  return {'retried', new}
end
redis.call('HSET', jkey, 'status', 'failed', 'failed_at', at, 'retry_count', new, 'error', err, 'failed_token',
  token)
redis.call('HDEL', jkey, 'retry_at')
redis.call('HSET', 'jobs:failed', id, cjson.encode({error = err, failed_at = at, retry_count = new}))
add_event(id, {t = now, ev = 'failed', worker_id = wid, error = err, retry_count = new, can_retry = false,
  steps = steps}, true)
-- The final failure carries the workflow fields, as complete_job does (webhooks track workflows by them).
publish('job_failed', add_workflow_fields({job_id = id, worker_id = wid, status = 'failed', error = err,
  failed_at = at, retry_count = new, can_retry = false, timestamp = now}, jkey))
return {'failed', new}
