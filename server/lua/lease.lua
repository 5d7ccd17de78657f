-- Lease up to A.max queued tasks to worker A.worker for A.lease_ms, choosing among the
-- ready jobs of up to A.scan groups by fair share (store-wide: one atomic pick-and-lease).
-- Returns {job, function_blob, reducer_blob, n, task1, attempt1, payload1, ..., job2, ...}.
-- A merge task's payload is its inputs' results, each prefixed by its length (u32, big end).
-- A.users: ',alice,bob,' for a worker that takes only those users' jobs, '' for any job.
--
-- Fair share (stride scheduling): each group (the job's user; in open mode its share
-- label) has a pass, the worker time leased to it divided by its weight. The group with
-- the lowest pass is served first; within a group, higher priority first, then the older
-- job. Worker time of a leased task is its job's mean reported wall time (before any
-- report: the store-wide mean; before any at all: 1 ms). A group that had no work comes
-- back at the lowest pass of those that had (PASS_FLOOR): it neither lost its turn nor
-- saved up credit while idle.

-- Locality: in a job whose tasks carry locality keys (the file a chunk reads), a worker
-- is given, among the first LOCALITY_WINDOW queued tasks: those without a key (merges)
-- first, then those of the key it last leased, then those of the key no other worker
-- holds with the most tasks, then the rest in queue order (so nothing starves). Returns
-- the tasks, the others of the window up to the last task taken, in order (they go back
-- to the front), and how many the queue's head gives up for it.
local LOCALITY_WINDOW = 256
local READY_RESYNC = 4096  -- READY's oldest jobs put back in RANKED at most, per lease

