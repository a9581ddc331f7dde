#!/usr/bin/env bash
# chatd's benchmark: chatd and its peers (Node ws, Python websockets) measured
# side by side in one run, on loopback only. Needs python3 (3.11), pip, node
# and npm; installs the rest itself:
#   - bench/.venv from bench/requirements-bench.txt (pinned; chatd's runtime
#     pins included, so chatd runs from the sources),
#   - bench/peers/node/node_modules with `npm ci` (pinned by package-lock.json).
#
#   bash bench/run.sh            full run (~18-20 min): bench/results/latest.json,
#                                docs/benchmarks.md, docs/benchmarks-fanout.png,
#                                bench/results/search.json
#   bash bench/run.sh --quick    tiny counts (~2 min), written to a temp dir:
#                                checks that the benchmark works, asserts no speed
set -euo pipefail
cd "$(dirname "$0")"
BENCH=$(pwd)
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.bench-requirements
want=$(cat requirements-bench.txt ../requirements.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-bench.txt
    echo "$want" > "$stamp"
fi
SERVERS=chatd,ws,websockets
if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
    lockstamp=peers/node/node_modules/.bench-lock
    lockwant=$(sha256sum peers/node/package-lock.json | cut -d' ' -f1)
    if [ "$(cat "$lockstamp" 2>/dev/null)" != "$lockwant" ]; then
        npm ci --prefix peers/node --silent --no-audit --no-fund
        echo "$lockwant" > "$lockstamp"
    fi
elif [ "$QUICK" = 1 ]; then
    echo "bench: no node/npm here: the quick run skips the ws peer" >&2
    SERVERS=chatd,websockets
else
    echo "bench: node and npm are needed for the ws peer" >&2
    exit 1
fi

# 10,000 idle connections need as many descriptors in the server and the
# load generator: raise the soft limit to the hard one.
hard=$(ulimit -Hn)
ulimit -n "$hard"
echo "ulimit -n: $(ulimit -n) (hard $hard)" >&2

if [ "$QUICK" = 1 ]; then
    out=$(mktemp -d)
    trap 'rm -rf "$out"' EXIT
    .venv/bin/python load.py --quick --servers "$SERVERS" --out "$out/latest.json"
    .venv/bin/python report.py "$out/latest.json" --md "$out/benchmarks.md" --png "$out/fanout.png"
    # CI asserts nothing about speed, but a scenario that failed (a refused
    # connection, a server that died) means the benchmark is broken; so does,
    # at these tiny counts, a big room not all joined, a storm not all back
    # and caught up (chatd: none of its messages missing or twice), a latency
    # point without a complete message, or chatd's batches not committed.
    .venv/bin/python - "$out/latest.json" <<'PY'
import json, sys
servers = json.load(open(sys.argv[1]))["servers"]
failed = {name: list(s["failures"]) for name, s in servers.items() if s.get("failures")}
for name, s in servers.items():
    bad = []
    big, storm = s.get("bigroom"), s.get("storm")
    if not big or big["joined"] < big["connections"]:
        bad.append(f"big room: {big and big['joined']} joined")
    if not storm or storm["caught_up"] < storm["members"] or storm.get("missing"):
        bad.append(f"storm: {storm and (storm['caught_up'], storm['members'], storm.get('missing'))}")
    if storm and storm.get("duplicates"):
        bad.append(f"storm: {storm['duplicates']} duplicates")
    if not (s.get("latency_fixed") or {}).get("complete"):
        bad.append("latency at a fixed rate: no complete message")
    batch = s.get("commit_batch")
    if name == "chatd" and not (batch and batch.get("supported") and batch.get("acked_per_s")):
        bad.append(f"commits with batches: {batch}")
    if bad:
        failed.setdefault(name, []).extend(bad)
if failed:
    sys.exit(f"bench --quick: scenarios failed: {failed}")
PY
    # Read state (unread counts, mark_read, typing) at tiny sizes: exits
    # non-zero when a scenario broke (a client refused, a count wrong).
    .venv/bin/python readstate.py all --quick --json "$out/readstate.json"
    # Webhooks on, and with the backend down, against off (tiny sizes).
    .venv/bin/python webhooks.py --quick --json "$out/webhooks.json"
    # The retention purge under load (20,000 old messages).
    .venv/bin/python purge.py --quick --json "$out/purge.json"
    .venv/bin/python overload.py --quick --json "$out/overload.json"
    # Search on 20,000 messages, SQLite and PostgreSQL (skipped, and said
    # so, where PostgreSQL is not installed): exits non-zero when a search
    # failed or got no answer.
    .venv/bin/python search.py --quick --json "$out/search.json"
    # 1,000 idle connections held, at rest, and back after a restart.
    .venv/bin/python connections.py --quick --json "$out/connections.json"
    # A cluster's unit costs and the capacity model (1-3 nodes on throwaway
    # PostgreSQL and Redis), and chatd migrate on 5,000 messages: with the
    # project's environment (they start the servers as the tests do).
    if [ -x ../.venv/bin/python ]; then
        ../.venv/bin/python cluster_load.py --quick --out "$out/cluster.json"
        ../.venv/bin/python migrate.py --messages 5000
    else
        echo "bench: no .venv (./build.sh test makes it): cluster_load.py and migrate.py not run" >&2
    fi
    echo "bench --quick: ok (results in a temp dir, docs/benchmarks.md untouched)"
else
    .venv/bin/python load.py --profile --out results/latest.json
    .venv/bin/python report.py results/latest.json \
        --md ../docs/benchmarks.md --png ../docs/benchmarks-fanout.png
    # Search over 1,000,000 messages, SQLite then PostgreSQL (~5 min more).
    .venv/bin/python search.py --json results/search.json
fi
