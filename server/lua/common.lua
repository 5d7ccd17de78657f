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
--   KEYS[8] events   stream one entry per completed batch ("ok"/"err": comma-joined ids), "end"
--   KEYS[9] ready    zset   (global) jobs with queued tasks, scored by creation time
--   KEYS[10] jobs    zset   (global) unfinished jobs, scored by creation time
-- ARGV[1] is the job id, ARGV[2] the wake-up channel, ARGV[3] the finished-job TTL (s).
local META, PAYLOAD, QUEUE, LEASES, OWNER, RESULTS, ERRORS, EVENTS, READY, JOBS =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local JOB, CHANNEL, TTL = ARGV[1], ARGV[2], tonumber(ARGV[3])

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

local function split_owner(value)
  local attempt, worker, done = string.match(value, '^(%d+)|([^|]+)|?(D?)$')
  return tonumber(attempt), worker, done == 'D'
end

local function finish(state)
  redis.call('HSET', META, 'state', state, 'finished', now_ms())
  redis.call('DEL', QUEUE, PAYLOAD, LEASES)
  redis.call('ZREM', READY, JOB)
  redis.call('ZREM', JOBS, JOB)
  redis.call('XADD', EVENTS, '*', 'end', state)
  for i = 1, 8 do redis.call('EXPIRE', KEYS[i], TTL) end
end

-- Finish the job if it is sealed and every task is accounted for.
local function finish_if_complete()
  local m = redis.call('HMGET', META, 'total', 'done', 'failed', 'state')
  if m[4] ~= 'running' or not m[1] then return end
  local done, failed = tonumber(m[2] or 0), tonumber(m[3] or 0)
  if done + failed >= tonumber(m[1]) then
    finish(failed > 0 and 'failed' or 'done')
  end
end

-- Record one task's failure; with fail_fast the whole job ends here.
local function fail_task(task, error_json, result)
  redis.call('HSET', ERRORS, task, error_json)
  redis.call('HSET', RESULTS, task, result)
  redis.call('HINCRBY', META, 'failed', 1)
  if not redis.call('HGET', META, 'first_error') then
    redis.call('HSET', META, 'first_error', task)
  end
end

local function fail_fast_if_needed()
  if redis.call('HGET', META, 'fail_fast') == '1'
     and redis.call('HGET', META, 'first_error')
     and redis.call('HGET', META, 'state') == 'running' then
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
