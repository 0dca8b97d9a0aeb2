-- Claim the lease of a token about to be inserted (a login), before its INSERT can commit:
-- a generation of the inserting process's own, which the fill after commit must present.
-- Any revocation meanwhile (a logout elsewhere, a delete in the same transaction) replaces
-- it, and anything that makes Redis forget it (a flush, an eviction, a restart, the lease
-- running out) removes it: either way the fill is refused, never landed on a token gone.
--
-- Nothing is claimed if Redis already knows anything of the token (a record, a generation,
-- a tombstone): the new token's first request takes the ordinary miss path.
--
-- KEYS[1]  {prefix}:token:{token_key}
-- ARGV[1]  field id        ARGV[2]  a fresh generation        ARGV[3]  the lease in ms
local key, id = KEYS[1], ARGV[1]
local state = redis.pcall('HMGET', key, 'r:' .. id, 'g:' .. id, 't:' .. id)
if type(state) == 'table' and state['err'] then return false end
if state[1] or state[2] or state[3] then return false end
redis.call('HSET', key, 'g:' .. id, ARGV[2])
if redis.call('PTTL', key) < tonumber(ARGV[3]) then redis.call('PEXPIRE', key, ARGV[3]) end
return ARGV[2]
