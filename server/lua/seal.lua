-- Declare the job's final task count. ARGV[4] total.
-- Returns {status, state}.
local m = redis.call('HMGET', META, 'state', 'total', 'submitted')
if not m[1] then return {'unknown', ''} end
local total = tonumber(ARGV[4])
if m[2] and tonumber(m[2]) ~= total then return {'conflict', m[1]} end
if m[1] ~= 'running' then return {'ok', m[1]} end
if tonumber(m[3]) ~= total then return {'mismatch', m[3]} end
redis.call('HSET', META, 'total', total)
finish_if_complete()
return {'ok', redis.call('HGET', META, 'state')}
