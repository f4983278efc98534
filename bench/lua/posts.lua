-- wrk script: POST a body made on each request of a template and the next of a list of
-- (ts, sig) pairs, each pair used once (bench/signing.py: the broker takes a signature
-- for one post only). Arguments (after --): the file, wrk's thread count [1].
-- The file: the body's text before ts, between ts and sig, after sig (three lines), then
-- one line "ts sig" per post. An unsigned body: its text, two empty lines, one line " ".
-- Thread k of n takes pairs k+1, k+1+n, ...; past its last it starts over (repeats, which
-- the broker refuses: the scenario writes more pairs than a run can post).

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "report.lua")

local threads_seen = 0

function setup(thread)
  thread:set("id", threads_seen)
  threads_seen = threads_seen + 1
end

local prefix, middle, suffix
local stamps, sigs = {}, {}
local first, step, next_pair

function init(args)
  local file = assert(io.open(args[1], "rb"), "posts.lua: cannot open " .. tostring(args[1]))
  local lines = file:lines()
  prefix, middle, suffix = lines(), lines(), lines()
  for line in lines do
    local ts, sig = line:match("^(%S*) (%S*)$")
    table.insert(stamps, ts)
    table.insert(sigs, sig)
  end
  file:close()
  step = tonumber(args[2]) or 1
  first = (id or 0) % #stamps + 1
  next_pair = first
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  if next_pair > #stamps then
    next_pair = first
  end
  local i = next_pair
  next_pair = next_pair + step
  return wrk.format(nil, nil, nil, prefix .. stamps[i] .. middle .. sigs[i] .. suffix)
end
