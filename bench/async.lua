-- wrk script for bench/load.sh scenarios e and f (async route): POST the
-- Cognigy payload, count the answers by status, and print the same
-- machine-readable summary line as post.lua plus the status counts.
--
-- Unlike post.lua this script has per-request Lua callbacks, because an
-- async benchmark must count 202s exactly (wrk's own err_status counts only
-- statuses >= 400, so a 200 or 3xx would pass as a success):
--   response()  counts 202 and every other status, per thread;
--   request()   (BENCH_UNIQUE=1 only) gives every request its own inputId,
--               "bench-<BENCH_RUN>-<thread>-<n>", so that with the route's
--               idempotency_key "{{inputId}}" every request is a new delivery
--               (and pays for its dedupe check) instead of a duplicate of the
--               first one. BENCH_RUN must differ between wrk runs against
--               the same store (the warm-up and the measured run), or the
--               second run's keys would be duplicates of the first's.
-- They cost wrk a few microseconds of CPU per request; load.sh reports wrk's
-- CPU ("wrk cores") so that it stays visible.
--
-- Environment:
--   BENCH_BODY_FILE  file whose content is the request body (trailing newline dropped)
--   BENCH_API_KEY    value of the X-API-Key header (default "bench-key")
--   BENCH_UNIQUE     1: a unique inputId per request (see above); else the body as is
--   BENCH_RUN        tag of this wrk run inside the inputIds (default "run")

local path = os.getenv("BENCH_BODY_FILE")
if path == nil or path == "" then
  error("BENCH_BODY_FILE is not set")
end
local f = assert(io.open(path, "rb"))
local body = f:read("*a"):gsub("%s+$", "")
f:close()

wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-API-Key"] = os.getenv("BENCH_API_KEY") or "bench-key"

-- ---- main state: one entry per thread, read back in done()
local threads = {}
local next_tid = 0

function setup(thread)
  next_tid = next_tid + 1
  thread:set("tid", next_tid)
  table.insert(threads, thread)
end

-- ---- thread states
accepted = 0     -- 202 answers
other = 0        -- every other status (2xx included)
other_codes = "" -- "status:count,…" of the first few distinct other statuses, filled in done()
local others = {}

function response(status, headers, resp_body)
  if status == 202 then
    accepted = accepted + 1
  else
    other = other + 1
    others[status] = (others[status] or 0) + 1
    local parts = {}
    for s, n in pairs(others) do
      parts[#parts + 1] = s .. ":" .. n
      if #parts >= 8 then break end
    end
    other_codes = table.concat(parts, ",")
  end
end

if os.getenv("BENCH_UNIQUE") == "1" then
  local key = body:match('"inputId"%s*:%s*"([^"]*)"')
  if key == nil then
    error("BENCH_UNIQUE=1 but the body has no \"inputId\" string")
  end
  local s, e = body:find('"inputId"%s*:%s*"[^"]*"')
  local head = body:sub(1, s - 1) .. '"inputId":"'
  local tail = '"' .. body:sub(e + 1)
  local run = os.getenv("BENCH_RUN") or "run"
  local n = 0
  local prefix

  function init(args)
    prefix = "bench-" .. run .. "-" .. tostring(tid) .. "-"
  end

  function request()
    n = n + 1
    return wrk.format(nil, nil, nil, head .. prefix .. n .. tail)
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  local acc, oth, codes = 0, 0, {}
  for _, t in ipairs(threads) do
    acc = acc + (t:get("accepted") or 0)
    oth = oth + (t:get("other") or 0)
    local c = t:get("other_codes")
    if c ~= nil and c ~= "" then codes[#codes + 1] = c end
  end
  local other_codes = table.concat(codes, ",")
  if other_codes == "" then other_codes = "-" end
  io.write(string.format(
    "BENCH requests=%d duration_us=%d bytes=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d mean_us=%.1f " ..
    "err_connect=%d err_read=%d err_write=%d err_timeout=%d err_status=%d " ..
    "accepted=%d other=%d other_codes=%s\n",
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
    e.connect, e.read, e.write, e.timeout, e.status, acc, oth, other_codes))
end
