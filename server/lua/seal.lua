-- Declare the job's final task count (A.total). Returns {SEALREPLY, detail}: for MISMATCH
-- the number of tasks submitted.
local m = redis.call('HMGET', META, F.STATE, F.TOTAL, F.SUBMITTED)
if not m[1] then return {SEALREPLY.UNKNOWN, 0} end
local total = tonumber(A.total)
if m[2] and tonumber(m[2]) ~= total then return {SEALREPLY.CONFLICT, 0} end
if m[1] ~= STATE.RUNNING then return {SEALREPLY.OK, 0} end
if tonumber(m[3]) ~= total then return {SEALREPLY.MISMATCH, tonumber(m[3])} end
redis.call('HSET', META, F.TOTAL, total)
finish_if_complete()
return {SEALREPLY.OK, 0}
