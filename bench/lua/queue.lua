-- wrk script: each thread is one worker agent with one connection: it takes a task of the
-- URL's channel, then marks it done with a short reply, and again. Run with as many
-- threads as connections (-tN -cN). Arguments (after --): lease seconds [60].

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "report.lua")

local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("number", threads)
end

local channel, take_body, holding

function init(args)
  local lease = tonumber(args[1]) or 60
  channel = wrk.path:match("^/queue/([^/?]+)")
  take_body = '{"lease": ' .. lease .. '}'
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["X-Agent-ID"] = "bench-worker-" .. number
end

function request()
  if holding then
    local path = "/messages/" .. channel .. "/" .. holding .. "/done"
    return wrk.format("POST", path, nil, '{"message": "done ' .. holding .. '"}')
  end
  return wrk.format("POST", "/queue/" .. channel .. "/take", nil, take_body)
end

function response(status, headers, body)
  if holding then
    holding = nil  -- done, or refused: take the next either way (refusals count as errors)
  elseif status == 200 then
    holding = body:match('"id":(%d+)')
  end
end
