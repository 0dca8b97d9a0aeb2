-- Revoke tokens before the database forgets them: delete each record, give it a new
-- generation (so fills in flight fail) and a tombstone (so fills that read the row before the
-- delete commits fail too). With user index keys, also every token those indexes list.
--
-- KEYS[1..n]          {prefix}:token:{token_key} of each token
-- KEYS[n+1..2n]       {prefix}:user:{user_pk}:tokens of each token's owner (to forget it)
-- KEYS[2n+1..]        {prefix}:user:{user_pk}:tokens to revoke in full
-- ARGV[1] n   ARGV[2] tombstone ms (0: none)   ARGV[3] generation seed   ARGV[4] key prefix
-- ARGV[5..4+n] field ids of the n tokens; ARGV[5+n..4+2n] their user index members
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

for i = 1, n do
  local id = ARGV[4 + i]
  revoke(KEYS[i], id)
  redis.pcall('SREM', KEYS[n + i], ARGV[4 + n + i])
end
for i = 2 * n + 1, #KEYS do
  local ok, members = pcall(redis.call, 'SMEMBERS', KEYS[i])
  if ok then
    for _, member in ipairs(members) do
      revoke(prefix .. ':token:' .. string.sub(member, 33), string.sub(member, 1, 32))
    end
  end
  redis.call('DEL', KEYS[i])
end
return removed
