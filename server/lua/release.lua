-- Worker A.worker hands back leased tasks it has not started (draining, or a lease reply
-- that never reached it): they go to the front of the queue and the attempt does not
-- count. ARGV[REST..]: task, attempt, task, attempt, ... Returns the number handed back.
local worker = A.worker
if redis.call('HGET', META, F.STATE) ~= STATE.RUNNING then return 0 end
local leases, attempts = {}, {}
for i = REST, #ARGV, 2 do
  leases[#leases + 1] = ARGV[i]
  attempts[#attempts + 1] = tonumber(ARGV[i + 1])
end
if #leases == 0 then return 0 end
local holders = call_sliced_collect('HMGET', HOLDER, leases)
local deadlines = call_sliced_collect('ZMSCORE', LEASES, leases)
local back, drop, restore, seen = {}, {}, {}, {}
for k, task in ipairs(leases) do
  local a, w, done = split_holder(holders[k])
  if a == attempts[k] and w == worker and not done and deadlines[k] and not seen[task] then
    seen[task] = true
    back[#back + 1] = task
    if a > 1 then
      restore[#restore + 1] = task
      restore[#restore + 1] = (a - 1) .. '|' .. w
    else
      drop[#drop + 1] = task
    end
  end
end
if #back == 0 then return 0 end
local by = {}
for i = 1, #back do by[i] = worker end
drop_claims(back, by)
call_sliced('ZREM', LEASES, back)
call_sliced('HDEL', HOLDER, drop)
call_sliced('HSET', HOLDER, restore)
call_sliced('LPUSH', QUEUE, back)
mark_ready()
count(COUNT.RELEASED, #back)
redis.call('PUBLISH', CHANNEL, #back)
return #back
