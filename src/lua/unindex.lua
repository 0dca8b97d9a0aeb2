-- Redis Cluster: forget index entries of revoked tokens, each only if it still holds what the
-- revocation saw (a fill of the same token since, once its tombstone lapsed, wrote another
-- entry, for a record that may be cached: it stays listed).
--
-- KEYS[1]  {prefix}:user:{user_pk}:ix
-- ARGV     pairs: field id (16 raw bytes), the entry the revocation saw
local forgotten = 0
for i = 1, #ARGV, 2 do
  local entry = redis.pcall('HGET', KEYS[1], ARGV[i])
  if type(entry) == 'table' and entry['err'] then return 0 end -- not a hash: nothing of ours
  if entry == ARGV[i + 1] then
    forgotten = forgotten + redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return forgotten
