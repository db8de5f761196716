#!/usr/bin/env bash
# Reload benchmark (issue 5), on the generated 1,000-route tree of bench/validate.sh:
#   1. load + compile + build + swap: the time of a synchronous `POST /admin/reload`
#      after a one-line change (a new generation each time), RUNS times;
#   2. file write → new generation serving, through the file watcher (its debounce included);
#   3. webhook latency p50/p99 under a steady wrk load, without reloads and with 20 admin
#      reloads spread over the run (needs wrk; skipped without it).
# Phases 1 and 3 run with the watcher's debounce at 10 minutes, so only the admin call reloads;
# phase 2 on a gateway started with DEBOUNCE_MS (default 50).
# Usage: bench/reload.sh [RUNS]   (default 20). Everything on 127.0.0.1; bounded in time.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=validate.sh
source "$ROOT/bench/validate.sh"
RUNS=${1:-20}
DURATION=${DURATION:-10s}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

ms_stats() { # reads µs values, prints "min median p99 max" in ms
    sort -n | awk '{ t[NR] = $1 } END {
        med = (NR % 2) ? t[(NR + 1) / 2] : (t[NR / 2] + t[NR / 2 + 1]) / 2
        p99 = t[int(NR * 0.99 + 0.999)]
        printf "min %.1f ms  median %.1f ms  p99 %.1f ms  max %.1f ms\n", t[1] / 1000, med / 1000, p99 / 1000, t[NR] / 1000 }'
}

generation() { curl -s "http://127.0.0.1:$ADMIN/admin/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["generation"])'; }

bump() { # a one-line change that makes a new configuration
    local n=$1
    sed -i "s/min_calls: [0-9]*/min_calls: $((10 + n))/" "$WORK/tree/routes/crm/routes-000.yaml"
}

main_reload() {
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/gateway-reload.XXXXXX")
    trap 'kill $PID 2>/dev/null || true; rm -rf "$WORK"' EXIT
    build
    generate "$WORK/tree"
    # a local downstream for the load part: python's http.server is enough for p50/p99 shape
    DS=$(free_port)
    python3 - "$DS" >/dev/null 2>&1 <<'PY' &
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_PUT(self): self.do_POST()
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        b = b'{"id":"crm-1"}'
        self.send_response(200); self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(b))); self.end_headers(); self.wfile.write(b)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
    DSPID=$!
    # Phases 1 and 3 run with the watcher's debounce at 10 minutes, so a file
    # change is reloaded only by the admin call being timed (with 50 ms, the
    # watcher's own reload of the same change ran at the same moment and the
    # admin call waited for it on the reload lock: two reloads timed as one).
    # Phase 2 times the watcher, on a gateway started with DEBOUNCE_MS.
    start_serve() {
        PORT=$(free_port); ADMIN=$(free_port)
        env -i PATH="$PATH" CRM_BASE_URL="http://127.0.0.1:$DS" CRM_TOKEN_URL="http://127.0.0.1:$DS/token" GATEWAY_LOG=warn \
            "$BIN" serve --routes "$WORK/tree/routes" --listen "127.0.0.1:$PORT" --admin-listen "127.0.0.1:$ADMIN" \
            --store "sqlite://$WORK/gw-$1.db" --reload-debounce-ms "$1" >"$WORK/serve-$1.log" 2>&1 &
        PID=$!
        for _ in $(seq 1 600); do curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.05; done
    }
    stop_serve() { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; }
    start_serve 600000
    trap 'kill $PID $DSPID 2>/dev/null || true; rm -rf "$WORK"' EXIT
    echo "reload benchmark: 1,000 routes in 100 files; $(nproc) CPUs; watcher debounce ${DEBOUNCE_MS:-50} ms (phase 2)"

    # 1. synchronous admin reload, each one a new generation
    local i t0 t1 g
    : >"$WORK/admin.txt"
    for ((i = 1; i <= RUNS; i++)); do
        bump "$i"
        t0=$(date +%s%N)
        curl -sf -X POST "http://127.0.0.1:$ADMIN/admin/reload" >/dev/null
        t1=$(date +%s%N)
        echo $(((t1 - t0) / 1000)) >>"$WORK/admin.txt"
    done
    echo "load+compile+build+swap (POST /admin/reload): $(ms_stats <"$WORK/admin.txt")"

    # 2. file write → new generation, via the watcher
    stop_serve
    start_serve "${DEBOUNCE_MS:-50}"
    : >"$WORK/watch.txt"
    for ((i = 1; i <= RUNS; i++)); do
        g=$(generation)
        t0=$(date +%s%N)
        bump "$((1000 + i))"
        for _ in $(seq 1 400); do [[ $(generation) -gt $g ]] && break; sleep 0.005; done
        t1=$(date +%s%N)
        echo $(((t1 - t0) / 1000)) >>"$WORK/watch.txt"
    done
    echo "file write → new generation serving (watcher):  $(ms_stats <"$WORK/watch.txt")"

    # 3. latency under load, without and with 20 reloads spread over the run
    stop_serve
    start_serve 600000
    if ! command -v wrk >/dev/null; then echo "latency under reloads: skipped (wrk missing)"; return; fi
    cat >"$WORK/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-API-Key"] = "dev-key-1"
wrk.body = '{"sessionId":"s-1","inputId":"i-1","intent":"intent-1","slots":{"customerId":[{"keyphrase":"C-1001"}]}}'
LUA
    run_wrk() { wrk -t2 -c16 -d"$DURATION" --latency -s "$WORK/post.lua" "http://127.0.0.1:$PORT/webhooks/bot-1" 2>&1 |
        awk '/Requests\/sec/ { rps = $2 } /^ +50%/ { p50 = $2 } /^ +99%/ { p99 = $2 } /Non-2xx/ { non2xx = $4 }
             END { printf "%s req/s, p50 %s, p99 %s, non-2xx %s\n", rps, p50, p99, (non2xx == "" ? 0 : non2xx) }'; }
    echo "webhooks without reloads: $(run_wrk)"
    local g0 gap
    g0=$(generation)
    gap=$(awk -v d="${DURATION%s}" 'BEGIN { printf "%.3f", d / 21 }')
    ( for n in $(seq 1 20); do sleep "$gap"; bump "$((5000 + n))"; curl -s -X POST "http://127.0.0.1:$ADMIN/admin/reload" >/dev/null; done ) &
    local loop=$!
    echo "webhooks with 20 reloads during the run (one every ${gap}s): $(run_wrk)"
    wait "$loop" 2>/dev/null || true
    echo "reloads applied during the run: $(($(generation) - g0))"
}

main_reload "$@"
