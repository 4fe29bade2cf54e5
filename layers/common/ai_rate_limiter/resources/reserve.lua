-- GCRA reservation over one or more candidate providers, each with one or more limits.
--
-- KEYS: first the keys of the pending adjustments, then one settlement key per adjustment,
-- then the limit keys of every candidate.
-- ARGV[1]: max_wait_us  - reserve only if the slot starts within this many microseconds
-- ARGV[2]: n_adjustments, then one delta_us per adjustment key: settles earlier reservations
--          (a token estimate against the provider's reported usage); applied first, each once:
--          its settlement key is set when it is applied, and one already set is skipped (a
--          call whose answer was lost is sent again with the same settlement keys)
-- then: n_candidates, and per candidate: weight_milli, n_limits, and per limit: increment_us,
-- tolerance_us
--   weight_milli: the candidate's weight times 1000 (1000 = 1)
--   increment_us: emission interval times cost (window / limit * cost)
--   tolerance_us: how far ahead of the theoretical arrival time a request may start (0 = strict)
--
-- Picks the candidate that serves soonest by capacity: the least (wait + first increment) /
-- weight, so free providers share work in proportion to their rates (and weights), and a
-- busy one loses to any that can start sooner. Commits that slot on all of its limits at
-- once, and returns {candidate_index (1-based), wait_us, reserved (1|0), slot_us}, where slot_us
-- is the slot's start on the Redis clock. Time comes from Redis TIME so that workers never
-- compare clocks. Every key expires once its schedule is in the past.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local max_wait = tonumber(ARGV[1])
local SETTLED_TTL_MS = 3600000  -- how long an applied settlement is remembered

local function store(key, tat)
  -- integral microseconds below 2^53: Lua writes them as plain digits
  redis.call('SET', key, tat, 'PX', math.ceil((tat - now) / 1000) + 1000)
end

local n_adjust = tonumber(ARGV[2])
for i = 1, n_adjust do
  if redis.call('SET', KEYS[n_adjust + i], 1, 'NX', 'PX', SETTLED_TTL_MS) then
    local tat = tonumber(redis.call('GET', KEYS[i]) or 'nil')
    if tat then
      local adjusted = tat + tonumber(ARGV[2 + i])
      if adjusted < now then adjusted = now end
      store(KEYS[i], adjusted)
    end
  end
end

local n_candidates = tonumber(ARGV[3 + n_adjust])
if n_candidates == 0 then
  return {0, 0, 0, now}  -- only settling
end
local a, k = 4 + n_adjust, 1 + 2 * n_adjust
local best, best_score, best_start, best_a, best_k, best_n
for c = 1, n_candidates do
  local weight = tonumber(ARGV[a]) / 1000
  local n = tonumber(ARGV[a + 1])
  a = a + 1
  local start = now
  for i = 0, n - 1 do
    local tat = tonumber(redis.call('GET', KEYS[k + i]) or '0')
    local allowed = tat - tonumber(ARGV[a + 2 + 2 * i])
    if allowed > start then start = allowed end
  end
  local score = (start - now + tonumber(ARGV[a + 1])) / weight
  if best == nil or score < best_score then
    best, best_score, best_start, best_a, best_k, best_n = c, score, start, a, k, n
  end
  a = a + 1 + 2 * n
  k = k + n
end

local wait = best_start - now
if wait > max_wait then
  return {best, wait, 0, best_start}
end
for i = 0, best_n - 1 do
  local key = KEYS[best_k + i]
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < best_start then tat = best_start end
  store(key, tat + tonumber(ARGV[best_a + 1 + 2 * i]))
end
return {best, wait, 1, best_start}
