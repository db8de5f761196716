#!/usr/bin/env bash
# Runs every test of the project. This is the README's test command and what CI runs.
# It installs what the tests need when missing (a fresh Debian machine, as root).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
# The delivery store's tests run against a real PostgreSQL, always (never skipped). Each test
# binary that needs one starts a throwaway cluster itself (tests/support/pg.rs: initdb in a temp
# dir as the `postgres` user, a free loopback port, stopped when the binary exits), so only the
# server binaries are needed here. To reuse a running server instead, export
# GATEWAY_TEST_PG_URL=postgres://user@host:port/db (each test makes its own schema in it).
have_pg_server() {
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || command -v initdb >/dev/null 2>&1
}
if [ -z "${GATEWAY_TEST_PG_URL:-}" ] && ! have_pg_server; then
  need_apt+=(postgresql)
fi
if ((${#need_apt[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "scripts/test.sh: please install: ${need_apt[*]}" >&2
  fi
fi

cargo test --all-targets "$@"
