-- Requests in flight per provider: a sorted set of leases scored by when they expire, so a
-- worker that dies cannot hold a place for longer than its lease.
--
-- acquire: KEYS[1] leases, ARGV: "acquire", max_in_flight, lease_ms, lease_id -> 1 taken | 0 full
-- release: KEYS[1] leases, KEYS[2] wake-up list, ARGV: "release", lease_id -> 1
-- A release pushes onto the wake-up list, where waiting workers block (BLPOP) instead of polling.

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

if ARGV[1] == 'acquire' then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
    return 0
  end
  redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[3]), ARGV[4])
  -- the set lives as long as its longest lease: a short lease must not cut a long one short
  local longest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  redis.call('PEXPIREAT', KEYS[1], tonumber(longest[2]) + 1000)
  return 1
end

redis.call('ZREM', KEYS[1], ARGV[2])
redis.call('RPUSH', KEYS[2], 1)
redis.call('LTRIM', KEYS[2], -100, -1)
redis.call('PEXPIRE', KEYS[2], 60000)
return 1
