-- Revoke tokens before the database forgets them: delete each record, give it a new
-- generation (so fills in flight fail) and a tombstone (so fills that read the row before the
-- delete commits fail too). With user index keys, also every token those indexes list.
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
-- KEYS[3n+1..]        pairs (ix, tokens) of users whose indexed tokens are revoked in full
-- ARGV[1] n   ARGV[2] tombstone ms (0: none)   ARGV[3] generation seed   ARGV[4] key prefix
-- ARGV[5..4+n] field ids (hex) of the n tokens; ARGV[5+n..4+2n] the same as 16 raw bytes;
-- ARGV[5+2n..4+3n] their previous-release index members
local n = tonumber(ARGV[1])
local tombstone_ms = tonumber(ARGV[2])
local seed, prefix = ARGV[3], ARGV[4]
local now = redis.call('TIME')
local deadline = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + tombstone_ms
local counter, removed = 0, 0

local function revoke(key, id)
  counter = counter + 1
  local deleted = redis.pcall('HDEL', key, 'r:' .. id)
  if type(deleted) == 'table' and deleted['err'] then
    redis.call('DEL', key)
  else
    removed = removed + deleted
  end
  if tombstone_ms > 0 then
    redis.call('HSET', key, 'g:' .. id, seed .. ':' .. counter, 't:' .. id, string.format('%d', deadline))
  else
    redis.call('HSET', key, 'g:' .. id, seed .. ':' .. counter)
  end
  local keep = math.max(tombstone_ms, 1000)
  if redis.call('PTTL', key) < keep then redis.call('PEXPIRE', key, keep) end
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
  revoke(KEYS[i], ARGV[4 + i])
  redis.pcall('HDEL', KEYS[n + i], ARGV[4 + n + i])
  redis.pcall('SREM', KEYS[2 * n + i], ARGV[4 + 2 * n + i])
end
for i = 3 * n + 1, #KEYS, 2 do
  local pairs_ = tolerant('HGETALL', KEYS[i])
  if pairs_['err'] then return pairs_ end
  for j = 1, #pairs_, 2 do
    if #pairs_[j] == 16 then revoke(prefix .. ':token:' .. pairs_[j + 1], tohex(pairs_[j])) end
  end
  local members = tolerant('SMEMBERS', KEYS[i + 1])
  if members['err'] then return members end
  for _, member in ipairs(members) do
    revoke(prefix .. ':token:' .. string.sub(member, 33), string.sub(member, 1, 32))
  end
  redis.call('DEL', KEYS[i], KEYS[i + 1])
end
return removed
