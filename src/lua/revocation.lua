-- Shared by the revocation scripts (revoke.lua on one server, revoke_slot.lua on a Cluster
-- slot), prepended to each: the replicas to wait for, the tombstones' deadline, and how one
-- entry is revoked.
-- ARGV[2] tombstone ms (0: none)   ARGV[3] generation seed   (the same in both scripts)
local tombstone_ms = tonumber(ARGV[2])
local seed = ARGV[3]
local replicas = 0
-- Only replicas that acknowledge: a real one announces its port and acks every second (lag 0
-- or 1). A replication-stream consumer that never sends REPLCONF (redis-cli --replica's SYNC,
-- some CDC tools: port 0, lag growing) would make every WAIT time out.
local info = redis.call('INFO', 'replication')
for port, lag in string.gmatch(info, 'port=(%d+),state=online,offset=%-?%d+,lag=(%d+)') do
  if tonumber(port) > 0 and tonumber(lag) <= 1 then replicas = replicas + 1 end
end
local now = redis.call('TIME')
local deadline = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + tombstone_ms
local counter, removed = 0, 0

-- An entry (`r:{id}` of a token key, `u` of a user key) with its generation and tombstone
-- fields. Returns how many entries were deleted (0 or 1).
local function revoke_entry(key, field, generation_field, tombstone_field, tombstone)
  counter = counter + 1
  local deleted = redis.pcall('HDEL', key, field)
  if type(deleted) == 'table' and deleted['err'] then
    redis.call('DEL', key)
    deleted = 0
  end
  if tombstone_ms > 0 then
    redis.call('HSET', key, generation_field, seed .. ':' .. counter, tombstone_field, tombstone)
  else
    redis.call('HSET', key, generation_field, seed .. ':' .. counter)
  end
  local keep = math.max(tombstone_ms, 1000)
  if redis.call('PTTL', key) < keep then redis.call('PEXPIRE', key, keep) end
  return deleted
end

-- A token's record.
local function revoke(key, id)
  removed = removed + revoke_entry(key, 'r:' .. id, 'g:' .. id, 't:' .. id, string.format('%d', deadline))
end
