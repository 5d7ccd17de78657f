-- Add tasks to a running job. ARGV[4] task ids (comma-joined), ARGV[5] payload sizes
-- (comma-joined), ARGV[6] the payloads concatenated.
-- A task id seen before (queued, leased or done) is skipped, so a retried batch adds nothing.
-- Returns {status, added}.
local m = redis.call('HMGET', META, 'state', 'total', 'created')
local state, sealed = m[1], m[2]
if not state then return {'unknown', 0} end
if state ~= 'running' then return {'finished', 0} end
local tasks, payloads = split_list(ARGV[4]), cut(ARGV[6], ARGV[5])
if not payloads or #payloads ~= #tasks then
  return redis.error_reply('submit: packed argument lengths differ')
end
-- Done tasks are in OWNER only; queued and leased ones are in PAYLOAD (HSETNX tells).
local owners = call_sliced_collect('HMGET', OWNER, tasks, 4000)
local added = 0
local fresh = {}
for k, task in ipairs(tasks) do
  if not owners[k] then
    if sealed then
      if redis.call('HEXISTS', PAYLOAD, task) == 0 then return {'sealed', added} end
    elseif redis.call('HSETNX', PAYLOAD, task, payloads[k]) == 1 then
      fresh[#fresh + 1] = task
      added = added + 1
    end
  end
end
if added > 0 then
  call_sliced('RPUSH', QUEUE, fresh, 4000)
  redis.call('HINCRBY', META, 'submitted', added)
  redis.call('ZADD', READY, 'NX', m[3], JOB)
  redis.call('PUBLISH', CHANNEL, added)
end
return {'ok', added}
