"""Many idle connections on one node: ``python bench/connections.py
[--connections N] [--rest 65] [--quick] [--json FILE]`` (with bench/.venv).

What it measures, on one chatd (SQLite, pinned to CPU 0; the load
generator, ``--procs`` bench/worker.py processes, on the other CPU):

* **held**: ``--connections`` WebSocket connections opened (token checked,
  no room), each answering the server's pings (every
  ``ping_interval_seconds``, 30 by default: the connections are spread
  over it as they open), then held for ``--rest`` seconds: how many are
  still open at the end (none may be dropped by the idle timeout);
* **memory**: the server's RSS before the first and once all are open,
  per connection;
* **heartbeats at rest**: the server's CPU over the rest, per connection
  and per ping (a ping a connection every 30 s);
* **reconnect after a restart**: the server gets SIGTERM (a drain: 1001 to
  everyone), is started again on the same port and database, and every
  client reconnects with bench/worker.py's back-off (0.5 s doubling up to
  8 s, each wait times a random 0.5-1.5), as the reference client backs
  off; the seconds until all are back, and the server's CPU meanwhile.

The machine's limit: a process may hold at most as many descriptors as the
hard ``RLIMIT_NOFILE`` (``ulimit -Hn``); the server raises its soft limit
to it, and ``--connections`` beyond it less 100 is cut to that (and said).
(All from 127.0.0.1: up to the ephemeral port range, 28,000 here.)
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from load import MONO, Pool, Server, log, proc_cpu, proc_rss_kib, split  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=50_000)
    parser.add_argument("--rest", type=float, default=65.0, help="seconds held at rest")
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--deadline", type=float, default=120.0, help="s for all to reconnect")
    parser.add_argument("--quick", action="store_true", help="1,000 connections, 5 s at rest")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.connections, args.rest, args.procs = 1000, 5.0, 2
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    wanted = args.connections
    if hard != resource.RLIM_INFINITY and args.connections > hard - 100:
        args.connections = hard - 100
        log(f"{wanted:,} connections wanted; this machine's descriptor limit (ulimit -Hn"
            f" {hard:,}) lets one process hold {args.connections:,}")  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="chatd-conns-"))
    server = Server("chatd", False, tmp, ["idle"])
    pool = Pool(args.procs, {1})
    result: dict[str, Any] = {"wanted": wanted, "connections": args.connections, "fd_hard": hard}
    try:
        server.start({0})
        time.sleep(1.0)
        rss0 = proc_rss_kib(server.pid)
        started = time.monotonic()
        parts = split(args.connections, args.procs)
        cmds: list[dict[str, Any] | None] = []
        uid = 1
        for part in parts:
            cmds.append({"op": "connect", "n": part, "port": server.port, "deflate": False,
                         "room": None, "uid0": uid, "concurrency": 100})  # fmt: skip
            uid += part
        replies = pool.call(cmds, timeout=600)
        opened = sum(r["opened"] for r in replies)
        result["open_seconds"] = time.monotonic() - started
        result["opened"] = opened
        rss1 = proc_rss_kib(server.pid)
        result["rss_mib"] = [rss0 / 1024, rss1 / 1024]
        result["kib_per_connection"] = (rss1 - rss0) / max(1, opened)
        log(f"opened {opened:,} in {result['open_seconds']:.1f} s;"
            f" RSS {rss0 / 1024:.0f} -> {rss1 / 1024:.0f} MiB,"
            f" {result['kib_per_connection']:.2f} KiB a connection")  # fmt: skip
        # at rest: the heartbeats
        c0 = proc_cpu(server.pid)
        t0 = time.monotonic()
        time.sleep(args.rest)
        rest = time.monotonic() - t0
        cores = (proc_cpu(server.pid) - c0) / rest
        still = sum(r["open"] for r in pool.all({"op": "drain", "quiet": 0.1, "limit": 1}, 30))
        result.update(rest_seconds=rest, rest_cores=cores, open_after_rest=still)
        # a ping a connection every 30 s (once the rest spans a whole interval)
        per_ping = cores * 30.0 / max(1, opened) * 1e6 if rest >= 30.0 else None
        result["us_per_ping"] = per_ping
        log(f"at rest {rest:.0f} s: server {cores:.4f} cores"
            + (f" ({per_ping:.1f} µs a ping and its pong)" if per_ping is not None else "")
            + f"; still open {still:,}")  # fmt: skip
        # a restart: every client reconnects
        result["restart"] = restart(server, pool, opened, args.deadline)
    finally:
        server.stop()
        pool.close()
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text)
    return 0 if result.get("open_after_rest") == result.get("opened") else 1


def restart(server: Server, pool: Pool, opened: int, deadline: float) -> dict[str, Any]:
    """SIGTERM, start again, and wait until every client is back."""
    start = {"op": "reconnect_start", "deadline": MONO() + int((deadline + 60) * 1e9),
             "backoff_base": 0.5, "backoff_cap": 8.0}  # fmt: skip
    pool.all(start, 60)
    t_stop = time.monotonic()
    server.stop()
    stopped = time.monotonic() - t_stop
    server.start({0}, restart=True)
    t0 = time.monotonic()
    c0 = proc_cpu(server.pid)
    back = 0
    while time.monotonic() - t0 < deadline:
        back = sum(r["back"] for r in pool.all({"op": "reconnect_status"}, 30))
        if back >= opened:
            break
        time.sleep(0.2)
    seconds = time.monotonic() - t0
    cpu = proc_cpu(server.pid) - c0
    pool.all({"op": "reconnect_stop"}, 60)
    out = {"stop_seconds": stopped, "back": back, "seconds": seconds,
           "server_cpu_seconds": cpu, "rss_mib": proc_rss_kib(server.pid) / 1024}  # fmt: skip
    log(f"restart: stopped in {stopped:.1f} s; {back:,}/{opened:,} back in {seconds:.1f} s,"
        f" server {cpu:.1f} CPU s, RSS {out['rss_mib']:.0f} MiB")  # fmt: skip
    return out


if __name__ == "__main__":
    sys.exit(main())
