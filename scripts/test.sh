#!/usr/bin/env bash
# Runs every test of the project. This is the README's test command and what CI runs.
# On a fresh Debian machine (as root) it first installs what the tests need:
#   curl; chromium (the status page is tested in a real headless browser, driven by
#   playwright-core from tests/browser/, installed with npm from its lockfile);
#   postgresql's server binaries: the delivery store's tests run against a real PostgreSQL,
#   always (never skipped). The integration-test binary (tests/it/) starts one throwaway
#   cluster for its whole run (tests/it/support/pg.rs: initdb in a temp dir as the `postgres`
#   user, a free loopback port, stopped when the binary exits), the store bench its own. To reuse a running server instead, export
#   GATEWAY_TEST_PG_URL=postgres://user@host:port/db (each test makes its own schema in it).
#   podman, runc and debootstrap: tests/it/container.rs builds the Dockerfile and runs the image
#   (its Debian base made with debootstrap from the package archive; no container registry).
set -euo pipefail
cd "$(dirname "$0")/.."

apt_install() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    if [ -z "${APT_UPDATED:-}" ]; then apt-get update -qq >/dev/null; APT_UPDATED=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    echo "scripts/test.sh: please install: $*" >&2
    return 1
  fi
}

have_pg_server() {
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || command -v initdb >/dev/null 2>&1
}

need=()
command -v curl >/dev/null 2>&1 || need+=(curl)
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v node >/dev/null 2>&1 || need+=(nodejs npm)
if [ -z "${GATEWAY_TEST_PG_URL:-}" ] && ! have_pg_server; then need+=(postgresql); fi
if ((${#need[@]})); then apt_install "${need[@]}"; fi
# The container test's tools: installed when possible; where they cannot be, that test says
# "NOT RUN" instead of failing the whole run for what the machine lacks.
containers=()
command -v podman >/dev/null 2>&1 || containers+=(podman)
command -v runc >/dev/null 2>&1 || [ -x /usr/sbin/runc ] || containers+=(runc)
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || containers+=(debootstrap)
if ((${#containers[@]})); then
  apt_install "${containers[@]}" || echo "scripts/test.sh: could not install ${containers[*]}" >&2
fi

if [ ! -d tests/browser/node_modules/playwright-core ]; then
  (cd tests/browser && npm ci --no-audit --no-fund --silent)
fi

# The hostile-traffic tests open thousands of sockets: allow what the hard limit allows.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo test --all-targets "$@"
