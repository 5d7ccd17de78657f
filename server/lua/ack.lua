-- The client holds every result up to stream id ARGV[4]: free them.
-- Returns the number of results freed.
local entries = redis.call('XRANGE', EVENTS, '-', ARGV[4])
local freed = 0
for _, entry in ipairs(entries) do
  local fields = entry[2]
  for j = 1, #fields, 2 do
    if (fields[j] == 'ok' or fields[j] == 'err') and fields[j + 1] ~= '' then
      for task in string.gmatch(fields[j + 1], '[^,]+') do
        freed = freed + redis.call('HDEL', RESULTS, task)
        redis.call('HDEL', ERRORS, task)
      end
    end
  end
  redis.call('XDEL', EVENTS, entry[1])
end
return freed
