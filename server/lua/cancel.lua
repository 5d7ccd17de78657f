-- Cancel a job: its queued tasks are dropped and late results refused.
-- Returns the job's state afterwards ('' if unknown).
local state = redis.call('HGET', META, 'state')
if not state then return '' end
if state == 'running' then finish('cancelled') end
return redis.call('HGET', META, 'state')
