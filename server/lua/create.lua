-- Create a job (idempotent: the client chooses the id and may retry).
-- Returns a CREATE reply: CREATED, EXISTS, CONFLICT (the id holds another function), or
-- NOT_YOURS (another user's job holds the id: checked here, atomically with the create).
local existing, owner = unpack(redis.call('HMGET', META, F.FUNCTION_BLOB, F.USER))
if existing then
  if (owner or '') ~= A.user then return CREATEREPLY.NOT_YOURS end
  if existing ~= A.function_blob then return CREATEREPLY.CONFLICT end
  return CREATEREPLY.EXISTS
end
local created = now_ms()
redis.call('HSET', META, F.STATE, STATE.RUNNING, F.FUNCTION_BLOB, A.function_blob,
  F.MAX_ATTEMPTS, A.max_attempts, F.FAIL_FAST, A.fail_fast, F.LABEL, A.label, F.USER, A.user,
  F.CREATED, created, F.TOUCHED, created, F.SUBMITTED, 0, F.DONE, 0, F.FAILED, 0,
  F.REDUCER_BLOB, A.reducer_blob, F.FANIN, A.fanin, F.MERGES, 0, F.MERGES_OPEN, 0,
  F.SHARE, A.share, F.PRIORITY, A.priority)
redis.call('ZADD', JOBS, created, JOB)
return CREATEREPLY.CREATED
