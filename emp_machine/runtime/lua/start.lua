-- start.lua: the worker begins running a claimed job (assigned -> in_progress).
-- KEYS[1] = jobs:pending, KEYS[2] = jobs:idx:of, KEYS[3] = jobs:leases (see lib.lua)
-- ARGV[1] = job id, ARGV[2] = worker id, ARGV[3] = claim token (the claim's assigned_at; '' or absent: none)
-- Returns 'ok', 'cancelled', 'lost' or 'missing' (see ownership() in lib.lua).
local id, wid = ARGV[1], ARGV[2]
local now = now_ms()
local state = ownership_or_release(id, wid, now, ARGV[3])
if state ~= 'ok' then return state end
redis.call('HSET', 'job:' .. id, 'status', 'in_progress', 'started_at', iso(now))
add_event(id, {t = now, ev = 'started', worker_id = wid})
return 'ok'
