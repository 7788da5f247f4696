-- adopt.lua: index jobs that reached jobs:pending without us (the EMP API writes only jobs:pending and
-- job:{id}); a queued id whose hash is missing is removed from jobs:pending.
-- KEYS[1] = jobs:pending, KEYS[2] = jobs:idx:of, KEYS[3] = jobs:leases (see lib.lua)
-- ARGV[1..] = job ids
-- Returns {indexed, removed_missing}
local indexed, removed = 0, 0
for i = 1, #ARGV do
  local r = adopt(ARGV[i])
  if r == 1 then indexed = indexed + 1 elseif r == -1 then removed = removed + 1 end
end
return {indexed, removed}
