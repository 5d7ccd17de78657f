-- Prepended to every job script (see scripts.py). Every job script receives the
-- same KEYS, all declared (Dragonfly rejects undeclared keys); the first eight
-- share the job's {hash tag}:
--   KEYS[1] meta     hash   state, function, max_attempts, fail_fast, total, done, failed, ...
--   KEYS[2] payload  hash   task -> pickled arguments (dropped once the task is done)
--   KEYS[3] queue    list   task ids waiting for a worker
--   KEYS[4] leases   zset   task -> lease deadline (ms)
--   KEYS[5] owner    hash   task -> "attempt|worker" while leased, "attempt|worker|D" once done
--   KEYS[6] results  hash   task -> pickled value (or pickled exception), until the client acks
--   KEYS[7] errors   hash   task -> JSON error description
--   KEYS[8] events   stream one entry per completed batch: "ok"/"err" (comma-joined ids whose
--                   results the client fetches), "done" (ids merged on workers), or "end"
--   KEYS[9] mergeable list  results of a reducing job waiting to be merged (task ids)
--   KEYS[10] ready   zset   (global) jobs with queued tasks, scored by creation time
--   KEYS[11] jobs    zset   (global) unfinished jobs, scored by creation time
-- ARGV[1] is the job id, ARGV[2] the wake-up channel, ARGV[3] the finished-job TTL (s).
--
-- A reducing job (meta 'reducer' set) merges results on workers: whenever 'fanin' results
-- wait in MERGEABLE, a merge task "m<n>" is queued (at the front) whose payload lists its
-- inputs; its result replaces them. The job ends when one result is left.
local META, PAYLOAD, QUEUE, LEASES, OWNER, RESULTS, ERRORS, EVENTS, MERGEABLE, READY, JOBS =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10],
  KEYS[11]
local JOB, CHANNEL, TTL = ARGV[1], ARGV[2], tonumber(ARGV[3])
local OWNED_KEYS = 9

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Lua's unpack() has a stack limit: issue variadic commands in slices.
local function call_sliced(cmd, key, args, step)
  for i = 1, #args, step do
    redis.call(cmd, key, unpack(args, i, math.min(i + step - 1, #args)))
  end
end

-- The same for a command whose reply is one entry per argument (HMGET, ZMSCORE): the
-- replies of the slices, concatenated (a missing entry is false).
local function call_sliced_collect(cmd, key, args, step)
  local out = {}
  for i = 1, #args, step do
    local part = redis.call(cmd, key, unpack(args, i, math.min(i + step - 1, #args)))
    for j = 1, #part do out[#out + 1] = part[j] end
  end
  return out
end

-- Packed arguments: a comma-joined list, and values cut from one string by their sizes.
local function split_list(text)
  local out = {}
  for item in string.gmatch(text, '[^,]+') do out[#out + 1] = item end
  return out
end

local function cut(blob, sizes_text)
  local out, at = {}, 1
  for size in string.gmatch(sizes_text, '%d+') do
    local n = tonumber(size)
    out[#out + 1] = string.sub(blob, at, at + n - 1)
    at = at + n
  end
  if at ~= #blob + 1 then return nil end  -- the sizes do not add up
  return out
end

local function split_owner(value)
  local attempt, worker, done = string.match(value, '^(%d+)|([^|]+)|?(D?)$')
  return tonumber(attempt), worker, done == 'D'
end

local function is_merge(task)
  return string.byte(task, 1) == 109  -- 'm'
end

local function finish(state)
  -- A reducing job hands its client the merge of everything that succeeded, even when
  -- some tasks failed (the partial result of coffea's recoverable mode).
  local left = redis.call('LRANGE', MERGEABLE, 0, -1)
  if #left == 1 then redis.call('XADD', EVENTS, '*', 'ok', left[1], 'err', '') end
  redis.call('HSET', META, 'state', state, 'finished', now_ms())
  redis.call('DEL', QUEUE, PAYLOAD, LEASES, MERGEABLE)
  redis.call('ZREM', READY, JOB)
  redis.call('ZREM', JOBS, JOB)
  redis.call('XADD', EVENTS, '*', 'end', state)
  for i = 1, OWNED_KEYS do redis.call('EXPIRE', KEYS[i], TTL) end
end

local function queue_merge(inputs)
  local task = 'm' .. redis.call('HINCRBY', META, 'merges', 1)
  redis.call('HSET', PAYLOAD, task, table.concat(inputs, ','))
  redis.call('HINCRBY', META, 'merges_open', 1)
  redis.call('LPUSH', QUEUE, task)  -- merges first: they free memory and shorten the tail
  redis.call('ZADD', READY, 'NX', redis.call('HGET', META, 'created'), JOB)
  redis.call('PUBLISH', CHANNEL, 1)
end

-- Queue merges for waiting results; finish the job once it is sealed, every task is
-- accounted for and (for a reducing job) one result is left.
local function finish_if_complete()
  local m = redis.call('HMGET', META, 'total', 'done', 'failed', 'state', 'reducer', 'fanin',
    'merges_open')
  if m[4] ~= 'running' then return end
  local all_in = m[1] and tonumber(m[2] or 0) + tonumber(m[3] or 0) >= tonumber(m[1])
  if m[5] and m[5] ~= '' then
    local fanin, open = tonumber(m[6]), tonumber(m[7] or 0)
    local waiting = redis.call('LLEN', MERGEABLE)
    while waiting >= fanin or (all_in and waiting >= 2 and open == 0) do
      local n = math.min(fanin, waiting)
      queue_merge(redis.call('LPOP', MERGEABLE, n))
      waiting = waiting - n
      open = open + 1
    end
    if open > 0 or waiting > 1 then return end
  end
  if all_in then
    finish(tonumber(m[3] or 0) > 0 and 'failed' or 'done')
  end
end

-- Record one task's failure. A failed merge ends the job whatever fail_fast says: the
-- results it held are gone.
local function fail_task(task, error_json, result)
  redis.call('HSET', ERRORS, task, error_json)
  redis.call('HSET', RESULTS, task, result)
  if is_merge(task) then
    redis.call('HSET', META, 'fatal', task)
  else
    redis.call('HINCRBY', META, 'failed', 1)
  end
  if not redis.call('HGET', META, 'first_error') then
    redis.call('HSET', META, 'first_error', task)
  end
end

local function fail_fast_if_needed()
  local m = redis.call('HMGET', META, 'fail_fast', 'first_error', 'state', 'fatal')
  if m[3] == 'running' and m[2] and (m[1] == '1' or m[4]) then
    finish('failed')
  end
end

local function requeue(task)
  -- Front of the queue: a retried task should not wait behind the whole backlog.
  redis.call('LPUSH', QUEUE, task)
  redis.call('ZADD', READY, 'NX', redis.call('HGET', META, 'created'), JOB)
end

-- Error JSON for a task that lost its worker, built here so the message is one sentence.
local function lost_error(task, attempt, worker, reason)
  return cjson.encode({
    type = 'coffea_hq.errors.WorkerLost',
    message = 'task ' .. task .. ' failed on all ' .. attempt .. ' attempts; the last on worker '
      .. worker .. ': ' .. reason,
    traceback = '',
    worker = worker,
    attempt = attempt,
  })
end
