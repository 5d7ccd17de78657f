-- Extend worker A.worker's leases by A.lease_ms. ARGV[REST..]: task, attempt, task, ...
-- Returns the leases this worker no longer holds (expired, cancelled, job gone), flat:
-- {task, attempt, task, attempt, ...}.
local worker = A.worker
local running = redis.call('HGET', META, F.STATE) == STATE.RUNNING
local leases, attempts = {}, {}
for i = REST, #ARGV, 2 do
  leases[#leases + 1] = ARGV[i]
  attempts[#attempts + 1] = tonumber(ARGV[i + 1])
end
local holders, deadlines = {}, {}
if running and #leases > 0 then
  holders = call_sliced_collect('HMGET', HOLDER, leases)
  deadlines = call_sliced_collect('ZMSCORE', LEASES, leases)
end
local deadline = now_ms() + tonumber(A.lease_ms)
local extend, lost = {}, {}
for k, task in ipairs(leases) do
  local a, w, done = split_holder(holders[k])
  if running and a == attempts[k] and w == worker and not done and deadlines[k] then
    extend[#extend + 1] = deadline
    extend[#extend + 1] = task
  else
    lost[#lost + 1] = task
    lost[#lost + 1] = attempts[k]
  end
end
if #extend > 0 then
  for i = 1, #extend, SLICE do
    redis.call('ZADD', LEASES, 'XX', unpack(extend, i, math.min(i + SLICE - 1, #extend)))
  end
end
return lost
