-- complete.lua: the job succeeded. A cancelled job is never marked completed.
-- KEYS[1] = jobs:pending, KEYS[2] = jobs:idx:of, KEYS[3] = jobs:leases (see lib.lua)
-- ARGV[1] = job id, ARGV[2] = worker id, ARGV[3] = result JSON (references to outputs, no blobs),
-- ARGV[4] = message, ARGV[5] = '1' to record progress 100 first (the progress hash and an
-- update_job_progress message, exactly as progress.lua writes them), saving the worker a round trip,
-- ARGV[6] = step timings JSON ({step: ms} measured by the worker; '' for none), kept in the timeline,
-- ARGV[7] = claim token (the claim's assigned_at; '' or absent: none; see ownership() in lib.lua)
-- Returns 'ok', 'cancelled', 'lost' or 'missing'; 'ok' too for a retry of this attempt's completion
-- that already landed (nothing is written again). An error reply, changing nothing, when a key it writes
-- holds another type (see wrong_types in lib.lua).
local id, wid, result = ARGV[1], ARGV[2], ARGV[3]
local now = now_ms()
local state, newer = ownership(id, wid, ARGV[7])
if state ~= 'ok' then
  if finished_before(id, wid, ARGV[7]) == 'completed' then return 'ok' end
  if not newer then release_not_owned(id, wid, now, state) end
  return state
end
-- A stray key where the bookkeeping below writes would fail the script with the job marked completed but
-- its result never recorded nor announced (and a retry of this completion then says 'ok'): checked first.
local stray = worker_keys_wrong(wid) or wrong_types('jobs:completed', 'hash')
if stray then return stray end
local at = iso(now)
local jkey = 'job:' .. id
local msg = add_workflow_fields({job_id = id, worker_id = wid, progress = 100, status = 'completed',
  message = ARGV[4], timestamp = now}, jkey)
if ARGV[5] == '1' then
  redis.call('HSET', jkey .. ':progress', 'progress', '100', 'status', 'in_progress', 'message', ARGV[4],
    'updated_at', at)
  publish('update_job_progress', {job_id = id, worker_id = wid, progress = 100, status = 'in_progress',
    message = ARGV[4], current_step = msg.current_step or '', total_steps = msg.total_steps or '',
    estimated_completion = at, timestamp = now})  -- at 100 %, the estimate is now (as the worker's)
end
redis.call('HSET', jkey, 'status', 'completed', 'completed_at', at)
release(id, wid, now, state)
-- The result is spliced in as received: decoding and re-encoding it in Lua would turn [] into {}.
redis.call('HSET', 'jobs:completed', id,
  '{"success":true,"data":' .. result .. ',"completed_at":' .. cjson.encode(at) .. '}')
local head = cjson.encode(msg)
redis.call('PUBLISH', 'complete_job', string.sub(head, 1, -2) .. ',"result":' .. result .. '}')
local ev = {t = now, ev = 'completed', worker_id = wid}
if ARGV[6] and ARGV[6] ~= '' then ev.steps = cjson.decode(ARGV[6]) end
add_event(id, ev, true)
return 'ok'
