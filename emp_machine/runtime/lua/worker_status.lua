-- worker_status.lua: register a worker or change its status (idle / busy / offline); publishes
-- worker_status on a change.
-- KEYS[1] = jobs:pending, KEYS[2] = jobs:idx:of, KEYS[3] = jobs:leases (see lib.lua)
-- ARGV[1] = worker id, ARGV[2] = new status, ARGV[3] = heartbeat key TTL in s ('0': delete the key)
-- ARGV[4..] = extra field, value pairs for worker:{wid} (machine_id, capabilities, connector_statuses,
-- instance: our own field, the token of the worker process that registered last)
-- Returns the old status.
local wid, new = ARGV[1], ARGV[2]
local wkey = 'worker:' .. wid
local now = now_ms()
local at = iso(now)
local old = redis.call('HGET', wkey, 'status') or ''
-- An exit (offline) written with an instance token that is not the hash's changes nothing: another process
-- registered this worker id since (a same-id machine booted while this one's orphans still drained), and
-- its status and heartbeat key are its own. Without a token (a dead worker marked by its machine), or when
-- the hash has none (Redis came back empty), the write goes through.
if new == 'offline' then
  for i = 4, #ARGV, 2 do
    if ARGV[i] == 'instance' then
      local owner = redis.call('HGET', wkey, 'instance')
      if owner and owner ~= ARGV[i + 1] then return old end
    end
  end
end
redis.call('HSET', wkey, 'worker_id', wid, 'status', new, 'last_heartbeat', at)
for i = 4, #ARGV, 2 do redis.call('HSET', wkey, ARGV[i], ARGV[i + 1]) end
local cur = redis.call('HGET', wkey, 'current_job_id') or ''
if new ~= 'busy' then
  cur = ''
  redis.call('HSET', wkey, 'current_job_id', '')
end
worker_expiry(wkey, old, new)
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', wkey .. ':heartbeat', at, 'EX', tonumber(ARGV[3]))
  redis.call('ZADD', BEATS, now + tonumber(ARGV[3]) * 1000, wid)
else
  redis.call('DEL', wkey .. ':heartbeat')
  redis.call('ZREM', BEATS, wid)
end
if old ~= new then
  redis.call('HSET', wkey, 'last_status_change', at)
  publish('worker_status', {worker_id = wid, old_status = old, new_status = new, current_job_id = cur,
    timestamp = now})
end
return old
