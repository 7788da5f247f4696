-- lib.lua: helpers shared by every job script. Redis scripts cannot include one another, so jobs.py
-- prepends this file to each script before registering it.
-- Every script is called with the same three fixed keys first:
-- KEYS[1] = jobs:pending        (contract ZSET, score = P x 10^15 - floor(T_ms / 1000))
-- KEYS[2] = jobs:idx:of         (our HASH job id -> "<service>\n<class>": where the job sits in the index)
-- KEYS[3] = jobs:leases         (our ZSET job id -> lease expiry, epoch ms)
-- Dynamic keys (single-node Redis only, like the EMP API's own claim): job:{id}, job:{id}:events,
-- jobs:active:{wid}, worker:{wid}, jobs:idx:classes:{service} (HASH class -> [requirements, customer]),
-- jobs:idx:queue:{service}:{class} (ZSET '<tag>|<job id>' -> index score), jobs:idx:seq (enqueue counter), jobs:idx:seq:{service} (its job type's),
-- jobs:idx:heads:{service} (ZSET class -> bound of its queue's head score, see heads_repair),
-- jobs:idx:heads_scan (HASH: cursors of heads_repair).
-- jobs:sweep:gate (STRING held for one sweep interval) and jobs:sweep:cursors (HASH): the slow sweep's, jobs.py.

local EVENTS_TTL_S = 7 * 86400
-- Our ZSET job id -> when a cancel of it was seen (ms): a cancelled job is failed in its hash but in no
-- jobs:failed entry (the API's cancel writes none), so the embedded Redis's clean-up (expire_finished.lua)
-- finds it here. Trimmed to 8 days at each write: on a shared Redis it holds one week's cancels.
local CANCELLED = 'jobs:cancelled'

-- Note that job `id` was seen cancelled at `now`.
local function note_cancelled(id, now)
  redis.call('ZADD', CANCELLED, now, id)
  redis.call('ZREMRANGEBYSCORE', CANCELLED, '-inf', '(' .. (now - 8 * 86400000))
end
-- Our ZSET worker id -> when its heartbeat key lapses (Redis clock ms), written with the key: the reaper
-- finds workers whose key lapsed while they held no job (an idle worker killed, a machine gone), which
-- nothing else would ever set offline.
local BEATS = 'jobs:worker_beats'
-- Index score: priority first, then creation time in ms. 2^42 ms reaches the year 2109; the contract
-- score cannot order by time within one priority (50 x 10^15 exceeds 2^53, so it moves in steps of 8 s).
local PRIORITY_SHIFT = 4398046511104

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m > 2) and (m - 3) or (m + 9)
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = (mp < 10) and (mp + 3) or (mp - 9)
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m, d
end

-- Texts of the time, for fields and messages. string.format costs ~1k instructions per conversion inside
-- Redis (each is a sprintf) and ~3.7k per call, so the texts up to the second are formatted once a second
-- and kept (between calls too, under FCALL), and the milliseconds come from tables made on first use (a
-- function library cannot reach `string` while it loads).
local MS3, DIGITS3, SMALL  -- '.000Z'..'.999Z', '000'..'999', '0'..'255'
local clock_second, iso_prefix, second_text

local function clock_texts(s)
  if not MS3 then
    MS3, DIGITS3, SMALL = {}, {}, {}
    for i = 0, 999 do
      DIGITS3[i] = string.format('%03d', i)
      MS3[i] = '.' .. DIGITS3[i] .. 'Z'
    end
    for i = 0, 255 do SMALL[i] = string.format('%d', i) end
  end
  local days = math.floor(s / 86400)
  local rem = s - days * 86400
  local y, m, d = civil_from_days(days)
  iso_prefix = string.format('%04d-%02d-%02dT%02d:%02d:%02d', y, m, d, math.floor(rem / 3600),
    math.floor((rem % 3600) / 60), rem % 60)
  second_text = string.format('%d', s)
  clock_second = s
end

-- ISO-8601 UTC with milliseconds, the form the EMP API writes (Date.toISOString).
local function iso(ms)
  local s = math.floor(ms / 1000)
  if s ~= clock_second then clock_texts(s) end
  return iso_prefix .. MS3[ms - s * 1000]
end

-- Epoch ms (a whole number, from now_ms) as decimal text.
local function ms_text(ms)
  local s = math.floor(ms / 1000)
  if s < 1 then return string.format('%d', ms) end
  if s ~= clock_second then clock_texts(s) end
  return second_text .. DIGITS3[ms - s * 1000]
end

-- A whole number as decimal text: small ones (retry counts) from a table.
local function int_text(n)
  return (SMALL and SMALL[n]) or string.format('%d', n)
end

-- Epoch ms from ISO-8601 (with Z or an offset), epoch ms, or "<seconds>.<micros>" as the upstream claim
-- writes assigned_at. nil when unparsable.
local function time_ms(v)
  if not v or v == '' then return nil end
  local n = tonumber(v)
  if n then
    -- tonumber also takes 'nan' and 'inf': such a time made every score NaN, and the ZADD of one job's
    -- index entry raised in every claim's adopt, for every worker of every type.
    if n ~= n or n == math.huge or n == -math.huge then return nil end
    if n < 1e11 then return math.floor(n * 1000) end
    return math.floor(n)
  end
  local y, mo, d, h, mi, s, rest = string.match(v, '^(%d%d%d%d)-(%d%d)-(%d%d)[T ](%d%d):(%d%d):(%d%d)(.*)$')
  if not y then return nil end
  local ms = 0
  local frac = string.match(rest, '^%.(%d+)')
  if frac then
    ms = tonumber(string.sub(frac .. '000', 1, 3))
    rest = string.sub(rest, #frac + 2)
  end
  local off = 0
  local sign, oh, om = string.match(rest, '^([%+%-])(%d%d):?(%d%d)$')
  if sign then
    off = (tonumber(oh) * 60 + tonumber(om)) * 60000
    if sign == '-' then off = -off end
  end
  local days = days_from_civil(tonumber(y), tonumber(mo), tonumber(d))
  return (days * 86400 + tonumber(h) * 3600 + tonumber(mi) * 60 + tonumber(s)) * 1000 + ms - off
end

-- Lua turns numbers into strings with 14 significant digits; scores need all 17 to round-trip.
local function fmt(n)
  return string.format('%.17g', n)
end

-- Fields that decide a job's place in the queue, in the order HMGET returns them.
local ORDER_FIELDS = {'service_required', 'requirements', 'customer_id', 'priority', 'workflow_priority',
  'created_at', 'workflow_datetime'}

-- A field's number when it is a finite one (nil otherwise): tonumber alone also takes 'nan' and 'inf',
-- which make ZADD and cjson.encode fail.
local function finite_number(v)
  local n = tonumber(v)
  if n and n == n and n ~= math.huge and n ~= -math.huge then return n end
  return nil
end

-- The job hash's workflow fields, added to a message (complete_job, the final job_failed) when present:
-- workflow_id as its text, the others as numbers when they are finite ones (the hash's text otherwise).
local WORKFLOW_FIELDS = {'workflow_id', 'current_step', 'total_steps', 'workflow_priority', 'workflow_datetime'}

local function add_workflow_fields(msg, jkey)
  local f = redis.call('HMGET', jkey, unpack(WORKFLOW_FIELDS))
  for i, name in ipairs(WORKFLOW_FIELDS) do
    local v = f[i]
    if v and v ~= '' then
      if i == 1 then msg[name] = v else msg[name] = finite_number(v) or v end
    end
  end
  return msg
end

-- ... and one the API's `||` would take: not 0 either.
local function set_number(v)
  local n = finite_number(v)
  if n ~= 0 then return n end
  return nil
end

-- P = workflow_priority || priority and T = workflow_datetime || created_at, as the API computes them in
-- TypeScript: 0, empty or junk falls back to the next (a priority of 0 itself stays 0).
local function order_of(f)
  local p = set_number(f[5]) or finite_number(f[4]) or 50
  local t = set_number(f[7]) or time_ms(f[6]) or now_ms()
  return p, t
end

-- The contract's submission score, also used for retries and re-queues.
local function pending_score(f)
  local p, t = order_of(f)
  return p * 1e15 - math.floor(t / 1000)
end

local add_event  -- the timeline, below

-- Requirements JSON nested deeper than cjson decodes (1000 levels: the API's JSON.parse takes it) is no
-- malformed JSON: counted as none, it switched every requirement off (strict customer isolation, a GPU).
-- Such a class matches no worker instead (match.lua).
local UNMATCHABLE = {unmatchable = true}

local function parse_requirements(raw)
  if not raw or raw == '' then return nil end
  local ok, v = pcall(cjson.decode, raw)
  if ok and type(v) == 'table' and v[1] == nil then return v end
  if not ok and string.find(tostring(v), 'nested', 1, true) then return UNMATCHABLE end
  return nil  -- malformed (or non-object) requirements count as none (contract)
end

-- Jobs with the same requirements (and, when isolation is asked for, the same customer) match exactly
-- the same workers, so they share one index queue: a claim evaluates each class once, not each job.
local function class_of(raw, customer_id)
  local req = parse_requirements(raw)
  if not req then return '0', '', '' end
  local pos = req.positive_requirements
  if type(pos) ~= 'table' then pos = req end
  local cust = ''
  if pos.customer_isolation ~= nil then cust = customer_id or '' end
  return redis.sha1hex(raw .. '\n' .. cust), raw, cust
end

-- A class queue's members are '<tag>|<job id>', the tag a fixed-width countdown of jobs:idx:seq: jobs with
-- equal scores (the same millisecond, or a workflow's steps sharing workflow_datetime) come out of
-- ZREVRANGE, which orders ties by member descending, in the order they were queued.
local TAG_LEN = 15

local function job_of(member)
  if string.byte(member, TAG_LEN + 1) == 124 then return string.sub(member, TAG_LEN + 2) end  -- '|'
  return member  -- queued by a version whose members were bare job ids
end

-- A job's index entry (`loc`, its jobs:idx:of value "<service>\n<class>\n<tag>") as its job type, class and
-- queue member ("<tag>|<id>"; the bare id for an entry of a version without tags: "<service>\n<class>").
local function index_location(id, loc)
  local svc, cls, tag = string.match(loc, '^(.*)\n([^\n]*)\n([^\n]*)$')
  if svc then return svc, cls, tag .. '|' .. id end
  svc, cls = string.match(loc, '^(.*)\n([^\n]*)$')
  return svc, cls, id
end

local index_remove

-- Where a job's order fields (HMGET ORDER_FIELDS) put it in the index: job type, class (with its
-- requirements and customer) and score.
local function index_place(f)
  local cls, raw, cust = class_of(f[2], f[3])
  local p, t = order_of(f)
  -- The index orders by priority, then time, only for 0 <= t < 2^42 ms: a time out of it (microseconds in
  -- workflow_datetime, a far future) would cost or gain whole priority levels. Clamped, such jobs keep their
  -- priority and come after the others of it (their queue order among themselves).
  if t < 0 then t = 0 elseif t >= PRIORITY_SHIFT then t = PRIORITY_SHIFT - 1 end
  return f[1] or '', cls, raw, cust, p * PRIORITY_SHIFT - t
end

-- Retries held back until a due time (fail.lua's retry_at, e.g. a service's Retry-After) wait outside their
-- class queue: in jobs:idx:delayed (ZSET job id -> due time, Redis clock ms), with '@<due>' as their
-- jobs:idx:of entry (so they count as indexed). Claims move the due ones into their queues (promote_due).
-- In their queue they sat at its head (a retry keeps its submission score), and every claim of their job
-- type read each of them before passing it over: one hash read per waiting job while a rate limit lasted.
local DELAYED = 'jobs:idx:delayed'
-- The earliest due time in jobs:idx:delayed, known to this library (kept between calls under FCALL; nil:
-- look). Never more than a second ahead, so entries another writer (another version's library) added are
-- promoted within a second of their due time.
local delayed_next

local function index_add(id, f)
  index_remove(id)  -- a job queued again (resubmitted, re-queued) keeps one entry, never two
  local svc, cls, raw, cust, score = index_place(f)
  local tag = string.format('%015.0f', 999999999999999 - redis.call('INCR', 'jobs:idx:seq'))
  redis.call('INCR', 'jobs:idx:seq:' .. svc)  -- per type: a claim resumed past the heads cap checks it
  redis.call('HSET', 'jobs:idx:classes:' .. svc, cls, cjson.encode({raw, cust}))
  redis.call('ZADD', 'jobs:idx:queue:' .. svc .. ':' .. cls, fmt(score), tag .. '|' .. id)
  redis.call('HSET', KEYS[2], id, svc .. '\n' .. cls .. '\n' .. tag)
  if #raw > 1000 and parse_requirements(raw) == UNMATCHABLE then  -- (only such text can nest 1000 deep)
    add_event(id, {t = now_ms(), ev = 'unmatchable', reason = 'requirements nested deeper than Redis can decode '
      .. '(1000 levels): no worker is matched to them'})
  end
  -- The class's head score only ever rises here (see HEADS): an upper bound of its queue's head stays one.
  local hkey = 'jobs:idx:heads:' .. svc
  local h = redis.call('ZSCORE', hkey, cls)
  if not h or tonumber(h) < tonumber(fmt(score)) then redis.call('ZADD', hkey, fmt(score), cls) end
end

-- jobs:idx:heads:{service}: ZSET class -> an upper bound of the score of its queue's head (its best entry),
-- so a claim reads the classes best first and stops at the first whose bound is below the best job found,
-- instead of matching every class of the type. index_add raises the bound (never lowers it); removals leave
-- it where it is (still a bound); a claim that reads a queue whose head is lower writes the real score (or
-- drops the class when the queue is empty), and index_remove drops it with the emptied class. A class
-- listed in jobs:idx:classes but not here (indexed by an older version, or an index from before heads
-- existed) is found by comparing the two counts, at most once a second per type under FCALL (every call
-- under EVAL, and every claim while a repair is under way), and listed by bounded repair steps.
local HEADS_REPAIR_STEP = 500
local heads_check_at = {}  -- job type -> Redis clock ms of its next count check (kept under FCALL)

-- Returns true when a repair step changed something or left more to do (a claim that found nothing then
-- says to claim again at once; a pass that changes nothing ends that). `force`: check even when not due (a
-- claim that found nothing: its worker would otherwise wait for the next wake-up).
local function heads_repair(svc, now, force)
  local due = heads_check_at[svc]
  -- a due more than a second ahead was set before the Redis clock stepped back: stale, check now
  if due and due > now + 1000 then due = nil end
  if due and due > now and not force then return false end
  if force and due == now + 1000 then return false end  -- checked by this very claim
  local ckey, hkey = 'jobs:idx:classes:' .. svc, 'jobs:idx:heads:' .. svc
  local nclasses, nheads = redis.call('HLEN', ckey), redis.call('ZCARD', hkey)
  heads_check_at[svc] = now + 1000
  if nclasses == nheads then return false end
  local field = svc .. (nclasses > nheads and '\nclasses' or '\nheads')
  local cursor = redis.call('HGET', 'jobs:idx:heads_scan', field) or '0'
  local r, changed = nil, false
  if nclasses > nheads then
    -- classes missing from heads: listed with their queue's real head (an empty queue's class is dropped)
    r = redis.call('HSCAN', ckey, cursor, 'COUNT', HEADS_REPAIR_STEP)
    for i = 1, #r[2], 2 do
      local cls = r[2][i]
      if nheads == 0 or not redis.call('ZSCORE', hkey, cls) then
        local top = redis.call('ZREVRANGE', 'jobs:idx:queue:' .. svc .. ':' .. cls, 0, 0, 'WITHSCORES')
        if top[2] then redis.call('ZADD', hkey, top[2], cls) else redis.call('HDEL', ckey, cls) end
        changed = true
      end
    end
  else
    -- heads of classes gone (an older version's index_remove): dropped when their queue is empty
    r = redis.call('ZSCAN', hkey, cursor, 'COUNT', HEADS_REPAIR_STEP)
    for i = 1, #r[2], 2 do
      local cls = r[2][i]
      if redis.call('HEXISTS', ckey, cls) == 0
          and redis.call('EXISTS', 'jobs:idx:queue:' .. svc .. ':' .. cls) == 0 then
        redis.call('ZREM', hkey, cls)
        changed = true
      end
    end
  end
  -- a class listed now may rank before where a claim stopped at HEADS_MAX: claim.lua's resume then starts over
  if changed and nclasses > nheads then redis.call('INCR', 'jobs:idx:seq:' .. svc) end
  if r[1] == '0' then
    redis.call('HDEL', 'jobs:idx:heads_scan', field)  -- a whole pass done: checked again in a second
  else
    redis.call('HSET', 'jobs:idx:heads_scan', field, r[1])
    heads_check_at[svc] = nil  -- the next claim takes the next step
    changed = true
  end
  return changed
end

-- Remove a job's index entry (the one jobs:idx:of points to). Returns its queue and member, nil when the
-- job was not indexed.
function index_remove(id)
  local loc = redis.call('HGET', KEYS[2], id)
  if not loc then return end
  redis.call('HDEL', KEYS[2], id)
  if string.byte(loc, 1) == 64 then  -- '@<due>': a delayed retry, in no queue (see index_delay)
    redis.call('ZREM', DELAYED, id)
    return
  end
  local svc, cls, member = index_location(id, loc)
  local q = 'jobs:idx:queue:' .. svc .. ':' .. cls
  redis.call('ZREM', q, member)
  if redis.call('EXISTS', q) == 0 then
    redis.call('HDEL', 'jobs:idx:classes:' .. svc, cls)
    redis.call('ZREM', 'jobs:idx:heads:' .. svc, cls)
  end
  return q, member
end

-- A retry's index entry until `due` (Redis clock ms): in jobs:idx:delayed, not in its class queue.
local function index_delay(id, due)
  index_remove(id)
  redis.call('ZADD', DELAYED, due, id)
  redis.call('HSET', KEYS[2], id, '@' .. string.format('%d', due))
  if delayed_next and due < delayed_next then delayed_next = due end
end

-- Put a job (back) into the pending queue and our index, with the submission score; with `due` (Redis clock
-- ms), into jobs:pending now (the API sees it as before) but into its class queue only once due.
local function enqueue(id, due)
  local f = redis.call('HMGET', 'job:' .. id, unpack(ORDER_FIELDS))
  redis.call('ZADD', KEYS[1], fmt(pending_score(f)), id)
  if due then index_delay(id, due) else index_add(id, f) end
end

local function dequeue(id)
  redis.call('ZREM', KEYS[1], id)
  return index_remove(id)
end

-- Whether a job's index entry (`loc`, from jobs:idx:of) still says what its hash says: the same job type
-- and class, and (when the job has a time of its own) the same score.
local function index_current(id, loc, f)
  if string.byte(loc, 1) == 64 then
    -- delayed (placed from its hash when due) while the hash still waits for that due time: a job the API
    -- wrote again under the id (no retry_at) was held back by the old attempt's delay, up to minutes
    local retry_at = redis.call('HGET', 'job:' .. id, 'retry_at')
    return retry_at ~= false and tonumber(retry_at) == tonumber(string.sub(loc, 2))
  end
  local svc, cls, member = index_location(id, loc)
  local want_svc, want_cls, _, _, score = index_place(f)
  if svc ~= want_svc or cls ~= want_cls then return false end
  if not (set_number(f[7]) or time_ms(f[6])) then return true end  -- timed at indexing: nothing to compare
  local indexed = redis.call('ZSCORE', 'jobs:idx:queue:' .. svc .. ':' .. cls, member)
  return indexed ~= false and tonumber(indexed) == tonumber(fmt(score))
end

-- Per class id: its requirements text, customer and whether the requirements ask for customer isolation,
-- read once from jobs:idx:classes:{service}. A class id hashes its texts, so an entry never goes stale;
-- kept between calls under FCALL (one call under EVAL), emptied when it grows past its bound.
local CLASS_TEXTS_MAX = 4096
local class_texts, class_texts_size = {}, 0

-- Whether a job's requirements text `raw` and customer still give class `cls` of job type `svc`
-- (class_of(raw, customer_id) == cls): for a claim's head, whose hash the API may have written again since
-- it was queued. Usually a comparison of texts; class_of only when they differ.
local function in_class(svc, cls, raw, customer_id)
  raw = raw or ''
  if cls == '0' and raw == '' then return true end
  local e = class_texts[cls]
  if not e then
    local ok, d = pcall(cjson.decode, redis.call('HGET', 'jobs:idx:classes:' .. svc, cls) or '')
    if ok and type(d) == 'table' and type(d[1]) == 'string' and type(d[2]) == 'string' then
      local _, _, probe = class_of(d[1], '?')  -- class_of keeps the customer only for isolating requirements
      e = {raw = d[1], cust = d[2], iso = probe == '?'}
      if class_texts_size >= CLASS_TEXTS_MAX then  -- about half evicted, never all at once
        for k in pairs(class_texts) do
          if class_texts_size <= CLASS_TEXTS_MAX / 2 then break end
          class_texts[k], class_texts_size = nil, class_texts_size - 1
        end
      end
      class_texts[cls], class_texts_size = e, class_texts_size + 1
    end
  end
  if e and raw == e.raw and (not e.iso or (customer_id or '') == e.cust) then return true end
  return (class_of(raw, customer_id)) == cls
end


-- Index a job that reached jobs:pending without us (the EMP API writes only jobs:pending + job:{id}).
-- 1 = indexed, 0 = nothing to do, -1 = its hash is missing (or job:{id} holds no hash), so it was removed
-- from the queue.
-- `deep`: a job already indexed is indexed again when its hash no longer says what the entry says (the API
-- wrote the id again with another type, requirements or priority: the old entry let a worker that does not
-- meet the new requirements claim it, or hid it from its new type). A few calls more per indexed id, so
-- for ids announced on job_submitted and the bounded sweep steps, not for a whole-queue reconcile.
local function adopt(id, deep)
  local loc = redis.call('HGET', KEYS[2], id)
  if loc and not deep then return 0 end
  if not redis.call('ZSCORE', KEYS[1], id) then return 0 end
  local kind = redis.call('TYPE', 'job:' .. id).ok
  if kind ~= 'hash' then
    -- A job:{id} of another type (another producer's, a clobbered key) is dropped like a missing one: its
    -- HMGET below raised, failing every claim that adopted it and every reconcile.
    dequeue(id)
    if kind ~= 'none' then
      add_event(id, {t = now_ms(), ev = 'dropped', reason = 'job:' .. id .. ' holds a ' .. kind .. ', not a job hash'})
    end
    return -1
  end
  local f = redis.call('HMGET', 'job:' .. id, unpack(ORDER_FIELDS))
  if loc and index_current(id, loc, f) then return 0 end
  index_add(id, f)
  return 1, f[1]  -- (and its job type)
end

-- Move the delayed retries that are due (at most 100 a call) into their class queues, placed from their
-- hashes as they stand; one no longer in jobs:pending just leaves the index. A call when nothing is due
-- costs nothing (delayed_next), else one ZRANGEBYSCORE and one ZRANGE.
local function promote_due(now)
  if delayed_next and delayed_next > now then return end
  local due = redis.call('ZRANGEBYSCORE', DELAYED, '-inf', now, 'LIMIT', 0, 100)
  for _, id in ipairs(due) do
    redis.call('ZREM', DELAYED, id)
    local loc = redis.call('HGET', KEYS[2], id)
    if loc and string.byte(loc, 1) == 64 then
      redis.call('HDEL', KEYS[2], id)
      adopt(id, false)
    end
  end
  if #due == 100 then
    delayed_next = nil  -- more may be due: the next call looks again
    return
  end
  local head = redis.call('ZRANGE', DELAYED, 0, 0, 'WITHSCORES')
  delayed_next = now + 1000
  if head[2] and tonumber(head[2]) < delayed_next then delayed_next = tonumber(head[2]) end
end

-- How soon (ms, at least 1) the first delayed retry is due, nil when none waits. One already due makes the
-- next promote_due look.
local function delayed_in(now)
  local head = redis.call('ZRANGE', DELAYED, 0, 0, 'WITHSCORES')
  if not head[2] then return nil end
  local left = tonumber(head[2]) - now
  if left < 1 then
    delayed_next = nil
    left = 1
  end
  return left
end

-- The per-job timeline (our addition): an append-only list of small JSON events.
-- The TTL is set when the list is created and renewed when the job ends (final = true).
-- A timeline write never fails its script (redis.pcall): the key can hold something else (job `a:events`'s
-- hash is job `a`'s timeline key), and a script that raised after its first writes left a claim half done
-- (the job assigned, never handed to the worker, and the same on every later claim of it).
-- Bounded: past EVENTS_MAX + EVENTS_SLACK events (a job retried thousands of times), the list keeps its first
-- event, one `events_dropped` marker ({t, ev, dropped = how many in all, the marker's earlier count
-- included}) and the last EVENTS_MAX; trimmed once per EVENTS_SLACK events, a few calls each time.
local EVENTS_MAX, EVENTS_SLACK = 500, 100

local function trim_events(key, n)
  if n <= EVENTS_MAX + EVENTS_SLACK + 2 then return end
  local first, second = redis.call('LINDEX', key, 0), redis.call('LINDEX', key, 1)
  local before, from = 0, 1  -- events dropped earlier (the marker's count); first event after the marker
  local ok, m = pcall(cjson.decode, second or '')
  if ok and type(m) == 'table' and m.ev == 'events_dropped' then
    before, from = tonumber(m.dropped) or 0, 2
  end
  local keep_from = n - EVENTS_MAX  -- index of the first of the last EVENTS_MAX
  local ok2, kept = pcall(cjson.decode, redis.call('LINDEX', key, keep_from) or '')
  local t = ok2 and type(kept) == 'table' and kept.t or nil
  local marker = cjson.encode({t = t, ev = 'events_dropped', dropped = before + keep_from - from})
  redis.call('LTRIM', key, keep_from, -1)
  redis.call('LPUSH', key, marker, first)
end

function add_event(id, ev, final)
  local key = 'job:' .. id .. ':events'
  local n = redis.pcall('RPUSH', key, cjson.encode(ev))
  if type(n) == 'number' then
    if n == 1 or final then redis.call('EXPIRE', key, EVENTS_TTL_S) end
    trim_events(key, n)
  end
end

-- Several events already encoded, in one call.
local function add_events(id, ...)
  local key = 'job:' .. id .. ':events'
  local n = redis.pcall('RPUSH', key, ...)
  if n == select('#', ...) then redis.call('EXPIRE', key, EVENTS_TTL_S) end
  if type(n) == 'number' then trim_events(key, n) end
end

local function publish(channel, msg)
  redis.call('PUBLISH', channel, cjson.encode(msg))
end

-- Stray keys. Redis keeps the writes a script made before one of its calls raised (WRONGTYPE: another
-- tool's key of another type where we write), so a script that changes a job's state and then writes the
-- worker's bookkeeping left the job half moved: in_progress with no lease and in no jobs:active (nothing
-- ever found it again), or pending outside jobs:pending. Such scripts check the keys they will write first
-- (one TYPE each) and, when one holds another type, change nothing and reply with an error naming it.
-- wrong_types(key1, type1, key2, type2, ...): that error reply, nil when each key holds its type or none.
local function wrong_types(...)
  local n = select('#', ...)
  for i = 1, n, 2 do
    local key, want = select(i, ...)
    local kind = redis.call('TYPE', key).ok
    if kind ~= want and kind ~= 'none' then
      return redis.error_reply('WRONGTYPE ' .. key .. ' holds a ' .. kind .. ' where the job contract keeps a '
        .. want .. ': nothing was changed; delete or rename that stray key')
    end
  end
  return nil
end

-- The reply for a write that failed (redis.pcall's error table `err`) on `key`: WRONGTYPE naming the key and
-- what it holds, as wrong_types says it; any other error (OOM, READONLY...) as it came.
local function stray_reply(err, key, want)
  if string.sub(err.err or '', 1, 9) ~= 'WRONGTYPE' then return err end
  return wrong_types(key, want) or err
end

-- The keys every script that moves a job writes for its worker: jobs:active:{wid}, worker:{wid}, the leases.
local function worker_keys_wrong(wid)
  return wrong_types('jobs:active:' .. wid, 'hash', 'worker:' .. wid, 'hash', KEYS[3], 'zset')
end

-- Worker status follows its active jobs: busy while any remain. Publishes worker_status on a change.
-- `reaping` (the reaper, after wid missed its lease renewals): with wid's heartbeat key gone too (TTL 60 s,
-- deleted on a clean exit) the worker is dead, so it is written and announced offline, not idle capacity.
-- A worker hash written offline expires after OFFLINE_TTL_S, unless the worker comes back first: the hash of
-- a worker gone for good (removed from its manifest, its machine's id changed, a rented machine destroyed)
-- used to stay in Redis, offline, for ever, where whatever lists worker:* found it. Any later status of the
-- worker (registered again, a beat after a stall) takes the expiry away. Call after writing `new` over `old`.
local OFFLINE_TTL_S = 86400
local function worker_expiry(wkey, old, new)
  if new == 'offline' then redis.call('EXPIRE', wkey, OFFLINE_TTL_S)
  elseif old == 'offline' then redis.call('PERSIST', wkey) end
end

-- The worker's status (idle / busy, offline when `reaping` finds its heartbeat key gone) and current job, from
-- what it still runs; worker_status goes out when either changes. A worker running several jobs (concurrency
-- > 1) is shown with one of them: the one it named while that still runs (the hash's order picked one at
-- random), another when it ends, said in a busy -> busy message (the API was shown a job that had ended).
local function refresh_worker(wid, now, create, reaping)
  local wkey = 'worker:' .. wid
  if not create and redis.call('EXISTS', wkey) == 0 then return end
  local remaining = redis.call('HKEYS', 'jobs:active:' .. wid)
  local was = redis.call('HMGET', wkey, 'status', 'current_job_id')
  local old, old_cur = was[1] or '', was[2] or ''
  local new, cur = 'idle', ''
  if #remaining > 0 then
    new, cur = 'busy', remaining[1]
    for _, id in ipairs(remaining) do
      if id == old_cur then cur = id break end
    end
  end
  if reaping and redis.call('EXISTS', wkey .. ':heartbeat') == 0 then new, cur = 'offline', '' end
  redis.call('HSET', wkey, 'status', new, 'current_job_id', cur)
  worker_expiry(wkey, old, new)
  if old ~= new then redis.call('HSET', wkey, 'last_status_change', iso(now)) end
  if old ~= new or cur ~= old_cur then
    publish('worker_status', {worker_id = wid, old_status = old, new_status = new, current_job_id = cur,
      timestamp = now})
  end
end

-- Whether worker wid still owns job id: 'ok', 'cancelled' (the API failed it under us), 'lost' (the lease
-- expired and the job went back to the queue or to another worker) or 'missing' (no hash).
-- `token` (optional): the attempt's claim token, the assigned_at its claim wrote. A write from an older
-- attempt (its reply lost and the write retried, or its lease reaped, after the job was claimed again,
-- maybe by the same worker) is then 'lost' too, and the second result is true when the job is wid's again:
-- its bookkeeping (jobs:active, the lease) belongs to the newer attempt.
local function ownership(id, wid, token)
  -- pcall: a job:{id} that holds no hash (clobbered while it ran) is 'missing', the worker's bookkeeping
  -- for it released; it failed the worker's heartbeat for all its jobs and every write for this one.
  local f = redis.pcall('HMGET', 'job:' .. id, 'status', 'worker_id', 'assigned_at')
  if f.err then return 'missing' end
  if not f[1] and redis.call('EXISTS', 'job:' .. id) == 0 then return 'missing' end
  if token and token ~= '' and f[3] ~= token then return 'lost', f[2] == wid end
  if f[1] == 'failed' or f[1] == 'cancelled' then return 'cancelled' end
  if f[2] ~= wid or (f[1] ~= 'assigned' and f[1] ~= 'in_progress') then return 'lost' end
  return 'ok'
end

-- Drop worker wid's bookkeeping for a job it no longer runs. The lease stays when the job now belongs
-- to someone else (state 'lost').
local function release(id, wid, now, state)
  redis.call('HDEL', 'jobs:active:' .. wid, id)
  if state ~= 'lost' then redis.call('ZREM', KEYS[3], id) end
  refresh_worker(wid, now, false)
end

-- Bookkeeping for a job its worker can no longer finish, for every non-'ok' ownership state.
local function release_not_owned(id, wid, now, state)
  release(id, wid, now, state)
  if state == 'cancelled' then
    add_event(id, {t = now, ev = 'cancelled', worker_id = wid})
    note_cancelled(id, now)
  end
end

-- What a finishing write of attempt `token` already did, when it is retried after its first try landed
-- (the reply lost on the way back): 'completed' (the claim's token still in assigned_at), 'failed' or
-- 'retried' (fail.lua leaves the attempt's token in failed_token either way), else nil. The retry then
-- returns that outcome and changes nothing, instead of 'lost' (a completed job logged as not completed)
-- or 'cancelled' (a spurious cancelled event). Asked only after ownership() said no: rarely.
local function finished_before(id, wid, token)
  if not token or token == '' or redis.call('TYPE', 'job:' .. id).ok ~= 'hash' then return nil end
  local f = redis.call('HMGET', 'job:' .. id, 'status', 'worker_id', 'assigned_at', 'failed_token')
  if f[1] == 'completed' and f[2] == wid and f[3] == token then return 'completed' end
  if f[4] == token then
    if f[1] == 'failed' then return 'failed' end
    return 'retried'
  end
  return nil
end

-- ownership(), and when the job is no longer wid's, that worker's bookkeeping for it released: the
-- prologue of every script a worker runs on a job it claimed. An older attempt of a job that wid claimed
-- again releases nothing.
local function ownership_or_release(id, wid, now, token)
  local state, newer = ownership(id, wid, token)
  if state ~= 'ok' and not newer then release_not_owned(id, wid, now, state) end
  return state
end

-- ---- end of lib.lua ----
