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
local tombstone_ms = tonumber(ARGV[2])
local seed, prefix = ARGV[3], ARGV[4]
local replicas = 0
-- Only replicas that acknowledge: a real one announces its port and acks every second (lag 0
-- or 1). A replication-stream consumer that never sends REPLCONF (redis-cli --replica's SYNC,
-- some CDC tools: port 0, lag growing) would make every WAIT time out.
local info = redis.call('INFO', 'replication')
for port, lag in string.gmatch(info, 'port=(%d+),state=online,offset=%-?%d+,lag=(%d+)') do
  if tonumber(port) > 0 and tonumber(lag) <= 1 then replicas = replicas + 1 end
end
local now = redis.call('TIME')
local deadline = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + tombstone_ms
local counter, removed = 0, 0

-- An entry (`r:{id}` of a token key, `u` of a user key) with its generation and tombstone
-- fields. Returns how many entries were deleted (0 or 1).
local function revoke_entry(key, field, generation_field, tombstone_field, tombstone)
  counter = counter + 1
  local deleted = redis.pcall('HDEL', key, field)
  if type(deleted) == 'table' and deleted['err'] then
    redis.call('DEL', key)
    deleted = 0
  end
  if tombstone_ms > 0 then
    redis.call('HSET', key, generation_field, seed .. ':' .. counter, tombstone_field, tombstone)
  else
    redis.call('HSET', key, generation_field, seed .. ':' .. counter)
  end
  local keep = math.max(tombstone_ms, 1000)
  if redis.call('PTTL', key) < keep then redis.call('PEXPIRE', key, keep) end
  return deleted
end

local function revoke(key, id)
  removed = removed + revoke_entry(key, 'r:' .. id, 'g:' .. id, 't:' .. id, string.format('%d', deadline))
end

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
