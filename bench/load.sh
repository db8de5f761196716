#!/usr/bin/env bash
# bench/load.sh — load benchmark: cognigy-gateway vs nginx, all on 127.0.0.1.
#
# Scenarios (run in the order given by SCENARIOS, default "a b c d"):
#   a  the downstream itself: nginx answering every POST with 200 {"id":"crm-1"}
#   b  nginx as a plain keep-alive reverse proxy in front of that downstream
#   c  the gateway, full sync pipeline (auth, JSON, schema, route, template,
#      PUT downstream, response template) in front of the same downstream
#   d  the gateway rejecting on a route whose breaker is open (fallback answer)
#
# Every scenario POSTs the same ~600-byte Cognigy payload with wrk
# (bench/post.lua), CONNECTIONS connections, THREADS threads, after a WARMUP.
# c and d are skipped with a message when the gateway cannot be built or does
# not become ready (e.g. a build without `gateway serve`).
#
# Environment (all optional):
#   SCENARIOS="a b c d"  DURATION=10s  WARMUP=2s  CONNECTIONS=32  THREADS=2
#   NGINX_WORKERS=1      worker_processes of both nginx instances
#   GATEWAY_BIN=target/release/gateway   BUILD=auto|0 (0: never run cargo)
#   READY_TIMEOUT=30     seconds to wait for the gateway's /readyz
#   GATEWAY_LOG=warn     the gateway's log filter (info adds one log line per request)
#   OUT_DIR=bench/out    KEEP_TMP=0 (1 keeps the temp dir with configs and logs)
#   OTHER_MAX=0.10       CPU (cores) of unrelated processes above which a row is flagged
#   QUIET_WAIT=15        seconds to wait before each scenario for the machine to be that quiet
#
# Needs wrk, nginx and curl; installs them with apt-get when missing (root).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
CONNECTIONS=${CONNECTIONS:-32}
THREADS=${THREADS:-2}
SCENARIOS=${SCENARIOS:-"a b c d"}
NGINX_WORKERS=${NGINX_WORKERS:-1}
READY_TIMEOUT=${READY_TIMEOUT:-30}
GATEWAY_BIN=${GATEWAY_BIN:-$REPO/target/release/gateway}
BUILD=${BUILD:-auto}
OUT_DIR=${OUT_DIR:-$HERE/out}
KEEP_TMP=${KEEP_TMP:-0}
OTHER_MAX=${OTHER_MAX:-0.10}   # cores used by unrelated processes above which a row is flagged
QUIET_WAIT=${QUIET_WAIT:-15}   # seconds to wait, before each scenario, for that to be true (0: don't)
API_KEY=bench-key
OPEN_INTENT=BenchRouteIsOpen   # the intent routed to the route with the open breaker

log() { printf '[load %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 2; }

for s in $SCENARIOS; do
  case $s in a|b|c|d) ;; *) die "unknown scenario '$s' in SCENARIOS (known: a b c d)";; esac
done