local function pick_local(max)
  local window = redis.call('LRANGE', QUEUE, 0, LOCALITY_WINDOW - 1)
  if #window == 0 then return {}, {}, 0 end
  local keys = call_sliced_collect('HMGET', LOCALITY, window)
  local taken, tasks = {}, {}
  local function take(i)
    if not taken[i] and #tasks < max then
      taken[i] = true
      tasks[#tasks + 1] = window[i]
    end
  end
  for i = 1, #window do
    if not keys[i] then take(i) end
  end
  local mine = redis.call('HGET', CLAIMS, 'w:' .. A.worker)
  if mine then
    for i = 1, #window do
      if keys[i] == mine then take(i) end
    end
  end
  if #tasks < max then
    local counts, names = {}, {}
    for i = 1, #window do
      local k = keys[i]
      if k and not taken[i] then
        if not counts[k] then
          counts[k] = 0
          names[#names + 1] = k
        end
        counts[k] = counts[k] + 1
      end
    end
    local fields = {}
    for i, k in ipairs(names) do fields[i] = 'k:' .. k end
    local holders = call_sliced_collect('HMGET', CLAIMS, fields)
    local free = {}
    for i, k in ipairs(names) do
      if not holders[i] or holders[i] == A.worker then free[#free + 1] = k end
    end
    table.sort(free, function(a, b) return counts[a] > counts[b] end)
    for _, k in ipairs(free) do
      if #tasks >= max then break end
      for i = 1, #window do
        if keys[i] == k then take(i) end
      end
    end
  end
  for i = 1, #window do take(i) end
  -- Only the queue's head up to the last task taken is popped: what it held besides the
  -- tasks goes back (a lease of the head's chunks moves nothing else).
  local last = 0
  for i = 1, #window do
    if taken[i] then last = i end
  end
  local rest = {}
  for i = last, 1, -1 do  -- reversed: LPUSH puts them back in their order
    if not taken[i] then rest[#rest + 1] = window[i] end
  end
  return tasks, rest, last
end

-- The job leaves the ready indices: `member` is its entry in RANKED (named as found
-- there, not rebuilt from its meta: a job whose keys are gone leaves all the same).
local function not_ready(member)
  redis.call('ZREM', READY, JOB)
  redis.call('ZREM', RANKED, member)
end

-- Lease from the job use_job() points at; appends its block to `out`, returns the count.
local function lease_job(max, out, member)
  local m = redis.call('HMGET', META, F.STATE, F.FUNCTION_BLOB, F.REDUCER_BLOB, F.LOCAL)
  if m[1] ~= STATE.RUNNING then
    not_ready(member)
    return 0
  end
  local tasks, rest, popped
  if m[4] == '1' then
    tasks, rest, popped = pick_local(max)
  else
    tasks = redis.call('LRANGE', QUEUE, 0, max - 1)
    rest, popped = {}, #tasks
  end
  if #tasks == 0 then
    not_ready(member)
    return 0
  end
  -- Read everything first.
  local previous = call_sliced_collect('HMGET', HOLDER, tasks)
  local payloads = call_sliced_collect('HMGET', PAYLOAD, tasks)
  -- The block goes straight into `out` (header first, its count filled in below): a copy
  -- per task costs as much as the rest of the loop.
  local head = #out
  out[head + 1] = JOB
  out[head + 2] = m[2]
  out[head + 3] = m[3] or ''
  out[head + 4] = 0
  local at = head + 4
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
    out[at + 1] = task
    out[at + 2] = (split_holder(previous[i]) or 0) + 1
    out[at + 3] = payload
    at = at + 3
  end
  if broken then
    for i = #out, head + 1, -1 do out[i] = nil end
    fail_task(broken, cjson.encode({type = 'coffea_hq.errors.StoreLostData',
      message = 'task ' .. broken .. ' lost its inputs in the store (evicted or deleted keys?)',
      traceback = ''}), '')
    redis.call('HSET', META, F.FATAL, broken)
    finish(STATE.FAILED, 'the store lost data of task ' .. broken)
    return 0
  end
  -- Then write.
  redis.call('LTRIM', QUEUE, popped, -1)
  call_sliced('LPUSH', QUEUE, rest)
  if m[4] == '1' then
    local keys = call_sliced_collect('HMGET', LOCALITY, tasks)
    local claims, counts, top = {}, {}, nil  -- top: the key it got most of, its next
    for i = 1, #tasks do
      local k = keys[i]
      if k then
        if not counts[k] then
          counts[k] = 0
          claims[#claims + 1] = 'k:' .. k
          claims[#claims + 1] = A.worker
        end
        counts[k] = counts[k] + 1
        if not top or counts[k] > counts[top] then top = k end
      end
    end
    if top then
      claims[#claims + 1] = 'w:' .. A.worker
      claims[#claims + 1] = top
      call_sliced('HSET', CLAIMS, claims)
    end
  end
  local deadline = now_ms() + tonumber(A.lease_ms)
  local zargs, hargs = {}, {}
  local suffix = '|' .. A.worker
  local j = 0
  for i = head + 5, at, 3 do
    j = j + 2
    zargs[j - 1] = deadline
    zargs[j] = out[i]
    hargs[j - 1] = out[i]
    hargs[j] = out[i + 1] .. suffix
  end
  call_sliced('ZADD', LEASES, zargs)
  call_sliced('HSET', HOLDER, hargs)
  if redis.call('LLEN', QUEUE) == 0 then not_ready(member) end
  out[head + 4] = #tasks
  return #tasks
end

-- Seconds of worker time one task of the current job is taken to cost.
local function task_cost(timed, wall_us)
  timed, wall_us = tonumber(timed or 0) or 0, tonumber(wall_us or 0) or 0
  if timed > 0 then return math.max(wall_us / timed / 1e6, 1e-6) end
  local d = redis.call('HMGET', DURATIONS, 'count', 'sum_us')
  local n, us = tonumber(d[1] or 0) or 0, tonumber(d[2] or 0) or 0
  if n > 0 then return math.max(us / n / 1e6, 1e-6) end
  return 1e-3  -- nothing known yet: nearly free (overcharging would last; this cannot)
end

-- A RANKED member's group, job and creation time (see common.lua's ranked_member).
local function parse_member(member)
  local at = string.find(member, NUL, 1, true)
  return string.sub(member, 1, at - 1), string.sub(member, at + 1 + RANK_LEN),
    tonumber(string.sub(member, at + 1 + RANK_WIDTH, at + RANK_LEN))
end

-- The best ready job of `group` after member `after` (nil: its best of all).
local function next_of(group, after)
  local low = after and ('(' .. after) or ('[' .. group .. NUL)
  return redis.call('ZRANGEBYLEX', RANKED, low, '(' .. group .. '\1', 'LIMIT', 0, 1)[1]
end

-- RANKED has what READY has, unless a server of an older version (which knew READY
-- alone) wrote meanwhile, during a rolling upgrade: then READY's jobs are put in again
-- (idempotent; a member READY lacks leaves as soon as its job is leased from).
if redis.call('ZCARD', READY) ~= redis.call('ZCARD', RANKED) then
  for _, job in ipairs(redis.call('ZRANGE', READY, 0, READY_RESYNC - 1)) do
    use_job(job)
    redis.call('ZADD', RANKED, 0, (ranked_member()))
  end
end

-- The groups with ready jobs: every one (up to A.scan) for an unrestricted worker, one
-- lookup each (a group with thousands of ready jobs costs no more than one with one);
-- a restricted worker looks up its users' groups directly.
local groups = {}
local function add_group(member)
  local name, _, created = parse_member(member)
  groups[#groups + 1] = {name = name, member = member, first = created}
  return name
end
local restricted = A.users ~= ''
if not restricted then
  local low = '-'
  while #groups < tonumber(A.scan) do
    local member = redis.call('ZRANGEBYLEX', RANKED, low, '+', 'LIMIT', 0, 1)[1]
    if not member then break end
    low = '[' .. add_group(member) .. '\1'  -- past every member of that group
  end
else
  for _, user in ipairs(split_list(A.users)) do
    if #groups >= tonumber(A.scan) then break end
    local member = next_of(user, nil)
    if member then add_group(member) end
  end
end
if #groups == 0 then return {} end

local names = {}
for i, g in ipairs(groups) do names[i] = g.name end
local passes = redis.call('HMGET', PASSES, PASS_FLOOR, unpack(names))
local weights = redis.call('HMGET', SHARES, unpack(names))
local floor = tonumber(passes[1] or 0) or 0
for i, g in ipairs(groups) do
  g.pass = math.max(tonumber(passes[i + 1] or 0) or 0, floor)
  local w = tonumber(weights[i] or 1) or 1
  g.weight = w > 0 and w or 1
end

-- Serve the lowest pass a quantum at a time (a big lease is shared between groups too);
-- within a group its jobs in RANKED order (higher priority first, then the older job).
local seen = {}
for i, g in ipairs(groups) do seen[i] = g end
local out, left = {}, tonumber(A.max)
local quantum = math.max(1, math.ceil(left / 8))
while left > 0 and #groups > 0 do
  local best = 1
  for i = 2, #groups do
    local g, b = groups[i], groups[best]
    if g.pass < b.pass or (g.pass == b.pass and g.first < b.first) then best = i end
  end
  local g = groups[best]
  local want = #groups > 1 and math.min(left, quantum) or left
  local n, spent = 0, 0
  while n < want and g.member do
    local member = g.member
    local _, job = parse_member(member)
    use_job(job)
    local m = redis.call('HMGET', META, F.USER, F.TIMED, F.WALL_US)
    local ask = want - n
    local got = 0
    -- (A restricted worker's group may hold an open-mode job labelled with its name.)
    if not restricted or (m[1] or '') == g.name then got = lease_job(ask, out, member) end
    if got < ask then g.member = next_of(g.name, member) end  -- nothing more queued there
    n = n + got
    spent = spent + got * task_cost(m[2], m[3])
  end
  if spent > 0 then
    g.pass = g.pass + spent / g.weight
    redis.call('HSET', PASSES, g.name, g.pass)
  end
  left = left - n
  if not g.member then table.remove(groups, best) end
end
-- The floor: the lowest pass of the groups with work after this lease. A restricted
-- worker saw only its users' groups: it looks up the others' (else, where only pool
-- workers serve, the floor never moved and a user idle for a day came back owed a day).
local lowest = nil
for _, g in ipairs(seen) do lowest = math.min(lowest or g.pass, g.pass) end
if restricted and lowest then
  local mine, others, low = {}, {}, '-'
  for _, g in ipairs(seen) do mine[g.name] = true end
  for _ = 1, tonumber(A.scan) do
    local member = redis.call('ZRANGEBYLEX', RANKED, low, '+', 'LIMIT', 0, 1)[1]
    if not member then break end
    local name = parse_member(member)
    if not mine[name] then others[#others + 1] = name end
    low = '[' .. name .. '\1'
  end
  if #others > 0 then
    for _, p in ipairs(redis.call('HMGET', PASSES, unpack(others))) do
      lowest = math.min(lowest, math.max(tonumber(p or 0) or 0, floor))
    end
  end
end
if lowest and lowest > floor then redis.call('HSET', PASSES, PASS_FLOOR, lowest) end
return out
