-- prune.lua: drop index entries whose job is no longer in jobs:pending (removed by someone else).
-- KEYS[1] = jobs:pending, KEYS[2] = jobs:idx:of, KEYS[3] = jobs:leases (see lib.lua)
-- ARGV[1..] = job ids found in jobs:idx:of
-- Returns the number of entries dropped.
local dropped = 0
for i = 1, #ARGV do
  if not redis.call('ZSCORE', KEYS[1], ARGV[i]) and redis.call('HEXISTS', KEYS[2], ARGV[i]) == 1 then
    index_remove(ARGV[i])
    dropped = dropped + 1
  end
end
return dropped
