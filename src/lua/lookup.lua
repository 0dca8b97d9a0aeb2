-- One round trip for every authentication: the token's record (if cached) and the
-- generation a later fill must present.
--
-- With ARGV[4] == '1', a missing generation is created here (the caller has a token the
-- database just confirmed and is about to re-read it), so that an eviction, a restart or a
-- lapsed TTL can only make pending fills fail, never succeed. Requests for unknown tokens
-- call it with '0': an unauthenticated request never writes to Redis.
--
-- KEYS[1]  {prefix}:token:{token_key}          (a HASH)
-- ARGV[1]  field id of the token (32 hex chars of its digest)
-- ARGV[2]  a fresh random generation, used only if none exists and ARGV[4] == '1'
-- ARGV[3]  TTL in ms for a key this script creates (the lease a fill must land within)
-- ARGV[4]  '1' to create a missing generation, '0' to only read
local key, id = KEYS[1], ARGV[1]
local reply = redis.pcall('HMGET', key, 'r:' .. id, 'g:' .. id)
if type(reply) == 'table' and reply['err'] then
  -- Not a hash (another tool's value under our name): a miss; replaced when we write.
  if ARGV[4] ~= '1' then return {false, false} end
  redis.call('DEL', key)
  reply = {false, false}
end
local generation = reply[2]
if not generation and ARGV[4] == '1' then
  generation = ARGV[2]
  redis.call('HSET', key, 'g:' .. id, generation)
  if redis.call('PTTL', key) < tonumber(ARGV[3]) then
    redis.call('PEXPIRE', key, ARGV[3])
  end
end
return {reply[1], generation}
