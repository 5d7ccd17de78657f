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
local back, failed = expire_leases(expired, tonumber(m[2] or 1),
  'no heartbeat within the lease timeout (worker killed, hung or cut off)')
return {back, failed}
