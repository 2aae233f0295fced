-- wrk load test for POST /generate through nginx:
--   wrk -t8 -c100 -d30s --timeout 120s -s load_test.lua http://localhost/generate
-- Give wrk a --timeout above the longest generation plus queue wait: its default of 2 s times out
-- every 1024x1024 request (wrk then counts them as "timeout" errors and never calls response()).
-- Environment: FLUX_WIDTH / FLUX_HEIGHT (default 512), FLUX_STEPS (default: the server's),
-- FLUX_API_KEY (sent as a Bearer token). images/s counts only 200 answers; every other answer is
-- listed by status code at the end: 503 means a worker queue was full (backpressure, Retry-After),
-- 429 the nginx rate limit, 502/504 a problem.

local width = tonumber(os.getenv("FLUX_WIDTH") or "512")
local height = tonumber(os.getenv("FLUX_HEIGHT") or "512")
local steps = os.getenv("FLUX_STEPS")
local api_key = os.getenv("FLUX_API_KEY")

local prompts = {
  "A beautiful mountain landscape",
  "A futuristic city at night, neon lights",
  "A red fox in a snowy forest",
  "A bowl of ramen, studio lighting",
  "An astronaut riding a horse on the moon",
}

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
if api_key and api_key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. api_key
end

local threads = {}

function setup(thread)
  thread:set("id", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  statuses = {}
  counter = 0
end

function request()
  counter = counter + 1
  local body = string.format('{"prompt":"%s","width":%d,"height":%d,"seed":%d%s}',
    prompts[(counter % #prompts) + 1], width, height, id * 1000000 + counter,
    steps and (',"num_inference_steps":' .. steps) or "")
  return wrk.format(nil, nil, nil, body)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local totals, images, others = {}, 0, 0
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses")) do
      totals[status] = (totals[status] or 0) + count
    end
  end
  local seconds = summary.duration / 1e6
  images = totals[200] or 0
  local codes = {}
  for status, count in pairs(totals) do
    table.insert(codes, status)
    if status ~= 200 then others = others + count end
  end
  table.sort(codes)
  io.write("------------------------------\n")
  io.write(string.format("images/s: %.2f (200 answers only: %d in %.1f s)   p50 %.0f ms   p95 %.0f ms   p99 %.0f ms\n",
    images / seconds, images, seconds, latency:percentile(50) / 1000,
    latency:percentile(95) / 1000, latency:percentile(99) / 1000))
  io.write(string.format("not images: %d answers, %d timeouts, %d connect/read/write errors\n", others,
    summary.errors.timeout, summary.errors.connect + summary.errors.read + summary.errors.write))
  io.write("status codes:\n")
  for _, status in ipairs(codes) do
    io.write(string.format("  %d: %d\n", status, totals[status]))
  end
end
