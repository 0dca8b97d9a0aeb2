-- Revoke tokens before the database forgets them: delete each record, give it a new
-- generation (so fills in flight fail) and a tombstone (so fills that read the row before the
-- delete commits fail too). With user index keys, also every token those indexes list. User
-- rows (USER_CACHE) are revoked the same way before a user's row changes or goes.
--
-- Rolling deploys: the previous release indexed a user's tokens in a SET
-- ({prefix}:user:{pk}:tokens, members `{id}{token_key}`); this one in a HASH
-- ({prefix}:user:{pk}:ix, field id as 16 raw bytes -> token_key). Both are read and pruned,
-- so a revocation here also reaches what a previous-release process cached. (Records and
-- generations live in the same fields in both releases.)
--
-- KEYS[1..n]          {prefix}:token:{token_key} of each token
-- KEYS[n+1..2n]       {prefix}:user:{user_pk}:ix of each token's owner (to forget it)
-- KEYS[2n+1..3n]      {prefix}:user:{user_pk}:tokens of each token's owner (previous release)
-- KEYS[3n+1..3n+2p]   pairs (ix, tokens) of users whose indexed tokens are revoked in full
-- KEYS[3n+2p+1..]     {prefix}:user:{user_pk}:ix of users whose row is revoked (USER_CACHE)
-- ARGV[1] n   ARGV[2] tombstone ms (0: none)   ARGV[3] generation seed   ARGV[4] key prefix
-- ARGV[5] p   ARGV[6] with no tombstone, the user rows' tombstone to lift ('' for none):
--             the one this revocation's first call wrote (and returned), before the write
--             that has now committed
-- ARGV[7..6+n] field ids (hex) of the n tokens; ARGV[7+n..6+2n] the same as 16 raw bytes;
-- ARGV[7+2n..6+3n] their previous-release index members
-- Returns {records deleted, the user rows' tombstone ('' without user rows or tombstone),
-- replicas online}: with a replica online, the caller waits for one to have this revocation
-- (WAIT 1) before it lets the deletion go on, so a failover can't lose it.
-- A user row's tombstone is `{deadline ms}:{seed}`, unique to this call, so that lifting it
-- never lifts another writer's (a token's is the deadline alone: never lifted).
local n, p = tonumber(ARGV[1]), tonumber(ARGV[5])
local lift = ARGV[6]
local prefix = ARGV[4]
-- A key of the wrong type (another tool's value under our name) holds nothing of ours: skip
-- it. Any other error (an ACL refusing the command) must fail the revocation, not skip it.
local function tolerant(command, key)
  local ok, reply = pcall(redis.call, command, key)
  if ok then return reply end
  local message = type(reply) == 'table' and reply['err'] or tostring(reply)
  if string.find(message, 'WRONGTYPE', 1, true) then return {} end
  return redis.error_reply(message)
end

local function tohex(bytes)
  return (string.gsub(bytes, '.', function(c) return string.format('%02x', string.byte(c)) end))
end

for i = 1, n do
  revoke(KEYS[i], ARGV[6 + i])
  redis.pcall('HDEL', KEYS[n + i], ARGV[6 + n + i])
  redis.pcall('SREM', KEYS[2 * n + i], ARGV[6 + 2 * n + i])
end
for i = 3 * n + 1, 3 * n + 2 * p, 2 do
  local pairs_ = tolerant('HGETALL', KEYS[i])
  if pairs_['err'] then return pairs_ end
  -- The index's token fields go; the user row's fields (`u`, `ug`, `ut`) stay: a tombstone
  -- there still guards a user save in flight.
  local indexed = {}
  for j = 1, #pairs_, 2 do
    if #pairs_[j] == 16 then
      revoke(prefix .. ':token:' .. pairs_[j + 1], tohex(pairs_[j]))
      indexed[#indexed + 1] = pairs_[j]
    end
  end
  for j = 1, #indexed, 1000 do
    redis.call('HDEL', KEYS[i], unpack(indexed, j, math.min(j + 999, #indexed)))
  end
  local members = tolerant('SMEMBERS', KEYS[i + 1])
  if members['err'] then return members end
  for _, member in ipairs(members) do
    revoke(prefix .. ':token:' .. string.sub(member, 33), string.sub(member, 1, 32))
  end
  redis.call('DEL', KEYS[i + 1])
end
local user_tombstone = ''
if tombstone_ms > 0 and #KEYS > 3 * n + 2 * p then user_tombstone = string.format('%d', deadline) .. ':' .. seed end
for i = 3 * n + 2 * p + 1, #KEYS do
  revoke_entry(KEYS[i], 'u', 'ug', 'ut', user_tombstone)
  -- Once the user's write has committed, a reader that looked the row up before this call
  -- holds a generation this call replaced: the tombstone has done its work. Lifted only if
  -- it is still the one written before the write (another is a write still open).
  if tombstone_ms == 0 and lift ~= '' and redis.pcall('HGET', KEYS[i], 'ut') == lift then
    redis.call('HDEL', KEYS[i], 'ut')
  end
end
return {removed, user_tombstone, replicas}
