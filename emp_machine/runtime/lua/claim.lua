-- claim.lua: atomically claim the best pending job this worker can serve.
-- KEYS[1] = jobs:pending, KEYS[2] = jobs:idx:of, KEYS[3] = jobs:leases (see lib.lua)
-- ARGV[1] = worker capabilities JSON (contract shape: worker_id, machine_id, services /
--           job_service_required_map, hardware, models, customer_access, optional workflow_id, ...)
-- ARGV[2] = lease in ms
-- ARGV[3] = ms during which a job this worker just failed is left to other workers
-- ARGV[4] = '1': when jobs:pending holds jobs our index lacks, claim nothing and say so (the caller
--           reconciles, then claims with '0'), so an unindexed higher-priority job is not passed over
-- ARGV[5] = '1': start the job at once (assigned -> in_progress, as start.lua does), saving a round trip
-- ARGV[6..] = job ids announced on job_submitted, indexed first if the EMP API submitted them
-- Returns {job_id or '', unindexed (1 when jobs:pending holds jobs our index lacks), HGETALL of the job...}
--
-- Order: highest index score (priority, then oldest first). Each requirement class is matched once and
-- only the head of each matching class queue is looked at, so the cost does not grow with queue depth;
-- a worker restricted to one workflow_id walks its classes' queues past other workflows' jobs.

local function is_array(t)
  if type(t) ~= 'table' then return false end
  local n = 0
  for _ in pairs(t) do
    n = n + 1
    if t[n] == nil then return false end
  end
  return true
end

local function contains(list, x)
  for _, v in ipairs(list) do
    if v == x then return true end
  end
  return false
end

local function present(v)
  return v ~= nil and v ~= cjson.null
end

-- Does the worker's value satisfy the required one: array contains all / membership / number >= / equality.
local function satisfies(wv, rv)
  if not present(wv) then return false end
  if type(rv) == 'table' and is_array(rv) then
    if type(wv) ~= 'table' then return false end
    for _, item in ipairs(rv) do
      if not contains(wv, item) then return false end
    end
    return true
  end
  if type(wv) == 'table' and is_array(wv) then return contains(wv, rv) end
  if type(rv) == 'number' then
    local n = tonumber(wv)
    return n ~= nil and n >= rv
  end
  return wv == rv
end

local function lookup(obj, path)
  local v = obj
  for part in string.gmatch(path, '[^%.]+') do
    if type(v) ~= 'table' then return nil end
    v = v[part]
  end
  return v
end

local function check_capability(worker, key, rv)
  local wv = lookup(worker, key)
  if type(rv) == 'table' and not is_array(rv) then
    if type(wv) ~= 'table' then return false end
    for k, sub in pairs(rv) do
      if not satisfies(wv[k], sub) then return false end
    end
    return true
  end
  return satisfies(wv, rv)
end

local function check_hardware(hw, req)
  if type(req) ~= 'table' then return true end
  if type(hw) ~= 'table' then hw = {} end
  for k, rv in pairs(req) do
    if rv ~= 'all' and present(rv) then
      local need = tonumber(rv)
      if need then
        local have = tonumber(hw[k])
        if not have or have < need then return false end
      elseif not satisfies(hw[k], rv) then
        return false
      end
    end
  end
  return true
end

local function check_isolation(access, isolation, customer_id)
  if type(access) ~= 'table' then access = {} end
  if isolation == 'strict' and access.isolation ~= 'strict' then return false end
  if type(access.allowed_customers) == 'table' and not contains(access.allowed_customers, customer_id) then
    return false
  end
  if type(access.denied_customers) == 'table' and contains(access.denied_customers, customer_id) then
    return false
  end
  return true
end

local function check_models(worker_models, required, service)
  if required == 'all' or type(required) ~= 'table' then return true end
  if worker_models == 'all' then return true end
  if type(worker_models) ~= 'table' then return false end
  local have = worker_models[service]
  if have == 'all' then return true end
  if type(have) ~= 'table' then return false end
  for _, m in ipairs(required) do
    if not contains(have, m) then return false end
  end
  return true
end

local SPECIAL = {service_type = true, hardware = true, customer_isolation = true, models = true,
  positive_requirements = true, negative_requirements = true}

-- One requirement class against this worker (requirements JSON and, with isolation, the customer).
local function class_matches(worker, raw, customer_id, service)
  local req = parse_requirements(raw)
  if not req then return true end
  local pos = req.positive_requirements
  if type(pos) ~= 'table' then pos = req end
  if pos.hardware ~= nil and not check_hardware(worker.hardware, pos.hardware) then return false end
  if pos.customer_isolation ~= nil and not check_isolation(worker.customer_access, pos.customer_isolation, customer_id) then
    return false
  end
  if pos.models ~= nil and not check_models(worker.models, pos.models, service) then return false end
  for key, rv in pairs(pos) do
    if not SPECIAL[key] and not check_capability(worker, key, rv) then return false end
  end
  local neg = req.negative_requirements
  if type(neg) == 'table' then
    for key, rv in pairs(neg) do
      if key == 'hardware' then
        if type(rv) == 'table' and type(worker.hardware) == 'table' then
          for hk, hv in pairs(rv) do
            if present(worker.hardware[hk]) and satisfies(worker.hardware[hk], hv) then return false end
          end
        end
      elseif check_capability(worker, key, rv) then
        return false
      end
    end
  end
  return true
end

