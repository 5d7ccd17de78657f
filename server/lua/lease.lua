-- Lease up to ARGV[5] queued tasks to worker ARGV[4] for ARGV[6] ms.
-- Returns {function_sha, reducer_sha, task1, attempt1, payload1, task2, ...} or {} when none.
-- A merge task's payload is its inputs' results, each prefixed by its length (u32, big end).
local max = tonumber(ARGV[5])
if redis.call('HGET', META, 'state') ~= 'running' then
  redis.call('ZREM', READY, JOB)
  return {}
end
local tasks = redis.call('LPOP', QUEUE, max)
if not tasks then
  redis.call('ZREM', READY, JOB)
  return {}
end
local deadline = now_ms() + tonumber(ARGV[6])
local worker = ARGV[4]
local previous = redis.call('HMGET', OWNER, unpack(tasks))
local payloads = redis.call('HMGET', PAYLOAD, unpack(tasks))
local m = redis.call('HMGET', META, 'function', 'reducer')
local out = {m[1], m[2] or ''}
local zargs, hargs = {}, {}
for i, task in ipairs(tasks) do
  local attempt = 1
  if previous[i] then attempt = split_owner(previous[i]) + 1 end
  zargs[#zargs + 1] = deadline
  zargs[#zargs + 1] = task
  hargs[#hargs + 1] = task
  hargs[#hargs + 1] = attempt .. '|' .. worker
  local payload = payloads[i]
  if is_merge(task) then
    local inputs = {}
    for input in string.gmatch(payload, '[^,]+') do inputs[#inputs + 1] = input end
    local parts = {}
    for j, value in ipairs(redis.call('HMGET', RESULTS, unpack(inputs))) do
      parts[j] = struct.pack('>I4', #value) .. value
    end
    payload = table.concat(parts)
  end
  out[#out + 1] = task
  out[#out + 1] = attempt
  out[#out + 1] = payload
end
call_sliced('ZADD', LEASES, zargs, 4000)
call_sliced('HSET', OWNER, hargs, 4000)
if redis.call('LLEN', QUEUE) == 0 then redis.call('ZREM', READY, JOB) end
return out
