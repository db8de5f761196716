#!/usr/bin/env bash
# bench/callgrind.sh — instructions per request of the gateway's sync path
# (load.sh scenario c), of its open-breaker rejection (scenario d) and of an
# async webhook accepted on SQLite and delivered by the worker (scenario e),
# counted by callgrind: a figure that does not move with other work on the
# machine, unlike load.sh's wall-clock and CPU numbers. (e counts user-space
# instructions only: SQLite's own code is in, the kernel's WAL writes and
# fsyncs are not.)
#
# What it does:
#   1. starts nginx as the downstream, exactly as bench/load.sh does (its
#      start_nginx, write_schema and write_routes functions are read from
#      load.sh, so the route file, schema and nginx config are the same);
#   2. starts `gateway serve` under `valgrind --tool=callgrind` (whole run,
#      instrumented from the start, all threads counted together);
#   3. warm-up: WARM requests of c, then trips d's breaker and sends WARM
#      requests of d (each must get the fallback);
#   4. `callgrind_control --zero`, then exactly N requests of c, then
#      `callgrind_control --dump=c`; then N requests of d and `--dump=d`.
#      A dump holds what was executed since the previous zero or dump, so
#      each dump's total is N requests and nothing else (start-up, config
#      load, warm-up and shutdown are outside both). What remains inside is
#      what the idle gateway does during the run (timer wheel, log thread,
#      the dump command itself): measured with N=0 at about
#      120,000 instructions per dump, i.e. ~60 per request at N=2000 (< 0.1 %).
#      Two runs of the same binary agree within ~0.5 %;
#   5. prints instructions per request (Ir / N) for c and d;
#   6. e (unless E=0): a second gateway under callgrind, with load.sh's async
#      route file (write_async_routes: idempotency key `{{inputId}}`) and its
#      own SQLite store; WARM webhooks (each with a unique inputId) and the
#      wait until the worker has delivered them all, `--zero`, N webhooks
#      (each must get 202), the wait until all N are delivered (read from the
#      SQLite file by this script, not through the gateway), `--dump=e`. So
#      e's figure is one webhook accepted, committed, claimed, sent to nginx
#      and settled.
#
# The requests come from a small Python http.client loop: CONNS keep-alive
# connections (threads), each sending N / CONNS requests one after another,
# the bench payload (bench/payload.json on one line) with
# `Content-Type: application/json` and `X-API-Key: bench-key`, like wrk in
# load.sh. Every answer is checked (c: 200 with "crmId"; d: 200 with the
# fallback body); any other answer fails the run (exit 1).
#
# Environment (all optional):
#   N=2000 requests per measured scenario    WARM=300 warm-up requests per scenario
#   E=1 (0 skips scenario e)
#   CONNS=4 keep-alive connections            GATEWAY_LOG=warn (info: one log line per webhook)
#   GATEWAY_BIN=$CARGO_TARGET_DIR/profiling/gateway (else target/profiling/gateway)
#   OUT_DIR=bench/out   the dumps: callgrind-<stamp>.out.<pid>.{1,2} (c, d), for
#                       callgrind_annotate --inclusive=yes <file> | head -60
#   KEEP_TMP=0          1 keeps the temp dir (configs, the gateway's log)
#
# Build the binary with `cargo build --profile profiling` (release with line
# tables and symbols). Needs valgrind, nginx, curl and python3 (valgrind and
# nginx are installed with apt-get when missing and run as root).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
N=${N:-2000}
WARM=${WARM:-300}
CONNS=${CONNS:-4}
GATEWAY_LOG=${GATEWAY_LOG:-warn}
OUT_DIR=${OUT_DIR:-$HERE/out}
GATEWAY_BIN=${GATEWAY_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/profiling/gateway}
API_KEY=bench-key
OPEN_INTENT=BenchRouteIsOpen
NGINX_WORKERS=1

