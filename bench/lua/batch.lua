-- wrk script: POST a batch of messages (a JSON array) to the URL's channel on every request.
-- Arguments (after --): messages per batch [100], bytes per message [256], sender [bench-batch].

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "report.lua")

function init(args)
  local count = tonumber(args[1]) or 100
  local size = tonumber(args[2]) or 256
  local sender = args[3] or "bench-batch"
  local text = string.sub(string.rep("agent status update: all systems nominal. ", size), 1, size)
  local item = '{"sender": "' .. sender .. '", "message": "' .. text .. '"}'
  local items = {}
  for i = 1, count do
    items[i] = item
  end
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.body = "[" .. table.concat(items, ", ") .. "]"
end
