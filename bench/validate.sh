#!/usr/bin/env bash
# Times `gateway validate` on a generated tree of 1,000 routes in 100 files
# (10 routes each, 10 bots, a payload schema shared by the bots; every route
# with a body template, a URL template, OAuth2 or bearer auth, retry and
# breaker blocks and one example), and on the shipped routes/ as a baseline.
# Goal: the 1,000-route tree validates in under 1 s (median).
#
# Usage: bench/validate.sh [RUNS]        (default 10 runs with hyperfine, 5 without)
#
# No network while measuring: validate never does network I/O, and serve is
# timed on loopback. If hyperfine is missing, it is installed from Debian
# when that is allowed (root, apt-get present, not CI, BENCH_NO_INSTALL unset);
# otherwise (or with BENCH_NO_HYPERFINE=1) runs are timed with `date +%s%N`. Every run is bounded by
# `timeout`, so the script cannot hang.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET/release/gateway
RUNS=${1:-}
RUN_TIMEOUT=60 # seconds, for one validate run
ROUTE_FILES=100
ROUTES_PER_FILE=10
BOTS=10


log() { printf '%s\n' "$*" >&2; }

build() {
    log "building the release binary (cargo build --release; a no-op when up to date)…"
    (cd "$ROOT" && nice -n 10 cargo build --release --quiet --bin gateway)
}

ensure_hyperfine() {
    [[ -z ${BENCH_NO_HYPERFINE:-} ]] || return 1
    command -v hyperfine >/dev/null && return 0
    if [[ $(id -u) == 0 && -z ${CI:-} && -z ${BENCH_NO_INSTALL:-} ]] && command -v apt-get >/dev/null; then
        log "hyperfine is missing; installing it from Debian…"
        timeout 300 apt-get install -y -qq hyperfine >/dev/null 2>&1 ||
            { timeout 300 apt-get update -qq >/dev/null 2>&1 &&
                timeout 300 apt-get install -y -qq hyperfine >/dev/null 2>&1; } || true
    fi
    command -v hyperfine >/dev/null
}

# ---------- the generated tree ----------

generate() {
    local dir=$1 f r n bot auth
    mkdir -p "$dir/routes/crm" "$dir/schemas" "$dir/examples"
    cat >"$dir/schemas/payload.schema.json" <<'JSON'
{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "required": ["sessionId", "inputId"],
  "properties": {
    "sessionId": { "type": "string", "minLength": 1 },
    "inputId": { "type": "string", "minLength": 1 },
    "intent": { "type": ["string", "null"] },
    "intentScore": { "anyOf": [{ "type": "number" }, { "type": "string" }] },
    "slots": {
      "type": "object",
      "properties": {
        "customerId": {
          "type": "array",
          "items": { "type": "object", "properties": { "keyphrase": { "type": "string" } } }
        }
      },
      "additionalProperties": { "type": "array" }
    },
    "data": { "type": "object" }
  }
}
JSON
    cat >"$dir/examples/payload.json" <<'JSON'
{
  "sessionId": "s-1",
  "inputId": "i-1",
  "intent": "update_profile",
  "intentScore": 0.91,
  "slots": { "customerId": [{ "keyphrase": "C-1001" }] },
  "data": { "status": "gold", "notes": "prefers e-mail" }
}
JSON
    {
        echo "bots:"
        for ((n = 0; n < BOTS; n++)); do
            cat <<YAML
  - id: bot-$n
    auth:
      api_key: { header: X-API-Key, keys: ["\${BOT_${n}_KEY:-dev-key-$n}"] }
    schema: ../schemas/payload.schema.json
YAML
        done
    } >"$dir/routes/bots.yaml"
    for ((f = 0; f < ROUTE_FILES; f++)); do
        {
            echo "routes:"
            for ((r = 0; r < ROUTES_PER_FILE; r++)); do
                n=$((f * ROUTES_PER_FILE + r))
                bot=$((n % BOTS))
                if ((n % 2 == 0)); then
                    auth='        oauth2:
          token_url: "${CRM_TOKEN_URL:-https://login.example.com/oauth2/token}"
          client_id: gateway
          client_secret: "${CRM_CLIENT_SECRET:-dev-secret}"
          scopes: [crm.contacts.write]'
                else
                    auth='        bearer: { token: "${CRM_TOKEN:-dev-token}" }'
                fi
                cat <<YAML
  - name: route-$n
    bot: bot-$bot
    intent: intent-$n
    idempotency_key: "{{inputId}}"
    downstream:
      method: PUT
      url: "\${CRM_BASE_URL:-https://crm.example.com}/api/v2/contacts/{{slots.customerId.0.keyphrase}}?route=$n"
      timeout: 3s
      headers: { X-Source: cognigy, X-Session: "{{sessionId}}" }
      auth:
$auth
      success: [2xx, 409]
    body: |
      {
        "external_id": "{{slots.customerId.0.keyphrase}}",
        "status": "{{default data.status "active"}}",
        "notes": {{json data.notes}},
        "route": "{{route}}",
        "at": "{{now}}"
      }
    retry:
      attempts: 3
      backoff: { initial: 100ms, max: 1s }
    breaker:
      window: 60s
      min_calls: 10
      failure_rate: 0.5
      consecutive_failures: 5
      slow_call: { threshold: 1200ms, rate: 0.8 }
      open_for: 30s
      open_for_max: 5m
    examples:
      - name: upsert
        payload: ../../examples/payload.json
        expect:
          url: https://crm.example.com/api/v2/contacts/C-1001?route=$n
          body: { external_id: C-1001, status: gold, route: route-$n }
YAML
            done
        } >"$(printf '%s/routes/crm/routes-%03d.yaml' "$dir" "$f")"
    done
}

