-- adopt.lua: index jobs that reached jobs:pending without us (the EMP API writes only jobs:pending and
-- job:{id}); a queued id whose hash is missing is removed from jobs:pending.
-- KEYS[1] = jobs:pending, KEYS[2] = jobs:idx:of, KEYS[3] = jobs:leases (see lib.lua)
-- ARGV[1] = '1': also re-index an indexed job whose hash changed (see adopt() in lib.lua), '0': not
-- ARGV[2..] = job ids
-- Returns {indexed, removed_missing}
-- Each job type with a job indexed here is announced once on job_requeued (reason 'adopted'), which wakes its
-- idle workers: nobody heard of these jobs (that is why they were unindexed), and a worker of another type
-- that found them in a sweep step or a reconcile cannot claim them. They waited for their workers' next
-- fallback claim (up to 5 s).
local indexed, removed = 0, 0
local deep = ARGV[1] == '1'
local announced = {}
for i = 2, #ARGV do
  local r, svc = adopt(ARGV[i], deep)
  if r == 1 then
    indexed = indexed + 1
    svc = svc or ''
    if not announced[svc] then
      announced[svc] = true
      publish('job_requeued', {job_id = ARGV[i], service_required = svc, reason = 'adopted',
        timestamp = now_ms()})
    end
  elseif r == -1 then
    removed = removed + 1
  end
end
return {indexed, removed}
