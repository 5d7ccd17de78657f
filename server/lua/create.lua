-- Create a job (idempotent: the client chooses the id and may retry).
-- ARGV[4] function sha, ARGV[5] max_attempts, ARGV[6] fail_fast (0/1), ARGV[7] label,
-- ARGV[8] owner (the user, once tokens exist), ARGV[9] reducer sha ('' for none), ARGV[10] fanin.
-- Returns {'created'|'exists'|'conflict', state}.
local existing = redis.call('HMGET', META, 'function', 'state')
if existing[1] then
  if existing[1] ~= ARGV[4] then return {'conflict', existing[2]} end
  return {'exists', existing[2]}
end
local created = now_ms()
redis.call('HSET', META, 'state', 'running', 'function', ARGV[4], 'max_attempts', ARGV[5],
  'fail_fast', ARGV[6], 'label', ARGV[7], 'owner', ARGV[8], 'created', created,
  'submitted', 0, 'done', 0, 'failed', 0, 'reducer', ARGV[9], 'fanin', ARGV[10],
  'merges', 0, 'merges_open', 0)
redis.call('ZADD', JOBS, created, JOB)
return {'created', 'running'}
