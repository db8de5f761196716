#!/usr/bin/env bash
# bench/load.sh — load benchmark: cognigy-gateway vs nginx, all on 127.0.0.1.
#
# Scenarios (run in the order given by SCENARIOS, default "a b c d e f"):
#   a  the downstream itself: nginx answering every POST with 200 {"id":"crm-1"}
#   b  nginx as a plain keep-alive reverse proxy in front of that downstream
#   c  the gateway, full sync pipeline (auth, JSON, schema, route, template,
#      PUT downstream, response template) in front of the same downstream
#   d  the gateway rejecting on a route whose breaker is open (fallback answer)
#   e  the gateway, async route on the embedded SQLite store: accepted webhooks
#      (202 after the commit) per second, while its worker delivers them to a;
#      then how long the worker takes to deliver the rest (the drain)
#   f  the same on PostgreSQL: a throwaway cluster started by this script
#      (initdb in the temp dir, fsync and synchronous_commit on)
#   g  c on a second gateway started with --telemetry off: c / g is the cost of
#      metrics and latency windows (run right after c, so both see the same machine)
#
# Every scenario POSTs the same ~600-byte Cognigy payload with wrk
# (bench/post.lua; e and f: bench/async.lua, which counts 202s and, with
# ASYNC_KEY=unique, gives each request its own inputId), CONNECTIONS
# connections, THREADS threads, after a WARMUP.
# c to f are skipped with a message when the gateway cannot be built or does
# not become ready (e.g. a build without `gateway serve`); f also when
# PostgreSQL cannot be installed or started.
#
# Environment (all optional):
#   SCENARIOS="a b c g d e f"  DURATION=10s  WARMUP=2s  CONNECTIONS=32  THREADS=2
#   NGINX_WORKERS=1      worker_processes of both nginx instances
#   GATEWAY_BIN=target/release/gateway   BUILD=auto|0 (0: never run cargo)
#   READY_TIMEOUT=30     seconds to wait for the gateway's /readyz
#   GATEWAY_LOG=warn     the gateway's log filter (info adds one log line per request)
#   OUT_DIR=bench/out    KEEP_TMP=0 (1 keeps the temp dir with configs and logs)
#   OTHER_MAX=0.10       CPU (cores) of unrelated processes above which a row is flagged
#   QUIET_WAIT=15        seconds to wait before each scenario for the machine to be that quiet
#   ASYNC_KEY=unique     e, f: unique = route idempotency_key "{{inputId}}" and a unique
#                        inputId per request; none = no idempotency_key on the route
#   DRAIN_TIMEOUT=120    e, f: most seconds to wait for the queue to empty (after the
#                        warm-up, and after the measured run)
#
# Needs wrk, nginx and curl (e: sqlite3, f: postgresql); installs them with
# apt-get when missing (root).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
CONNECTIONS=${CONNECTIONS:-32}
THREADS=${THREADS:-2}
SCENARIOS=${SCENARIOS:-"a b c g d e f"}
NGINX_WORKERS=${NGINX_WORKERS:-1}
READY_TIMEOUT=${READY_TIMEOUT:-30}
GATEWAY_BIN=${GATEWAY_BIN:-$REPO/target/release/gateway}
BUILD=${BUILD:-auto}
OUT_DIR=${OUT_DIR:-$HERE/out}
KEEP_TMP=${KEEP_TMP:-0}
OTHER_MAX=${OTHER_MAX:-0.10}   # cores used by unrelated processes above which a row is flagged
QUIET_WAIT=${QUIET_WAIT:-15}   # seconds to wait, before each scenario, for that to be true (0: don't)
ASYNC_KEY=${ASYNC_KEY:-unique}  # e, f: unique (idempotency_key "{{inputId}}", unique inputIds) or none
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-120}
ASYNC_GOAL=5000                # issue 8: accepted async webhooks per second on SQLite
API_KEY=bench-key
OPEN_INTENT=BenchRouteIsOpen   # the intent routed to the route with the open breaker

log() { printf '[load %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 2; }

for s in $SCENARIOS; do
  case $s in a|b|c|d|e|f|g) ;; *) die "unknown scenario '$s' in SCENARIOS (known: a b c d e f g)";; esac
done
case $ASYNC_KEY in unique|none) ;; *) die "ASYNC_KEY must be unique or none, got '$ASYNC_KEY'";; esac
wants() { [[ " $SCENARIOS " == *" $1 "* ]]; }

# ---------------------------------------------------------------- tools
pg_bin_dir() {  # the newest Debian PostgreSQL bin dir (or PATH's) with initdb and pg_ctl
  local d v best="" best_v=-1
  for d in /usr/lib/postgresql/*/bin; do
    v=${d%/bin} v=${v##*/}
    [[ $v =~ ^[0-9]+$ && -x $d/initdb && -x $d/pg_ctl ]] || continue
    if ((v > best_v)); then best=$d best_v=$v; fi
  done
  [[ -n $best ]] && { echo "$best"; return 0; }
  d=$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/initdb)")
  [[ -x $d/initdb && -x $d/pg_ctl ]] && { echo "$d"; return 0; }
  return 1
}

