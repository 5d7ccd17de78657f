-- Extend worker ARGV[4]'s leases by ARGV[5] ms. ARGV[6..]: task, attempt, ...
-- Returns the leases this worker no longer holds (expired, cancelled, job gone), flat:
-- task, attempt, task, attempt, ... (the attempt says which lease: a worker may hold
-- a newer attempt of the same task).
local worker = ARGV[4]
local deadline = now_ms() + tonumber(ARGV[5])
local running = redis.call('HGET', META, 'state') == 'running'
local lost = {}
for i = 6, #ARGV, 2 do
  local task, attempt = ARGV[i], tonumber(ARGV[i + 1])
  local current = running and redis.call('HGET', OWNER, task)
  local held = false
  if current then
    local a, w, done = split_owner(current)
    held = a == attempt and w == worker and not done
      and redis.call('ZSCORE', LEASES, task) ~= false
    if held then redis.call('ZADD', LEASES, 'XX', deadline, task) end
  end
  if not held then
    lost[#lost + 1] = task
    lost[#lost + 1] = attempt
  end
end
return lost
