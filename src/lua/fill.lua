-- Store a record read from the database, but only if nothing revoked the token since the
-- reader looked it up: the generation must be the one it saw, and no tombstone may stand.
--
-- KEYS[1]  {prefix}:token:{token_key}          KEYS[2]  {prefix}:user:{user_pk}:tokens
-- ARGV[1]  field id        ARGV[2]  generation seen at lookup      ARGV[3]  encoded record
-- ARGV[4]  key TTL in ms   ARGV[5]  member of the user's index (field id .. token_key)
local key, id = KEYS[1], ARGV[1]
local state = redis.pcall('HMGET', key, 'g:' .. id, 't:' .. id)
if type(state) == 'table' and state['err'] then return 0 end
if state[1] ~= ARGV[2] then return 0 end
if state[2] then
  local now = redis.call('TIME')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  if (tonumber(state[2]) or math.huge) > now_ms then return 0 end
end
local ttl = tonumber(ARGV[4])
redis.call('HSET', key, 'r:' .. id, ARGV[3])
if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end

local index = KEYS[2]
local kind = redis.call('TYPE', index)['ok']
if kind ~= 'set' and kind ~= 'none' then redis.call('DEL', index) end
redis.call('SADD', index, ARGV[5])
if redis.call('PTTL', index) < ttl then redis.call('PEXPIRE', index, ttl) end
return 1
