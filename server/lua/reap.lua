-- Requeue tasks whose lease deadline passed (their worker died or hung); past
-- max_attempts the task fails. At most ARGV[4] tasks per call.
-- Returns {requeued, failed}.
if redis.call('HGET', META, 'state') ~= 'running' then
  redis.call('ZREM', JOBS, JOB)
  return {0, 0}
end
local expired = redis.call('ZRANGEBYSCORE', LEASES, '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[4]))
local max_attempts = tonumber(redis.call('HGET', META, 'max_attempts') or 1)
local requeued, failed, err = 0, 0, {}
for _, task in ipairs(expired) do
  redis.call('ZREM', LEASES, task)
  local attempt, worker = split_owner(redis.call('HGET', OWNER, task))
  if attempt < max_attempts then
    requeue(task)
    requeued = requeued + 1
  else
    redis.call('HSET', OWNER, task, attempt .. '|' .. worker .. '|D')
    redis.call('HDEL', PAYLOAD, task)
    fail_task(task, lost_error(task, attempt, worker,
      'no heartbeat within the lease timeout (worker killed, hung or cut off)'), '')
    err[#err + 1] = task
    failed = failed + 1
  end
end
if requeued > 0 then redis.call('PUBLISH', CHANNEL, requeued) end
if failed > 0 then
  redis.call('XADD', EVENTS, '*', 'ok', '', 'err', table.concat(err, ','))
  fail_fast_if_needed()
  finish_if_complete()
end
return {requeued, failed}
