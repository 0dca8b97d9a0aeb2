-- Redis Cluster: the part of a revocation that lives in one slot. client.rs sends one call
-- per slot, pipelined per node, every node under one deadline: token records, and user rows
-- (USER_CACHE). The indexes of users whose tokens are all revoked are read first (their
-- tokens are then revoked here, by key) and pruned in the same round trip as these calls,
-- each on its own node. (revoke.lua does all of it in one call on a single server.)
--
-- KEYS[1..n]   {prefix}:token:{token_key} of each token
-- KEYS[n+1..]  {prefix}:user:{user_pk}:ix of each user whose row is revoked (USER_CACHE)
-- ARGV[1] n   ARGV[2] tombstone ms (0: none)   ARGV[3] generation seed
-- ARGV[4]     with no tombstone, the user rows' tombstone to lift ('' for none): only its seed
--             part (after ':') is compared, unique to the call that wrote it (each node wrote
--             its own deadline, by its own clock)
-- ARGV[5..4+n] field ids (hex) of the n tokens
-- Returns {records deleted, the user rows' tombstone ('' without user rows or tombstone),
-- replicas online} (see revoke.lua).
local n = tonumber(ARGV[1])
local lift_seed = string.match(ARGV[4], ':(%x+)$')
for i = 1, n do
  revoke(KEYS[i], ARGV[4 + i])
end
local user_tombstone = ''
if tombstone_ms > 0 and #KEYS > n then user_tombstone = string.format('%d', deadline) .. ':' .. seed end
for i = n + 1, #KEYS do
  revoke_entry(KEYS[i], 'u', 'ug', 'ut', user_tombstone)
  if tombstone_ms == 0 and lift_seed then
    local standing = redis.pcall('HGET', KEYS[i], 'ut')
    if type(standing) == 'string' and string.match(standing, ':(%x+)$') == lift_seed then
      redis.call('HDEL', KEYS[i], 'ut')
    end
  end
end
return {removed, user_tombstone, replicas}
