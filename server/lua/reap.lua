-- Requeue tasks whose lease deadline passed (their worker died or hung); past
-- max_attempts the task fails. At most A.batch tasks per call. An unsealed job with no
-- create or submit for A.unsealed_ms was abandoned by its client: it is cancelled.
-- Returns {requeued, failed}.
local m = redis.call('HMGET', META, F.STATE, F.MAX_ATTEMPTS, F.TOTAL, F.TOUCHED)
if m[1] ~= STATE.RUNNING then
  redis.call('ZREM', JOBS, JOB)
  return {0, 0}
end
local now = now_ms()
if not m[3] and now - tonumber(m[4] or 0) > tonumber(A.unsealed_ms) then
  finish(STATE.CANCELLED, 'abandoned: its client never sealed it and sent no tasks for '
    .. math.floor(tonumber(A.unsealed_ms) / 1000) .. ' s')
  return {0, 0}
end
local expired = redis.call('ZRANGEBYSCORE', LEASES, '-inf', now, 'LIMIT', 0, tonumber(A.batch))
if #expired == 0 then return {0, 0} end
local max_attempts = tonumber(m[2] or 1)
local holders = call_sliced_collect('HMGET', HOLDER, expired)
local back, failed, done_pairs = {}, {}, {}
for k, task in ipairs(expired) do
  local attempt, worker = split_holder(holders[k])
  if not attempt then
    back[#back + 1] = task  -- no holder record: give the task another go
  elseif attempt < max_attempts then
    back[#back + 1] = task
  else
    failed[#failed + 1] = {task, attempt, worker}
    done_pairs[#done_pairs + 1] = task
    done_pairs[#done_pairs + 1] = attempt .. '|' .. worker .. '|D'
  end
end
call_sliced('ZREM', LEASES, expired)
if #back > 0 then
  call_sliced('LPUSH', QUEUE, back)
  redis.call('ZADD', READY, 'NX', redis.call('HGET', META, F.CREATED), JOB)
  count(COUNT.REQUEUED, #back)
  redis.call('HINCRBY', META, F.REQUEUED, #back)
  redis.call('PUBLISH', CHANNEL, #back)
end
if #failed > 0 then
  call_sliced('HSET', HOLDER, done_pairs)
  local err = {}
  for _, f in ipairs(failed) do
    redis.call('HDEL', PAYLOAD, f[1])
    fail_task(f[1], lost_error(f[1], f[2], f[3],
      'no heartbeat within the lease timeout (worker killed, hung or cut off)'), '')
    err[#err + 1] = f[1]
  end
  redis.call('XADD', EVENTS, '*', EV.OK, '', EV.ERROR, table.concat(err, ','))
  fail_fast_if_needed()
  finish_if_complete()
end
return {#back, #failed}
