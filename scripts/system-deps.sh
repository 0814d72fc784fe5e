#!/usr/bin/env bash
# Debian packages the test suite (and the studies) need, installed in one apt-get call when missing:
#   postgresql           the tests start a throwaway server from its binaries (tests/db_fixtures.py)
#   chromium             the browser tests drive it through Playwright (never `playwright install`)
#   docker-compose       validates docker-compose.yml without a Docker engine (`docker-compose config`)
#   dataset-fashion-mnist real Fashion-MNIST for the first study (/usr/share/datasets/fashion-mnist)
# Idempotent and quiet. Without root it only says what is missing: the tests that need it then
# skip, except under CI=true, where they fail.
set -euo pipefail

missing=()
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || missing+=(postgresql)
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
[ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)

if ((${#missing[@]})); then
    if [ "$(id -u)" -ne 0 ]; then
        echo "system-deps: missing ${missing[*]} (run as root to install: apt-get install ${missing[*]})" >&2
        exit 0
    fi
    echo "system-deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# PostgreSQL refuses to run as root: the test fixture runs it as this user (the package makes it).
if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
fi
