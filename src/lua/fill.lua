-- Store an entry read from the database (a token's record, or a user row), but only if
-- nothing revoked it since the reader looked it up: the generation must be the one it saw,
-- and no tombstone may stand. The entry carries its own (new) generation in its first 8
-- bytes; the generation field goes.
--
-- KEYS[1]  {prefix}:token:{token_key}, or {prefix}:user:{pk}:ix for a user row
-- KEYS[2]  (tokens) {prefix}:user:{user_pk}:ix, the user's index of cached tokens (a HASH)
-- ARGV[1]  the entry's field (`r:{id}`, `u`)     ARGV[2]  its generation field (`g:{id}`, `ug`)
-- ARGV[3]  its tombstone field (`t:{id}`, `ut`)  ARGV[4]  generation seen at lookup (or claimed)
-- ARGV[5]  the encoded entry                     ARGV[6]  key TTL in ms
-- ARGV[7]  the lease (tombstone lifetime) in ms
-- ARGV[8]  (tokens) the index's field: the field id as 16 raw bytes    ARGV[9]  its value: token_key
local key, field, generation_field, tombstone_field = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local lease = tonumber(ARGV[7])
local state = redis.pcall('HMGET', key, generation_field, tombstone_field, field)
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
if current ~= ARGV[4] then return refuse() end
if state[2] then
  local now = redis.call('TIME')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  -- A revocation writes whole milliseconds, at most a day (the largest
  -- REVOCATION_TOMBSTONE_TTL) ahead; a user row's is followed by `:{seed}` (revoke.lua).
  local digits = string.match(state[2], '^(%d+)$') or string.match(state[2], '^(%d+):%x+$')
  local deadline = digits and tonumber(digits)
  if not deadline or deadline > now_ms + 86400000 then
    -- Unreadable or impossible (garbage, 'inf', a format this code doesn't know): it stands
    -- for one lease from now, then fills resume. Never for ever, and never dropped on the
    -- spot. (A readable one is never shortened: another process may run with a longer
    -- REVOCATION_TOMBSTONE_TTL.)
    redis.call('HSET', key, tombstone_field, string.format('%d', now_ms + lease))
    return refuse()
  end
  if deadline > now_ms then return refuse() end
  redis.call('HDEL', key, tombstone_field)
end
local ttl = tonumber(ARGV[6])
redis.call('HSET', key, field, ARGV[5])
redis.call('HDEL', key, generation_field)
if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end

local index = KEYS[2]
if index then
  local kind = redis.call('TYPE', index)['ok']
  if kind ~= 'hash' and kind ~= 'none' then redis.call('DEL', index) end
  redis.call('HSET', index, ARGV[8], ARGV[9])
  if redis.call('PTTL', index) < ttl then redis.call('PEXPIRE', index, ttl) end
end
return 1
