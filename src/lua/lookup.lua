-- One round trip for every authentication: the token's record (if cached) and the
-- generation a later fill must present; with USER_CACHE, also the row of the user that the
-- record names, and that row's generation.
--
-- An entry (a token's record in field `r:{id}` of the token's key, or a user row in field
-- `u` of the user's key) has a generation: its generation field (`g:{id}`, `ug`) when there
-- is one (a revocation or a first sight wrote it), else the entry's first 8 bytes (a fill
-- stores its generation there and drops the field: one field per cached entry). A value too
-- short to hold one is garbage without a generation: a fill must create one first.
--
-- With ARGV[5] == '1', a missing generation is created here (the caller has a token the
-- database just confirmed and is about to re-read it), so that an eviction, a restart or a
-- lapsed TTL can only make pending fills fail, never succeed. Requests for unknown tokens
-- call it with '0': an unauthenticated request never writes to Redis. A user row's missing
-- generation is created whenever a record is found: the caller is about to read the row.
--
-- A generation field that is not one this code (or the previous release) writes is garbage:
-- it reads as missing and is replaced when one is created. Whoever wrote it could as well
-- have deleted it, so this grants nothing; left alone, it would make the fill that presents
-- it the only one that can ever land.
--
-- KEYS[1]  {prefix}:token:{token_key} (a HASH), or {prefix}:user:{pk}:ix for a user row alone
-- ARGV[1]  the entry's field (`r:{id}`, `u`)     ARGV[2]  its generation field (`g:{id}`, `ug`)
-- ARGV[3]  a fresh random generation, used only if none exists and one is to be created
-- ARGV[4]  TTL in ms for a key this script creates (the lease a fill must land within)
-- ARGV[5]  '1' to create a missing generation, '0' to only read
-- ARGV[6]  (USER_CACHE) the key prefix, to read the row of the user the record names; '' not to
-- ARGV[7]  (USER_CACHE) a fresh random generation for that row
--
-- Returns {entry, generation}, with ARGV[6] {record, generation, user key, row, row generation}.
-- (The user key is named from a record whose MAC only the caller can check: it compares the
-- name with the one the verified record gives, and ignores the row if they differ.)
local lease = tonumber(ARGV[4])

local function valid(g)
  return #g >= 16 and #g <= 64 and (string.match(g, '^%x+$') or string.match(g, '^%x+:%d+$')) ~= nil
end

local function read(key, field, generation_field, candidate, create)
  local reply = redis.pcall('HMGET', key, field, generation_field)
  if type(reply) == 'table' and reply['err'] then
    -- Not a hash (another tool's value under our name): a miss; replaced when we write.
    if not create then return false, false end
    redis.call('DEL', key)
    reply = {false, false}
  end
  local entry, generation = reply[1], reply[2]
  if generation and not valid(generation) then generation = false end
  if not generation and entry and #entry > 8 then generation = string.sub(entry, 1, 8) end
  if not generation and create then
    generation = candidate
    redis.call('HSET', key, generation_field, generation)
    -- The lease the fill must land within (a longer TTL is kept).
    if redis.call('PTTL', key) < lease then redis.call('PEXPIRE', key, lease) end
  elseif create and redis.call('PTTL', key) == -1 then
    -- A key someone left without a TTL (a PERSIST, a restore without one) gets one: every key
    -- of ours ends up with one, even one whose entry is served for ever after. (Nothing
    -- else is written when nothing is created: every write is pushed to every in-process
    -- cache, LOCAL_CACHE_SIZE, as an invalidation of this key.)
    redis.call('PEXPIRE', key, lease)
  end
  return entry, generation
end

local function tohex(bytes)
  return (string.gsub(bytes, '.', function(c) return string.format('%02x', string.byte(c)) end))
end

-- The user key as the record's user key spells it (record.rs: generation 8 | version 1 |
-- incarnation hint 1 | created 8 | expiry varint, if flagged | fresh_until 4 | user key), or nil.
local function user_pk(record)
  if #record < 8 + 1 + 1 + 8 + 4 + 1 + 16 then return nil end
  local flags = string.byte(record, 9)
  if math.floor(flags / 16) ~= 3 then return nil end
  local pos = 19
  local function varint()
    local value, scale = 0, 1
    for _ = 1, 10 do
      local b = string.byte(record, pos)
      if not b then return nil end
      pos = pos + 1
      value = value + (b % 128) * scale
      if b < 128 then return value end
      scale = scale * 128
    end
    return nil
  end
  if flags % 2 == 1 and not varint() then return nil end
  pos = pos + 4
  local kind = math.floor(flags / 2) % 4
  if kind == 0 then
    -- Up to 7 varint bytes (below 2^49, every key a sequence hands out): exact in a double.
    local value, scale = 0, 1
    for i = 0, 6 do
      local b = string.byte(record, pos + i)
      if not b then return nil end
      value = value + (b % 128) * scale
      if b < 128 then
        if value % 2 == 0 then return string.format('%d', value / 2) end
        return string.format('%d', -(value + 1) / 2)
      end
      scale = scale * 128
    end
    -- Longer: exact for every i64: the zigzag varint in base-10^7 limbs (a double holds 2^53 only).
    local groups = {}
    for i = 1, 10 do
      local b = string.byte(record, pos)
      if not b then return nil end
      pos = pos + 1
      groups[i] = b % 128
      if b < 128 then break end
      if i == 10 then return nil end
    end
    local limbs = {0}  -- little-endian, base 10^7
    for i = #groups, 1, -1 do
      local carry = groups[i]
      for j = 1, #limbs do
        local v = limbs[j] * 128 + carry
        limbs[j], carry = v % 10000000, math.floor(v / 10000000)
      end
      if carry > 0 then limbs[#limbs + 1] = carry end
    end
    local negative = groups[1] % 2 == 1
    if negative then  -- -(z + 1) / 2
      local j = 1
      while true do
        limbs[j] = (limbs[j] or 0) + 1
        if limbs[j] < 10000000 then break end
        limbs[j] = 0
        j = j + 1
      end
    end
    local rem = 0
    for j = #limbs, 1, -1 do
      local v = rem * 10000000 + limbs[j]
      limbs[j], rem = math.floor(v / 2), v % 2
    end
    while #limbs > 1 and limbs[#limbs] == 0 do limbs[#limbs] = nil end
    local parts = {string.format('%d', limbs[#limbs])}
    for j = #limbs - 1, 1, -1 do parts[#parts + 1] = string.format('%07d', limbs[j]) end
    local text = table.concat(parts)
    if negative then return '-' .. text end
    return text
  elseif kind == 1 then
    local h = tohex(string.sub(record, pos, pos + 15))
    if #h ~= 32 then return nil end
    return string.sub(h, 1, 8) .. '-' .. string.sub(h, 9, 12) .. '-' .. string.sub(h, 13, 16) .. '-'
      .. string.sub(h, 17, 20) .. '-' .. string.sub(h, 21, 32)
  elseif kind == 2 then
    local n = varint()
    if not n or pos + n - 1 > #record - 16 then return nil end
    return string.sub(record, pos, pos + n - 1)
  end
  return nil
end

local record, generation = read(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[5] == '1')
if ARGV[6] == '' then return {record, generation} end
local pk = record and user_pk(record)
if not pk then return {record, generation, false, false, false} end
local user_key = ARGV[6] .. ':user:' .. pk .. ':ix'
local row, row_generation = read(user_key, 'u', 'ug', ARGV[7], true)
return {record, generation, user_key, row, row_generation}
