#!/usr/bin/env bash
# The browser test: chatd from the sources on a free port (dev tokens on, a
# throwaway SQLite database), the page driven in headless Chromium by
# chat.spec.mjs (playwright-core, Debian's /usr/bin/chromium), then the server
# stopped. Exits with the driver's status.
#
#   npm ci --prefix tests/browser     (once)
#   bash tests/browser/run.sh
#
# The driver restarts the server itself, to check reconnection and recovery:
# it gets the command (CHATD_SERVER_CMD, a JSON array) and the file holding the
# running server's pid (CHATD_PID_FILE); it stops that pid with SIGTERM, starts
# the same command again and writes the new pid there. This script stops
# whichever server the file names at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}

[ -x "$CHROMIUM" ] || { echo "run.sh: $CHROMIUM not found (apt-get install chromium)" >&2; exit 2; }
[ -d tests/browser/node_modules/playwright-core ] ||
    { echo "run.sh: run 'npm ci --prefix tests/browser' first" >&2; exit 2; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/chatd-browser.XXXXXX")
PID_FILE=$TMP/server.pid
LOG=$TMP/server.log
mkdir -p test-artifacts

# Alive and not a zombie (a server the driver started is not our child).
alive() {
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}
stop_server() {
    local pid
    pid=$(cat "$PID_FILE" 2>/dev/null) || return 0
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 100); do
        alive "$pid" || return 0
        sleep 0.1
    done
    echo "run.sh: the server did not stop in 10 s; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
}
cleanup() {
    stop_server
    cp "$LOG" test-artifacts/browser-server.log 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT

PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
SECRET=$("$PYTHON" -c 'import secrets; print(secrets.token_hex(32))')
API_KEY=$("$PYTHON" -c 'import secrets; print(secrets.token_hex(16))')
cat > "$TMP/chatd.toml" <<EOF
[server]
host = "127.0.0.1"
port = $PORT
dev_tokens = true
shutdown_timeout_seconds = 2

[auth]
jwt_secret = "$SECRET"

[storage]
sqlite_path = "$TMP/data/chatd.db"

[rooms]
public = ["general", "random"]

[limits]
messages_per_minute = 1000
messages_per_hour = 10000

[api]
keys = ["$API_KEY"]
EOF

CMD=("$PYTHON" -m chatd --config "$TMP/chatd.toml")
"${CMD[@]}" >>"$LOG" 2>&1 &
echo $! > "$PID_FILE"

up=false
for _ in $(seq 150); do
    if "$PYTHON" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/healthz', timeout=1)" 2>/dev/null; then
        up=true
        break
    fi
    sleep 0.1
done
if [ "$up" != true ]; then
    echo "run.sh: chatd did not answer /healthz on port $PORT; its log:" >&2
    cat "$LOG" >&2
    exit 1
fi

# Node 20 has WebSocket behind a flag (the driver's raw clients use it).
NODE_FLAGS=()
node -e 'process.exit(typeof WebSocket === "function" ? 0 : 1)' || NODE_FLAGS=(--experimental-websocket)

status=0
CHATD_URL="http://127.0.0.1:$PORT" \
CHATD_API_KEY="$API_KEY" \
CHATD_PID_FILE="$PID_FILE" \
CHATD_SERVER_LOG="$LOG" \
CHATD_SERVER_CMD=$("$PYTHON" -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "${CMD[@]}") \
CHROMIUM="$CHROMIUM" \
ARTIFACTS="$ROOT/test-artifacts" \
    node "${NODE_FLAGS[@]}" tests/browser/chat.spec.mjs || status=$?
if [ "$status" -ne 0 ]; then
    echo "run.sh: the browser test failed ($status); server log: test-artifacts/browser-server.log" >&2
fi
exit "$status"
