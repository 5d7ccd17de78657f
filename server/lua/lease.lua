-- Lease up to A.max queued tasks to worker A.worker for A.lease_ms.
-- Returns {function_blob, reducer_blob, task1, attempt1, payload1, task2, ...} or {}.
-- A merge task's payload is its inputs' results, each prefixed by its length (u32, big end).
-- A.users: ',alice,bob,' for a worker that takes only those users' jobs, '' for any job.
local m = redis.call('HMGET', META, F.STATE, F.FUNCTION_BLOB, F.REDUCER_BLOB, F.USER)
if m[1] ~= STATE.RUNNING then
  redis.call('ZREM', READY, JOB)
  return {}
end
if A.users ~= '' and not string.find(A.users, ',' .. (m[4] or '') .. ',', 1, true) then
  return {}  -- not this worker's users: the job stays ready for the others
end
local max = tonumber(A.max)
local tasks = redis.call('LRANGE', QUEUE, 0, max - 1)
if #tasks == 0 then
  redis.call('ZREM', READY, JOB)
  return {}
end
-- Read everything first.
local previous = call_sliced_collect('HMGET', HOLDER, tasks)
local payloads = call_sliced_collect('HMGET', PAYLOAD, tasks)
local out = {m[2], m[3] or ''}
local broken = nil  -- a merge whose inputs are gone (the store lost keys): the job fails
for i, task in ipairs(tasks) do
  local payload = payloads[i]
  if is_merge(task) and payload then
    local inputs = split_list(payload)
    local parts = {}
    for j, value in ipairs(call_sliced_collect('HMGET', RESULTS, inputs)) do
      if not value then broken = task break end
      parts[j] = struct.pack('>I4', #value) .. value
    end
    payload = table.concat(parts)
  elseif not payload then
    broken = task
  end
  if broken then break end
  out[#out + 1] = task
  out[#out + 1] = (split_holder(previous[i]) or 0) + 1
  out[#out + 1] = payload
end
if broken then
  fail_task(broken, cjson.encode({type = 'coffea_hq.errors.StoreLostData',
    message = 'task ' .. broken .. ' lost its inputs in the store (evicted or deleted keys?)',
    traceback = ''}), '')
  redis.call('HSET', META, F.FATAL, broken)
  finish(STATE.FAILED, 'the store lost data of task ' .. broken)
  return {}
end
-- Then write.
redis.call('LTRIM', QUEUE, #tasks, -1)
local deadline = now_ms() + tonumber(A.lease_ms)
local zargs, hargs = {}, {}
for i = 3, #out, 3 do
  zargs[#zargs + 1] = deadline
  zargs[#zargs + 1] = out[i]
  hargs[#hargs + 1] = out[i]
  hargs[#hargs + 1] = out[i + 1] .. '|' .. A.worker
end
call_sliced('ZADD', LEASES, zargs)
call_sliced('HSET', HOLDER, hargs)
if redis.call('LLEN', QUEUE) == 0 then redis.call('ZREM', READY, JOB) end
return out