local function job_types(worker)
  local out = {}
  local map = worker.job_service_required_map
  if type(map) == 'table' and #map > 0 then
    for _, entry in ipairs(map) do
      if type(entry) == 'string' then table.insert(out, entry)
      elseif type(entry) == 'table' and type(entry.job_service_required) == 'string' then
        table.insert(out, entry.job_service_required)
      end
    end
  elseif type(worker.services) == 'table' then
    for _, s in ipairs(worker.services) do
      if type(s) == 'string' then table.insert(out, s) end
    end
  end
  return out
end

local caps = cjson.decode(ARGV[1])
local wid = caps.worker_id
local lease_ms = tonumber(ARGV[2])
local avoid_ms = tonumber(ARGV[3])
local now = now_ms()
local wf = caps.workflow_id
if type(wf) ~= 'string' or wf == '' then wf = nil end

for i = 6, #ARGV do adopt(ARGV[i]) end

local unindexed = 0
if redis.call('ZCARD', KEYS[1]) > redis.call('HLEN', KEYS[2]) then unindexed = 1 end
if unindexed == 1 and ARGV[4] == '1' then return {'', 1} end

-- The first job in queue q this worker may take, skipping (and cleaning out) jobs that cannot run.
-- Stops at scores not above `floor`: a better candidate was already found elsewhere. Most claims take
-- the head, so the first read is one entry and later reads grow.
local function head_of(svc, cls, floor)
  local q = 'jobs:idx:queue:' .. svc .. ':' .. cls
  local offset, size = 0, 1
  while true do
    local chunk = redis.call('ZREVRANGE', q, offset, offset + size - 1, 'WITHSCORES')
    if #chunk == 0 then
      -- The claim below leaves an emptied class listed (saving a call per claim); drop it here.
      if offset == 0 then redis.call('HDEL', 'jobs:idx:classes:' .. svc, cls) end
      return nil
    end
    local dropped = 0
    for i = 1, #chunk, 2 do
      local id, score = chunk[i], tonumber(chunk[i + 1])
      if floor and score <= floor then return nil end
      local f = redis.call('HMGET', 'job:' .. id, 'status', 'workflow_id', 'last_failed_worker', 'failed_at')
      if not f[1] and redis.call('EXISTS', 'job:' .. id) == 0 then
        dequeue(id)  -- hash missing: remove rather than skip forever
        dropped = dropped + 1
      elseif f[1] and f[1] ~= '' and f[1] ~= 'pending' then
        dequeue(id)  -- cancelled, finished or owned elsewhere: never run it from the queue
        if f[1] == 'failed' or f[1] == 'cancelled' then
          add_event(id, {t = now, ev = 'dropped', status = f[1]})
        end
        dropped = dropped + 1
      elseif wf and f[2] ~= wf then
        -- another workflow: skip
      elseif f[3] == wid and now - (time_ms(f[4]) or 0) < avoid_ms then
        -- this worker just failed it: leave it to others for a while
      else
        return id, score
      end
    end
    offset = offset + #chunk / 2 - dropped
    size = math.min(size * 4, 256)
  end
end

-- The best candidate over every matching class; a candidate that left jobs:pending without us (e.g.
-- removed by the API) is dropped from the index and the choice made again.
local types = job_types(caps)
local best_id, best_q
while true do
  local best_score
  best_id = nil
  for _, svc in ipairs(types) do
    local classes = redis.call('HGETALL', 'jobs:idx:classes:' .. svc)
    for i = 1, #classes, 2 do
      local desc = cjson.decode(classes[i + 1])
      if class_matches(caps, desc[1], desc[2], svc) then
        local id, score = head_of(svc, classes[i], best_score)
        if id then best_id, best_score, best_q = id, score, 'jobs:idx:queue:' .. svc .. ':' .. classes[i] end
      end
    end
  end
  if not best_id then return {'', unindexed} end
  if redis.call('ZREM', KEYS[1], best_id) == 1 then break end
  index_remove(best_id)
end

local id = best_id
local jkey = 'job:' .. id
local at = iso(now)
redis.call('HDEL', KEYS[2], id)
redis.call('ZREM', best_q, id)
redis.call('HSET', jkey, 'status', 'assigned', 'worker_id', wid, 'assigned_at', at)
local flat = redis.call('HGETALL', jkey)
local job = {}
for i = 1, #flat, 2 do job[flat[i]] = flat[i + 1] end
redis.call('HSET', 'jobs:active:' .. wid, id, cjson.encode(job))
local old_status = redis.call('HGET', 'worker:' .. wid, 'status') or ''
redis.call('HSET', 'worker:' .. wid, 'status', 'busy', 'current_job_id', id)
if old_status ~= 'busy' then
  redis.call('HSET', 'worker:' .. wid, 'last_status_change', at)
  publish('worker_status', {worker_id = wid, old_status = old_status, new_status = 'busy', current_job_id = id,
    timestamp = now})
end
redis.call('ZADD', KEYS[3], now + lease_ms, id)
local machine = caps.machine_id
if type(machine) ~= 'string' then machine = '' end
add_event(id, {t = now, ev = 'claimed', worker_id = wid, machine_id = machine,
  retry_count = tonumber(job.retry_count) or 0})
publish('job_claimed', {job_id = id, worker_id = wid, status = 'claimed', message = 'Job claimed by worker',
  claimed_at = at, timestamp = now, service_required = job.service_required, customer_id = job.customer_id,
  workflow_id = job.workflow_id, current_step = job.current_step, total_steps = job.total_steps})
publish('update_job_progress', {job_id = id, worker_id = wid, progress = 0, timestamp = now})
if ARGV[5] == '1' then
  redis.call('HSET', jkey, 'status', 'in_progress', 'started_at', at)
  add_event(id, {t = now, ev = 'started', worker_id = wid})
end
local out = {id, unindexed}
for i = 1, #flat do table.insert(out, flat[i]) end
return out
