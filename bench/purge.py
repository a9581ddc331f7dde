"""The retention purge under load: what purging millions of old messages
costs the latency of live chat.

Usage (bench/.venv, which bench/run.sh makes)::

    python bench/purge.py [--quick] [--messages 10000000] [--json FILE]

What it does
------------
* Builds a SQLite database the way chatd lays it out (its own migrations),
  with ``--messages`` messages 60 days old spread over 100 rooms
  (``old0``..``old99``), written straight into the file in large
  transactions (minutes for 10 million; the file is about 2 GB).
* Runs chatd on it twice, one after the other (bench/load.py's config,
  chatd on CPU 0, the load generator on the others):
  - ``off``: no ``[retention]``;
  - ``purge``: ``[retention] room_days = 30, interval_seconds = 1``: every
    old message is to go, in batches of ``batch_size`` (500) messages,
    one writer operation each.
  In each, bench/load.py's latency point: a room of 100, one publisher at
  ``--rate`` (500) msgs/s, publish-to-last-recipient p50 / p99 / p99.9 over
  ``--duration`` seconds; in ``purge`` the window starts once the purge has
  begun (its counter is read from ``/metrics``) and the purge's own figures
  are reported: messages purged during the window, the batches' times
  (``chatd_retention_batch_seconds``) and the rate (a purge of 10 million
  at that rate takes the better part of an hour; the quick run waits for
  its 20,000 to go).
* Target (issue bound): the p99 with the purge under 2x the p99 without.
  Nothing is asserted; ``--quick`` (20,000 messages, a 2 s window) checks
  that the script works.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import readstate  # noqa: E402
from load import log, proc_rss_kib  # noqa: E402

from chatd.protocol import rfc3339  # noqa: E402
from chatd.store.schema import connect, migrate  # noqa: E402

OLD_ROOMS = 100
DAY = 86400.0


def build(db: Path, messages: int) -> float:
    """``messages`` old messages in ``OLD_ROOMS`` rooms; seconds taken."""
    started = time.monotonic()
    db.parent.mkdir(parents=True, exist_ok=True)
    conn = connect(str(db))
    migrate(conn)
    conn.execute("PRAGMA synchronous = OFF")
    created = rfc3339(time.time() - 60 * DAY)
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO users (id, username, created_at) VALUES (?, ?, ?)",
        [(u, f"old{u}", created) for u in range(1, 101)],
    )
    conn.executemany(
        "INSERT INTO rooms (name, private, created_at) VALUES (?, 0, ?)",
        [(f"old{r}", created) for r in range(OLD_ROOMS)],
    )
    conn.execute("COMMIT")
    per_room = messages // OLD_ROOMS
    chunk = 200_000
    rows: list[tuple[Any, ...]] = []
    done = 0

    def flush() -> None:
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO messages (channel, seq, user_id, username, message_type, content,"
            " created_at) VALUES (?, ?, ?, ?, 'text', ?, ?)",
            rows,
        )
        conn.execute("COMMIT")
        rows.clear()

    content = "x" * 100
    for seq in range(1, per_room + 1):  # (rooms interleaved, as a busy server writes)
        for r in range(OLD_ROOMS):
            u = r + 1
            rows.append((f"r:old{r}", seq, u, f"old{u}", content, created))
            if len(rows) >= chunk:
                flush()
                done += chunk
                log(f"  built {done:,} / {per_room * OLD_ROOMS:,} messages")
    if rows:
        flush()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return time.monotonic() - started


def metric(port: int, name: str) -> float:
    """A metric's value (summed over its labels) from chatd's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--messages", type=int)
    parser.add_argument("--duration", type=float)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--json")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--no-pin", dest="pin", action="store_false")
    a = parser.parse_args()
    q = a.quick
    a.messages = a.messages or (20_000 if q else 10_000_000)
    a.duration = a.duration or (2.0 if q else 20.0)
    a.warm = 0.2 if q else 1.0
    a.members = 100
    readstate.raise_nofile()
    bench = readstate.Bench(a)
    bench.rooms = ["lat"]
    db = bench.tmp / "purge" / "chatd.db"
    out: dict[str, Any] = {"messages": a.messages, "rate": a.rate, "quick": q}
    try:
        log(f"building {a.messages:,} old messages in {db}")
        out["build_seconds"] = build(db, a.messages)
        out["db_bytes"] = db.stat().st_size
        for side in ("off", "purge"):
            server = bench.server(db=db, rooms=["lat"])
            if side == "purge":
                cfg = Path(server.cmd[-1])
                text = cfg.read_text() + (
                    "[retention]\nroom_days = 30\ninterval_seconds = 1\n"
                )
                cfg.write_text(text)
            try:
                server.start(bench.server_cpus)
                res: dict[str, Any] = {}
                if side == "purge":
                    deadline = time.monotonic() + 60
                    while metric(server.port, "chatd_retention_purged_messages_total") == 0:
                        if time.monotonic() > deadline:
                            raise RuntimeError("the purge did not start")
                        time.sleep(0.1)
                    before = metric(server.port, "chatd_retention_purged_messages_total")
                    started = time.monotonic()
                res["latency"] = bench.latency(server, a.members, a.rate, a.duration)
                if side == "purge":
                    during = metric(server.port, "chatd_retention_purged_messages_total") - before
                    span = time.monotonic() - started
                    res["purged_during"] = during
                    res["purged_per_s_during"] = during / span
                    end = time.monotonic() + (10 if q else 0)  # (a full purge: see below)
                    while metric(server.port, "chatd_retention_purged_messages_total") < a.messages:
                        if time.monotonic() > end:
                            break
                        time.sleep(0.5)
                    res["purged_total"] = metric(
                        server.port, "chatd_retention_purged_messages_total"
                    )
                    batches = metric(server.port, "chatd_retention_batch_seconds_count")
                    held = metric(server.port, "chatd_retention_batch_seconds_sum")
                    res["batches"] = batches
                    res["batch_mean_ms"] = 1000 * held / batches if batches else None
                    res["purge_done"] = res["purged_total"] >= a.messages
                res["rss_kib"] = proc_rss_kib(server.pid)
            finally:
                server.stop()
            out[side] = res
    finally:
        bench.close()
    off, on = out["off"]["latency"], out["purge"]["latency"]
    ratio = on["p99_ms"] / off["p99_ms"]
    out["p99_ratio"] = ratio
    p = out["purge"]
    print(f"\npurge: {a.messages:,} old messages ({out['db_bytes'] / 2**30:.2f} GiB), latency at"
          f" {a.rate:,.0f} msgs/s into a room of 100 over {a.duration:g} s")  # fmt: skip
    for side in ("off", "purge"):
        lat = out[side]["latency"]
        print(f"  {side:6} p50 {lat['p50_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms,"
              f" p99.9 {lat['p999_ms']:.2f} ms, server {lat['server_cpu']:.2f} cores")  # fmt: skip
    mean = p["batch_mean_ms"]
    print(f"  purged {p['purged_during']:,.0f} during the window ({p['purged_per_s_during']:,.0f}/s),"
          f" {p['purged_total']:,.0f} in all (done: {p['purge_done']}), {p['batches']:,.0f} batches,"
          f" {mean if mean is not None else float('nan'):.2f} ms each on average")  # fmt: skip
    print(f"  p99 with the purge / without: {ratio:.2f} (target under 2)")
    print(json.dumps({"scenario": "purge", "p99_ratio": ratio, "purged": p["purged_total"]}))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1, default=str))
    return 0 if on["complete"] and off["complete"] and p["purged_total"] > 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