log() { printf '[callgrind %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 2; }

[[ -x $GATEWAY_BIN ]] || die "no gateway binary at $GATEWAY_BIN (cargo build --profile profiling)"
need=()
command -v valgrind >/dev/null 2>&1 || need+=(valgrind)
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || need+=(nginx-light)
command -v curl >/dev/null 2>&1 || need+=(curl)
if ((${#need[@]})); then
  [[ $(id -u) == 0 ]] || die "missing: ${need[*]}"
  log "installing ${need[*]}"
  apt-get update -qq >&2 && apt-get install -y -qq "${need[@]}" >&2 || die "apt-get install ${need[*]} failed"
fi
command -v python3 >/dev/null 2>&1 || die "python3 is needed for the request loop"
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

TMP=$(mktemp -d /tmp/gw-callgrind.XXXXXX)
chmod 755 "$TMP"
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  if [[ ${KEEP_TMP:-0} == 1 ]]; then log "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The helpers and config writers of load.sh, read from it (one definition).
# (a function ends at the first `}` in column 0 outside a here-document)
eval "$(awk '
  /^(alive|pick_port|nginx_temp_paths|start_nginx|write_schema|write_routes|write_async_routes)\(\) \{/ { on = 1 }
  on { print }
  on && /<<.?EOF/ { hd = 1; next }
  on && hd && /^EOF$/ { hd = 0; next }
  on && !hd && /^}/ { on = 0 }
' "$HERE/load.sh")"
for f in alive pick_port nginx_temp_paths start_nginx write_schema write_routes write_async_routes; do
  declare -F "$f" >/dev/null || die "could not read $f from bench/load.sh"
done
USED_PORTS=" "

PAYLOAD=$TMP/payload.json
tr -d '\n' <"$HERE/payload.json" >"$PAYLOAD"
PAYLOAD_OPEN=$TMP/payload-open.json
sed "s/\"UpdateContactDetails\"/\"$OPEN_INTENT\"/" "$PAYLOAD" >"$PAYLOAD_OPEN"

pick_port DS_PORT
start_nginx downstream "$DS_PORT" "        default_type application/json;
        location / { return 200 '{\"id\":\"crm-1\"}'; }"
pick_port GW_PORT
pick_port GW_ADMIN_PORT
pick_port CLOSED_PORT
write_routes
dir=$TMP/gw
"$GATEWAY_BIN" validate "$dir/routes" >"$dir/validate.log" 2>&1 ||
  { cat "$dir/validate.log" >&2; die "gateway validate refused the route file"; }

mkdir -p "$OUT_DIR"
STAMP=$(date +%Y%m%d-%H%M%S)

# serve_cg DIR PORT ADMIN_PORT OUT: `gateway serve` on DIR/routes and
# DIR/gateway.db under callgrind (dumps OUT.<pid>.N), log in DIR/gateway.log;
# waits for /readyz and sets SERVED_PID.
serve_cg() {
  local dir=$1 port=$2 admin=$3 out=$4 deadline=$((SECONDS + 180))
  (cd "$dir" && GATEWAY_LOG=$GATEWAY_LOG exec valgrind --tool=callgrind --callgrind-out-file="$out.%p" \
    "$GATEWAY_BIN" serve --routes "$dir/routes" --listen "127.0.0.1:$port" \
    --admin-listen "127.0.0.1:$admin" --store "sqlite://$dir/gateway.db") >"$dir/gateway.log" 2>&1 &
  SERVED_PID=$!
  PIDS+=("$SERVED_PID")
  until [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$port/readyz" 2>/dev/null) == 200 ]]; do
    alive "$SERVED_PID" || { tail -n 20 "$dir/gateway.log" >&2; die "the gateway in $dir exited"; }
    ((SECONDS < deadline)) || die "the gateway in $dir was not ready within 180 s"
    sleep 0.5
  done
}

CG_OUT=$OUT_DIR/callgrind-$STAMP.out
serve_cg "$dir" "$GW_PORT" "$GW_ADMIN_PORT" "$CG_OUT"
GW_PID=$SERVED_PID
log "gateway (valgrind pid $GW_PID) on 127.0.0.1:$GW_PORT, GATEWAY_LOG=$GATEWAY_LOG"

# send SCENARIO COUNT [ALLOW_ERRORS]: COUNT requests over CONNS connections; checks every answer.
send() {
  python3 - "${PORT:-$GW_PORT}" "$1" "$2" "$CONNS" "${3:-0}" "$PAYLOAD" "$PAYLOAD_OPEN" "$API_KEY" <<'PY'
import http.client, sys, threading
port, scen, count, conns, allow = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
body = open(sys.argv[6] if scen in "ce" else sys.argv[7], "rb").read()
headers = {"Content-Type": "application/json", "X-API-Key": sys.argv[8]}
want = {"c": b'"crmId"', "d": b'"fallback"', "e": b'"delivery_id"'}[scen]
status = 202 if scen == "e" else 200
import json, uuid
bad = []
def run(n):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    for _ in range(n):
        b = body
        if scen == "e":  # a unique inputId: the route's idempotency key, no dedupe hit
            p = json.loads(body)
            p["inputId"] = str(uuid.uuid4())
            b = json.dumps(p, separators=(",", ":")).encode()
        c.request("POST", "/webhooks/bench-bot", b, headers)
        r = c.getresponse()
        data = r.read()
        if r.status != status or want not in data:
            bad.append((r.status, data[:200]))
    c.close()
per = [count // conns + (1 if i < count % conns else 0) for i in range(conns)]
ts = [threading.Thread(target=run, args=(n,)) for n in per if n]
for t in ts: t.start()
for t in ts: t.join()
if bad and not allow:
    print(f"{len(bad)} of {count} answers were not the expected 200, e.g. {bad[0]}", file=sys.stderr)
    sys.exit(1)
PY
}

log "warm-up: $WARM requests of c; tripping d's breaker; $WARM of d"
send c "$WARM"
send d 3 1   # the first call fails (closed port) and opens the breaker
send d "$WARM"

total_ir() {  # total_ir DUMPFILE: the dump's total Ir
  awk '/^(summary|totals):/ { print $2; exit }' "$1"
}
dumps() { ls "$CG_OUT.$GW_PID".* 2>/dev/null | grep -E '\.[0-9]+$' | sort -t. -k4 -n || true; }

callgrind_control --zero "$GW_PID" >/dev/null 2>&1
log "c: $N requests"
send c "$N"
callgrind_control --dump=c "$GW_PID" >/dev/null 2>&1
log "d: $N requests"
send d "$N"
callgrind_control --dump=d "$GW_PID" >/dev/null 2>&1
sleep 1
mapfile -t files < <(dumps)
((${#files[@]} >= 2)) || die "expected two callgrind dumps, found: ${files[*]:-none}"
ir_c=$(total_ir "${files[0]}")
ir_d=$(total_ir "${files[1]}")
kill -TERM "$GW_PID" 2>/dev/null || true
wait "$GW_PID" 2>/dev/null || true
PIDS=("${PIDS[@]/$GW_PID/}")
# (expected: the route file's lint warnings and the breaker transition of the warm-up)
ERRS=$(grep -cE ' (WARN|ERROR) ' "$dir/gateway.log" || true)
[[ $GATEWAY_LOG == info ]] && log "info lines in the gateway log: $(grep -c ' INFO ' "$dir/gateway.log" || true)"

# ---- e: one async webhook, accepted on SQLite and delivered (see the header)
ir_e=
if [[ ${E:-1} != 0 ]]; then
  ASYNC_ROUTE=bench-async ASYNC_KEY=unique
  edir=$TMP/gw-e
  write_async_routes "$edir"
  "$GATEWAY_BIN" validate "$edir/routes" >"$edir/validate.log" 2>&1 ||
    { cat "$edir/validate.log" >&2; die "gateway validate refused the async route file"; }
  pick_port E_PORT
  pick_port E_ADMIN_PORT
  E_DB=$edir/gateway.db
  E_OUT=$OUT_DIR/callgrind-$STAMP-e.out
  serve_cg "$edir" "$E_PORT" "$E_ADMIN_PORT" "$E_OUT"
  E_PID=$SERVED_PID
  # drained WANT: until WANT deliveries are delivered and none is pending or
  # leased, read from the SQLite file (WAL: a reader beside the writer), so
  # the wait adds nothing to the gateway's count
  drained() {
    python3 - "$E_DB" "$1" <<'PY'
import sqlite3, sys, time
db, want = sys.argv[1], int(sys.argv[2])
deadline = time.time() + 600
while True:
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    live, done = c.execute("SELECT SUM(state IN ('pending','leased')), SUM(state = 'delivered') FROM deliveries").fetchone()
    c.close()
    if (live or 0) == 0 and (done or 0) >= want:
        sys.exit(0)
    if time.time() > deadline:
        print(f"not drained: {live} live, {done} of {want} delivered", file=sys.stderr)
        sys.exit(1)
    time.sleep(0.5)
PY
  }
  log "e: warm-up $WARM async webhooks (async gateway, valgrind pid $E_PID)"
  PORT=$E_PORT send e "$WARM"
  drained "$WARM" || die "the warm-up deliveries were not all delivered"
  callgrind_control --zero "$E_PID" >/dev/null 2>&1
  log "e: $N async webhooks, then the wait until all are delivered"
  PORT=$E_PORT send e "$N"
  drained "$((WARM + N))" || die "the measured deliveries were not all delivered"
  callgrind_control --dump=e "$E_PID" >/dev/null 2>&1
  sleep 1
  e_file=$(ls "$E_OUT.$E_PID".* 2>/dev/null | grep -E '\.[0-9]+$' | head -1 || true)
  [[ -n $e_file ]] || die "no callgrind dump of e"
  ir_e=$(total_ir "$e_file")
  kill -TERM "$E_PID" 2>/dev/null || true
  wait "$E_PID" 2>/dev/null || true
  PIDS=("${PIDS[@]/$E_PID/}")
  E_ERRS=$(grep -cE ' (WARN|ERROR) ' "$edir/gateway.log" || true)
  ((E_ERRS == 0)) || log "$E_ERRS WARN/ERROR lines in the async gateway's log (its route file's lint warnings are expected)"
fi

echo "gateway: $GATEWAY_BIN (commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')), GATEWAY_LOG=$GATEWAY_LOG, N=$N, CONNS=$CONNS"
awk -v c="$ir_c" -v d="$ir_d" -v e="$ir_e" -v n="$((N > 0 ? N : 1))" 'BEGIN {
  printf "c  sync pipeline       %12d Ir  %8.0f instr/req\n", c, c / n
  printf "d  open-breaker reject %12d Ir  %8.0f instr/req\n", d, d / n
  if (e != "") printf "e  async, SQLite       %12d Ir  %8.0f instr/webhook (accepted and delivered)\n", e, e / n
}'
echo "dumps: ${files[0]} (c), ${files[1]} (d)${e_file:+, $e_file (e)}"
((ERRS == 0)) || log "$ERRS WARN/ERROR lines in the gateway log (the 4 lint warnings of the route file and the breaker opening in the warm-up are expected)"
