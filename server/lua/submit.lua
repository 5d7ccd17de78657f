-- Add tasks to a running job (A.tasks comma-joined, A.sizes their payload lengths, A.payloads
-- concatenated). A task id seen before (queued, leased or done) is skipped, so a retried
-- batch adds nothing. A.keep: comma-joined tasks whose results stay in the store (KEPT).
-- Returns {SUBMITREPLY, added}.
local m = redis.call('HMGET', META, F.STATE, F.TOTAL, F.CREATED)
local state, sealed = m[1], m[2]
if not state then return {SUBMITREPLY.UNKNOWN, 0} end
if state ~= STATE.RUNNING then return {SUBMITREPLY.FINISHED, 0} end
local tasks, payloads = split_list(A.tasks), cut(A.payloads, A.sizes)
if not payloads or #payloads ~= #tasks then
  return redis.error_reply('submit: packed argument lengths differ')
end
-- Done tasks are in HOLDER only; queued and leased ones are in PAYLOAD.
local holders = call_sliced_collect('HMGET', HOLDER, tasks)
local queued = call_sliced_collect('HMGET', PAYLOAD, tasks)
local locs = nil  -- (kept in step with tasks: a task without a key has '')
if A.localities ~= '' then
  locs = {}
  for key in string.gmatch(A.localities .. ',', '([^,]*),') do locs[#locs + 1] = key end
end
local keep = {}
for task in string.gmatch(A.keep, '[^,]+') do keep[task] = true end
local fresh, pairs_, placed, kept = {}, {}, {}, {}
for k, task in ipairs(tasks) do
  if not holders[k] and not queued[k] then
    if sealed then return {SUBMITREPLY.SEALED, 0} end
    fresh[#fresh + 1] = task
    if keep[task] then kept[#kept + 1] = task end
    pairs_[#pairs_ + 1] = task
    pairs_[#pairs_ + 1] = payloads[k]
    if locs and locs[k] and locs[k] ~= '' then
      placed[#placed + 1] = task
      placed[#placed + 1] = locs[k]
    end
  end
end
redis.call('HSET', META, F.TOUCHED, now_ms())
if #fresh > 0 then
  call_sliced('HSET', PAYLOAD, pairs_)
  call_sliced('SADD', KEPT, kept)
  if #placed > 0 then
    call_sliced('HSET', LOCALITY, placed)
    redis.call('HSET', META, F.LOCAL, '1')
  end
  call_sliced('RPUSH', QUEUE, fresh)
  redis.call('HINCRBY', META, F.SUBMITTED, #fresh)
  mark_ready()
  redis.call('PUBLISH', CHANNEL, #fresh)
end
return {SUBMITREPLY.OK, #fresh}
