-- One round trip for every authentication: the token's record (if cached) and the
-- generation a later fill must present.
--
-- A token's generation is its `g:{id}` field when there is one (a revocation or a first
-- sight wrote it), else the first 8 bytes of its record (a fill stores its generation there
-- and drops the field: one field per cached token). A value too short to hold one is garbage
-- without a generation: a fill must create one first.
--
-- With ARGV[4] == '1', a missing generation is created here (the caller has a token the
-- database just confirmed and is about to re-read it), so that an eviction, a restart or a
-- lapsed TTL can only make pending fills fail, never succeed. Requests for unknown tokens
-- call it with '0': an unauthenticated request never writes to Redis.
--
-- A `g:` field that is not one this code (or the previous release) writes is garbage: it
-- reads as missing and with '1' is replaced. Whoever wrote it could as well have deleted it,
-- so this grants nothing; left alone, it would make the fill that presents it the only one
-- that can ever land.
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
local function valid(g)
  return #g >= 16 and #g <= 64 and (string.match(g, '^%x+$') or string.match(g, '^%x+:%d+$')) ~= nil
end
local record, generation = reply[1], reply[2]
if generation and not valid(generation) then generation = false end
if not generation and record and #record > 8 then generation = string.sub(record, 1, 8) end
if not generation and ARGV[4] == '1' then
  generation = ARGV[2]
  redis.call('HSET', key, 'g:' .. id, generation)
end
if ARGV[4] == '1' and redis.call('PTTL', key) < tonumber(ARGV[3]) then
  -- Also gives a TTL to a key someone left without one: every key of ours ends up with one.
  redis.call('PEXPIRE', key, ARGV[3])
end
return {record, generation}
