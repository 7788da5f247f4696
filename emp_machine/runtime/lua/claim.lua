-- claim.lua: atomically claim the best pending job this worker can serve (lib.lua and match.lua first).
-- KEYS[1] = jobs:pending, KEYS[2] = jobs:idx:of, KEYS[3] = jobs:leases (see lib.lua)
-- ARGV[1] = worker capabilities JSON (contract shape: worker_id, machine_id, services /
--           job_service_required_map, hardware, models, customer_access, optional workflow_id, ...)
-- ARGV[2] = lease in ms
-- ARGV[3] = ms during which a job this worker just failed is left to other workers
-- ARGV[4] = '1': look first whether jobs:pending holds jobs our index lacks and, when it does, claim
--           nothing and say so (the caller reconciles, then claims with '0'), so an unindexed
--           higher-priority job is not passed over. The caller asks at most once per interval: the look
--           is two calls, ~3 us of a ~60 us claim. A claim that finds nothing always looks.
-- ARGV[5] = '1': start the job at once (in_progress, as start.lua does), saving a round trip
-- ARGV[6..] = job ids announced on job_submitted, indexed first if the EMP API submitted them
-- Returns {job_id, 0, job JSON} (the JSON is the jobs:active entry: the job hash as it stands after the
-- claim), or {'', unindexed[, wait_ms]} where unindexed is 1 when jobs:pending holds jobs our index lacks
-- (by count: stale index entries can hide them, which the caller's slow sweep catches) and wait_ms, when
-- present, is 1 when the claim stopped at HEADS_MAX or took a heads repair step (claim again at once), or
-- how soon the first job passed over because this worker just failed it, or the first delayed
-- retry (fail.lua's retry_at: it waits in jobs:idx:delayed, see lib.lua, and each claim first moves the
-- due ones into their queues) becomes due, so a lone worker retries it then rather than at its next sweep.
-- (The delayed retry may be of a type this worker does not serve: it then finds nothing, once.)
--
-- Order: highest index score (priority, then oldest first). Classes are reached through
-- jobs:idx:heads:{type}, best bound first, and only as far as one can still beat the best job found; each is
-- matched once (see match.lua) and only the heads of the matching class queues are read, so the cost grows
-- neither with queue depth nor with the number of classes (up to HEADS_MAX heads a claim, below). The cap is
-- the one exception to the order: a claim that reaches it takes the best job found among the heads it
-- examined, though a class past them may hold a better one (finding none, the next claim goes on). Only the
-- best head's job hash is read; a head that cannot run is cleaned out or passed over and that queue's next
-- entry competes instead (a worker restricted to one workflow_id walks its
-- classes' queues past other workflows' jobs).

local w = worker_of(ARGV[1])
local wid = w.caps.worker_id
local lease_ms = tonumber(ARGV[2])
local avoid_ms = tonumber(ARGV[3])
local start = ARGV[5] == '1'
local now = now_ms()

for i = 6, #ARGV do adopt(ARGV[i], true) end
promote_due(now)

local function unindexed()
  if redis.call('ZCARD', KEYS[1]) > redis.call('HLEN', KEYS[2]) then return 1 end
  return 0
end
if ARGV[4] == '1' and unindexed() == 1 then return {'', 1} end

-- One cursor per matching class queue: `buf` holds entries read (member, score, ...); `offset` is the rank
-- of the first entry not read yet. Cursors are added as the walk of jobs:idx:heads:{type} (lib.lua: class ->
-- a bound of its queue's head score) reaches their class, best bound first; the walk stops at the first
-- bound not above the best job found (no entry of a later class can beat it), so a claim's cost follows the
-- classes it must look at, not all the classes of its types.
local cursors = {}
-- Heads examined per claim at most. A claim that reaches it without finding a job remembers where it
-- stopped (w.resume, kept with the worker's memo under FCALL) and says to claim again in 1 ms; the next
-- claim goes on from there, until the end of the heads (then the next claim starts at the best again).
-- It goes on only if nothing the stopped claim passed could have changed: no job of its types indexed since
-- (any index_add, promote_due's included, counts jobs:idx:seq:{type}, and heads_repair counts it when it
-- lists a class), and no job it passed over for its retry_at or this worker's failure due yet; else it
-- starts at the best (and, capped again, says to claim again in RESTARTED_WAIT_MS rather than 1 ms: under a
-- steady stream of jobs of its types a worker whose runnable jobs lie past the cap waits for a lull).
-- It goes on from the first head not examined (found again by its class, since heads examined may have
-- left or been lowered meanwhile: its rank is no anchor). Under EVAL nothing is kept between calls:
-- classes past the first HEADS_MAX that no earlier one beats wait until the classes before them drain.
local HEADS_MAX = 2000
local RESTARTED_WAIT_MS = 100
local readers, seen, fixes = {}, {}, {}
local examined, capped, dropped_any = 0, false, false
local resume = w.resume
w.resume = nil
for _, svc in ipairs(w.types) do heads_repair(svc, now) end
local restarted = false  -- a resume point dropped because something changed before it
if resume and resume.due and now >= resume.due then resume = nil end
if resume then
  for _, svc in ipairs(w.types) do
    if resume.seqs[svc] ~= redis.call('GET', 'jobs:idx:seq:' .. svc) then
      resume, restarted = nil, true
      break
    end
  end
end
for _, svc in ipairs(w.types) do
  local key, offset = 'jobs:idx:heads:' .. svc, 0
  local at = resume and resume[svc]
  if type(at) == 'number' then
    offset = at  -- that reader had reached its end
  elseif at then
    -- at = {class, bound}: its rank now, or (its bound lowered, or gone) the first rank at or below the bound
    if redis.call('ZSCORE', key, at[1]) == at[2] then offset = redis.call('ZREVRANK', key, at[1])
    else offset = redis.call('ZCOUNT', key, '(' .. at[2], '+inf') end
  end
  table.insert(readers, {svc = svc, key = key, ckey = 'jobs:idx:classes:' .. svc,
    buf = {}, i = 1, offset = offset, size = 16})
end

-- A reader's current head (class, bound), reading further in chunks; nil at the end.
local function next_head(r)
  if r.i > #r.buf then
    if r.done then return nil end
    local chunk = redis.call('ZREVRANGE', r.key, r.offset, r.offset + r.size - 1, 'WITHSCORES')
    -- a short chunk is the end: no further read (heads move only under drop(), which rewinds)
    r.done = #chunk / 2 < r.size
    r.buf, r.i, r.offset, r.size = chunk, 1, r.offset + #chunk / 2, math.min(r.size * 4, 256)
    if #chunk == 0 then return nil end
  end
  return r.buf[r.i], tonumber(r.buf[r.i + 1])
end

-- After an index entry was removed or added (drop): heads may have moved by a rank or two, so each reader
-- reads again from two ranks before its next unread one (classes already seen are passed).
local function rewind_heads()
  dropped_any = true
  for _, r in ipairs(readers) do
    local unread = r.offset - (#r.buf - r.i + 1) / 2
    r.buf, r.i, r.offset, r.done, r.size = {}, 1, math.max(0, unread - 2), false, 16
  end
end

-- The cursor's current entry (member, score), reading further when its buffer is used up; nil at the end.
-- Reads start at one entry and grow, since most claims take the head.
local function head(c)
  if c.i > #c.buf then
    local chunk = redis.call('ZREVRANGE', c.q, c.offset, c.offset + c.size - 1, 'WITHSCORES')
    if #chunk == 0 then
      -- The claim below leaves an emptied class listed (saving a call per claim); drop it here (and its
      -- head, once the walk is over: fix_heads).
      if c.offset == 0 then
        redis.call('HDEL', 'jobs:idx:classes:' .. c.svc, c.cls)
        table.insert(fixes, c)
      end
      c.done = true
      return nil
    end
    c.buf, c.i, c.offset, c.size = chunk, 1, c.offset + #chunk / 2, math.min(c.size * 4, 256)
  end
  return c.buf[c.i], tonumber(c.buf[c.i + 1])
end

-- Drop the entry just read (its job is gone, or no longer pending) with the job's own index entry
-- (`remove`: dequeue or index_remove). That is another entry of the same queue when the job was queued twice
-- (left by a resubmission before index_add removed the old entry): then the cursor reads again from before
-- both removals, passing over at most one entry a second time. Either way the entry read is gone, so the
-- walk ends (a leftover duplicate used to be read again and again: the script never returned, holding the
-- whole server).
local function drop(c, member, id, remove)
  local q, indexed = remove(id)
  rewind_heads()
  if q == c.q and indexed ~= member then
    redis.call('ZREM', c.q, member)
    local next_rank = c.offset - (#c.buf - c.i + 1) / 2
    c.buf, c.i, c.offset, c.size = {}, 1, math.max(0, next_rank - 2), 1
  elseif indexed == member then
    c.offset = c.offset - 1
  elseif redis.call('ZREM', c.q, member) == 1 then
    c.offset = c.offset - 1
  end
end

-- For drop(): move a job whose hash no longer belongs to the queue it was read from (the API wrote the id
-- again with another type, requirements or customer, and this claim had no hint of it) to where its hash
-- says, as adopt(id, true) does; a job no longer in jobs:pending just leaves the index. Returns the entry
-- removed, as index_remove does: nil when the job's own entry is elsewhere and current already (the entry
-- read is then a leftover, which drop() removes).
local function reindex(id)
  if not redis.call('ZSCORE', KEYS[1], id) then return index_remove(id) end
  local f = redis.call('HMGET', 'job:' .. id, unpack(ORDER_FIELDS))
  local loc = redis.call('HGET', KEYS[2], id)
  if loc and index_current(id, loc, f) then return nil end
  local q, indexed = index_remove(id)
  index_add(id, f)
  return q, indexed
end

-- The best cursor's current entry: cursor, score, member (nil when every cursor is at its end).
local function best_cursor()
  local b, bs, bm
  for _, c in ipairs(cursors) do
    if not c.done then
      local m, score = head(c)
      if m and (not bs or score > bs) then b, bs, bm = c, score, m end
    end
  end
  return b, bs, bm
end

-- Add cursors for the classes whose bound is above `best_score` (all while it is nil), best first, as far
-- as HEADS_MAX allows. A class whose queue's head is not its bound gets it corrected (fix_heads).
local function add_classes(best_score)
  while true do
    local top_r, top_cls, top_s
    for _, r in ipairs(readers) do
      local cls, score = next_head(r)
      if cls and (not top_s or score > top_s) then top_r, top_cls, top_s = r, cls, score end
    end
    if not top_r or (best_score and top_s <= best_score) then return end
    if examined >= HEADS_MAX then
      capped = true
      return
    end
    top_r.i = top_r.i + 2
    local key = top_r.svc .. '\n' .. top_cls
    if not seen[key] then
      seen[key] = true
      examined = examined + 1
      local met = meets(w, top_r.svc, top_cls, top_r.ckey)
      if met == nil then
        -- a head whose class entry is gone (an older version's removal, a damaged index): dropped if its queue
        -- is empty (fix_heads); if jobs wait there, the entry is written again from the head job's own
        -- requirements, so the next claim matches them as it should (unmatched, they waited for ever)
        local q = 'jobs:idx:queue:' .. top_r.svc .. ':' .. top_cls
        local top = redis.call('ZREVRANGE', q, 0, 0)
        if top[1] then
          local f = redis.pcall('HMGET', 'job:' .. job_of(top[1]), 'requirements', 'customer_id')
          if not f.err then
            local again, raw, cust = class_of(f[1], f[2])
            if again == top_cls then redis.call('HSET', top_r.ckey, top_cls, cjson.encode({raw, cust})) end
          end
        else
          table.insert(fixes, {q = q, svc = top_r.svc, cls = top_cls})
        end
      elseif met then
        local c = {q = 'jobs:idx:queue:' .. top_r.svc .. ':' .. top_cls, svc = top_r.svc, cls = top_cls,
          buf = {}, i = 1, offset = 0, size = 1}
        local m, score = head(c)  -- an empty queue is listed in fixes by head()
        if m then
          table.insert(cursors, c)
          if score ~= top_s then
            c.real = score
            table.insert(fixes, c)
          end
          if not best_score or score > best_score then best_score = score end
        end
      end
    end
  end
end

-- Write the bounds found wrong (after the walk: writes during it would move the readers' ranks). After a
-- drop, this claim may have queued jobs itself (reindex), so each queue's head is read again then.
local function fix_heads()
  for _, c in ipairs(fixes) do
    local hkey = 'jobs:idx:heads:' .. c.svc
    local real = c.real
    if dropped_any or not real then
      local top = redis.call('ZREVRANGE', c.q, 0, 0, 'WITHSCORES')
      real = top[2]
    end
    if real then
      redis.call('ZADD', hkey, real, c.cls)
    else
      redis.call('ZREM', hkey, c.cls)
      redis.call('HDEL', 'jobs:idx:classes:' .. c.svc, c.cls)
    end
  end
end

-- Take the best head until one can run: a job whose hash is missing, or that is no longer pending, is
-- removed from the queue (never run from it); one whose hash says another type or requirement class than
-- the queue's is indexed again where its hash says (never run from the stale entry; a later claim may take
-- it there); another workflow's job, one whose retry is not due yet (retry_at, e.g. a service's
-- Retry-After), or one this worker just failed, is passed over. A job that left jobs:pending without us
-- (e.g. removed by the API) leaves the index.
local id, member, job, best, soonest
while true do
  local best_score
  best, best_score, member = best_cursor()
  local known = #cursors
  add_classes(best_score)
  if #cursors > known then best, best_score, member = best_cursor() end
  if not best then
    fix_heads()
    if capped then
      -- more heads than one claim looks at: the next claim goes on where this one stopped (see HEADS_MAX).
      -- Each reader's next head was read (add_classes reads them all before it stops): kept by class.
      w.resume = {seqs = {}, due = soonest and now + soonest}
      for _, r in ipairs(readers) do
        w.resume.seqs[r.svc] = redis.call('GET', 'jobs:idx:seq:' .. r.svc)
        if r.i <= #r.buf then w.resume[r.svc] = {r.buf[r.i], r.buf[r.i + 1]}
        else w.resume[r.svc] = r.offset end
      end
      -- again in 1 ms; after a restart (jobs of its types kept coming), in RESTARTED_WAIT_MS: a steady stream
      -- of them restarted every claim, and the 1 ms hint made each idle worker a busy loop over the cap
      local again = restarted and RESTARTED_WAIT_MS or 1
      if LIBRARY and (not soonest or soonest > again) then soonest = again end
    end
    -- classes an older version indexed without a head: looked for now rather than in up to a second, and
    -- when a repair step ran, claim again at once
    for _, r in ipairs(readers) do
      if heads_repair(r.svc, now, true) and (not soonest or soonest > 1) then soonest = 1 end
    end
    -- a delayed retry (lib.lua's index_delay) this worker may be able to run: say when it is due too
    local left = delayed_in(now)
    if left and (not soonest or left < soonest) then soonest = left end
    return {'', unindexed(), soonest}
  end
  id = job_of(member)
  -- pcall: a job:{id} of another type (another producer's, a clobbered key) is dropped as a missing one
  -- is, with a timeline event saying why; it made every claim of its job type fail.
  local flat = redis.pcall('HGETALL', 'job:' .. id)
  -- The constructor names the fields a job hash usually has, so the table is allocated at its final size
  -- instead of growing (rehashing) five times while it fills: ~0.6 us.
  job = {id = nil, service_required = nil, priority = nil, payload = nil, requirements = nil, customer_id = nil,
    created_at = nil, status = nil, retry_count = nil, max_retries = nil, workflow_id = nil, workflow_priority = nil,
    workflow_datetime = nil, current_step = nil, total_steps = nil, job_trace_id = nil, job_span_id = nil,
    workflow_trace_id = nil, workflow_span_id = nil, ctx = nil, worker_id = nil, assigned_at = nil, started_at = nil,
    last_failed_worker = nil, failed_at = nil, error = nil, retry_at = nil}
  for i = 1, #flat, 2 do job[flat[i]] = flat[i + 1] end
  local status = job.status
  best.i = best.i + 2
  if flat.err then
    drop(best, member, id, dequeue)
    add_event(id, {t = now, ev = 'dropped', reason = 'job:' .. id .. ' holds a '
      .. redis.call('TYPE', 'job:' .. id).ok .. ', not a job hash'})
  elseif #flat == 0 then
    drop(best, member, id, dequeue)
  elseif status and status ~= '' and status ~= 'pending' then
    -- not pending: off the queue. The timeline says why, unless it is a live job's (another claimer in a
    -- mixed fleet took it without our index): failed, cancelled, or a producer's own word ('PENDING',
    -- 'queued': the contract's is 'pending'), which left without a trace.
    drop(best, member, id, dequeue)
    if status ~= 'assigned' and status ~= 'in_progress' and status ~= 'completed' then
      add_event(id, {t = now, ev = 'dropped', status = status})
    end
    if job.error == 'Job cancelled by user' or status == 'cancelled' then note_cancelled(id, now) end
  elseif (job.service_required or '') ~= best.svc
      or not in_class(best.svc, best.cls, job.requirements, job.customer_id) then
    -- read through a stale entry: never run from it (a worker of the old type or class would run it)
    drop(best, member, id, reindex)
  elseif w.wf and job.workflow_id ~= w.wf then
    -- another workflow: pass over
  elseif job.retry_at and (tonumber(job.retry_at) or 0) > now then
    -- its retry is not due yet (fail.lua's delay): no worker takes it before then
    local left = tonumber(job.retry_at) - now
    if not soonest or left < soonest then soonest = left end
  elseif job.last_failed_worker == wid and now - (time_ms(job.failed_at) or 0) < avoid_ms then
    -- this worker just failed it: leave it to others for a while (idle ones were woken by its requeue)
    local left = avoid_ms - now + time_ms(job.failed_at)
    if not soonest or left < soonest then soonest = left end
  elseif redis.call('ZSCORE', KEYS[1], id) then
    break  -- still in jobs:pending: taken below, once the worker's own keys took their writes
  else
    drop(best, member, id, index_remove)
  end
end

fix_heads()
local jkey = 'job:' .. id
local at = iso(now)
job.worker_id, job.assigned_at = wid, at
if start then job.status, job.started_at = 'in_progress', at else job.status = 'assigned' end
local job_json = cjson.encode(job)
-- The worker's own keys first, before the job leaves jobs:pending: Redis keeps what a script wrote before a
-- call failed, so a stray key of another type there (another tool's, a clobbered key) used to fail the claim
-- with the job taken and in_progress, in no lease and maybe no jobs:active: lost. Now such a claim changes
-- nothing and names the key (stray_reply in lib.lua; no TYPE call unless a write fails).
local wkey, akey = 'worker:' .. wid, 'jobs:active:' .. wid
local was = redis.pcall('HMGET', wkey, 'status', 'current_job_id')
if was.err then return stray_reply(was, wkey, 'hash') end
local wrote = redis.pcall('HSET', akey, id, job_json)
if type(wrote) == 'table' then return stray_reply(wrote, akey, 'hash') end
wrote = redis.pcall('ZADD', KEYS[3], now + lease_ms, id)
if type(wrote) == 'table' then
  redis.call('HDEL', akey, id)
  return stray_reply(wrote, KEYS[3], 'zset')
end
local old_status = was[1] or ''
redis.call('ZREM', KEYS[1], id)
redis.call('HDEL', KEYS[2], id)
redis.call('ZREM', best.q, member)
if start then
  redis.call('HSET', jkey, 'status', 'in_progress', 'worker_id', wid, 'assigned_at', at, 'started_at', at)
else
  redis.call('HSET', jkey, 'status', 'assigned', 'worker_id', wid, 'assigned_at', at)
end
if old_status ~= 'busy' then
  redis.call('HSET', wkey, 'status', 'busy', 'current_job_id', id, 'last_status_change', at)
  worker_expiry(wkey, old_status, 'busy')
  publish('worker_status', {worker_id = wid, old_status = old_status, new_status = 'busy', current_job_id = id,
    timestamp = now})
elseif not was[2] or was[2] == '' then
  -- busy naming no job (a hash another tool wrote): this one, and said, as refresh_worker does
  redis.call('HSET', wkey, 'current_job_id', id)
  publish('worker_status', {worker_id = wid, old_status = 'busy', new_status = 'busy', current_job_id = id,
    timestamp = now})
end
-- Busy with another job already (concurrency > 1): current_job_id goes on naming that one, as the last
-- worker_status said (this claim overwrote it without a word, so the API was shown a job that had ended
-- while the hash named another); when it ends, refresh_worker (lib.lua) names one that remains, and says so.
-- The timeline events and the messages are concatenated, with the worker's ids encoded once per capability
-- set (match.lua's memo) and the time's text kept (lib.lua): cheaper than building and encoding tables (~3 us),
-- and than string.format, which costs ~3.7k instructions per call inside Redis (276k -> 254k instructions
-- per claim at 50k pending).
w.wid_json = w.wid_json or cjson.encode(wid)
w.machine_json = w.machine_json or cjson.encode(w.machine)
local now_s = ms_text(now)
local claimed = '{"t":' .. now_s .. ',"ev":"claimed","worker_id":' .. w.wid_json .. ',"machine_id":'
  .. w.machine_json .. ',"retry_count":' .. int_text(finite_number(job.retry_count) or 0) .. '}'
if start then
  add_events(id, claimed, '{"t":' .. now_s .. ',"ev":"started","worker_id":' .. w.wid_json .. '}')
else
  add_events(id, claimed)
end
local id_json = cjson.encode(id)
local sr, cu, wf, cs, ts = job.service_required, job.customer_id, job.workflow_id, job.current_step, job.total_steps
-- The steps go out as update_job_progress and complete_job send them: a number when the text is a finite
-- one, else the text as it is ('' stays '').
if cs then cs = finite_number(cs) or cs end
if ts then ts = finite_number(ts) or ts end
if sr and cu and wf and cs and ts then
  -- Every contract job hash has these five (empty when unused): written directly, ~3 us less than a
  -- table encoded (paired A/B, 5 of 5 rounds). A hash lacking one takes the table path, which omits it.
  redis.call('PUBLISH', 'job_claimed', '{"job_id":' .. id_json .. ',"worker_id":' .. w.wid_json
    .. ',"status":"claimed","message":"Job claimed by worker","claimed_at":"' .. at .. '","timestamp":' .. now_s
    .. ',"service_required":' .. cjson.encode(sr) .. ',"customer_id":' .. cjson.encode(cu) .. ',"workflow_id":'
    .. cjson.encode(wf) .. ',"current_step":' .. cjson.encode(cs) .. ',"total_steps":' .. cjson.encode(ts) .. '}')
else
  publish('job_claimed', {job_id = id, worker_id = wid, status = 'claimed', message = 'Job claimed by worker',
    claimed_at = at, timestamp = now, service_required = sr, customer_id = cu, workflow_id = wf,
    current_step = cs, total_steps = ts})
end
redis.call('PUBLISH', 'update_job_progress', '{"job_id":' .. id_json .. ',"worker_id":' .. w.wid_json
  .. ',"progress":0,"timestamp":' .. now_s .. '}')
return {id, 0, job_json}
