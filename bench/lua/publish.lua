-- wrk script: POST one message of a given size to the URL's channel on every request.
-- Arguments (after --): message size in bytes [1024], sender [bench-publisher],
-- bearer token [none].

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "report.lua")

function init(args)
  local size = tonumber(args[1]) or 1024
  local sender = args[2] or "bench-publisher"
  local text = string.sub(string.rep("agent status update: all systems nominal. ", size), 1, size)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  if args[3] then
    wrk.headers["Authorization"] = "Bearer " .. args[3]
  end
  wrk.body = '{"sender": "' .. sender .. '", "message": "' .. text .. '"}'
end
