-- Report finished tasks of worker ARGV[4], packed: ARGV[5] task ids (comma-joined),
-- ARGV[6] attempts (comma-joined), ARGV[7] outcomes (one letter each: o ok, e error,
-- c crashed), ARGV[8] result sizes (comma-joined), ARGV[9] the results concatenated,
-- ARGV[10..] the error JSON of each task not 'ok', in order.
-- Returns one status per task (see protocol.CompleteStatus).
-- The common path (an 'ok' for a held lease) costs no command per task: owners and
-- leases are read in bulk first and the writes are issued in bulk at the end.
local worker = ARGV[4]
local m = redis.call('HMGET', META, 'state', 'max_attempts', 'reducer')
local state = m[1]
local max_attempts = tonumber(m[2] or 1)
local reducing = (m[3] or '') ~= ''
local tasks, attempts, codes = split_list(ARGV[5]), split_list(ARGV[6]), ARGV[7]
local values = cut(ARGV[9], ARGV[8])
if not values or #attempts ~= #tasks or #codes ~= #tasks or #values ~= #tasks then
  return redis.error_reply('complete: packed argument lengths differ')
end
local OUTCOMES = {o = 'ok', e = 'error', c = 'crashed'}
local next_error = 10
local owners, leased = {}, {}
if state then owners = call_sliced_collect('HMGET', OWNER, tasks, 4000) end
if state == 'running' then leased = call_sliced_collect('ZMSCORE', LEASES, tasks, 4000) end
local statuses, ok, err, merged = {}, {}, {}, {}
local unleased, owner_pairs, done_tasks, result_pairs = {}, {}, {}, {}
local touched = {}  -- task -> owner value after this batch (a task twice in one batch)
local done_count, requeued = 0, 0
for k, task in ipairs(tasks) do
  local attempt, outcome = tonumber(attempts[k]), OUTCOMES[string.sub(codes, k, k)]
  local error_json = ''
  if outcome ~= 'ok' then
    error_json = ARGV[next_error]
    next_error = next_error + 1
  end
  local current, held = owners[k], leased[k]
  if touched[task] ~= nil then current, held = touched[task], false end
  local status
  if not state or not current then
    status = 'unknown'
  else
    local a, w, done = split_owner(current)
    if a ~= attempt or w ~= worker then
      status = 'not_leased'
    elseif done then
      status = 'duplicate'
    elseif state ~= 'running' then
      status = 'job_finished'
    elseif not held then
      status = 'not_leased'  -- expired and reaped, though nobody took it yet
    else
      unleased[#unleased + 1] = task
      touched[task] = current
      if outcome == 'crashed' and attempt < max_attempts then
        requeue(task)
        requeued = requeued + 1
        status = 'requeued'
      else
        touched[task] = current .. '|D'
        owner_pairs[#owner_pairs + 1] = task
        owner_pairs[#owner_pairs + 1] = current .. '|D'
        done_tasks[#done_tasks + 1] = task
        if outcome == 'ok' then
          if not reducing then
            result_pairs[#result_pairs + 1] = task
            result_pairs[#result_pairs + 1] = values[k]
            ok[#ok + 1] = task
            done_count = done_count + 1
          else
            redis.call('HSET', RESULTS, task, values[k])
            if is_merge(task) then
              -- The merge's result replaces its inputs.
              local inputs = redis.call('HGET', PAYLOAD, task)
              for input in string.gmatch(inputs, '[^,]+') do redis.call('HDEL', RESULTS, input) end
              redis.call('HINCRBY', META, 'merges_open', -1)
              redis.call('RPUSH', MERGEABLE, task)
            else
              merged[#merged + 1] = task
              done_count = done_count + 1
              redis.call('RPUSH', MERGEABLE, task)
            end
          end
        else
          if outcome == 'crashed' then
            error_json = lost_error(task, attempt, worker, cjson.decode(error_json).message)
          end
          fail_task(task, error_json, values[k])
          err[#err + 1] = task
        end
        status = 'accepted'
      end
    end
  end
  statuses[#statuses + 1] = status
end
call_sliced('ZREM', LEASES, unleased, 4000)
call_sliced('HSET', OWNER, owner_pairs, 4000)
call_sliced('HDEL', PAYLOAD, done_tasks, 4000)
call_sliced('HSET', RESULTS, result_pairs, 4000)
if done_count > 0 then redis.call('HINCRBY', META, 'done', done_count) end
if #ok > 0 or #err > 0 or #merged > 0 then
  redis.call('XADD', EVENTS, '*', 'ok', table.concat(ok, ','), 'err', table.concat(err, ','),
    'done', table.concat(merged, ','))
end
if requeued > 0 then redis.call('PUBLISH', CHANNEL, requeued) end
if #err > 0 then fail_fast_if_needed() end
finish_if_complete()
return statuses
