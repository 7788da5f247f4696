-- match.lua: does a worker meet a job's requirements (the contract's matching rules), with a memo of
-- decoded capabilities and class answers. Prepended to claim.lua (see jobs.py).

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

local function contains_all(list, items)
  for _, item in ipairs(items) do
    if not contains(list, item) then return false end
  end
  return true
end

-- Does the worker's value satisfy the required one: array contains all / membership / number >= / equality.
local function satisfies(wv, rv)
  if not present(wv) then return false end
  if type(rv) == 'table' and is_array(rv) then
    return type(wv) == 'table' and contains_all(wv, rv)
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

-- A positive requirement that asks for nothing: null, an empty list or object (a JS client's "no
-- preference"), or false where the worker has no such capability (an absent flag is false). Each made its
-- job unclaimable for ever.
local function no_preference(wv, rv)
  return rv == cjson.null or (type(rv) == 'table' and next(rv) == nil) or (rv == false and not present(wv))
end

-- `positive`: a requirement (no preference is met); else a negative one (no preference matches nothing: an
-- empty list "contains all of nothing" and rejected every worker having the capability).
local function check_capability(worker, key, rv, positive)
  local wv = lookup(worker, key)
  if no_preference(wv, rv) then return positive end
  if type(rv) == 'table' and not is_array(rv) then
    if type(wv) ~= 'table' then
      if not positive then return false end
      wv = {}  -- a worker without the object: only subkeys that ask for nothing are met
    end
    for k, sub in pairs(rv) do
      local met
      if no_preference(wv[k], sub) then met = positive else met = satisfies(wv[k], sub) end
      if not met then return false end
    end
    return true
  end
  return satisfies(wv, rv)
end

-- A numeric amount the worker does not publish counts as 0 (a worker without a GPU has no gpu_memory_gb):
-- a requirement of 0 or less then means "none needed" and matches; a positive one still needs the key.
local function check_hardware(hw, req)
  if type(req) ~= 'table' then return true end
  if type(hw) ~= 'table' then hw = {} end
  for k, rv in pairs(req) do
    if rv ~= 'all' and present(rv) then
      local need = tonumber(rv)
      if need ~= need then return false end  -- NaN (cjson takes it): matched every worker (have < NaN is false)
      if need then
        local have = 0
        if present(hw[k]) then have = tonumber(hw[k]) end
        if not have or have < need then return false end
      elseif not satisfies(hw[k], rv) then
        return false
      end
    end
  end
  return true
end

-- Strict isolation needs a strict worker that names the customer in its allow list: a strict worker
-- without one serves no strict customer (rather than every one). Other isolation levels apply the lists
-- the worker has.
local function check_isolation(access, isolation, customer_id)
  if type(access) ~= 'table' then access = {} end
  local allowed = access.allowed_customers
  if isolation == 'strict' and (access.isolation ~= 'strict' or type(allowed) ~= 'table') then return false end
  if type(allowed) == 'table' and not contains(allowed, customer_id) then
    return false
  end
  if type(access.denied_customers) == 'table' and contains(access.denied_customers, customer_id) then
    return false
  end
  return true
end

-- The models a job needs, for its service: a list, one name, or an object keyed by service whose entry
-- for this service is either (entries for other services concern jobs of those services). 'all', null or
-- no entry: none. Anything else (a number, a nested object) cannot be satisfied.
local function check_models(worker_models, required, service)
  if type(required) == 'table' and not is_array(required) then required = required[service] end
  if required == nil or required == cjson.null or required == 'all' then return true end
  if type(required) == 'string' then required = {required} end
  if not is_array(required) then return false end
  if #required == 0 then return true end
  if worker_models == 'all' then return true end
  if type(worker_models) ~= 'table' then return false end
  local have = worker_models[service]
  if have == 'all' then return true end
  return type(have) == 'table' and contains_all(have, required)
end

local SPECIAL = {service_type = true, hardware = true, customer_isolation = true, models = true,
  positive_requirements = true, negative_requirements = true}

-- One requirement class against this worker (requirements JSON and, with isolation, the customer).
local function class_matches(worker, raw, customer_id, service)
  local req = parse_requirements(raw)
  if not req then return true end
  if req == UNMATCHABLE then return false end
  local pos = req.positive_requirements
  if type(pos) ~= 'table' then pos = req end
  if pos.hardware ~= nil and not check_hardware(worker.hardware, pos.hardware) then return false end
  if pos.customer_isolation ~= nil and not check_isolation(worker.customer_access, pos.customer_isolation, customer_id) then
    return false
  end
  if pos.models ~= nil and not check_models(worker.models, pos.models, service) then return false end
  for key, rv in pairs(pos) do
    if not SPECIAL[key] and not check_capability(worker, key, rv, true) then return false end
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
      elseif check_capability(worker, key, rv, false) then
        return false
      end
    end
  end
  return true
end

-- Decoded capabilities and class answers per capabilities JSON. The table lives as long as the Lua chunk:
-- one call under EVAL (so it only saves work within that call), the library's lifetime under FCALL, where
-- a worker's claims then skip decoding its capabilities and re-matching known classes. Answers depend
-- only on the capabilities and the class (whose id hashes its requirements), so they never go stale.
-- Bounds for the whole library: MEMO_MAX capability sets and ANSWERS_MAX answers over all of them (each
-- distinct worker id is its own set). Past either, about half is evicted (entries in table order, an
-- arbitrary one), never all at once: a claim never has to re-match every class at once. The cost is
-- amortised: one pass over the evicted half per half a budget of inserts.
local MEMO_MAX, ANSWERS_MAX = 1024, 65536
local memo, memo_size, answers_total = {}, 0, 0

-- Evict about half of the answers (whole answer tables of sets first met, then single answers).
local function evict_answers()
  local goal = answers_total - math.floor(ANSWERS_MAX / 2)
  for _, w in pairs(memo) do
    if goal <= 0 then break end
    if w.answered <= goal then
      goal, answers_total = goal - w.answered, answers_total - w.answered
      w.answers, w.answered = {}, 0
    else
      for k in pairs(w.answers) do
        if goal <= 0 then break end
        w.answers[k] = nil
        goal, answers_total, w.answered = goal - 1, answers_total - 1, w.answered - 1
      end
    end
  end
end

-- Evict about half of the capability sets (with their answers).
local function evict_sets()
  local goal = memo_size - math.floor(MEMO_MAX / 2)
  for k, w in pairs(memo) do
    if goal <= 0 then break end
    memo[k] = nil
    memo_size, answers_total, goal = memo_size - 1, answers_total - w.answered, goal - 1
  end
end

-- {caps = decoded capabilities, types = job types (job_service_required_map, else services), wf = the
-- workflow_id restriction or nil, machine = machine id or '', answers = class key -> bool}.
local function worker_of(caps_json)
  local w = memo[caps_json]
  if w then return w end
  local caps = cjson.decode(caps_json)
  local types = {}
  local map = caps.job_service_required_map
  if type(map) == 'table' and #map > 0 then
    for _, entry in ipairs(map) do
      if type(entry) == 'string' then table.insert(types, entry)
      elseif type(entry) == 'table' and type(entry.job_service_required) == 'string' then
        table.insert(types, entry.job_service_required)
      end
    end
  elseif type(caps.services) == 'table' then
    for _, s in ipairs(caps.services) do
      if type(s) == 'string' then table.insert(types, s) end
    end
  end
  local wf = caps.workflow_id
  if type(wf) ~= 'string' or wf == '' then wf = nil end
  local machine = caps.machine_id
  if type(machine) ~= 'string' then machine = '' end
  w = {caps = caps, types = types, wf = wf, machine = machine, answers = {}, answered = 0}
  if memo_size >= MEMO_MAX then evict_sets() end
  memo[caps_json], memo_size = w, memo_size + 1
  return w
end

-- Does worker w (from worker_of) meet requirement class cls of service svc; the class's [requirements,
-- customer] JSON is read from ckey (jobs:idx:classes:{svc}) when the answer is not known yet. nil when the
-- class is not listed there (unknown: not met).
local function meets(w, svc, cls, ckey)
  local key = svc .. '\n' .. cls
  local answer = w.answers[key]
  if answer == nil then
    local raw = redis.call('HGET', ckey, cls)
    -- A class listed in heads but not in classes (an older version's removal, a repair not run yet) is
    -- unknown, not "no requirements": read as none and kept in the memo (FCALL), it let workers claim its
    -- later jobs whatever they required, customer isolation included. nil: not met, not remembered (the
    -- claim drops its head when its queue is empty).
    if not raw then return nil end
    local d = cjson.decode(raw)
    answer = class_matches(w.caps, d[1], d[2], svc)
    if answers_total >= ANSWERS_MAX then evict_answers() end
    w.answers[key], w.answered, answers_total = answer, w.answered + 1, answers_total + 1
  end
  return answer
end

-- ---- end of match.lua ----
