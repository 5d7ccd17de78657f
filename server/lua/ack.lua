-- The client holds every result up to stream id ARGV[4]: free them.
-- Returns the number of results freed.
local entries = redis.call('XRANGE', EVENTS, '-', ARGV[4])
local freed = 0
local ok, err, ids = {}, {}, {}
for _, entry in ipairs(entries) do
  local fields = entry[2]
  for j = 1, #fields, 2 do
    local name, value = fields[j], fields[j + 1]
    if (name == 'ok' or name == 'err') and value ~= '' then
      local into = name == 'ok' and ok or err
      for task in string.gmatch(value, '[^,]+') do into[#into + 1] = task end
    end
  end
  ids[#ids + 1] = entry[1]
end
for i = 1, #ok, 4000 do
  freed = freed + redis.call('HDEL', RESULTS, unpack(ok, i, math.min(i + 3999, #ok)))
end
for i = 1, #err, 4000 do
  local slice = {unpack(err, i, math.min(i + 3999, #err))}
  freed = freed + redis.call('HDEL', RESULTS, unpack(slice))
  redis.call('HDEL', ERRORS, unpack(slice))
end
call_sliced('XDEL', EVENTS, ids, 4000)
return freed
