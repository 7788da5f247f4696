-- progress.lua: record and announce progress in one round trip; tells the worker when the job is no
-- longer its own (cancelled by the API, or lost with an expired lease).
-- KEYS[1] = jobs:pending, KEYS[2] = jobs:idx:of, KEYS[3] = jobs:leases (see lib.lua)
-- ARGV[1] = job id, ARGV[2] = worker id, ARGV[3] = progress 0-100, ARGV[4] = message,
-- ARGV[5] = current_step, ARGV[6] = total_steps, ARGV[7] = estimated_completion ('' when unknown),
-- ARGV[8] = claim token (the claim's assigned_at; '' or absent: none; see ownership() in lib.lua)
-- Returns 'ok', 'cancelled', 'lost' or 'missing'; nothing is written unless 'ok'.
local id, wid = ARGV[1], ARGV[2]
local state = ownership(id, wid, ARGV[8])
if state ~= 'ok' then return state end
local now = now_ms()
local progress = finite_number(ARGV[3]) or 0
redis.call('HSET', 'job:' .. id .. ':progress', 'progress', ARGV[3], 'status', 'in_progress',
  'message', ARGV[4], 'updated_at', iso(now))
-- The contract lists current_step, total_steps and estimated_completion in every message: '' when unknown,
-- the steps as numbers when they are finite ones.
publish('update_job_progress', {job_id = id, worker_id = wid, progress = progress, status = 'in_progress',
  message = ARGV[4], current_step = finite_number(ARGV[5]) or ARGV[5], total_steps = finite_number(ARGV[6]) or ARGV[6],
  estimated_completion = ARGV[7], timestamp = now})
return 'ok'
