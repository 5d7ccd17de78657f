-- Worker ARGV[4] hands back leased tasks it has not started (draining on SIGTERM):
-- they go to the front of the queue and the attempt does not count. ARGV[5..]: task, attempt.
-- Returns the number handed back.
local worker = ARGV[4]
if redis.call('HGET', META, 'state') ~= 'running' then return 0 end
local back = 0
for i = 5, #ARGV, 2 do
  local task, attempt = ARGV[i], tonumber(ARGV[i + 1])
  local current = redis.call('HGET', OWNER, task)
  if current then
    local a, w, done = split_owner(current)
    if a == attempt and w == worker and not done and redis.call('ZREM', LEASES, task) == 1 then
      if a > 1 then
        redis.call('HSET', OWNER, task, (a - 1) .. '|' .. w)
      else
        redis.call('HDEL', OWNER, task)
      end
      requeue(task)
      back = back + 1
    end
  end
end
if back > 0 then redis.call('PUBLISH', CHANNEL, back) end
return back
