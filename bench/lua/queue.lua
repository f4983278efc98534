-- wrk script: each thread is one worker agent with one connection, looping as
-- `agent-chat work` does: it takes a task of the URL's channel, then marks it done with a
-- short reply and takes the next in the same request ("next"), and again. Run with as
-- many threads as connections (-tN -cN). Arguments (after --): lease seconds [60].

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "report.lua")

local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("number", threads)
end

local channel, take_body, next_part, holding

function init(args)
  local lease = tonumber(args[1]) or 60
  channel = wrk.path:match("^/queue/([^/?]+)")
  take_body = '{"lease": ' .. lease .. '}'
  next_part = '"next": ' .. take_body
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["X-Agent-ID"] = "bench-worker-" .. number
end

function request()
  if holding then
    local path = "/messages/" .. channel .. "/" .. holding .. "/done"
    return wrk.format("POST", path, nil, '{"message": "done ' .. holding .. '", ' .. next_part .. '}')
  end
  return wrk.format("POST", "/queue/" .. channel .. "/take", nil, take_body)
end

function response(status, headers, body)
  if holding then
    -- done: the next task, if one was there; refused (an error): take one afresh
    holding = status == 200 and body:match('"next":{"status":"success","id":(%d+)') or nil
  elseif status == 200 then
    holding = body:match('"id":(%d+)')
  end
end
