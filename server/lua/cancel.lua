-- Cancel a job (A.reason: why, when the server decides it): its queued tasks are dropped
-- and late results refused. Returns the job's state afterwards ('' if unknown).
local state = redis.call('HGET', META, F.STATE)
if not state then return '' end
if state == STATE.RUNNING then finish(STATE.CANCELLED, A.reason) end
return redis.call('HGET', META, F.STATE)