# ---------------------------------------------------------------- tools
install_missing() {
  local need=()
  command -v wrk >/dev/null 2>&1 || need+=(wrk)
  command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || need+=(nginx-light)
  command -v curl >/dev/null 2>&1 || need+=(curl)
  ((${#need[@]} == 0)) && return 0
  [[ $(id -u) == 0 ]] || die "missing: ${need[*]}; install them or run as root"
  command -v apt-get >/dev/null 2>&1 || die "missing: ${need[*]}, and no apt-get to install them"
  log "installing ${need[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  if ! apt-get install -y -qq "${need[@]}" >&2; then
    # Some releases have no nginx-light; plain nginx does as well.
    local alt=("${need[@]/nginx-light/nginx}")
    apt-get install -y -qq "${alt[@]}" >&2 || die "apt-get install ${alt[*]} failed"
  fi
}
install_missing
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)
CORES=$(nproc 2>/dev/null || grep -c ^processor /proc/cpuinfo)

# ---------------------------------------------------------------- temp dir, cleanup
TMP=$(mktemp -d /tmp/gw-load.XXXXXX)
chmod 755 "$TMP"             # nginx workers run as nobody and must traverse it
PIDS=()                      # every server this script started

alive() {  # pid exists and is not a zombie
  local st
  st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  st=${st##*) }
  [[ ${st%% *} != Z ]]
}

cleanup() {
  local pid i
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for ((i = 0; i < 50; i++)); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    wait "$pid" 2>/dev/null || true
  done
  if [[ $KEEP_TMP == 1 ]]; then log "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- helpers
USED_PORTS=" "
pick_port() {  # pick_port VAR: a port nobody listens on (or has any socket on)
  local p hex i
  for ((i = 0; i < 500; i++)); do
    p=$((20000 + RANDOM % 12000))        # below Linux's ephemeral range (32768+)
    [[ $USED_PORTS == *" $p "* ]] && continue
    hex=$(printf ':%04X' "$p")
    if ! cat /proc/net/tcp /proc/net/tcp6 2>/dev/null |
         awk -v h="$hex" 'NR > 0 && substr($2, length($2) - 4) == h { f = 1 } END { exit !f }'; then
      USED_PORTS+="$p "
      printf -v "$1" '%s' "$p"
      return 0
    fi
  done
  die "no free port found"
}

tree_pids() {  # a pid and its children (nginx: master + workers)
  local root=$1 f line rest
  echo "$root"
  if compgen -G "/proc/$root/task/*/children" >/dev/null; then
    cat /proc/"$root"/task/*/children 2>/dev/null | tr ' ' '\n' | grep . || true
  else
    for f in /proc/[0-9]*/stat; do
      line=$(cat "$f" 2>/dev/null) || continue
      rest=${line##*) }
      read -r _ ppid _ <<<"$rest"
      [[ $ppid == "$root" ]] && { f=${f#/proc/}; echo "${f%/stat}"; }
    done
  fi
}

cpu_ticks() {  # utime + stime (clock ticks) summed over the given pids
  local t=0 p line f
  for p in "$@"; do
    line=$(cat "/proc/$p/stat" 2>/dev/null) || continue
    read -r -a f <<<"${line##*) }"
    t=$((t + f[11] + f[12]))       # fields 14 and 15 of proc(5)
  done
  echo "$t"
}

# Machine-wide busy CPU (clock ticks) from /proc/stat. During a run, this
# minus the CPU of the benchmark's own processes (servers, wrk) is what other
# workloads (another session's build, say) took; on a quiet machine it stays
# near 0, as the loopback softirq work is charged to the processes.
machine_busy_ticks() {
  local _cpu u n sy idle io irq sirq st
  read -r _cpu u n sy idle io irq sirq st _ </proc/stat
  echo $((u + n + sy + irq + sirq + st))
}

wait_quiet() {  # up to QUIET_WAIT seconds for other workloads to drop below OTHER_MAX cores
  local deadline=$((SECONDS + QUIET_WAIT)) b0 b1 busy said=""
  while :; do
    b0=$(machine_busy_ticks); sleep 1; b1=$(machine_busy_ticks)
    busy=$(awk -v t=$((b1 - b0)) -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", t / hz }')
    awk -v b="$busy" -v m="$OTHER_MAX" 'BEGIN { exit !(b <= m) }' && return 0
    ((SECONDS < deadline)) || { log "machine still busy ($busy cores used by others); measuring anyway"; return 0; }
    [[ -n $said ]] || { log "machine busy ($busy cores used by others); waiting up to ${QUIET_WAIT}s"; said=1; }
  done
}

hwm_reset() { local p; for p in "$@"; do echo 5 >"/proc/$p/clear_refs" 2>/dev/null || return 1; done; }
hwm_kib() {  # VmHWM summed over the given pids, in KiB
  local t=0 p v
  for p in "$@"; do
    v=$(awk '/^VmHWM:/ { print $2 }' "/proc/$p/status" 2>/dev/null) || continue
    t=$((t + ${v:-0}))
  done
  echo "$t"
}

wait_http() {  # wait_http URL PID SECONDS: until URL answers 200 (or PID dies)
  local url=$1 pid=$2 deadline=$((SECONDS + $3))
  while ((SECONDS < deadline)); do
    alive "$pid" || return 1
    [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$url" 2>/dev/null) == 200 ]] && return 0
    sleep 0.2
  done
  return 1
}

post() {  # post URL BODYFILE: prints "<status> <body>"
  curl -s --max-time 10 -w '\n%{http_code}' -X POST -H 'Content-Type: application/json' \
    -H "X-API-Key: $API_KEY" --data-binary @"$2" "$1" | { body=$(cat); printf '%s %s' "${body##*$'\n'}" "${body%$'\n'*}"; }
}

# ---------------------------------------------------------------- payloads
PAYLOAD=$TMP/payload.json
tr -d '\n' <"$HERE/payload.json" >"$PAYLOAD"
PAYLOAD_OPEN=$TMP/payload-open.json
sed "s/\"UpdateContactDetails\"/\"$OPEN_INTENT\"/" "$PAYLOAD" >"$PAYLOAD_OPEN"
PAYLOAD_BYTES=$(wc -c <"$PAYLOAD")

# ---------------------------------------------------------------- nginx instances
# Modules that can be compiled out have their temp path set only when present,
# so the config works with nginx-light as well as full nginx.
nginx_temp_paths() {
  local dir=$1 v m
  v=$("$NGINX" -V 2>&1)
  echo "    client_body_temp_path $dir/tmp/body;"
  for m in proxy fastcgi uwsgi scgi; do
    [[ $v == *"--without-http_${m}_module"* ]] || echo "    ${m}_temp_path $dir/tmp/$m;"
  done
}

start_nginx() {  # start_nginx NAME PORT SERVER_BODY [HTTP_EXTRA]; sets NGINX_PID_<NAME>
  local name=$1 port=$2 server_body=$3 http_extra=${4:-} dir=$TMP/nginx-$1
  mkdir -p "$dir/tmp"
  chmod 755 "$dir" "$dir/tmp"
  cat >"$dir/nginx.conf" <<EOF
# generated by bench/load.sh
daemon off;
worker_processes $NGINX_WORKERS;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
$(nginx_temp_paths "$dir")
    keepalive_requests 1000000;   # default 1000 would make wrk reconnect mid-run
    keepalive_timeout 75s;
    $http_extra
    server {
        listen 127.0.0.1:$port;
        client_max_body_size 2m;
        client_body_buffer_size 64k;  # the whole payload stays in memory
$server_body
    }
}
EOF
  "$NGINX" -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" -t -q 2>"$dir/test.log" ||
    { cat "$dir/test.log" >&2; die "nginx config for $name is invalid"; }
  "$NGINX" -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" >"$dir/stdout.log" 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  printf -v "NGINX_PID_$name" '%s' "$pid"
  local deadline=$((SECONDS + 10))
  until [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 1 -X POST --data-binary @"$PAYLOAD" \
      -H 'Content-Type: application/json' "http://127.0.0.1:$port/webhooks/bench-bot" 2>/dev/null) == 200 ]]; do
    alive "$pid" || { cat "$dir/error.log" >&2; die "nginx $name exited"; }
    ((SECONDS < deadline)) || die "nginx $name did not answer on port $port"
    sleep 0.1
  done
  log "nginx $name (pid $pid) on 127.0.0.1:$port"
}

DS_PORT=
ensure_downstream() {
  [[ -n $DS_PORT ]] && return 0
  pick_port DS_PORT
  # `return` answers without reading the body into a buffer: nginx discards it
  # (reads and drops it) so keep-alive stays in sync; POST and PUT both work.
  start_nginx downstream "$DS_PORT" "        default_type application/json;
        location / { return 200 '{\"id\":\"crm-1\"}'; }"
  # Keep-alive sanity: two POSTs on one connection must both get 200.
  local codes
  codes=$(curl -s -o /dev/null -o /dev/null -w '%{http_code} ' -X POST --data-binary @"$PAYLOAD" \
    "http://127.0.0.1:$DS_PORT/a" "http://127.0.0.1:$DS_PORT/b")
  [[ $codes == "200 200 " ]] || die "downstream: two keep-alive POSTs gave '$codes'"
}

PX_PORT=
ensure_proxy() {
  [[ -n $PX_PORT ]] && return 0
  ensure_downstream
  pick_port PX_PORT
  start_nginx proxy "$PX_PORT" "        location / {
            proxy_pass http://downstream;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }" "upstream downstream {
        server 127.0.0.1:$DS_PORT;
        keepalive 64;
        keepalive_requests 1000000;
    }"
}

# ---------------------------------------------------------------- gateway
GW_STATE=      # "" (not tried), ok, or the reason it was skipped
GW_PORT= GW_ADMIN_PORT= GW_PID= CLOSED_PORT=

write_routes() {
  local dir=$TMP/gw
  mkdir -p "$dir/routes" "$dir/schemas"
  cat >"$dir/schemas/bench-payload.schema.json" <<'EOF'
{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "required": ["sessionId", "userId", "inputId"],
  "properties": {
    "sessionId": { "type": "string", "minLength": 1 },
    "userId": { "type": "string", "minLength": 1 },
    "inputId": { "type": "string", "minLength": 1 },
    "channel": { "type": "string" },
    "intent": { "type": ["string", "null"] },
    "intentScore": { "type": ["number", "string", "null"] },
    "slots": {
      "type": "object",
      "properties": {
        "customerId": {
          "type": "array",
          "items": { "type": "object", "properties": { "keyphrase": { "type": "string" } } }
        }
      }
    },
    "context": {
      "type": "object",
      "properties": {
        "customerEmail": { "type": "string" },
        "newStatus": { "type": "string" },
        "notes": {}
      }
    }
  }
}
EOF
  # No idempotency_key: every request is a fresh one (with a key, the constant
  # inputId would turn the run into a measurement of the dedupe cache).
  cat >"$dir/routes/bench.yaml" <<EOF
# generated by bench/load.sh
bots:
  - id: bench-bot
    auth:
      api_key: { header: X-API-Key, keys: ["$API_KEY"] }
    schema: ../schemas/bench-payload.schema.json

routes:
  - name: bench-upsert
    bot: bench-bot
    intent: UpdateContactDetails
    mode: sync
    deadline: 7s
    downstream:
      method: PUT
      url: "http://127.0.0.1:$DS_PORT/api/v2/contacts/{{slots.customerId.0.keyphrase}}"
      timeout: 4s
      auth: { none: {} }
    body: |
      {
        "external_id": "{{slots.customerId.0.keyphrase}}",
        "email": "{{context.customerEmail}}",
        "status": "{{default context.newStatus "active"}}",
        "notes": {{json context.notes}},
        "channel": "{{channel}}",
        "last_interaction": "{{now}}"
      }
    response:
      status: 200
      body: '{"crmId": {{json downstream.body.id}}, "updated": true}'

  # Scenario d: nothing listens on this port; the first failure opens the
  # breaker for 5 minutes, and every later call gets the fallback at once.
  - name: bench-open
    bot: bench-bot
    intent: $OPEN_INTENT
    downstream:
      url: "http://127.0.0.1:$CLOSED_PORT/api/v2/contacts"
      timeout: 1s
      auth: { none: {} }
    body: '{"external_id": "{{slots.customerId.0.keyphrase}}"}'
    retry:
      attempts: 1
    breaker:
      consecutive_failures: 1
      open_for: 5m
    fallback:
      status: 200
      body: '{"fallback": true}'

  - name: bench-default
    bot: bench-bot
    intent: "*"
    downstream:
      url: "http://127.0.0.1:$DS_PORT/v1/bot-events"
      auth: { none: {} }
    body: '{"bot": "{{bot}}", "intent": {{json intent}}}'
EOF
}

ensure_gateway() {  # 0 when the gateway is up; else GW_STATE says why
  [[ -n $GW_STATE ]] && { [[ $GW_STATE == ok ]]; return; }
  ensure_downstream
  GW_STATE="not started"
  local dir=$TMP/gw
  mkdir -p "$dir"
  if [[ $BUILD != 0 && -f $REPO/Cargo.toml ]] && command -v cargo >/dev/null 2>&1; then
    log "cargo build --release (a no-op when target/release/gateway is current)"
    if ! (cd "$REPO" && nice -n 10 cargo build --release --bin gateway) >"$dir/build.log" 2>&1; then
      tail -n 20 "$dir/build.log" >&2
      GW_STATE="cargo build --release failed (see above)"
      return 1
    fi
  fi
  if [[ ! -x $GATEWAY_BIN ]]; then
    GW_STATE="no gateway binary at $GATEWAY_BIN (and no cargo to build it)"
    return 1
  fi
  pick_port GW_PORT
  pick_port GW_ADMIN_PORT
  pick_port CLOSED_PORT
  write_routes
  if ! "$GATEWAY_BIN" validate "$dir/routes" >"$dir/validate.log" 2>&1; then
    cat "$dir/validate.log" >&2
    GW_STATE="'gateway validate' refused the generated route file (see above)"
    return 1
  fi
  if ! "$GATEWAY_BIN" serve --help >/dev/null 2>&1; then
    GW_STATE="this gateway build has no 'serve' subcommand ('gateway serve --help' failed)"
    return 1
  fi
  (cd "$dir" && GATEWAY_LOG=${GATEWAY_LOG:-warn} exec "$GATEWAY_BIN" serve --routes "$dir/routes" \
    --listen "127.0.0.1:$GW_PORT" --admin-listen "127.0.0.1:$GW_ADMIN_PORT" \
    --store "sqlite://$dir/gateway.db") >"$dir/gateway.log" 2>&1 &
  GW_PID=$!
  PIDS+=("$GW_PID")
  if ! wait_http "http://127.0.0.1:$GW_PORT/readyz" "$GW_PID" "$READY_TIMEOUT"; then
    tail -n 20 "$dir/gateway.log" >&2
    if alive "$GW_PID"; then
      GW_STATE="'gateway serve' did not answer 200 on /readyz within ${READY_TIMEOUT}s"
    else
      GW_STATE="'gateway serve' exited before it was ready"
    fi
    return 1
  fi
  log "gateway (pid $GW_PID) on 127.0.0.1:$GW_PORT, admin 127.0.0.1:$GW_ADMIN_PORT"
  GW_STATE=ok
}

# ---------------------------------------------------------------- measurement
declare -A NAME RPS P50 P99 NON2XX SOCKERR CPU_US SRV_CORES WRK_CORES OTHER_CORES RSS NOTE REQS
NAME[a]="a  downstream nginx, direct"
NAME[b]="b  nginx keep-alive proxy"
NAME[c]="c  gateway, sync pipeline"
NAME[d]="d  gateway, open-breaker reject"

skip() { NOTE[$1]="SKIPPED: $2"; log "scenario $1 skipped: $2"; }

# measure SCENARIO URL BODYFILE PID...: warm up, then one measured wrk run.
measure() {
  local s=$1 url=$2 body=$3
  shift 3
  local pids=("$@") t0 t1 wt line
  export BENCH_BODY_FILE=$body BENCH_API_KEY=$API_KEY
  ((QUIET_WAIT > 0)) && wait_quiet
  log "scenario $s: warm-up $WARMUP"
  wrk -t "$THREADS" -c "$CONNECTIONS" -d "$WARMUP" -s "$HERE/post.lua" "$url" >/dev/null
  local hwm_note=""
  hwm_reset "${pids[@]}" || hwm_note=" (peak since start)"
  local all_ours=() p
  for p in "${PIDS[@]}"; do all_ours+=($(tree_pids "$p")); done
  log "scenario $s: measuring $DURATION, $CONNECTIONS connections, $THREADS threads → $url"
  local m0 m1 o0 o1
  m0=$(machine_busy_ticks)
  o0=$(cpu_ticks "${all_ours[@]}")
  t0=$(cpu_ticks "${pids[@]}")
  local TIMEFORMAT='%3U %3S'
  { time wrk -t "$THREADS" -c "$CONNECTIONS" -d "$DURATION" --latency -s "$HERE/post.lua" "$url" \
      >"$TMP/wrk-$s.txt" 2>&1; } 2>"$TMP/wrk-$s.time"
  t1=$(cpu_ticks "${pids[@]}")
  o1=$(cpu_ticks "${all_ours[@]}")
  m1=$(machine_busy_ticks)
  RSS[$s]="$(awk -v k="$(hwm_kib "${pids[@]}")" 'BEGIN { printf "%.1f MiB", k / 1024 }')$hwm_note"
  line=$(grep '^BENCH ' "$TMP/wrk-$s.txt" || true)
  if [[ -z $line ]]; then
    cat "$TMP/wrk-$s.txt" >&2
    NOTE[$s]="FAILED: wrk printed no summary"
    return
  fi
  local requests duration_us p50_us p99_us e_conn e_read e_write e_timeout e_status
  local -A kv=()
  local pair
  for pair in ${line#BENCH }; do kv[${pair%%=*}]=${pair#*=}; done
  requests=${kv[requests]} duration_us=${kv[duration_us]}
  REQS[$s]=$requests
  RPS[$s]=$(awk -v r="$requests" -v d="$duration_us" 'BEGIN { printf "%.0f", r / (d / 1e6) }')
  P50[$s]=${kv[p50_us]}
  P99[$s]=${kv[p99_us]}
  NON2XX[$s]=${kv[err_status]}
  SOCKERR[$s]=$((kv[err_connect] + kv[err_read] + kv[err_write] + kv[err_timeout]))
  CPU_US[$s]=$(awk -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v r="$requests" \
    'BEGIN { if (r > 0) printf "%.1f", t / hz * 1e6 / r; else print "-" }')
  SRV_CORES[$s]=$(awk -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v d="$duration_us" 'BEGIN { printf "%.2f", t / hz / (d / 1e6) }')
  read -r wu ws <"$TMP/wrk-$s.time"
  WRK_CORES[$s]=$(awk -v u="$wu" -v s="$ws" -v d="$duration_us" 'BEGIN { printf "%.2f", (u + s) / (d / 1e6) }')
  OTHER_CORES[$s]=$(awk -v m=$((m1 - m0)) -v o=$((o1 - o0)) -v w="$wu" -v ws="$ws" -v hz="$CLK_TCK" -v d="$duration_us" \
    'BEGIN { t = (m - o) / hz - (w + ws); if (t < 0) t = 0; printf "%.2f", t / (d / 1e6) }')
  if ((NON2XX[$s] + SOCKERR[$s] > 0)); then
    NOTE[$s]="ERRORS: ${NON2XX[$s]} non-2xx, socket connect ${kv[err_connect]} read ${kv[err_read]} write ${kv[err_write]} timeout ${kv[err_timeout]}"
  else
    NOTE[$s]=ok
  fi
  log "scenario $s: ${RPS[$s]} req/s, p50 ${P50[$s]}us, p99 ${P99[$s]}us, ${NOTE[$s]}"
}

scenario_a() {
  ensure_downstream
  # shellcheck disable=SC2046
  measure a "http://127.0.0.1:$DS_PORT/webhooks/bench-bot" "$PAYLOAD" $(tree_pids "$NGINX_PID_downstream")
}

scenario_b() {
  ensure_proxy
  # shellcheck disable=SC2046
  measure b "http://127.0.0.1:$PX_PORT/webhooks/bench-bot" "$PAYLOAD" $(tree_pids "$NGINX_PID_proxy")
}

scenario_c() {
  ensure_gateway || { skip c "$GW_STATE"; return; }
  local url="http://127.0.0.1:$GW_PORT/webhooks/bench-bot" r
  r=$(post "$url" "$PAYLOAD")
  if [[ $r != 2* ]]; then
    tail -n 20 "$TMP/gw/gateway.log" >&2
    skip c "a single request did not succeed: ${r:0:300}"
    return
  fi
  log "scenario c: probe answered $r"
  # shellcheck disable=SC2046
  measure c "$url" "$PAYLOAD" $(tree_pids "$GW_PID")
}

scenario_d() {
  ensure_gateway || { skip d "$GW_STATE"; return; }
  local url="http://127.0.0.1:$GW_PORT/webhooks/bench-bot" r i
  for i in 1 2 3; do r=$(post "$url" "$PAYLOAD_OPEN"); log "scenario d: tripping the breaker: ${r:0:120}"; done
  r=$(post "$url" "$PAYLOAD_OPEN")
  if [[ $r != 200* || $r != *fallback* ]]; then
    skip d "the breaker did not open (expected 200 with the fallback body, got: ${r:0:300})"
    return
  fi
  log "scenario d: breaker open, probe answered $r"
  # shellcheck disable=SC2046
  measure d "$url" "$PAYLOAD_OPEN" $(tree_pids "$GW_PID")
}

START=$SECONDS
for s in $SCENARIOS; do "scenario_$s"; done

# ---------------------------------------------------------------- report
ms() { [[ -n ${1:-} ]] && awk -v u="$1" 'BEGIN { printf "%.2f", u / 1000 }' || echo -; }
ratio() { awk -v x="$1" -v y="$2" 'BEGIN { if (y > 0) printf "%.2f", x / y; else print "-" }'; }

mkdir -p "$OUT_DIR"
STAMP=$(date +%Y%m%d-%H%M%S)
OUT=$OUT_DIR/load-$STAMP.txt
REPORT=$TMP/report.txt
{
  echo "cognigy-gateway load benchmark — $(date -Is)"
  echo "host: $CORES cores ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)), $(uname -sr)"
  echo "tools: $(wrk -v 2>&1 | head -n 1 | awk '{ print $1, $2 }'), $("$NGINX" -v 2>&1 | sed 's/^nginx version: //')"
  if [[ $GW_STATE == ok ]]; then
    echo "gateway: $GATEWAY_BIN ($("$GATEWAY_BIN" --version 2>/dev/null || echo '?'); commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')), GATEWAY_LOG=${GATEWAY_LOG:-warn}"
  fi
  echo "load: wrk -t$THREADS -c$CONNECTIONS -d$DURATION (after a $WARMUP warm-up), POST ${PAYLOAD_BYTES}-byte JSON with X-API-Key"
  echo "nginx: worker_processes $NGINX_WORKERS per instance, access_log off, keepalive_requests 1000000"
  echo "NOTE: wrk, the server under test and (a-c) the downstream all share these $CORES cores;"
  echo "      'wrk cores' is the load generator's own CPU. CPU/req counts only the server under test."
  echo
  printf '%-33s %8s %7s %7s %7s %7s %10s %9s %9s %11s %10s\n' \
    scenario 'req/s' 'p50 ms' 'p99 ms' 'non-2xx' 'sockerr' 'CPU us/req' 'srv cores' 'wrk cores' 'other cores' 'peak RSS'
  for s in $SCENARIOS; do
    if [[ ${NOTE[$s]} == SKIPPED* || ${NOTE[$s]} == FAILED* ]]; then
      printf '%-33s %s\n' "${NAME[$s]}" "${NOTE[$s]}"
      continue
    fi
    printf '%-33s %8s %7s %7s %7s %7s %10s %9s %9s %11s %10s%s\n' "${NAME[$s]}" "${RPS[$s]}" \
      "$(ms "${P50[$s]}")" "$(ms "${P99[$s]}")" "${NON2XX[$s]}" "${SOCKERR[$s]}" "${CPU_US[$s]}" \
      "${SRV_CORES[$s]}" "${WRK_CORES[$s]}" "${OTHER_CORES[$s]}" "${RSS[$s]}" \
      "$([[ ${NOTE[$s]} == ok ]] || echo '  <-- ERRORS')"
  done
  echo
  echo "CPU us/req: utime+stime of the server process(es) under test (/proc/<pid>/stat) / requests;"
  echo "  a: downstream nginx (master+workers); b: proxy nginx only; c, d: the gateway process only."
  echo "peak RSS: VmHWM during the measured run (reset via clear_refs after warm-up), summed over processes."
  echo "other cores: machine-wide busy CPU (/proc/stat) minus the benchmark's own processes: another workload"
  echo "  (a build in another session, say) when above ~0.05; rows with more than $OTHER_MAX are flagged."
  echo
  have() { [[ ${NOTE[$1]:-} == ok ]]; }
  if have c && have b; then
    echo "gateway (c) / nginx proxy (b): throughput x$(ratio "${RPS[c]}" "${RPS[b]}"), p99 x$(ratio "${P99[c]}" "${P99[b]}"), CPU/req x$(ratio "${CPU_US[c]}" "${CPU_US[b]}")"
  fi
  if have d && have b; then
    echo "open-breaker reject (d) / nginx proxy (b): throughput x$(ratio "${RPS[d]}" "${RPS[b]}"), p99 x$(ratio "${P99[d]}" "${P99[b]}"), CPU/req x$(ratio "${CPU_US[d]}" "${CPU_US[b]}")"
  fi
  if have b && have a; then
    echo "nginx proxy (b) / direct (a): throughput x$(ratio "${RPS[b]}" "${RPS[a]}"), p99 x$(ratio "${P99[b]}" "${P99[a]}")"
  fi
  for s in $SCENARIOS; do
    [[ ${NOTE[$s]} == ok || ${NOTE[$s]} == SKIPPED* ]] || echo "!! ${NAME[$s]}: ${NOTE[$s]}"
    if [[ -n ${OTHER_CORES[$s]:-} ]] && awk -v o="${OTHER_CORES[$s]}" -v m="$OTHER_MAX" 'BEGIN { exit !(o > m) }'; then
      echo "!! ${NAME[$s]}: other processes used ${OTHER_CORES[$s]} cores during the run; its numbers are disturbed"
    fi
  done
  echo "total run time: $((SECONDS - START))s"
} >"$REPORT"
cat "$REPORT"
{
  cat "$REPORT"
  for s in $SCENARIOS; do
    [[ -f $TMP/wrk-$s.txt ]] || continue
    echo
    echo "--- raw wrk output, scenario $s ---"
    cat "$TMP/wrk-$s.txt"
  done
} >"$OUT"
echo "written to $OUT"
rc=0
for s in $SCENARIOS; do [[ ${NOTE[$s]} == ok || ${NOTE[$s]} == SKIPPED* ]] || rc=1; done
exit "$rc"
