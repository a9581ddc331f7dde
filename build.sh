#!/usr/bin/env bash
# chatd's two commands, on a machine with nothing but python3 and pip access:
#
#   ./build.sh          build chatd.pyz, the shiv zipapp (pinned, reproducible)
#   ./build.sh test     install the test dependencies into .venv, run pytest
#   ./build.sh lint     ruff over chatd/, tests/ and fuzz/, mypy --strict over chatd/ (CI too)
#
# Extra arguments after `test` go to pytest (./build.sh test -k history).
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv

# Create .venv and install the pinned requirements, once per change of them.
venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV"
    fi
    local stamp="$VENV/.chatd-requirements"
    local want
    want=$(cat requirements*.txt | sha256sum | cut -d' ' -f1)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
            -r requirements-test.txt -r requirements-build.txt -r requirements-lint.txt
        echo "$want" > "$stamp"
    fi
}

# The protocol document's React hook runs in the tests under Node.js: install
# React there (pinned by tests/js/package-lock.json) when npm is available.
js() {
    command -v npm >/dev/null 2>&1 || return 0
    local stamp=tests/js/node_modules/.chatd-lock
    local want
    want=$(sha256sum tests/js/package-lock.json | cut -d' ' -f1)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        npm ci --prefix tests/js --silent --no-audit --no-fund
        echo "$want" > "$stamp"
    fi
}

build() {
    venv
    local site=build/site
    rm -rf build
    mkdir -p "$site"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        --no-deps --no-compile --target "$site" -r requirements.txt
    cp -r chatd "$site/"
    find "$site" -name __pycache__ -prune -exec rm -rf {} +
    "$VENV/bin/shiv" --site-packages "$site" --entry-point chatd.cli:main \
        --python '/usr/bin/env python3' --reproducible --compressed \
        --output-file chatd.pyz
    rm -rf build
    echo "built chatd.pyz ($(sha256sum chatd.pyz | cut -c1-16)...)"
}

case "${1:-build}" in
    build)
        build
        ;;
    test)
        shift
        venv
        js
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    lint)
        venv
        "$VENV/bin/ruff" check chatd tests fuzz
        "$VENV/bin/ruff" format --check chatd tests fuzz
        "$VENV/bin/mypy" chatd
        ;;
    *)
        echo "usage: ./build.sh [build|test [pytest args]|lint]" >&2
        exit 2
        ;;
esac
