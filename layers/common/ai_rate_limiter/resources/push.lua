-- Move limits forward: no slot on KEYS may start before now + ARGV[1] microseconds.
-- Used when a provider answers 429 or reports no requests left until its reset, so that every
-- worker waits until then. Returns the number of keys moved.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local not_before = now + tonumber(ARGV[1])
local moved = 0
for _, key in ipairs(KEYS) do
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < not_before then
    redis.call('SET', key, string.format('%d', not_before), 'PX', math.ceil((not_before - now) / 1000) + 1000)
    moved = moved + 1
  end
end
return moved
