-- Redis Cluster: a token's entry in its user's index (a HASH: field id as 16 raw bytes ->
-- 16 hex characters of this fill's own, then token_key), added before the token's record is
-- filled on its own node (fill.lua adds it in the same call on a single server). First, so
-- that the index always lists at least what is cached: a logoutall that reads it can miss no
-- record. A fill refused after it leaves an entry that names no record: a later revocation
-- of it costs nothing. The fill's own characters let a revocation prune exactly the entry it
-- saw (unindex.lua), never one a later fill of the same token wrote.
--
-- KEYS[1]  {prefix}:user:{user_pk}:ix
-- ARGV[1]  the field id as 16 raw bytes   ARGV[2]  the entry   ARGV[3]  TTL in ms
-- Returns the replicas online (as revocation.lua counts them): with one, the caller waits for
-- it to have the entry (WAIT 1) before it fills the record, which a failover of the token's
-- own node could not lose without losing the record too.
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'hash' and kind ~= 'none' then redis.call('DEL', KEYS[1]) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
local replicas = 0
for port, lag in string.gmatch(redis.call('INFO', 'replication'), 'port=(%d+),state=online,offset=%-?%d+,lag=(%d+)') do
  if tonumber(port) > 0 and tonumber(lag) <= 1 then replicas = replicas + 1 end
end
return replicas
