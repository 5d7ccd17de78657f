-- The client holds every result (and task note) up to stream id A.cursor: free them.
-- Returns the number of results freed.
local entries = redis.call('XRANGE', EVENTS, '-', A.cursor)
local fetched, failed, ids, noted = {}, {}, {}, {}
local has_notes = redis.call('EXISTS', NOTES) == 1  -- (most jobs have none: no list then)
for _, entry in ipairs(entries) do
  local fields = entry[2]
  for j = 1, #fields, 2 do
    local name, value = fields[j], fields[j + 1]
    if has_notes and (name == EV.OK or name == EV.ERROR or name == EV.MERGED) then
      for task in string.gmatch(value, '[^,]+') do noted[#noted + 1] = task end
    end
    if name == EV.OK or name == EV.ERROR then
      for task in string.gmatch(value, '[^,]+') do
        fetched[#fetched + 1] = task
        if name == EV.ERROR then failed[#failed + 1] = task end
      end
    end
  end
  ids[#ids + 1] = entry[1]
end
local freed = 0
for i = 1, #fetched, SLICE do
  freed = freed + redis.call('HDEL', RESULTS, unpack(fetched, i, math.min(i + SLICE - 1, #fetched)))
end
call_sliced('HDEL', ERRORS, failed)
call_sliced('HDEL', NOTES, noted)
call_sliced('XDEL', EVENTS, ids)
return freed
