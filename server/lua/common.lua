-- Helpers shared by every job script. scripts.py puts a generated prelude in front: the
-- KEYS (META .. COUNTERS, see keys.JobKeys), JOB/CHANNEL/TTL, the script's named ARGV in
-- table A (REST: the first ARGV of a variadic tail), and the constants shared with Python
-- (STATE, STATUS, F meta fields, EV stream fields, COUNT counters, OUTCOME codes, ...).
--
-- Redis does not roll a script back when it fails half way: every script reads and checks
-- all it needs first, and only then writes.
--
-- A reducing job (meta reducer_blob set) merges results on workers: whenever 'fanin'
-- results wait in MERGEABLE, a merge task is queued (at the front) whose payload lists its
-- inputs; its result replaces them. The job ends when one result is left. A merge is named
-- by its inputs (MERGE_PREFIX .. sha1 of their ids), so after a store rollback a merge over
-- other inputs has another name, and a late report of the old one is refused.

local SLICE = 4000  -- arguments per variadic command (Lua's unpack() stops near 8,000)

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function call_sliced(cmd, key, args)
  if #args == 0 then return end
  if #args <= SLICE then return redis.call(cmd, key, unpack(args)) end
  for i = 1, #args, SLICE do
    redis.call(cmd, key, unpack(args, i, math.min(i + SLICE - 1, #args)))
  end
end

-- The same for a command whose reply is one entry per argument (HMGET, ZMSCORE): the
-- replies of the slices, concatenated (a missing entry is false).
local function call_sliced_collect(cmd, key, args)
  if #args == 0 then return {} end
  if #args <= SLICE then return redis.call(cmd, key, unpack(args)) end
  local out = {}
  for i = 1, #args, SLICE do
    local part = redis.call(cmd, key, unpack(args, i, math.min(i + SLICE - 1, #args)))
    for j = 1, #part do out[#out + 1] = part[j] end
  end
  return out
end

local function count(field, n)
  if n > 0 then redis.call('HINCRBY', COUNTERS, field, n) end
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

-- A holder value: attempt, worker, and whether that attempt's report was accepted.
local function split_holder(value)
  if not value then return nil end
  local attempt, worker, done = string.match(value, '^(%d+)|([^|]+)|?(D?)$')
  return tonumber(attempt), worker, done == 'D'
end

local function is_merge(task)
  return string.sub(task, 1, #MERGE_PREFIX) == MERGE_PREFIX
end

-- The ready indices (keys.Keys.ready and .ranked): READY by age, RANKED by group, then
-- priority, then age, so the lease script reaches every group with work at the cost of
-- one lookup per group, however many ready jobs each has.
local NUL = string.char(0)
local RANK_WIDTH = #tostring(2 * PRIORITY_MAX)
local RANK_LEN = RANK_WIDTH + 15

local function ranked_member()
  local m = redis.call('HMGET', META, F.USER, F.SHARE, F.PRIORITY, F.CREATED)
  local owner = m[1] or ''
  local group = owner ~= '' and owner or (m[2] or '')
  local rank = string.format('%0' .. RANK_WIDTH .. 'd%015d',
    PRIORITY_MAX - (tonumber(m[3] or 0) or 0), tonumber(m[4] or 0) or 0)
  return group .. NUL .. rank .. JOB, m[4] or 0
end

-- The job has queued tasks (again): in both indices (idempotent).
local function mark_ready()
  local member, created = ranked_member()
  redis.call('ZADD', READY, 'NX', created, JOB)
  redis.call('ZADD', RANKED, 0, member)
end

local function unmark_ready()
  redis.call('ZREM', READY, JOB)
  redis.call('ZREM', RANKED, (ranked_member()))
end

local function finish(state, reason)
  -- A reducing job hands its client the merge of everything that succeeded, even when
  -- some tasks failed (the partial result of coffea's recoverable mode).
  local left = redis.call('LRANGE', MERGEABLE, 0, -1)
  if #left == 1 then redis.call('XADD', EVENTS, '*', EV.OK, left[1], EV.ERROR, '') end
  redis.call('HSET', META, F.STATE, state, F.FINISHED, now_ms())
  if reason and reason ~= '' then redis.call('HSET', META, F.REASON, reason) end
  -- Kept results served only the job's own tasks (a failed one's exception stays for
  -- the client).
  local kept = redis.call('SMEMBERS', KEPT)
  if #kept > 0 then
    local failed = call_sliced_collect('HMGET', ERRORS, kept)
    local drop = {}
    for k, task in ipairs(kept) do if not failed[k] then drop[#drop + 1] = task end end
    call_sliced('HDEL', RESULTS, drop)
  end
  redis.call('DEL', QUEUE, PAYLOAD, LEASES, MERGEABLE, KEPT)
  unmark_ready()
  redis.call('ZREM', JOBS, JOB)
  redis.call('XADD', EVENTS, '*', EV.END, state)
  redis.call('PUBLISH', CHANNEL, JOB_ENDED_MESSAGE)  -- workers running its tasks stop them
  for _, key in ipairs(owned_keys()) do redis.call('EXPIRE', key, TTL) end
end

local function queue_merge(inputs)
  local task = MERGE_PREFIX .. redis.sha1hex(table.concat(inputs, ','))
  redis.call('HINCRBY', META, F.MERGES, 1)
  redis.call('HSET', PAYLOAD, task, table.concat(inputs, ','))
  redis.call('HINCRBY', META, F.MERGES_OPEN, 1)
  redis.call('LPUSH', QUEUE, task)  -- merges first: they free memory and shorten the tail
  mark_ready()
  redis.call('PUBLISH', CHANNEL, 1)
end

-- Queue merges for waiting results; finish the job once it is sealed, every task is
-- accounted for and (for a reducing job) one result is left.
local function finish_if_complete()
  local m = redis.call('HMGET', META, F.TOTAL, F.DONE, F.FAILED, F.STATE, F.REDUCER_BLOB,
    F.FANIN, F.MERGES_OPEN)
  if m[4] ~= STATE.RUNNING then return end
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
    finish(tonumber(m[3] or 0) > 0 and STATE.FAILED or STATE.DONE)
  end
end

-- Record one task's failure. A failed merge ends the job whatever fail_fast says: the
-- results it held are gone.
local function fail_task(task, error_json, result)
  redis.call('HSET', ERRORS, task, error_json)
  redis.call('HSET', RESULTS, task, result)
  if is_merge(task) then
    redis.call('HSET', META, F.FATAL, task)
    count(COUNT.MERGES_FAILED, 1)
  else
    redis.call('HINCRBY', META, F.FAILED, 1)
    count(COUNT.TASKS_FAILED, 1)
  end
  redis.call('HSETNX', META, F.FIRST_ERROR, task)
end

local function fail_fast_if_needed()
  local m = redis.call('HMGET', META, F.FAIL_FAST, F.FIRST_ERROR, F.STATE, F.FATAL)
  if m[3] == STATE.RUNNING and m[2] and (m[1] == '1' or m[4]) then
    finish(STATE.FAILED)
  end
end

-- Error JSON for a task that lost its worker, built here so the message is one sentence.
local function lost_error(task, attempt, worker, reason)
  return cjson.encode({
    type = WORKER_LOST,
    message = 'task ' .. task .. ' failed on all ' .. attempt .. ' attempts; the last on worker '
      .. worker .. ': ' .. reason,
    traceback = '',
    worker = worker,
    attempt = attempt,
  })
end

-- Locality claims (see lease.lua) of workers that lost or handed back `tasks`
-- (`workers[i]` held tasks[i]) end: a dead worker's claim kept every other worker off
-- its file, the retry of its chunk included, while any other file had chunks queued.
local function drop_claims(tasks, workers)
  if #tasks == 0 or redis.call('HGET', META, F.LOCAL) ~= '1' then return end
  local keys = call_sliced_collect('HMGET', LOCALITY, tasks)
  local fields, owners, drop, seen = {}, {}, {}, {}
  for i = 1, #tasks do
    local w = workers[i]
    if w and not seen['w:' .. w] then
      seen['w:' .. w] = true
      drop[#drop + 1] = 'w:' .. w
    end
    local field = keys[i] and ('k:' .. keys[i])
    if w and field and not seen[field] then
      seen[field] = true
      fields[#fields + 1] = field
      owners[#owners + 1] = w
    end
  end
  for i, holder in ipairs(call_sliced_collect('HMGET', CLAIMS, fields)) do
    if holder == owners[i] then drop[#drop + 1] = fields[i] end
  end
  call_sliced('HDEL', CLAIMS, drop)
end

-- End leases of tasks whose worker is gone (lease expired, or its presence dropped): back
-- to the queue with the attempt counted, or failed for good past max_attempts with
-- `reason`. Returns requeued, failed.
local function expire_leases(expired, max_attempts, reason)
  if #expired == 0 then return 0, 0 end
  local holders = call_sliced_collect('HMGET', HOLDER, expired)
  local back, failed, done_pairs, held_by = {}, {}, {}, {}
  for k, task in ipairs(expired) do
    local attempt, worker = split_holder(holders[k])
    held_by[k] = worker
    if not attempt then
      back[#back + 1] = task  -- no holder record: give the task another go
    elseif attempt < max_attempts then
      back[#back + 1] = task
    else
      failed[#failed + 1] = {task, attempt, worker}
      done_pairs[#done_pairs + 1] = task
      done_pairs[#done_pairs + 1] = attempt .. '|' .. worker .. '|D'
    end
  end
  drop_claims(expired, held_by)
  call_sliced('ZREM', LEASES, expired)
  if #back > 0 then
    call_sliced('LPUSH', QUEUE, back)
    mark_ready()
    count(COUNT.REQUEUED, #back)
    redis.call('HINCRBY', META, F.REQUEUED, #back)
    redis.call('PUBLISH', CHANNEL, #back)
  end
  if #failed > 0 then
    call_sliced('HSET', HOLDER, done_pairs)
    local err = {}
    for _, f in ipairs(failed) do
      redis.call('HDEL', PAYLOAD, f[1])
      redis.call('HDEL', LOCALITY, f[1])
      fail_task(f[1], lost_error(f[1], f[2], f[3], reason), '')
      err[#err + 1] = f[1]
    end
    redis.call('XADD', EVENTS, '*', EV.OK, '', EV.ERROR, table.concat(err, ','))
    fail_fast_if_needed()
    finish_if_complete()
  end
  return #back, #failed
end
