-- Report finished tasks of worker ARGV[4]. ARGV[5..]: groups of
--   task, attempt, outcome ('ok'|'error'|'crashed'), error JSON ('' for ok), result bytes
-- Returns one status per task (see protocol.CompleteStatus).
local worker = ARGV[4]
local state = redis.call('HGET', META, 'state')
local max_attempts = tonumber(redis.call('HGET', META, 'max_attempts') or 1)
local reducing = (redis.call('HGET', META, 'reducer') or '') ~= ''
local statuses, ok, err, merged = {}, {}, {}, {}
local done_count, requeued = 0, 0
for i = 5, #ARGV, 5 do
  local task, attempt, outcome = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  local current = redis.call('HGET', OWNER, task)
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
    elseif redis.call('ZREM', LEASES, task) == 0 then
      status = 'not_leased'  -- expired and reaped, though nobody took it yet
    else
      if outcome == 'crashed' and attempt < max_attempts then
        requeue(task)
        requeued = requeued + 1
        status = 'requeued'
      else
        redis.call('HSET', OWNER, task, current .. '|D')
        local inputs = redis.call('HGET', PAYLOAD, task)
        redis.call('HDEL', PAYLOAD, task)
        if outcome == 'ok' then
          redis.call('HSET', RESULTS, task, ARGV[i + 4])
          if not reducing then
            ok[#ok + 1] = task
            done_count = done_count + 1
          elseif is_merge(task) then
            -- The merge's result replaces its inputs.
            for input in string.gmatch(inputs, '[^,]+') do redis.call('HDEL', RESULTS, input) end
            redis.call('HINCRBY', META, 'merges_open', -1)
            redis.call('RPUSH', MERGEABLE, task)
          else
            merged[#merged + 1] = task
            done_count = done_count + 1
            redis.call('RPUSH', MERGEABLE, task)
          end
        else
          local error_json = ARGV[i + 3]
          if outcome == 'crashed' then
            error_json = lost_error(task, attempt, worker, cjson.decode(error_json).message)
          end
          fail_task(task, error_json, ARGV[i + 4])
          err[#err + 1] = task
        end
        status = 'accepted'
      end
    end
  end
  statuses[#statuses + 1] = status
end
if done_count > 0 then redis.call('HINCRBY', META, 'done', done_count) end
if #ok > 0 or #err > 0 or #merged > 0 then
  redis.call('XADD', EVENTS, '*', 'ok', table.concat(ok, ','), 'err', table.concat(err, ','),
    'done', table.concat(merged, ','))
end
if requeued > 0 then redis.call('PUBLISH', CHANNEL, requeued) end
if #err > 0 then fail_fast_if_needed() end
finish_if_complete()
return statuses
