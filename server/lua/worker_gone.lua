-- Worker A.worker's presence connection A.session ended. Fenced: if the worker has opened
-- a newer session since (it reconnected, maybe to another replica), nothing happens.
-- A.lost '0' (a clean goodbye) only closes the session. A.lost '1' (the connection dropped
-- and no reconnect came within the grace) also forgets the worker and ends every lease
-- it holds as a lease timeout would: requeued with the attempt counted, or failed past
-- max_attempts. A late report of those attempts is refused (their lease is gone).
-- A.users (',alice,bob,' or ''): the presence came with a pool token limited to those
-- users' jobs, so only their leases end and the worker is not forgotten (a token must not
-- reach, through a worker name it claims, what its lease route would refuse it).
-- Returns {1 if the session was current else 0, requeued, failed}.
local worker = A.worker
if redis.call('HGET', SESSIONS, worker) ~= A.session then return {0, 0, 0} end
redis.call('HDEL', SESSIONS, worker)
if A.lost ~= '1' then return {1, 0, 0} end
if A.users == '' then
  redis.call('HDEL', WORKERS, worker)
  redis.call('ZREM', WORKERS_SEEN, worker)
end
local requeued, failed = 0, 0
for _, job in ipairs(redis.call('ZRANGE', JOBS, 0, -1)) do
  use_job(job)
  local m = redis.call('HMGET', META, F.STATE, F.MAX_ATTEMPTS, F.USER)
  local reachable = A.users == '' or string.find(A.users, ',' .. (m[3] or '') .. ',', 1, true)
  if m[1] == STATE.RUNNING and reachable then
    local leased = redis.call('ZRANGE', LEASES, 0, -1)
    local holders = call_sliced_collect('HMGET', HOLDER, leased)
    local mine = {}
    for k, task in ipairs(leased) do
      local _, w, done = split_holder(holders[k])
      if w == worker and not done then mine[#mine + 1] = task end
    end
    local back, lost = expire_leases(mine, tonumber(m[2] or 1), WORKER_GONE_REASON)
    requeued, failed = requeued + back, failed + lost
  end
end
return {1, requeued, failed}
