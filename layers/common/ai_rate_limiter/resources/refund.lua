-- Give back a slot that was not used (its request never left): for each limit, only if no
-- reservation came after it, that is, if the key still ends where this slot put it.
-- KEYS: the slot's limit keys. ARGV[1]: the slot's start (slot_us, on the Redis clock); then one
-- increment_us per key. Returns the number of keys given back.
-- A slot given back while later ones exist stays used: moving the schedule back under them
-- would put two requests at one time.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local start = tonumber(ARGV[1])
local refunded = 0
for i, key in ipairs(KEYS) do
  local tat = tonumber(redis.call('GET', key) or 'nil')
  if tat and tat == start + tonumber(ARGV[1 + i]) then
    local back = math.max(start, now)
    redis.call('SET', key, string.format('%d', back), 'PX', math.ceil((back - now) / 1000) + 1000)
    refunded = refunded + 1
  end
end
return refunded
