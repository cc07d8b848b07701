-- wrk script for the SkiDataAPI 2.0 routes with random parameters in the standard ranges
-- (resortID 1-10, dayID 1-3, skierID 1-SKIERS, liftID 1-40, time 1-360).
-- Usage: wrk -s bench/wrk/api.lua URL -- ENDPOINT [SEASON] [SKIERS]
--   ENDPOINT: post | skier-day | resort-day | vertical
-- The same script drives liftlog and the bare actix-web ceiling.

local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
end

local endpoint, season, skiers

function init(args)
  endpoint = args[1] or "resort-day"
  season = args[2] or "2025"
  skiers = tonumber(args[3] or "100000")
  math.randomseed(os.time() * 1000 + (tid or 0))
  wrk.headers["Content-Type"] = "application/json"
end

local random, format = math.random, string.format

function request()
  local r, d, k = random(1, 10), random(1, 3), random(1, skiers)
  if endpoint == "post" then
    local body = format('{"time":%d,"liftID":%d}', random(1, 360), random(1, 40))
    return wrk.format("POST", format("/skiers/%d/seasons/%s/days/%d/skiers/%d", r, season, d, k), nil, body)
  elseif endpoint == "skier-day" then
    return wrk.format("GET", format("/skiers/%d/seasons/%s/days/%d/skiers/%d", r, season, d, k))
  elseif endpoint == "vertical" then
    return wrk.format("GET", format("/skiers/%d/vertical?resort=%d&season=%s", k, r, season))
  else
    return wrk.format("GET", format("/resorts/%d/seasons/%s/day/%d/skiers", r, season, d))
  end
end

-- One JSON line at the end for scripts/bench.sh (latencies in ms; errors.status counts
-- answers that are not 2xx/3xx, e.g. the 404 "Data not found" of a skier without rides).
function done(summary, latency, requests)
  local e = summary.errors
  local s = summary.duration / 1e6
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_s":%.3f,"rps":%.1f,' ..
    '"latency_ms":{"mean":%.3f,"p50":%.3f,"p90":%.3f,"p99":%.3f,"max":%.3f},' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d,"status":%d}}\n',
    summary.requests, s, summary.requests / s,
    latency.mean / 1000, latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000,
    e.connect, e.read, e.write, e.timeout, e.status))
end
