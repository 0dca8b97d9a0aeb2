-- Prepended to every script that trusts or writes a record (lookup, fill, claim): the server
-- must still be the incarnation the connection learned when it opened (incarnation.rs). A
-- `REPLICAOF` sent by hand keeps the connections open while the node takes another dataset
-- (its new primary's, which may hold records revoked here since) and another master_replid.
-- ARGV[#ARGV]  the connection's master_replid (the last argument of every such script)
do
  local info = redis.call('INFO', 'replication')
  if string.match(info, 'master_replid:(%x+)') ~= ARGV[#ARGV] then
    return redis.error_reply('KNOXREDIS_ROLE_CHANGED the server took another role since this connection opened')
  end
end
