-- Add tasks to a running job. ARGV[4..]: task, payload, task, payload, ...
-- A task id seen before (queued, leased or done) is skipped, so a retried batch adds nothing.
-- Returns {status, added}.
local state = redis.call('HGET', META, 'state')
if not state then return {'unknown', 0} end
if state ~= 'running' then return {'finished', 0} end
local sealed = redis.call('HGET', META, 'total')
local added = 0
local fresh = {}
for i = 4, #ARGV, 2 do
  local task = ARGV[i]
  if redis.call('HEXISTS', PAYLOAD, task) == 0 and redis.call('HEXISTS', OWNER, task) == 0 then
    if sealed then return {'sealed', added} end
    redis.call('HSET', PAYLOAD, task, ARGV[i + 1])
    fresh[#fresh + 1] = task
    added = added + 1
  end
end
if added > 0 then
  call_sliced('RPUSH', QUEUE, fresh, 4000)
  redis.call('HINCRBY', META, 'submitted', added)
  redis.call('ZADD', READY, 'NX', redis.call('HGET', META, 'created'), JOB)
  redis.call('PUBLISH', CHANNEL, added)
end
return {'ok', added}
