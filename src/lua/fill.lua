-- Store a record read from the database, but only if nothing revoked the token since the
-- reader looked it up: the generation must be the one it saw, and no tombstone may stand.
-- The record carries its own (new) generation in its first 8 bytes; the `g:` field goes.
--
-- KEYS[1]  {prefix}:token:{token_key}          KEYS[2]  {prefix}:user:{user_pk}:ix (a HASH)
-- ARGV[1]  field id        ARGV[2]  generation seen at lookup (or claimed, claim.lua)
-- ARGV[3]  encoded record
-- ARGV[4]  key TTL in ms   ARGV[5]  the field id as 16 raw bytes (the index's field)
-- ARGV[6]  token_key (the index's value)      ARGV[7]  the lease (tombstone lifetime) in ms
local key, id = KEYS[1], ARGV[1]
local lease = tonumber(ARGV[7])
local state = redis.pcall('HMGET', key, 'g:' .. id, 't:' .. id, 'r:' .. id)
if type(state) == 'table' and state['err'] then return 0 end
local function refuse()
  -- A key someone left without a TTL gets one, so nothing of ours lives for ever.
  if redis.call('PTTL', key) == -1 then redis.call('PEXPIRE', key, lease) end
  return 0
end
-- The generation exactly as lookup.lua reads it.
local function valid(g)
  return #g >= 16 and #g <= 64 and (string.match(g, '^%x+$') or string.match(g, '^%x+:%d+$')) ~= nil
end
local current = state[1]
if current and not valid(current) then current = false end
if not current and state[3] and #state[3] > 8 then current = string.sub(state[3], 1, 8) end
if current ~= ARGV[2] then return refuse() end
if state[2] then
  local now = redis.call('TIME')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  -- A revocation writes whole milliseconds, at most a day (the largest
  -- REVOCATION_TOMBSTONE_TTL) ahead.
  local deadline = string.match(state[2], '^%d+$') and tonumber(state[2])
  if not deadline or deadline > now_ms + 86400000 then
    -- Unreadable or impossible (garbage, 'inf', a format this code doesn't know): it stands
    -- for one lease from now, then fills resume. Never for ever, and never dropped on the
    -- spot. (A readable one is never shortened: another process may run with a longer
    -- REVOCATION_TOMBSTONE_TTL.)
    redis.call('HSET', key, 't:' .. id, string.format('%d', now_ms + lease))
    return refuse()
  end
  if deadline > now_ms then return refuse() end
  redis.call('HDEL', key, 't:' .. id)
end
local ttl = tonumber(ARGV[4])
redis.call('HSET', key, 'r:' .. id, ARGV[3])
redis.call('HDEL', key, 'g:' .. id)
if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end

local index = KEYS[2]
local kind = redis.call('TYPE', index)['ok']
if kind ~= 'hash' and kind ~= 'none' then redis.call('DEL', index) end
redis.call('HSET', index, ARGV[5], ARGV[6])
if redis.call('PTTL', index) < ttl then redis.call('PEXPIRE', index, ttl) end
return 1