install_missing() {
  local need=() want=()
  command -v wrk >/dev/null 2>&1 || need+=(wrk)
  command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || need+=(nginx-light)
  command -v curl >/dev/null 2>&1 || need+=(curl)
  # Wanted by e and f only: without them f is skipped and e's store check is.
  if wants e; then command -v sqlite3 >/dev/null 2>&1 || want+=(sqlite3); fi
  if wants f; then pg_bin_dir >/dev/null || want+=(postgresql); fi
  ((${#need[@]} + ${#want[@]} == 0)) && return 0
  if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    ((${#need[@]} == 0)) || die "missing: ${need[*]}; install them (as root this script uses apt-get)"
    log "missing: ${want[*]}; install them for scenarios e and f (as root this script uses apt-get)"
    return 0
  fi
  log "installing ${need[*]} ${want[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  if ((${#need[@]})) && ! apt-get install -y -qq "${need[@]}" >&2; then
    # Some releases have no nginx-light; plain nginx does as well.
    local alt=("${need[@]/nginx-light/nginx}")
    apt-get install -y -qq "${alt[@]}" >&2 || die "apt-get install ${alt[*]} failed"
  fi
  if ((${#want[@]})) && ! apt-get install -y -qq "${want[@]}" >&2; then
    log "apt-get install ${want[*]} failed; scenario f will be skipped / e's store check left out"
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
PG_PID=                      # scenario f's PostgreSQL postmaster (also in PIDS; stopped by stop_postgres)
PG_WATCHDOG=                 # stops that PostgreSQL if this script dies without its cleanup

alive() {  # pid exists and is not a zombie
  local st
  st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  st=${st##*) }
  [[ ${st%% *} != Z ]]
}

forget_pid() {  # a stopped server: out of PIDS, so that cleanup never signals a reused pid
  local keep=() p
  for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

stop_postgres() {  # fast shutdown (clients disconnected, checkpoint), bounded
  [[ -n $PG_PID ]] || return 0
  forget_pid "$PG_PID"
  local i
  kill -INT "$PG_PID" 2>/dev/null || true
  for ((i = 0; i < 300; i++)); do alive "$PG_PID" || break; sleep 0.1; done
  if alive "$PG_PID"; then
    log "PostgreSQL did not stop within 30s; immediate shutdown"
    kill -QUIT "$PG_PID" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do alive "$PG_PID" || break; sleep 0.1; done
    alive "$PG_PID" && kill -KILL "$PG_PID" 2>/dev/null
  fi
  PG_PID=
}

cleanup() {
  local pid i
  # The gateways (and nginx) first, so that PostgreSQL sees its clients leave.
  for pid in "${PIDS[@]}"; do [[ $pid == "$PG_PID" ]] || kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    [[ $pid == "$PG_PID" ]] && continue
    for ((i = 0; i < 50; i++)); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    wait "$pid" 2>/dev/null || true
  done
  stop_postgres
  if [[ -n $PG_WATCHDOG ]]; then
    kill -TERM "$PG_WATCHDOG" 2>/dev/null || true
    wait "$PG_WATCHDOG" 2>/dev/null || true
  fi
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

reaped_ticks() {  # cutime + cstime: CPU of the pid's children that have exited (0 without a pid)
  local line f
  if [[ -z ${1:-} ]] || ! line=$(cat "/proc/$1/stat" 2>/dev/null); then echo 0; return; fi
  read -r -a f <<<"${line##*) }"
  echo $((f[13] + f[14]))          # fields 16 and 17 of proc(5)
}

# CPU ticks of every process this script started (PIDS), their children as
# they are now, and the exited children of PostgreSQL (its backends and
# autovacuum workers come and go). Differences between two calls are exact
# as long as the PIDS themselves run throughout.
ours_ticks() {
  local all=() p
  for p in "${PIDS[@]}"; do all+=($(tree_pids "$p")); done
  echo $(($(cpu_ticks "${all[@]}") + $(reaped_ticks "$PG_PID")))
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

write_schema() {  # write_schema DIR: DIR/schemas/bench-payload.schema.json
  local dir=$1
  mkdir -p "$dir/schemas"
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
}

write_routes() {
  local dir=$TMP/gw
  mkdir -p "$dir/routes"
  write_schema "$dir"
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

GW_BIN_STATE=  # "" (not checked), ok, or why the gateway binary cannot be used
gateway_usable() {  # build (BUILD=auto) and check the binary once; else GW_BIN_STATE says why
  [[ -n $GW_BIN_STATE ]] && { [[ $GW_BIN_STATE == ok ]]; return; }
  GW_BIN_STATE="not checked"
  mkdir -p "$TMP/gw"
  if [[ $BUILD != 0 && -f $REPO/Cargo.toml ]] && command -v cargo >/dev/null 2>&1; then
    log "cargo build --release (a no-op when target/release/gateway is current)"
    if ! (cd "$REPO" && nice -n 10 cargo build --release --bin gateway) >"$TMP/gw/build.log" 2>&1; then
      tail -n 20 "$TMP/gw/build.log" >&2
      GW_BIN_STATE="cargo build --release failed (see above)"
      return 1
    fi
  fi
  if [[ ! -x $GATEWAY_BIN ]]; then
    GW_BIN_STATE="no gateway binary at $GATEWAY_BIN (and no cargo to build it)"
    return 1
  fi
  if ! "$GATEWAY_BIN" serve --help >/dev/null 2>&1; then
    GW_BIN_STATE="this gateway build has no 'serve' subcommand ('gateway serve --help' failed)"
    return 1
  fi
  GW_BIN_STATE=ok
}

# launch_gateway DIR PORT ADMIN_PORT STORE_URL: validate DIR/routes, start
# `gateway serve` in DIR (log DIR/gateway.log) and wait for /readyz. Sets
# LAUNCHED_PID; on failure returns 1 with the reason in LAUNCH_WHY.
LAUNCHED_PID= LAUNCH_WHY=
launch_gateway() {
  local dir=$1 port=$2 admin=$3 store=$4 pid
  local extra=("${@:5}")   # more `serve` flags
  LAUNCHED_PID= LAUNCH_WHY=
  if ! "$GATEWAY_BIN" validate "$dir/routes" >"$dir/validate.log" 2>&1; then
    cat "$dir/validate.log" >&2
    LAUNCH_WHY="'gateway validate' refused the generated route file (see above)"
    return 1
  fi
  (cd "$dir" && GATEWAY_LOG=${GATEWAY_LOG:-warn} exec "$GATEWAY_BIN" serve --routes "$dir/routes" \
    --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
    --store "$store" "${extra[@]}") >"$dir/gateway.log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  LAUNCHED_PID=$pid
  if ! wait_http "http://127.0.0.1:$port/readyz" "$pid" "$READY_TIMEOUT"; then
    tail -n 20 "$dir/gateway.log" >&2
    if alive "$pid"; then
      LAUNCH_WHY="'gateway serve' did not answer 200 on /readyz within ${READY_TIMEOUT}s"
    else
      LAUNCH_WHY="'gateway serve' exited before it was ready"
    fi
    return 1
  fi
}

ensure_gateway() {  # 0 when the gateway is up; else GW_STATE says why
  [[ -n $GW_STATE ]] && { [[ $GW_STATE == ok ]]; return; }
  ensure_downstream
  GW_STATE="not started"
  local dir=$TMP/gw
  mkdir -p "$dir"
  gateway_usable || { GW_STATE=$GW_BIN_STATE; return 1; }
  pick_port GW_PORT
  pick_port GW_ADMIN_PORT
  pick_port CLOSED_PORT
  write_routes
  launch_gateway "$dir" "$GW_PORT" "$GW_ADMIN_PORT" "sqlite://$dir/gateway.db" ||
    { GW_STATE=$LAUNCH_WHY; return 1; }
  GW_PID=$LAUNCHED_PID
  log "gateway (pid $GW_PID) on 127.0.0.1:$GW_PORT, admin 127.0.0.1:$GW_ADMIN_PORT"
  GW_STATE=ok
}

# ---------------------------------------------------------------- PostgreSQL (scenario f)
PG_STATE=      # "" (not tried), ok, or why f is skipped
PG_BIN= PG_PSQL= PG_PORT= PG_URL= PG_DIR=$TMP/pg PG_DB=gwbench

as_pg() {  # run a PostgreSQL program as the server user when root (Debian's server refuses root)
  if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_sql() {  # pg_sql SQL: one query on the bench database, unaligned, fields separated by spaces
  "$PG_PSQL" -X -A -t -q -F ' ' -h 127.0.0.1 -p "$PG_PORT" -U postgres -d "$PG_DB" -c "$1"
}

pg_ticks() {  # CPU ticks of the PostgreSQL server: postmaster, current children, exited children
  [[ -n $PG_PID ]] || { echo 0; return; }
  # shellcheck disable=SC2046
  echo $(($(cpu_ticks $(tree_pids "$PG_PID")) + $(reaped_ticks "$PG_PID")))
}

# A throwaway cluster: initdb into the temp dir, the server on a free loopback
# port with its socket in that dir, durability settings as in production
# (fsync, synchronous_commit and full_page_writes on: a commit is flushed to
# the WAL on disk before it returns, which is what makes the 202 durable).
ensure_postgres() {  # 0 when up; else PG_STATE says why
  [[ -n $PG_STATE ]] && { [[ $PG_STATE == ok ]]; return; }
  PG_STATE="not started"
  PG_BIN=$(pg_bin_dir) || {
    PG_STATE="no PostgreSQL server binaries (initdb, pg_ctl) in /usr/lib/postgresql/*/bin or on PATH (Debian package postgresql)"
    return 1
  }
  PG_PSQL=$PG_BIN/psql
  [[ -x $PG_PSQL ]] || PG_PSQL=$(command -v psql) || { PG_STATE="no psql"; return 1; }
  mkdir -p "$PG_DIR"
  if [[ $(id -u) == 0 ]]; then
    id postgres >/dev/null 2>&1 || { PG_STATE="running as root, but there is no 'postgres' user to run the server as"; return 1; }
    chown postgres: "$PG_DIR"
  fi
  # --no-sync: initdb itself does not fsync the new files (a crash during set-up
  # does not matter here); the server's own settings are the production ones.
  if ! as_pg "$PG_BIN/initdb" -D "$PG_DIR/data" -U postgres --auth=trust -E UTF8 --locale=C \
      --no-sync >"$TMP/pg-initdb.log" 2>&1; then
    tail -n 20 "$TMP/pg-initdb.log" >&2
    PG_STATE="initdb failed (see above)"
    return 1
  fi
  local try
  for try in 1 2 3; do
    pick_port PG_PORT
    if as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 30 -s \
        -o "-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1 -c fsync=on -c synchronous_commit=on -c full_page_writes=on" \
        start >"$TMP/pg-start.log" 2>&1; then
      break
    fi
    PG_PORT=
    # Someone took the port between the check and the server's bind: another one.
    grep -q 'could not bind\|could not create any TCP' "$PG_DIR/server.log" 2>/dev/null || break
    log "PostgreSQL: port taken (try $try), another one"
  done
  if [[ -f $PG_DIR/data/postmaster.pid ]]; then
    PG_PID=$(head -n 1 "$PG_DIR/data/postmaster.pid")
    PIDS+=("$PG_PID")
    # Stops the server if this script dies without running its cleanup (SIGKILL).
    # shellcheck disable=SC2016
    setsid sh -c 'while kill -0 "$1" 2>/dev/null; do sleep 1; done; kill -INT "$2" 2>/dev/null' \
      sh "$$" "$PG_PID" </dev/null >/dev/null 2>&1 &
    PG_WATCHDOG=$!
  fi
  if [[ -z $PG_PORT ]]; then
    cat "$TMP/pg-start.log" >&2
    tail -n 20 "$PG_DIR/server.log" >&2 2>/dev/null || true
    PG_STATE="PostgreSQL did not start (see above)"
    return 1
  fi
  if ! as_pg "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres "$PG_DB" >"$TMP/pg-createdb.log" 2>&1; then
    cat "$TMP/pg-createdb.log" >&2
    PG_STATE="createdb $PG_DB failed (see above)"
    return 1
  fi
  PG_URL="postgres://postgres@127.0.0.1:$PG_PORT/$PG_DB"
  log "PostgreSQL $("$PG_BIN/postgres" --version | awk '{ print $3 }') (pid $PG_PID) on 127.0.0.1:$PG_PORT, data in $PG_DIR/data"
  PG_STATE=ok
}

# ---------------------------------------------------------------- async gateways (e, f)
ASYNC_ROUTE=bench-async
declare -A A_PID A_ADMIN A_WARM A_S0 A_S1 A_BACKLOG A_GW0 A_GW1 A_PG0 A_PG1

write_async_routes() {  # write_async_routes DIR
  local dir=$1 key
  if [[ $ASYNC_KEY == unique ]]; then
    key='    idempotency_key: "{{inputId}}"   # async.lua makes every inputId unique: no dedupe hits'
  else
    key='    # no idempotency_key (ASYNC_KEY=none): no dedupe check'
  fi
  mkdir -p "$dir/routes"
  write_schema "$dir"
  cat >"$dir/routes/bench.yaml" <<EOF
# generated by bench/load.sh (scenarios e, f)
bots:
  - id: bench-bot
    auth:
      api_key: { header: X-API-Key, keys: ["$API_KEY"] }
    schema: ../schemas/bench-payload.schema.json

routes:
  - name: $ASYNC_ROUTE
    bot: bench-bot
    intent: UpdateContactDetails
    mode: async
$key
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

  - name: bench-default
    bot: bench-bot
    intent: "*"
    downstream:
      url: "http://127.0.0.1:$DS_PORT/v1/bot-events"
      auth: { none: {} }
    body: '{"bot": "{{bot}}", "intent": {{json intent}}}'
EOF
}

# queue_state ADMIN_PORT: "pending leased dead delivered failed" from the
# gateway's /metrics: the queue gauges (gateway_delivery_queue_depth,
# gateway_delivery_dead_letters) and the async route's downstream tries by
# outcome since the gateway started (only the worker calls that route).
queue_state() {
  curl -s --max-time 5 "http://127.0.0.1:$1/metrics" | awk -v r="$ASYNC_ROUTE" '
    $1 == "gateway_delivery_queue_depth{state=\"pending\"}" { p = $2; seen = 1 }
    $1 == "gateway_delivery_queue_depth{state=\"leased\"}" { l = $2 }
    $1 == "gateway_delivery_dead_letters" { d = $2 }
    $1 == "gateway_downstream_tries_total{route=\"" r "\",outcome=\"success\"}" { s = $2 }
    $1 == "gateway_downstream_tries_total{route=\"" r "\",outcome=\"failure\"}" { f = $2 }
    END { if (!seen) exit 1; printf "%d %d %d %d %d\n", p, l, d, s, f }'
}

DRAIN_LEFT=
wait_drained() {  # wait_drained ADMIN_PORT SECONDS: until nothing is pending or leased; else DRAIN_LEFT says how many
  local admin=$1 deadline=$((SECONDS + $2)) p l q
  while :; do
    if q=$(queue_state "$admin"); then
      read -r p l _ <<<"$q"
      DRAIN_LEFT=$((p + l))
      ((DRAIN_LEFT == 0)) && return 0
    else
      DRAIN_LEFT="? (no /metrics answer)"
    fi
    ((SECONDS < deadline)) || return 1
    sleep 0.05
  done
}

stop_gateway() {  # stop_gateway PID: SIGTERM (queued deliveries stay in the store), bounded
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 150; i++)); do alive "$pid" || break; sleep 0.1; done
  if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
  wait "$pid" 2>/dev/null || true
  forget_pid "$pid"
}

accepted_in() {  # accepted_in FILE: the accepted= count of async.lua's summary line (0 if none)
  local n
  n=$(sed -n 's/^BENCH .*accepted=\([0-9]*\).*/\1/p' "$1" 2>/dev/null | head -n 1)
  echo "${n:-0}"
}

async_cpu_f() { echo $(($(cpu_ticks "${A_PID[f]}") + $(pg_ticks))); }

async_hook() {  # the M_HOOK of e and f (see measure)
  local what=$1 s=$2 q d p l
  case $what in
    after-warmup)
      # The measured run starts with an empty queue: what is delivered from
      # now on was accepted in the measured run.
      wait_drained "${A_ADMIN[$s]}" "$DRAIN_TIMEOUT" ||
        log "scenario $s: the warm-up's deliveries were not all delivered within ${DRAIN_TIMEOUT}s ($DRAIN_LEFT left)"
      A_WARM[$s]=$(accepted_in "$TMP/wrk-$s-warmup.txt")
      ;;
    before-run)
      q=$(queue_state "${A_ADMIN[$s]}") || q="0 0 0 0 0"
      read -r _ _ _ d _ <<<"$q"
      A_S0[$s]=$d
      A_GW0[$s]=$(cpu_ticks "${A_PID[$s]}") A_PG0[$s]=$(pg_ticks)
      ;;
    after-run)
      # At once: the worker keeps delivering.
      q=$(queue_state "${A_ADMIN[$s]}") || q="0 0 0 0 0"
      A_GW1[$s]=$(cpu_ticks "${A_PID[$s]}") A_PG1[$s]=$(pg_ticks)
      read -r p l _ d _ <<<"$q"
      A_BACKLOG[$s]=$((p + l)) A_S1[$s]=$d
      ;;
  esac
}

# ---------------------------------------------------------------- measurement
declare -A NAME RPS P50 P99 NON2XX SOCKERR CPU_US SRV_CORES WRK_CORES OTHER_CORES RSS NOTE REQS DUR_US
NAME[a]="a  downstream nginx, direct"
NAME[b]="b  nginx keep-alive proxy"
NAME[c]="c  gateway, sync pipeline"
NAME[d]="d  gateway, open-breaker reject"
NAME[e]="e  gateway async, SQLite"
NAME[f]="f  gateway async, PostgreSQL"
NAME[g]="g  gateway sync, telemetry off"

skip() { NOTE[$1]="SKIPPED: $2"; log "scenario $1 skipped: $2"; }

# measure SCENARIO URL BODYFILE PID...: warm up, then one measured wrk run.
# CPU and peak RSS are those of the PIDs. Optional, for e and f:
#   M_SCRIPT   the wrk script (default bench/post.lua); BENCH_RUN is set to
#              "<scenario>-warmup" and "<scenario>-run" for the two wrk runs
#   M_HOOK     a function called as `M_HOOK after-warmup|before-run|after-run SCENARIO`
#   M_CPU_FN   a function printing the CPU ticks that count (instead of the PIDs'
#              own), for a server with processes that come and go (PostgreSQL)
# A summary line with accepted=N (async.lua) makes req/s count only those
# (202s), and non-2xx every other answer.
M_SCRIPT= M_HOOK= M_CPU_FN= WRK_END=
measure() {
  local s=$1 url=$2 body=$3
  shift 3
  local pids=("$@") t0 t1 wt line script=${M_SCRIPT:-$HERE/post.lua}
  export BENCH_BODY_FILE=$body BENCH_API_KEY=$API_KEY
  ((QUIET_WAIT > 0)) && wait_quiet
  log "scenario $s: warm-up $WARMUP"
  BENCH_RUN=$s-warmup wrk -t "$THREADS" -c "$CONNECTIONS" -d "$WARMUP" -s "$script" "$url" >"$TMP/wrk-$s-warmup.txt" 2>&1
  [[ -z $M_HOOK ]] || "$M_HOOK" after-warmup "$s"
  local hwm_note=""
  hwm_reset "${pids[@]}" || hwm_note=" (peak since start)"
  [[ -z $M_HOOK ]] || "$M_HOOK" before-run "$s"
  log "scenario $s: measuring $DURATION, $CONNECTIONS connections, $THREADS threads → $url"
  local m0 m1 o0 o1 w0 w1
  w0=$EPOCHREALTIME
  m0=$(machine_busy_ticks)
  o0=$(ours_ticks)
  if [[ -n $M_CPU_FN ]]; then t0=$("$M_CPU_FN"); else t0=$(cpu_ticks "${pids[@]}"); fi
  local TIMEFORMAT='%3U %3S'
  { time BENCH_RUN=$s-run wrk -t "$THREADS" -c "$CONNECTIONS" -d "$DURATION" --latency -s "$script" "$url" \
      >"$TMP/wrk-$s.txt" 2>&1; } 2>"$TMP/wrk-$s.time"
  WRK_END=$EPOCHREALTIME
  [[ -z $M_HOOK ]] || "$M_HOOK" after-run "$s"
  if [[ -n $M_CPU_FN ]]; then t1=$("$M_CPU_FN"); else t1=$(cpu_ticks "${pids[@]}"); fi
  o1=$(ours_ticks)
  m1=$(machine_busy_ticks)
  w1=$EPOCHREALTIME
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
  local bad=${kv[err_status]} bad_what=non-2xx
  if [[ -n ${kv[accepted]:-} ]]; then
    requests=${kv[accepted]} bad=${kv[other]} bad_what="non-202 (${kv[other_codes]})"
  fi
  REQS[$s]=$requests
  DUR_US[$s]=$duration_us
  RPS[$s]=$(awk -v r="$requests" -v d="$duration_us" 'BEGIN { printf "%.0f", r / (d / 1e6) }')
  P50[$s]=${kv[p50_us]}
  P99[$s]=${kv[p99_us]}
  NON2XX[$s]=$bad
  SOCKERR[$s]=$((kv[err_connect] + kv[err_read] + kv[err_write] + kv[err_timeout]))
  CPU_US[$s]=$(awk -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v r="$requests" \
    'BEGIN { if (r > 0) printf "%.1f", t / hz * 1e6 / r; else print "-" }')
  SRV_CORES[$s]=$(awk -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v d="$duration_us" 'BEGIN { printf "%.2f", t / hz / (d / 1e6) }')
  read -r wu ws <"$TMP/wrk-$s.time"
  WRK_CORES[$s]=$(awk -v u="$wu" -v s="$ws" -v d="$duration_us" 'BEGIN { printf "%.2f", (u + s) / (d / 1e6) }')
  # Over the wall time from m0 to m1 (a little longer than wrk's run, more so with a hook).
  OTHER_CORES[$s]=$(awk -v m=$((m1 - m0)) -v o=$((o1 - o0)) -v w="$wu" -v ws="$ws" -v hz="$CLK_TCK" -v a="$w0" -v b="$w1" \
    'BEGIN { t = (m - o) / hz - (w + ws); if (t < 0) t = 0; printf "%.2f", t / (b - a) }')
  if ((NON2XX[$s] + SOCKERR[$s] > 0)); then
    NOTE[$s]="ERRORS: ${NON2XX[$s]} $bad_what, socket connect ${kv[err_connect]} read ${kv[err_read]} write ${kv[err_write]} timeout ${kv[err_timeout]}"
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

# g: c again on a second gateway started with `--telemetry off` (no metrics, no
# latency windows): c / g is what telemetry costs. Same routes, same downstream.
scenario_g() {
  ensure_gateway || { skip g "$GW_STATE"; return; }
  local dir=$TMP/gw-g port admin r
  mkdir -p "$dir"
  cp -r "$TMP/gw/routes" "$dir/"
  cp -r "$TMP/gw/schemas" "$dir/" 2>/dev/null || true
  pick_port port
  pick_port admin
  launch_gateway "$dir" "$port" "$admin" "sqlite://$dir/gateway.db" --telemetry off ||
    { skip g "$LAUNCH_WHY"; return; }
  local pid=$LAUNCHED_PID url="http://127.0.0.1:$port/webhooks/bench-bot"
  log "gateway with --telemetry off (pid $pid) on 127.0.0.1:$port"
  r=$(post "$url" "$PAYLOAD")
  [[ $r == 2* ]] || { skip g "a single request did not succeed: ${r:0:300}"; return; }
  # shellcheck disable=SC2046
  measure g "$url" "$PAYLOAD" $(tree_pids "$pid")
  stop_gateway "$pid"
}

# e and f: a fresh gateway with only the async route, on a fresh store;
# measure() with async.lua (accepted = 202s); then the drain: from wrk's end
# until nothing is pending or leased; then the store's rows against the 202s.
declare -A A_DURING A_TAIL_S A_TAIL_RATE A_TOTAL A_LEFT A_DEAD A_FAILED A_GW_US A_PG_US A_CHECK A_DESC A_LOG A_WARN

store_rows() {  # store_rows SCENARIO: "rows delivered tries" of the async route, from the store itself
  local sql="SELECT COUNT(*), COALESCE(SUM(CASE WHEN state = 'delivered' THEN 1 ELSE 0 END), 0), COALESCE(SUM(attempts), 0) FROM deliveries WHERE route = '$ASYNC_ROUTE'"
  case $1 in
    e) command -v sqlite3 >/dev/null 2>&1 && sqlite3 -cmd '.timeout 5000' -separator ' ' "$TMP/gw-e/data/gateway.db" "$sql" ;;
    f) pg_sql "$sql" ;;
  esac
}

# One synced 8 kB write in the temp dir (where both stores live), timed with
# dd oflag=dsync: the floor of one commit's latency on this disk. SQLite's
# group commit and PostgreSQL's WAL flush pay it once per batch.
SYNC_MS=
measure_sync() {
  [[ -n $SYNC_MS ]] && return 0
  local secs
  secs=$(LC_ALL=C dd if=/dev/zero of="$TMP/sync-probe" bs=8k count=200 oflag=dsync 2>&1 |
    sed -n 's/.*copied, \([0-9.]*\) s,.*/\1/p')
  rm -f "$TMP/sync-probe"
  SYNC_MS=$(awk -v s="${secs:-}" 'BEGIN { if (s > 0) printf "%.2f", s / 200 * 1000; else print "?" }')
  log "a synced 8 kB write in $TMP takes ${SYNC_MS} ms"
}

scenario_async() {  # scenario_async SCENARIO STORE_URL
  local s=$1 store=$2 dir=$TMP/gw-$1 port admin url r unique=0
  ensure_downstream
  gateway_usable || { skip "$s" "$GW_BIN_STATE"; return; }
  measure_sync
  write_async_routes "$dir"
  pick_port port
  pick_port admin
  if ! launch_gateway "$dir" "$port" "$admin" "$store"; then
    [[ -z $LAUNCHED_PID ]] || stop_gateway "$LAUNCHED_PID"
    skip "$s" "$LAUNCH_WHY"
    return
  fi
  A_PID[$s]=$LAUNCHED_PID A_ADMIN[$s]=$admin
  log "scenario $s: gateway (pid ${A_PID[$s]}) on 127.0.0.1:$port, admin 127.0.0.1:$admin, store $store"
  url="http://127.0.0.1:$port/webhooks/bench-bot"
  r=$(post "$url" "$PAYLOAD")
  if [[ $r != 202* ]]; then
    tail -n 20 "$dir/gateway.log" >&2
    stop_gateway "${A_PID[$s]}"
    skip "$s" "a single request was not accepted with 202: ${r:0:300}"
    return
  fi
  log "scenario $s: probe answered $r"

  [[ $ASYNC_KEY == unique ]] && unique=1
  export BENCH_UNIQUE=$unique
  M_SCRIPT=$HERE/async.lua M_HOOK=async_hook M_CPU_FN=
  [[ $s == f ]] && M_CPU_FN=async_cpu_f
  measure "$s" "$url" "$PAYLOAD" "${A_PID[$s]}"
  M_SCRIPT= M_HOOK= M_CPU_FN=
  if [[ ${NOTE[$s]} == FAILED* ]]; then
    stop_gateway "${A_PID[$s]}"
    return
  fi

  # The drain: what was still pending or leased when wrk stopped.
  local t_end q p l d delivered failed
  log "scenario $s: ${A_BACKLOG[$s]} deliveries pending or leased at the end of the run; waiting up to ${DRAIN_TIMEOUT}s for the worker"
  wait_drained "$admin" "$DRAIN_TIMEOUT" || true
  t_end=$EPOCHREALTIME
  q=$(queue_state "$admin") || q="? ? ? ${A_S0[$s]} ?"
  read -r p l d delivered failed <<<"$q"
  A_LEFT[$s]=$((p + l)) A_DEAD[$s]=$d A_FAILED[$s]=$failed
  local dur_s tail_s
  dur_s=$(awk -v d="${DUR_US[$s]}" 'BEGIN { printf "%.3f", d / 1e6 }')
  tail_s=$(awk -v a="$WRK_END" -v b="$t_end" 'BEGIN { printf "%.2f", b - a }')
  A_TAIL_S[$s]=$tail_s
  A_DURING[$s]=$(awk -v n=$((A_S1[$s] - A_S0[$s])) -v t="$dur_s" 'BEGIN { printf "%.0f", n / t }')
  # Under half a second the tail is too short to time with 0.05 s polling.
  A_TAIL_RATE[$s]=$(awk -v n="${A_BACKLOG[$s]}" -v t="$tail_s" 'BEGIN { if (t >= 0.5) printf "%.0f", n / t; else print "-" }')
  A_TOTAL[$s]=$(awk -v n=$((delivered - A_S0[$s])) -v t="$dur_s" -v u="$tail_s" 'BEGIN { printf "%.0f", n / (t + u) }')
  A_GW_US[$s]=$(awk -v t=$((A_GW1[$s] - A_GW0[$s])) -v hz="$CLK_TCK" -v r="${REQS[$s]}" \
    'BEGIN { if (r > 0) printf "%.1f", t / hz * 1e6 / r; else print "-" }')
  A_PG_US[$s]=-
  [[ $s == f ]] && A_PG_US[$s]=$(awk -v t=$((A_PG1[$s] - A_PG0[$s])) -v hz="$CLK_TCK" -v r="${REQS[$s]}" \
    'BEGIN { if (r > 0) printf "%.1f", t / hz * 1e6 / r; else print "-" }')
  log "scenario $s: drain ${tail_s}s, ${A_LEFT[$s]} left, ${A_DEAD[$s]} dead; ${A_DURING[$s]}/s delivered during the run, ${A_TOTAL[$s]}/s overall"

  # Every 202 has its row: rows >= 202s answered (probe + warm-up + run). A
  # few more rows are requests wrk had in flight when a run stopped: committed
  # and answered, but wrk did not wait for the answer (at most one per
  # connection and run).
  local seen=$((1 + ${A_WARM[$s]:-0} + REQS[$s])) out rows drows tries problems=()
  if out=$(store_rows "$s") && [[ -n $out ]]; then
    read -r rows drows tries <<<"$out"
    A_CHECK[$s]="202s answered $seen (probe 1, warm-up ${A_WARM[$s]:-0}, run ${REQS[$s]}); store rows $rows"
    if ((rows < seen)); then
      problems+=("$((seen - rows)) 202s without a row in the store")
    elif ((rows - seen > 2 * CONNECTIONS)); then
      problems+=("$((rows - seen)) more rows than 202s, above the $((2 * CONNECTIONS)) that can be in flight when wrk stops")
    else
      A_CHECK[$s]+=" (+$((rows - seen)) in flight when wrk stopped)"
    fi
    A_CHECK[$s]+="; delivered $drows, tries $tries (failed tries: ${A_FAILED[$s]})"
    ((drows == rows)) || problems+=("$((rows - drows)) rows not delivered")
    ((tries == drows)) || A_CHECK[$s]+=" (some needed more than one try)"
  else
    A_CHECK[$s]="store rows not checked (no sqlite3 / psql)"
  fi
  if [[ $s == f ]]; then
    # A transaction left open on a pooled connection holds its row locks and
    # takes the next borrower's statements in: none may be left at rest.
    local idle
    idle=$(pg_sql "SELECT count(*) FROM pg_stat_activity WHERE datname = '$PG_DB' AND state LIKE 'idle in transaction%'" 2>/dev/null || echo '?')
    A_CHECK[$s]+="; sessions idle in transaction: $idle"
    [[ $idle == 0 ]] || problems+=("$idle PostgreSQL sessions idle in transaction after the drain")
  fi
  ((A_LEFT[$s] == 0)) || problems+=("${A_LEFT[$s]} still pending or leased after ${DRAIN_TIMEOUT}s")
  ((A_DEAD[$s] == 0)) || problems+=("${A_DEAD[$s]} dead letters")

  # The store's durability settings, as the report should show them.
  local fs
  fs=$(df --output=fstype "$dir" 2>/dev/null | tail -n 1 || echo '?')
  if [[ $s == e ]]; then
    A_DESC[$s]="SQLite file $dir/data/gateway.db on $fs: journal_mode=$(sqlite3 "$dir/data/gateway.db" 'PRAGMA journal_mode' 2>/dev/null || echo '?'), synchronous=FULL (set by the gateway on each connection)"
  else
    A_DESC[$s]="PostgreSQL $(pg_sql 'SHOW server_version' 2>/dev/null | awk '{ print $1 }') on $fs: $(pg_sql "SELECT 'fsync=' || current_setting('fsync') || ', synchronous_commit=' || current_setting('synchronous_commit') || ', wal_sync_method=' || current_setting('wal_sync_method') || ', full_page_writes=' || current_setting('full_page_writes')" 2>/dev/null)"
  fi
  [[ $fs == tmpfs ]] && problems+=("the store is on tmpfs: fsync does nothing there, so nothing was durable")

  stop_gateway "${A_PID[$s]}"
  local nlog
  nlog=$(grep -cE ' (WARN|ERROR) ' "$dir/gateway.log" || true)
  A_LOG[$s]="$nlog warning/error lines in the gateway log"
  if ((nlog > 0)); then
    A_LOG[$s]+=", e.g.: $(grep -m 1 -E ' (WARN|ERROR) ' "$dir/gateway.log" | cut -c 1-300)"
    grep -qE ' ERROR ' "$dir/gateway.log" && problems+=("errors in the gateway log")
    # PostgreSQL's notice when BEGIN runs inside an open transaction: a
    # pooled connection was handed out still inside one (e.g. a request
    # cancelled by its client during BEGIN), and its next user's statements
    # ran in that transaction.
    if grep -q 'there is already a transaction in progress' "$dir/gateway.log"; then
      A_WARN[$s]="$(grep -c 'there is already a transaction in progress' "$dir/gateway.log") times a pooled PostgreSQL connection began a transaction inside an open one (see the gateway log)"
    fi
  fi
  if ((${#problems[@]})); then
    local joined
    joined=$(printf '%s; ' "${problems[@]}")
    if [[ ${NOTE[$s]} == ok ]]; then NOTE[$s]="ERRORS: ${joined%; }"; else NOTE[$s]+="; ${joined%; }"; fi
  fi
  log "scenario $s: ${A_CHECK[$s]}; ${NOTE[$s]}"
}

scenario_e() {
  scenario_async e "sqlite://$TMP/gw-e/data/gateway.db"
}

scenario_f() {
  gateway_usable || { skip f "$GW_BIN_STATE"; return; }
  ensure_postgres || { skip f "$PG_STATE"; return; }
  scenario_async f "$PG_URL"
  # Its autovacuum and checkpoints are not to disturb a scenario after it.
  stop_postgres
  PG_STATE="stopped after scenario f"
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
  if [[ $GW_BIN_STATE == ok ]]; then
    echo "gateway: $GATEWAY_BIN ($("$GATEWAY_BIN" --version 2>/dev/null || echo '?'); commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')), GATEWAY_LOG=${GATEWAY_LOG:-warn}"
  fi
  echo "load: wrk -t$THREADS -c$CONNECTIONS -d$DURATION (after a $WARMUP warm-up), POST ${PAYLOAD_BYTES}-byte JSON with X-API-Key"
  echo "nginx: worker_processes $NGINX_WORKERS per instance, access_log off, keepalive_requests 1000000"
  echo "NOTE: wrk, the server under test and (a-c) the downstream all share these $CORES cores;"
  echo "      'wrk cores' is the load generator's own CPU. CPU/req counts only the server under test."
  if wants e || wants f; then
    echo "      e, f: req/s counts only 202s (accepted webhooks) and non-2xx every other answer."
  fi
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
  echo "  a: downstream nginx (master+workers); b: proxy nginx only; c, d: the gateway process only;"
  echo "  e: the gateway (SQLite is in it); f: the gateway + the PostgreSQL server processes (per 202)."
  echo "peak RSS: VmHWM during the measured run (reset via clear_refs after warm-up), summed over processes;"
  echo "  e, f: the gateway only."
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
  if have c && have g; then
    echo "telemetry (c: on / g: off): CPU/req x$(ratio "${CPU_US[c]}" "${CPU_US[g]}"), throughput x$(ratio "${RPS[c]}" "${RPS[g]}"), p99 x$(ratio "${P99[c]}" "${P99[g]}")"
  fi
  if have b && have a; then
    echo "nginx proxy (b) / direct (a): throughput x$(ratio "${RPS[b]}" "${RPS[a]}"), p99 x$(ratio "${P99[b]}" "${P99[a]}")"
  fi
  async_ran() { [[ -n ${A_CHECK[$1]:-} ]]; }
  if async_ran e || async_ran f; then
    echo
    if [[ $ASYNC_KEY == unique ]]; then
      echo "async (e, f): route $ASYNC_ROUTE, mode async, idempotency_key \"{{inputId}}\" with a unique inputId per request"
      echo "  (every request a new delivery and a dedupe check); its worker delivers to a (nginx) meanwhile."
    else
      echo "async (e, f): route $ASYNC_ROUTE, mode async, no idempotency_key (ASYNC_KEY=none); its worker delivers to a (nginx) meanwhile."
    fi
    printf '%-33s %9s %9s %10s %8s %8s %8s %10s %5s %5s %9s %9s\n' \
      scenario accepted 'accept/s' 'deliv/s' backlog 'drain s' 'drain/s' 'overall/s' left dead 'gw us' 'store us'
    for s in e f; do
      async_ran "$s" || continue
      printf '%-33s %9s %9s %10s %8s %8s %8s %10s %5s %5s %9s %9s\n' "${NAME[$s]}" "${REQS[$s]}" "${RPS[$s]}" \
        "${A_DURING[$s]}" "${A_BACKLOG[$s]}" "${A_TAIL_S[$s]}" "${A_TAIL_RATE[$s]}" "${A_TOTAL[$s]}" \
        "${A_LEFT[$s]}" "${A_DEAD[$s]}" "${A_GW_US[$s]}" "${A_PG_US[$s]}"
    done
    echo
    echo "accepted, accept/s: 202 answers in the measured run (bench/async.lua counts statuses), per second;"
    echo "  p50/p99 in the table above are over all answers, i.e. of the 202s when non-2xx is 0."
    echo "deliv/s: deliveries made by the worker during the measured run, while accepting (CPU shared);"
    echo "backlog: pending + leased when wrk stopped; drain s: from then until nothing was pending or leased;"
    echo "drain/s: backlog / drain s: the worker alone, no accepting ('-': drain under 0.5 s, too short to time);"
    echo "overall/s: deliveries from the start of the run to the empty queue / (run + drain s);"
    echo "left: pending + leased after DRAIN_TIMEOUT=${DRAIN_TIMEOUT}s (0 unless it ran out); dead: dead letters;"
    echo "gw us, store us: CPU per accepted webhook of the gateway process (accepting and delivering) and,"
    echo "  for f, of the PostgreSQL server processes; the table's CPU us/req is their sum."
    echo "disk: one 8 kB write with O_DSYNC in the temp dir took ${SYNC_MS} ms (dd, 200 writes): at most"
    echo "  $(awk -v m="$SYNC_MS" 'BEGIN { if (m > 0) printf "%.0f", 1000 / m; else print "?" }') commits/s one after another; group commit shares each among a batch."
    for s in e f; do
      async_ran "$s" || continue
      echo "$s store: ${A_DESC[$s]}"
      echo "$s check: ${A_CHECK[$s]}"
      echo "$s log:   ${A_LOG[$s]}"
    done
    if async_ran e && [[ ${NOTE[e]} == ok ]]; then
      if ((RPS[e] >= ASYNC_GOAL)); then
        echo "issue 8 goal, >= $ASYNC_GOAL accepted/s on SQLite with every 202 durable: met (${RPS[e]}/s)"
      else
        echo "issue 8 goal, >= $ASYNC_GOAL accepted/s on SQLite with every 202 durable: NOT met (${RPS[e]}/s)"
      fi
    fi
  fi
  for s in $SCENARIOS; do
    [[ ${NOTE[$s]} == ok || ${NOTE[$s]} == SKIPPED* ]] || echo "!! ${NAME[$s]}: ${NOTE[$s]}"
    [[ -z ${A_WARN[$s]:-} ]] || echo "!! ${NAME[$s]}: ${A_WARN[$s]}"
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