# ---------- timing ----------

# Prints "min median max" in ms of RUNS runs of `gateway validate DIR` in CWD.
time_validate() {
    local cwd=$1 dir=$2
    # it must validate clean, or we would time the error path
    if ! (cd "$cwd" && env -i PATH="$PATH" "$BIN" validate "$dir" >"$WORK/out.txt"); then
        log "gateway validate $dir is not clean:"
        head -20 "$WORK/out.txt" >&2
        exit 1
    fi
    if [[ $HAVE_HYPERFINE == 1 ]]; then
        (cd "$cwd" && hyperfine -N --style none --warmup 2 --runs "$RUNS" \
            --export-csv "$WORK/hf.csv" \
            "env -i PATH='$PATH' timeout $RUN_TIMEOUT '$BIN' validate '$dir'" >/dev/null)
        # command,mean,stddev,median,user,system,min,max (seconds)
        awk -F, 'NR == 2 { printf "%.1f %.1f %.1f\n", $7 * 1000, $4 * 1000, $8 * 1000 }' "$WORK/hf.csv"
    else
        local i t0 t1 times=()
        for ((i = 0; i < RUNS; i++)); do
            t0=$(date +%s%N)
            (cd "$cwd" && env -i PATH="$PATH" timeout "$RUN_TIMEOUT" "$BIN" validate "$dir" >/dev/null)
            t1=$(date +%s%N)
            times+=("$(((t1 - t0) / 1000))") # µs
        done
        printf '%s\n' "${times[@]}" | sort -n | awk '
            { t[NR] = $1 }
            END {
                med = (NR % 2) ? t[(NR + 1) / 2] : (t[NR / 2] + t[NR / 2 + 1]) / 2
                printf "%.1f %.1f %.1f\n", t[1] / 1000, med / 1000, t[NR] / 1000
            }'
    fi
}

