-- wrk script for bench/load.sh: POST one fixed Cognigy payload, then print a
-- machine-readable summary line that load.sh parses (exact microseconds, no
-- unit parsing). No per-request Lua callbacks: `response()` would make wrk
-- itself the bottleneck, so status counting is wrk's own (status >= 400 and
-- socket errors).
--
-- Environment:
--   BENCH_BODY_FILE  file whose content is the request body (trailing newline dropped)
--   BENCH_API_KEY    value of the X-API-Key header (default "bench-key")

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

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d bytes=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d mean_us=%.1f " ..
    "err_connect=%d err_read=%d err_write=%d err_timeout=%d err_status=%d\n",
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
    e.connect, e.read, e.write, e.timeout, e.status))
end
