-- Store a record read from the database, but only if nothing revoked the token since the
-- reader looked it up: the generation must be the one it saw, and no tombstone may stand.
--
-- KEYS[1]  {prefix}:token:{token_key}          KEYS[2]  {prefix}:user:{user_pk}:tokens
-- ARGV[1]  field id        ARGV[2]  generation seen at lookup      ARGV[3]  encoded record
-- ARGV[4]  key TTL in ms   ARGV[5]  member of the user's index (field id .. token_key)
-- ARGV[6]  the lease (tombstone lifetime) in ms
local key, id = KEYS[1], ARGV[1]
local lease = tonumber(ARGV[6])
local state = redis.pcall('HMGET', key, 'g:' .. id, 't:' .. id)
if type(state) == 'table' and state['err'] then return 0 end
local function refuse()
  -- A key someone left without a TTL gets one, so nothing of ours lives for ever.
  if redis.call('PTTL', key) == -1 then redis.call('PEXPIRE', key, lease) end
  return 0
end
if state[1] ~= ARGV[2] then return refuse() end
if state[2] then
  local now = redis.call('TIME')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  local deadline = tonumber(state[2])
  if not deadline then
    -- Unreadable (garbage, or a format this code doesn't know): it stands for one lease from
    -- now, then fills resume. Never for ever, and never dropped on the spot. (A readable one
    -- is never shortened: another process may run with a longer REVOCATION_TOMBSTONE_TTL.)
    redis.call('HSET', key, 't:' .. id, string.format('%d', now_ms + lease))
    return refuse()
  end
  if deadline > now_ms then return refuse() end
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