# TODO(serve): fill in when `gateway serve` lands. Times start-up to the first
# 200 from GET /readyz on the generated tree, RUNS times, and prints
# "min median max" in ms. The polling loop is written and needs only the
# binary; check the flags against the real `serve` (SPEC §4), and switch to
# port 0 once serve reports the address it bound.
time_serve_startup() {
    local dir=$1 i port admin pid t0 t1 code deadline times=()
    for ((i = 0; i < RUNS; i++)); do
        port=$((20000 + RANDOM % 20000))
        admin=$((port + 1))
        t0=$(date +%s%N)
        env -i PATH="$PATH" "$BIN" serve --routes "$dir" \
            --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
            --store "sqlite://$WORK/serve-$i.db" >"$WORK/serve-$i.log" 2>&1 &
        pid=$!
        deadline=$((t0 + 30 * 1000000000)) # give up after 30 s
        code=000
        while [[ $code != 200 ]]; do
            if ! kill -0 "$pid" 2>/dev/null; then
                log "gateway serve exited before it was ready:"
                tail -20 "$WORK/serve-$i.log" >&2
                return 1
            fi
            if (($(date +%s%N) > deadline)); then
                log "gateway serve was not ready within 30 s"
                kill "$pid" 2>/dev/null || true
                wait "$pid" 2>/dev/null || true
                return 1
            fi
            code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 \
                "http://127.0.0.1:$port/readyz" 2>/dev/null) || code=000
            [[ $code == 200 ]] || sleep 0.005
        done
        t1=$(date +%s%N)
        times+=("$(((t1 - t0) / 1000))")
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    printf '%s\n' "${times[@]}" | sort -n | awk '
        { t[NR] = $1 }
        END {
            med = (NR % 2) ? t[(NR + 1) / 2] : (t[NR / 2] + t[NR / 2 + 1]) / 2
            printf "%.1f %.1f %.1f\n", t[1] / 1000, med / 1000, t[NR] / 1000
        }'
}

report() {
    local label=$1 min med max
    read -r min med max
    printf '%-52s min %8.1f ms   median %8.1f ms   max %8.1f ms\n' "$label" "$min" "$med" "$max"
    LAST_MEDIAN=$med
}

# ---------- main ----------

main() {
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/gateway-bench.XXXXXX")
    trap 'rm -rf "$WORK"' EXIT
    build
    if ensure_hyperfine; then HAVE_HYPERFINE=1; else HAVE_HYPERFINE=0; fi
    if [[ -z $RUNS ]]; then
        if [[ $HAVE_HYPERFINE == 1 ]]; then RUNS=10; else RUNS=5; fi
    fi

    generate "$WORK/tree"
    files=$(find "$WORK/tree/routes" -name '*.yaml' | wc -l)
    routes=$(grep -rc '^  - name: ' "$WORK/tree/routes" | awk -F: '{ s += $2 } END { print s }')
    log "generated $routes routes in $files files under $WORK/tree"
    shipped_files=$(find "$ROOT/routes" -name '*.y*ml' | wc -l)

    echo "gateway validate, $RUNS runs each ($([[ $HAVE_HYPERFINE == 1 ]] && echo "hyperfine $(hyperfine --version | cut -d' ' -f2)" || echo 'date +%s%N loop'); $(nproc) CPUs)"
    # (command substitution, not a pipe: a failed run stops the script, and
    # report sets LAST_MEDIAN in this shell)
    result=$(time_validate "$ROOT" routes/)
    report "shipped routes/ ($shipped_files files, baseline)" <<<"$result"
    result=$(time_validate "$WORK/tree" routes)
    report "generated tree ($routes routes in $((files - 1)) files + bots)" <<<"$result"
    if awk -v m="$LAST_MEDIAN" 'BEGIN { exit !(m < 1000) }'; then
        echo "goal: 1,000-route tree under 1 s (median): met"
    else
        echo "goal: 1,000-route tree under 1 s (median): MISSED"
    fi

    if env -i PATH="$PATH" "$BIN" help serve >/dev/null 2>&1; then
        if command -v curl >/dev/null; then
            result=$(time_serve_startup "$WORK/tree/routes")
            report "serve start-up to first 200 from /readyz" <<<"$result"
        else
            echo "serve start-up: skipped (curl is missing)"
        fi
    else
        echo "serve start-up: skipped (gateway serve is not there yet; see time_serve_startup)"
    fi
}

# sourcing the script (to reuse generate) runs nothing
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    main "$@"
fi
