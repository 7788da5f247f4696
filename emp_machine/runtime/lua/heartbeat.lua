-- heartbeat.lua: the worker is alive; renew its heartbeat key and the leases of the jobs it owns.
-- KEYS[1] = jobs:pending, KEYS[2] = jobs:idx:of, KEYS[3] = jobs:leases (see lib.lua)
-- ARGV[1] = worker id, ARGV[2] = lease in ms, ARGV[3] = heartbeat key TTL in s (contract: 60)
-- Returns {state, job id, state, job id, ...} for each job in jobs:active:{wid}: 'ok' (lease renewed), or
-- 'cancelled' / 'lost' / 'missing' (no longer this worker's; dropped from jobs:active).
local wid = ARGV[1]
local now = now_ms()
local at = iso(now)
redis.call('SET', 'worker:' .. wid .. ':heartbeat', at, 'EX', tonumber(ARGV[3]))
redis.call('ZADD', BEATS, now + tonumber(ARGV[3]) * 1000, wid)
redis.call('HSET', 'worker:' .. wid, 'last_heartbeat', at)
-- Set offline while its key had lapsed (a partition, a stall past 60 s: the reaper's jobs:worker_beats
-- pass): alive again, it is idle (or busy) again, announced as any change is.
if redis.call('HGET', 'worker:' .. wid, 'status') == 'offline' then refresh_worker(wid, now, false) end
local out = {}
for _, id in ipairs(redis.call('HKEYS', 'jobs:active:' .. wid)) do
  local state = ownership_or_release(id, wid, now)
  if state == 'ok' then redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), id) end
  table.insert(out, state)
  table.insert(out, id)
end
return out
