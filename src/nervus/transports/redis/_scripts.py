"""The Lua scripts that change several keys at once (Redis runs each atomically)."""

from __future__ import annotations

# Appends messages, an XADD each, answering once for all (a pipeline of XADDs costs
# the client a reply each). An XADD that fails does not stop the others.
# KEYS: the stream of each message
# ARGV: trim ('MAXLEN', 'MINID' or ''), its threshold, then per message: headers,
# body, '1' if it has a key else '', the key
# Returns per message its entry id or its error.
APPEND = """
local trim, threshold = ARGV[1], ARGV[2]
local out = {}
for i = 1, #KEYS do
  local a = i * 4 - 1
  local headers, body = ARGV[a], ARGV[a + 1]
  if trim == '' then
    if ARGV[a + 2] == '' then
      out[i] = redis.pcall('XADD', KEYS[i], '*', 'headers', headers, 'body', body)
    else
      out[i] = redis.pcall('XADD', KEYS[i], '*', 'headers', headers, 'body', body,
        'key', ARGV[a + 3])
    end
  elseif ARGV[a + 2] == '' then
    out[i] = redis.pcall('XADD', KEYS[i], trim, '~', threshold, '*', 'headers', headers,
      'body', body)
  else
    out[i] = redis.pcall('XADD', KEYS[i], trim, '~', threshold, '*', 'headers', headers,
      'body', body, 'key', ARGV[a + 3])
  end
end
return out
"""

# KEYS: members, subscribed, owners, generation
# ARGV: member, lease ms, JSON [[escaped channel, partitions, shift], ...], JSON [escaped channel]
# Returns {flat list of (channel index, partition) owned, waiting 0/1, generation}.
RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local member = ARGV[1]
local bump = false
if redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), member) == 1 then bump = true end
redis.call('HSET', KEYS[2], member, ARGV[4])
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%.0f', now))
local flat = redis.call('HGETALL', KEYS[3])
if #expired > 0 then
  local dead = {}
  for _, m in ipairs(expired) do
    dead[m] = true
    redis.call('ZREM', KEYS[1], m)
    redis.call('HDEL', KEYS[2], m)
  end
  for i = 1, #flat, 2 do
    if dead[flat[i + 1]] then redis.call('HDEL', KEYS[3], flat[i]) end
  end
  flat = redis.call('HGETALL', KEYS[3])
  bump = true
end
local live = redis.call('ZRANGE', KEYS[1], 0, -1)
table.sort(live)
local lists = redis.call('HMGET', KEYS[2], unpack(live))
local subscribed = {}
local alive = {}
for i, m in ipairs(live) do
  local set = {}
  if lists[i] then
    for _, c in ipairs(cjson.decode(lists[i])) do set[c] = true end
  end
  subscribed[m] = set
  alive[m] = true
end
local holders = {}
for i = 1, #flat, 2 do holders[flat[i]] = flat[i + 1] end
local owned = {}
local waiting = 0
for index, ch in ipairs(cjson.decode(ARGV[3])) do
  local name, count, shift = ch[1], ch[2], ch[3]
  local candidates = {}
  for _, m in ipairs(live) do
    if subscribed[m][name] then candidates[#candidates + 1] = m end
  end
  for part = 0, count - 1 do
    local field = name .. ':' .. part
    local holder = holders[field]
    if candidates[((part + shift) % #candidates) + 1] == member then
      if holder == member then
        owned[#owned + 1] = index - 1
        owned[#owned + 1] = part
      elseif holder == nil or not alive[holder] then
        redis.call('HSET', KEYS[3], field, member)
        owned[#owned + 1] = index - 1
        owned[#owned + 1] = part
      else
        waiting = 1
      end
    elseif holder == member then
      redis.call('HDEL', KEYS[3], field)
      bump = true
    end
  end
end
local generation
if bump then
  generation = redis.call('INCR', KEYS[4])
else
  generation = tonumber(redis.call('GET', KEYS[4]) or '0')
end
return {owned, waiting, generation}
"""

# KEYS: members, subscribed, owners, generation; ARGV: member
LEAVE = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
local flat = redis.call('HGETALL', KEYS[3])
for i = 1, #flat, 2 do
  if flat[i + 1] == ARGV[1] then redis.call('HDEL', KEYS[3], flat[i]) end
end
return redis.call('INCR', KEYS[4])
"""

# Schedules a redelivery and settles the delivery it replaces, in one step.
# KEYS: retries, stream; ARGV: group, due ms, new retry, entry id to XACK or '',
# retry to remove or ''
NACK = """
if ARGV[5] ~= '' then redis.call('ZREM', KEYS[1], ARGV[5]) end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
if ARGV[4] ~= '' then redis.call('XACK', KEYS[2], ARGV[1], ARGV[4]) end
return 1
"""

# Moves a group's position on one stream for a replay: what was pending is dropped
# (entries from the new position on are read again, those before it are skipped).
# KEYS: stream; ARGV: group, last delivered id
REPLAY = """
while true do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1000)
  if #pending == 0 then break end
  local ids = {}
  for i, entry in ipairs(pending) do ids[i] = entry[1] end
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
end
return redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], ARGV[2])
"""

# Deletes consumers without pending entries from a group's streams, so consumer
# names of finished members do not pile up. Atomic: a consumer is removed only
# while nothing is pending to it. ARGV: group, consumer to keep ('' for none),
# consumer to delete ('' for every consumer without pending entries but the kept one)
PRUNE = """
local removed = 0
for _, stream in ipairs(KEYS) do
  local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', stream, ARGV[1])
  if ok then
    for _, c in ipairs(consumers) do
      local name, pending
      for i = 1, #c, 2 do
        if c[i] == 'name' then name = c[i + 1] elseif c[i] == 'pending' then pending = c[i + 1] end
      end
      if pending == 0 and name ~= ARGV[2] and (ARGV[3] == '' or name == ARGV[3]) then
        redis.call('XGROUP', 'DELCONSUMER', stream, ARGV[1], name)
        removed = removed + 1
      end
    end
  end
end
return removed
"""
