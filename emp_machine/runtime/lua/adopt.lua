-- adopt.lua: index jobs that reached jobs:pending without us (the EMP API writes only jobs:pending and
-- job:{id}); a queued id whose hash is missing is removed from jobs:pending.
-- KEYS[1] = jobs:pending, KEYS[2] = jobs:idx:of, KEYS[3] = jobs:leases (see lib.lua)
-- ARGV[1] = '1': also re-index an indexed job whose hash changed (see adopt() in lib.lua), '0': not
-- ARGV[2..] = job ids
-- Returns {indexed, removed_missing}
local indexed, removed = 0, 0
local deep = ARGV[1] == '1'
for i = 2, #ARGV do
  local r = adopt(ARGV[i], deep)
  if r == 1 then indexed = indexed + 1 elseif r == -1 then removed = removed + 1 end
end
return {indexed, removed}
