-- Report finished tasks of worker A.worker, packed: A.tasks (comma-joined), A.attempts
-- (comma-joined), A.outcomes (one OUTCOME letter each), A.sizes (comma-joined) and A.values
-- (the results concatenated), A.notes/A.note_sizes (each task's JSON TaskNote, '' for none)
-- and A.outputs/A.output_sizes (each task's JSON LogLine of its output, '' for none), packed
-- the same way (sizes '' when every one is ''), and A.spent ('wall:cpu:rss' of each task,
-- comma-joined, '-:-:-' where unknown, '' when all are: the duration histogram and the
-- job's totals count every attempt they take; a job that keeps resources gets a note of
-- them for each task sent without one); ARGV[REST..]: the error JSON of each task not
-- 'ok', in order. Notes and output lines are kept only for the reports accepted (or
-- requeued) here.
-- Returns one STATUS per task. Everything is read and judged first, then written in bulk.
local worker = A.worker
local m = redis.call('HMGET', META, F.STATE, F.MAX_ATTEMPTS, F.REDUCER_BLOB, F.RESOURCES,
  F.RSS_MAX, F.LOCAL)
local state = m[1]
local max_attempts = tonumber(m[2] or 1)
local reducing = (m[3] or '') ~= ''
local keep_resources = m[4] == '1'
local rss_max = tonumber(m[5] or 0)
local tasks, attempts, codes = split_list(A.tasks), split_list(A.attempts), A.outcomes
local values = cut(A.values, A.sizes)
-- (Most batches carry no notes and no output: nothing to cut then, per task.)
local notes, outputs = true, true  -- true: every one is ''; nil: the sizes do not add up
if A.note_sizes ~= '' or A.notes ~= '' then notes = cut(A.notes, A.note_sizes) end
if A.output_sizes ~= '' or A.outputs ~= '' then outputs = cut(A.outputs, A.output_sizes) end
-- Each task's wall, CPU and peak RSS as sent (strings: valid JSON numbers), and the wall
-- as a number (nil where unknown): parsed only when needed (tonumber is costly per task).
local walls, s_wall, s_cpu, s_rss = nil, {}, {}, {}
local function parse_spent()
  walls = {}
  local k = 0
  for w, c, r in string.gmatch(A.spent, '([^:,]*):([^:,]*):([^:,]*)') do
    k = k + 1
    local wall = tonumber(w)
    if wall and tonumber(c) and tonumber(r) then
      walls[k], s_wall[k], s_cpu[k], s_rss[k] = wall, w, c, r
    end
  end
end
if keep_resources then parse_spent() end
if not values or not notes or not outputs or (notes ~= true and #notes ~= #tasks)
  or (outputs ~= true and #outputs ~= #tasks)
  or #attempts ~= #tasks or #codes ~= #tasks or #values ~= #tasks then
  return redis.error_reply('complete: packed argument lengths differ')
end
local holders, leased = {}, {}
if state then holders = call_sliced_collect('HMGET', HOLDER, tasks) end
if state == STATE.RUNNING then leased = call_sliced_collect('ZMSCORE', LEASES, tasks) end
-- Tasks submitted with 'keep': their results stay for other tasks, listed as merged (the
-- client fetches nothing of them).
local kept = {}
if state == STATE.RUNNING and not reducing and redis.call('EXISTS', KEPT) == 1 then
  kept = call_sliced_collect('SMISMEMBER', KEPT, tasks)
end
local n_kept, kept_bytes = 0, 0


local statuses = {}
local unleased, requeued, holder_pairs, done_tasks, result_pairs = {}, {}, {}, {}, {}
local ok, merged, mergeable, merges, failures = {}, {}, {}, {}, {}
local note_pairs, log_lines = {}, {}
local touched = {}  -- task -> holder value after this batch (a task twice in one batch)
local n_dup, n_refused, n_crashed = 0, 0, 0
local n_untimed = 0  -- reports neither accepted nor requeued: not in the histogram
local next_error = REST
for k, task in ipairs(tasks) do
  local attempt, outcome = tonumber(attempts[k]), OUTCOME[string.sub(codes, k, k)]
  local error_json = ''
  if outcome ~= 'ok' then
    error_json = ARGV[next_error] or '{}'
    next_error = next_error + 1
  end
  local current, held = holders[k], leased[k]
  if touched[task] ~= nil then current, held = touched[task], false end
  local status
  if not state or not current then
    status = STATUS.UNKNOWN
  else
    -- (The common case, this attempt held and not yet reported, needs no pattern match.)
    local a, w, done = attempt, worker, false
    if current ~= attempts[k] .. '|' .. worker then a, w, done = split_holder(current) end
    if a ~= attempt or w ~= worker then
      status = STATUS.NOT_LEASED
    elseif done then
      status = STATUS.DUPLICATE
    elseif state ~= STATE.RUNNING then
      status = STATUS.JOB_FINISHED
    elseif not held then
      status = STATUS.NOT_LEASED  -- expired and reaped, though nobody took it yet
    else
      unleased[#unleased + 1] = task
      touched[task] = current
      local note = notes ~= true and notes[k] or ''
      if note == '' and keep_resources and walls[k] then  -- (parsed above)
        note = '{"worker":"' .. worker .. '","wall":' .. s_wall[k] .. ',"cpu":' .. s_cpu[k]
          .. ',"max_rss":' .. s_rss[k] .. '}'
      end
      if note ~= '' then
        note_pairs[#note_pairs + 1] = task
        note_pairs[#note_pairs + 1] = note
      end
      if outputs ~= true and outputs[k] ~= '' then log_lines[#log_lines + 1] = outputs[k] end
      if outcome == 'crashed' then n_crashed = n_crashed + 1 end
      if outcome == 'crashed' and attempt < max_attempts then
        requeued[#requeued + 1] = task
        status = STATUS.REQUEUED
      else
        touched[task] = current .. '|D'
        holder_pairs[#holder_pairs + 1] = task
        holder_pairs[#holder_pairs + 1] = current .. '|D'
        done_tasks[#done_tasks + 1] = task
        if outcome == 'ok' then
          result_pairs[#result_pairs + 1] = task
          result_pairs[#result_pairs + 1] = values[k]
          if kept[k] == 1 then
            merged[#merged + 1] = task
            n_kept, kept_bytes = n_kept + 1, kept_bytes + #values[k]
          elseif not reducing then
            ok[#ok + 1] = task
          else
            mergeable[#mergeable + 1] = task
            if is_merge(task) then merges[#merges + 1] = task else merged[#merged + 1] = task end
          end
        else
          if outcome == 'crashed' then
            local decoded, doc = pcall(cjson.decode, error_json)
            local why = decoded and type(doc) == 'table' and doc.message or 'crashed'
            error_json = lost_error(task, attempt, worker, tostring(why))
          end
          failures[#failures + 1] = {task, error_json, values[k]}
        end
        status = STATUS.ACCEPTED
      end
    end
  end
  if status ~= STATUS.ACCEPTED and status ~= STATUS.REQUEUED then n_untimed = n_untimed + 1 end
  if status == STATUS.DUPLICATE then n_dup = n_dup + 1 end
  if status == STATUS.UNKNOWN or status == STATUS.NOT_LEASED then n_refused = n_refused + 1 end
  statuses[#statuses + 1] = status
end
-- The histogram and the job's totals: the batch's, as scripts.py summed them (A.spent_sums:
-- 'count:wall s:CPU s:peak RSS' then ':bucket=n' each), when every report counts; else
-- summed here over those that do.
local buckets, n_timed, sum_wall, sum_cpu, new_rss_max = {}, 0, 0, 0, rss_max
if n_untimed == 0 and A.spent_sums ~= '' then
  local n, w, c, r, rest = string.match(A.spent_sums, '^(%d+):([^:]+):([^:]+):(%d+)(.*)$')
  n_timed, sum_wall, sum_cpu = tonumber(n), tonumber(w), tonumber(c)
  new_rss_max = math.max(new_rss_max, tonumber(r))
  for b, count in string.gmatch(rest, ':(%d+)=(%d+)') do buckets[tonumber(b)] = tonumber(count) end
elseif A.spent_sums ~= '' then
  if not walls then parse_spent() end
  for k = 1, #statuses do
    local wall, status = walls[k], statuses[k]
    if wall and (status == STATUS.ACCEPTED or status == STATUS.REQUEUED) then
      local i = 1
      while DURATION_BUCKETS[i] and wall > DURATION_BUCKETS[i] do i = i + 1 end
      buckets[i] = (buckets[i] or 0) + 1
      n_timed = n_timed + 1
      sum_wall = sum_wall + wall
      sum_cpu = sum_cpu + tonumber(s_cpu[k])
      new_rss_max = math.max(new_rss_max, tonumber(s_rss[k]))
    end
  end
end
local sum_us = math.floor(sum_wall * 1000000 + 0.5)
local cpu_us = math.floor(sum_cpu * 1000000 + 0.5)

-- A merge's result replaces its inputs: read their names before anything is written.
local consumed = {}
if #merges > 0 then
  for _, inputs in ipairs(call_sliced_collect('HMGET', PAYLOAD, merges)) do
    if inputs then
      for input in string.gmatch(inputs, '[^,]+') do consumed[#consumed + 1] = input end
    end
  end
end

-- Writes.
call_sliced('ZREM', LEASES, unleased)
call_sliced('HSET', HOLDER, holder_pairs)
call_sliced('HDEL', PAYLOAD, done_tasks)
if m[6] == '1' then call_sliced('HDEL', LOCALITY, done_tasks) end  -- (a done task's key)
call_sliced('HSET', RESULTS, result_pairs)
call_sliced('HDEL', RESULTS, consumed)
call_sliced('RPUSH', MERGEABLE, mergeable)
call_sliced('HSET', NOTES, note_pairs)  -- before the event: a client that sees it finds them
if #log_lines > 0 then
  call_sliced('RPUSH', LOGS, log_lines)
  redis.call('LTRIM', LOGS, -JOB_LOG_LINES, -1)
end
if #requeued > 0 then
  call_sliced('LPUSH', QUEUE, requeued)  -- front: a retry should not wait behind the backlog
  mark_ready()
  redis.call('PUBLISH', CHANNEL, #requeued)
end
if #merges > 0 then redis.call('HINCRBY', META, F.MERGES_OPEN, -#merges) end
if #requeued > 0 then redis.call('HINCRBY', META, F.REQUEUED, #requeued) end
if n_crashed > 0 then redis.call('HINCRBY', META, F.CRASHED, n_crashed) end
local n_done = #ok + #merged
if n_done > 0 then redis.call('HINCRBY', META, F.DONE, n_done) end
local err = {}
for _, f in ipairs(failures) do
  fail_task(f[1], f[2], f[3])
  err[#err + 1] = f[1]
end
count(COUNT.TASKS_OK, n_done)
count(COUNT.MERGES_OK, #merges)
count(COUNT.KEPT, n_kept)
count(COUNT.KEPT_BYTES, kept_bytes)
count(COUNT.REQUEUED, #requeued)
count(COUNT.DUPLICATES, n_dup)
count(COUNT.REFUSED, n_refused)
if n_timed > 0 then
  for i, n in pairs(buckets) do redis.call('HINCRBY', DURATIONS, i, n) end
  redis.call('HINCRBY', DURATIONS, 'count', n_timed)
  redis.call('HINCRBY', DURATIONS, 'sum_us', sum_us)
  redis.call('HINCRBY', META, F.WALL_US, sum_us)
  redis.call('HINCRBY', META, F.TIMED, n_timed)  -- the job's mean: fair share's cost
  redis.call('HINCRBY', META, F.CPU_US, cpu_us)
  if new_rss_max > rss_max then redis.call('HSET', META, F.RSS_MAX, new_rss_max) end
end
if #ok > 0 or #err > 0 or #merged > 0 then
  redis.call('XADD', EVENTS, '*', EV.OK, table.concat(ok, ','), EV.ERROR, table.concat(err, ','),
    EV.MERGED, table.concat(merged, ','))
end
if #err > 0 then fail_fast_if_needed() end
finish_if_complete()
return statuses
