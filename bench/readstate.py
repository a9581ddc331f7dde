"""Read state under load: unread counts, mark_read, typing (chatd only).

Usage (bench/.venv, which bench/run.sh makes)::

    python bench/readstate.py unread  [--quick] [--rooms 1000] [--messages 10000] [--calls 200]
    python bench/readstate.py commit  [--quick] [--rounds 4]
    python bench/readstate.py typing  [--quick] [--members 1000]
    python bench/readstate.py fanout  [--quick] [--rounds 4]
    python bench/readstate.py all     [--quick]

Each scenario prints a short table and one JSON line (``{"scenario": ...}``)
on stdout, its progress on stderr; ``--json FILE`` writes every run's raw
figures. Targets are printed next to the figures, never asserted. ``--quick``
runs tiny sizes to check that the script works: its numbers mean nothing.

How it measures
---------------
bench/load.py's machinery: chatd started from this checkout (``python -m
chatd``) with load.py's config (SQLite, rate limits raised out of the way,
logging at warning) plus ``typing_per_minute`` raised, on CPU 0; the load
generator (``--procs`` (2) processes of bench/readstate_worker.py, which
extends bench/worker.py's worker and bench/wsclient.py's client) on the
other CPUs; tokens signed as load.py does; a fresh chatd (fresh database)
for every run. chatd's own counters come from its Prometheus ``/metrics``
(on its main port), read at t0 and t1 of a measured window: messages
committed (``chatd_messages_total``), commit groups, frames in and out by
type. Server CPU is utime+stime from ``/proc/PID/stat`` (all threads) over
the window, in cores busy; the load generator's is each worker's
``getrusage`` over the window. Default room/receipt/presence limits are
chatd's own: a room of more than 50 members online gets no read receipts
(``receipts_max_members``), more than 100 gets presence summaries.

* ``unread``: a SQLite database built for it (chatd's schema and
  migrations, then ``executemany`` in transactions of about a million rows,
  in the store's own layout): ``--rooms`` (1,000) rooms of ``--messages``
  (10,000) messages each (10M rows), user 1 with a marker in every room (a
  third read to the end, the rest spread evenly over the room) and mentioned
  in every ``--mention-every`` (1,000th) message, ``--others`` (99) more users
  with a marker in every room. Built once and kept in ``--cache`` (a temp
  dir by default; the file name says its sizes; ``--rebuild`` builds it
  again). Then, in this process on a read-only connection with chatd's
  pragmas: ``chatd.store.sqlite.unread(conn, 1)`` ``--calls`` (200) times
  after 10 not counted: median, p99, max (target: under 5 ms); the SQL it
  ran (traced: one statement) and its ``EXPLAIN QUERY PLAN``, checked for
  any SCAN (every step should be an index SEARCH; no SCAN of messages).
  Then end to end: chatd started on that database file, one client as
  user 1 sends ``unread {}`` and waits for ``unread_counts``, ``--calls``
  times one after the other (after 10 not counted): median, p99, and
  chatd's CPU per call. The page cache is warm
  (the build, or the previous run, has just read the file).
* ``commit``: one room of ``--members`` (100); ``--publishers`` (4) of them
  keep ``--window`` (32) 100-byte messages in flight each (load.py's fan-out
  closed loop), ``--duration`` (5) s measured after 1 s warm-up. A: no
  mark_read. B: every member sends ``mark_read {room, message_id}`` for every
  message it receives (100 per message, publishers included). Both runs read
  every received message's id, so the load generator's receive work is the
  same; only B sends. Figure: messages committed per second (chatd's
  counter; target: B within 10% of A). Also chatd's CPU µs per committed
  message, mark_read frames in/s and their acks, commit groups.
* ``typing``: a room of ``--members`` (1,000), all joined and quiet; at t0
  every member sends ``typing {room, state: "start"}`` and renews it every
  ``--renew`` (2) s while ``--typing-duration`` (10) s have not passed; then
  nothing, and the server's expiry (chatd.typists.EXPIRY, 6 s) sends the
  stops; watched until 2 s after that. Figures: typing frames received per
  member (starts, stops; every member counts, a few are shown), relayed
  starts per typist, when each member had one frame from every other
  (first round), chatd's frames out (``chatd_frames_out_total{type=
  "typing"}``), its CPU (sampled every 0.1 s: the first round's, the whole
  storm's, the busiest second), and messages stored before and after (the
  database's count and chatd's counter: must not move).
* ``fanout``: load.py's fan-out point (room of ``--members`` (100), 4
  publishers x 32 in flight, 100 bytes, 5 s after 1 s warm-up). A ("off"):
  plain. B ("on"): every member marks its newest message read once per
  ``--mark-interval`` (1) s (the members' turns spread over the interval;
  ``--mark-every N`` instead: after every N messages received), and
  ``--typists`` (10) members (not publishers) send ``typing start`` every
  ``--typing-interval`` (2) s. Figure: deliveries/s (room_message frames
  received by all members; target: B within 5% of A), and chatd's µs per
  delivery.

``commit`` and ``fanout`` run ``--rounds`` (4; quick 2) rounds of A then B
(A, B, A, B, ...), each run a fresh chatd, after a short A run not counted
(the first start's bytecode and page cache); the table gives each round's
A, B and B/A, and the median of the per-round ratios. On a shared 2-core
machine one run moves by 10-40% (bench/analysis.md): trust the median of
several rounds, and look at the load generator's cores: at ~1.00 it, not
chatd, was the limit.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import load  # noqa: E402
from load import MONO, log, machine_busy, pct, proc_cpu, split  # noqa: E402
from readstate_worker import rs_worker_main  # noqa: E402
from worker import raise_nofile  # noqa: E402

ROOM = "rs"
UNREAD_USER = 1
CREATED = "2024-01-01T00:00:00.000Z"
CONTENT = "a chat message of some forty characters."
#: cores busy with other work in a run's window above which it gets a note
OTHER_CORES = 0.2


# --- machinery ----------------------------------------------------------------


class Pool(load.Pool):
    """load.py's worker pool, its workers bench/readstate_worker.py's."""

    entry = staticmethod(rs_worker_main)


class Bench(load.Bench):
    """load.py's Bench (connect, close_all, window, ...) with ``Pool`` above."""

    def __init__(self, args: argparse.Namespace) -> None:  # as load.Bench's, other workers
        self.args = args
        ncpu = os.cpu_count() or 1
        self.server_cpus = {0} if args.pin and ncpu > 1 else None
        self.load_cpus = set(range(1, ncpu)) if self.server_cpus else None
        if self.load_cpus:
            os.sched_setaffinity(0, self.load_cpus)
        self.pool = Pool(args.procs, self.load_cpus)
        self.tmp = Path(tempfile.mkdtemp(prefix="chatd-readstate-"))
        self.rooms = [ROOM]
        self.uid = 1000

    def close(self) -> None:
        self.pool.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def server(self, db: Path | None = None, rooms: list[str] | None = None) -> load.Server:
        """A chatd with load.py's config, ``typing_per_minute`` raised, on
        ``db`` (default: a fresh one in the temp dir)."""
        s = load.Server("chatd", False, self.tmp, rooms or self.rooms)
        cfg = Path(s.cmd[-1])
        text = cfg.read_text()
        if db is not None:
            text = text.replace(f'sqlite_path = "{s.db}"', f'sqlite_path = "{db}"')
            s.db = db
        text = text.replace("[limits]\n", "[limits]\ntyping_per_minute = 1000000000\n")
        cfg.write_text(text)
        s.config_text = text
        return s

    def measure(
        self,
        server: load.Server,
        cmds: list[dict[str, Any] | None],
        t0: int,
        t1: int,
        timeout: float,
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Start ``cmds``; over [t0, t1] chatd's CPU, the machine's and
        chatd's counters; then the workers' answers."""
        self.pool.send(cmds)
        time.sleep(max(0.0, (t0 - MONO()) / 1e9))
        m0 = scrape(server.port)
        c0, (b0, s0) = proc_cpu(server.pid), machine_busy()
        time.sleep(max(0.0, (t1 - MONO()) / 1e9))
        c1, (b1, s1) = proc_cpu(server.pid), machine_busy()
        m1 = scrape(server.port)
        dur = (t1 - t0) / 1e9
        window = {
            "seconds": dur,
            "server_cpu": (c1 - c0) / dur,
            "machine_cpu": (b1 - b0) / dur,
            "softirq_cpu": (s1 - s0) / dur,
            "metrics": delta(m0, m1),
        }
        return window, self.pool.gather(cmds, timeout)


def scrape(port: int) -> dict[str, float]:
    """chatd's /metrics (Prometheus text) as {name{labels}: value}."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        body = conn.getresponse().read().decode()
    finally:
        conn.close()
    out = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def delta(m0: dict[str, float], m1: dict[str, float]) -> dict[str, float]:
    """The counters that moved (and are worth keeping) between two scrapes."""
    keep = (
        "chatd_messages_total",
        "chatd_frames_in_total",
        "chatd_frames_out_total",
        "chatd_errors_total",
        "chatd_rate_limited_total",
        "chatd_slow_consumer_closes_total",
        "chatd_store_commit_seconds_count",
        "chatd_store_commit_seconds_sum",
        "chatd_store_group_size_count",
        "chatd_store_group_size_sum",
    )
    return {
        k: v - m0.get(k, 0.0) for k, v in m1.items() if k.startswith(keep) and v - m0.get(k, 0.0)
    }


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def table(head: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for k, r in enumerate([head, ["-" * w for w in widths], *rows]):
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        print("  " + "  ".join(cells) if k != 1 else "  " + "  ".join(r))


def emit(result: dict[str, Any]) -> None:
    """The result's JSON line (no per-run detail: that goes to --json)."""
    print(json.dumps(result, default=str), flush=True)


def stored_messages(db: Path) -> int:
    """Rows in ``messages`` (a read-only connection: chatd may be running)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
    finally:
        conn.close()


# --- unread: the database ------------------------------------------------------


def build_db(path: Path, rooms: int, msgs: int, others: int, mention_every: int) -> float:
    """Build the unread scenario's database at ``path`` (see the module's
    docstring); returns the seconds it took. Built under another name and
    renamed at the end: a build cut short is never taken for a whole one."""
    sys.path.insert(0, str(ROOT))
    from chatd.store.schema import connect, migrate

    started = time.monotonic()
    part = path.with_name(path.name + ".building")
    for p in (part, Path(f"{part}-wal"), Path(f"{part}-shm")):
        p.unlink(missing_ok=True)
    conn = connect(str(part), synchronous="off")
    migrate(conn)
    users = [(UNREAD_USER, f"u{UNREAD_USER}")]
    users += [(UNREAD_USER + 1 + k, f"u{UNREAD_USER + 1 + k}") for k in range(others)]
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT OR IGNORE INTO users (id, username, created_at) VALUES (?, ?, ?)",
        [(uid, name, CREATED) for uid, name in users],
    )
    conn.executemany(
        "INSERT INTO rooms (name, private, created_at) VALUES (?, 0, ?)",
        [(room_name(k), CREATED) for k in range(rooms)],
    )
    conn.execute("COMMIT")
    mentioned = str(UNREAD_USER)

    def rows(first: int, last: int) -> Any:
        for k in range(first, last):
            channel = "r:" + room_name(k)
            base = k * msgs
            for s in range(1, msgs + 1):
                author = 10_000 + (s % 50)
                yield (
                    base + s,
                    channel,
                    s,
                    author,
                    f"u{author}",
                    CONTENT,
                    CREATED,
                    mentioned if s % mention_every == 0 else None,
                )

    per_txn = max(1, 1_000_000 // msgs)
    for first in range(0, rooms, per_txn):
        last = min(rooms, first + per_txn)
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO messages (id, channel, seq, user_id, username, message_type, content,"
            " created_at, mentions) VALUES (?, ?, ?, ?, ?, 'text', ?, ?, ?)",
            rows(first, last),
        )
        conn.execute("COMMIT")
        log(f"  built rooms {last:,}/{rooms:,} ({(last * msgs):,} messages)")
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO mentions (user_id, channel, seq, message_id) VALUES (?, ?, ?, ?)",
        (
            (UNREAD_USER, "r:" + room_name(k), s, k * msgs + s)
            for k in range(rooms)
            for s in range(mention_every, msgs + 1, mention_every)
        ),
    )

    def marker(uid: int, k: int) -> tuple[int, str, int, int]:
        if uid == UNREAD_USER:  # a third read to the end, the rest spread over the room
            read = msgs if k % 3 == 0 else (k * 7919) % msgs
        else:
            read = (k * 104_729 + uid * 7_919) % (msgs + 1)
        return (uid, "r:" + room_name(k), k * msgs + read if read else 0, read)

    conn.executemany(
        "INSERT INTO read_markers (user_id, channel, last_read_id, last_read_seq)"
        " VALUES (?, ?, ?, ?)",
        (marker(uid, k) for uid, _ in users for k in range(rooms)),
    )
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    part.rename(path)
    for suffix in ("-wal", "-shm"):
        Path(f"{part}{suffix}").unlink(missing_ok=True)
    return time.monotonic() - started


def room_name(k: int) -> str:
    return f"rs{k:04d}"


def expected_unread(rooms: int, msgs: int, mention_every: int) -> tuple[int, int]:
    """User 1's total unread and unread mentions, as built."""
    unread = mentions = 0
    for k in range(rooms):
        read = msgs if k % 3 == 0 else (k * 7919) % msgs
        unread += msgs - read
        mentions += msgs // mention_every - read // mention_every
    return unread, mentions


def query_times(db: Path, calls: int, warm: int = 10) -> dict[str, Any]:
    """``chatd.store.sqlite.unread`` timed in this process; its SQL and plan."""
    sys.path.insert(0, str(ROOT))
    from chatd.store import sqlite as store_sqlite
    from chatd.store.schema import connect

    conn = connect(str(db), readonly=True)
    traced: list[str] = []
    conn.set_trace_callback(traced.append)
    t = time.perf_counter_ns()
    first = store_sqlite.unread(conn, UNREAD_USER)
    first_ms = (time.perf_counter_ns() - t) / 1e6
    conn.set_trace_callback(None)
    for _ in range(warm):
        store_sqlite.unread(conn, UNREAD_USER)
    wall: list[float] = []
    cpu0 = time.process_time()
    for _ in range(calls):
        t = time.perf_counter_ns()
        store_sqlite.unread(conn, UNREAD_USER)
        wall.append((time.perf_counter_ns() - t) / 1e6)
    cpu = time.process_time() - cpu0
    statements = [s for s in traced if s.strip().upper().startswith(("SELECT", "WITH"))]
    plan = []
    for sql in statements:
        plan += [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql).fetchall()]
    conn.close()
    scans = [line for line in plan if line.startswith("SCAN") and "CONSTANT" not in line]
    return {
        "calls": calls,
        "rows": len(first),
        "unread_sum": sum(p.unread for _, p in first),
        "mentions_sum": sum(p.mentions for _, p in first),
        "first_ms": first_ms,
        "p50_ms": pct(wall, 0.5),
        "p99_ms": pct(wall, 0.99),
        "max_ms": max(wall),
        "mean_ms": statistics.fmean(wall),
        "cpu_ms_per_call": 1e3 * cpu / calls,
        "statements": len(statements),
        "sql": statements,
        "plan": plan,
        # (the statement names its tables by aliases: any SCAN is suspect)
        "scans": scans,
    }


def scenario_unread(a: argparse.Namespace) -> dict[str, Any]:
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    name = f"unread-{a.rooms}x{a.messages}-o{a.others}-m{a.mention_every}.db"
    db = cache / name
    built = None
    if a.rebuild or not db.exists():
        log(f"unread: building {db} ({a.rooms:,} rooms x {a.messages:,} messages)")
        built = build_db(db, a.rooms, a.messages, a.others, a.mention_every)
        log(f"unread: built in {built:.1f} s, {db.stat().st_size / 2**20:,.0f} MiB")
    else:
        log(f"unread: using the cached {db}")
    want_unread, want_mentions = expected_unread(a.rooms, a.messages, a.mention_every)
    q = query_times(db, a.calls)
    log(f"unread: query p50 {q['p50_ms']:.3f} ms, p99 {q['p99_ms']:.3f} ms")
    bench = Bench(a)
    server = bench.server(db=db, rooms=[room_name(0)])
    e2e: dict[str, Any] = {}
    try:
        server.start(bench.server_cpus)
        # one connection, user 1's (worker 0)
        cmds: list[dict[str, Any] | None] = [
            {"op": "connect", "n": 1, "port": server.port, "deflate": False, "uid0": UNREAD_USER}
        ]
        cmds += [None] * (bench.pool.n - 1)
        conn = bench.pool.call(cmds, timeout=60)[0]
        if not conn["opened"]:
            raise RuntimeError(f"no connection: {conn['errors']}")
        cmds = [{"op": "unread_calls", "warm": 10, "n": a.calls}]
        cmds += [None] * (bench.pool.n - 1)
        c0 = proc_cpu(server.pid)
        r = bench.pool.call(cmds, timeout=60 + a.calls)[0]
        cpu = proc_cpu(server.pid) - c0
        lat = [x / 1e6 for x in r["lat_ns"]]
        e2e = {
            "calls": len(lat),
            "errors": r["errors"],
            "p50_ms": pct(lat, 0.5),
            "p99_ms": pct(lat, 0.99),
            "max_ms": max(lat) if lat else float("nan"),
            # (the 10 not counted included: CPU is read around all of them)
            "server_cpu_ms_per_call": 1e3 * cpu / max(1, len(lat) + 10),
            "reply_bytes": r["reply_bytes"],
            "rooms": r["rooms"],
            "unread_sum": r["unread_sum"],
            "mentions_sum": r["mentions_sum"],
        }
        bench.close_all(server)
    finally:
        tail = server.stop()
        bench.close()
    errors = [ln for ln in tail.splitlines() if "ERROR" in ln or "Traceback" in ln]
    res = {
        "scenario": "unread",
        "quick": a.quick,
        "rooms": a.rooms,
        "messages_per_room": a.messages,
        "db": str(db),
        "db_mib": round(db.stat().st_size / 2**20, 1),
        "built_s": built,
        "expected": {"rooms": a.rooms, "unread_sum": want_unread, "mentions_sum": want_mentions},
        "query": q,
        "e2e": e2e,
        "log_errors": errors[-10:],
    }
    print(
        f"\nunread {{}}: user {UNREAD_USER}, {a.rooms:,} rooms x {a.messages:,} messages"
        f" ({a.rooms * a.messages:,} rows), {res['db_mib']:,.0f} MiB, warm page cache"
    )
    table(
        ["", "calls", "p50 ms", "p99 ms", "max ms", "rooms", "unread", "mentions"],
        [
            [
                "query (in process)",
                str(q["calls"]),
                f"{q['p50_ms']:.3f}",
                f"{q['p99_ms']:.3f}",
                f"{q['max_ms']:.3f}",
                str(q["rows"]),
                f"{q['unread_sum']:,}",
                f"{q['mentions_sum']:,}",
            ],
            [
                "unread over WebSocket",
                str(e2e.get("calls", 0)),
                f"{e2e.get('p50_ms', float('nan')):.3f}",
                f"{e2e.get('p99_ms', float('nan')):.3f}",
                f"{e2e.get('max_ms', float('nan')):.3f}",
                str(e2e.get("rooms", "")),
                f"{e2e.get('unread_sum', 0):,}",
                f"{e2e.get('mentions_sum', 0):,}",
            ],
            [
                "expected (as built)",
                "",
                "",
                "",
                "",
                str(a.rooms),
                f"{want_unread:,}",
                f"{want_mentions:,}",
            ],
        ],
    )
    print(
        f"  target: query under 5 ms (p50 {q['p50_ms']:.3f}, p99 {q['p99_ms']:.3f});"
        f" {q['statements']} statement(s); first call {q['first_ms']:.2f} ms;"
        f" chatd CPU {e2e.get('server_cpu_ms_per_call', float('nan')):.2f} ms a call,"
        f" reply {e2e.get('reply_bytes', 0):,} bytes"
    )
    print("  EXPLAIN QUERY PLAN:")
    for line in q["plan"]:
        print(f"    {line}")
    print(
        "  -> "
        + (
            "no SCAN: every table (r read_markers, t messages, m mentions) read by index SEARCH"
            if not q["scans"]
            else f"SCAN: {q['scans']}"
        )
    )
    emit(
        {
            "scenario": "unread",
            "quick": a.quick,
            "rooms": a.rooms,
            "messages_per_room": a.messages,
            "query_p50_ms": q["p50_ms"],
            "query_p99_ms": q["p99_ms"],
            "query_max_ms": q["max_ms"],
            "statements": q["statements"],
            "scans": q["scans"],
            "e2e_p50_ms": e2e.get("p50_ms"),
            "e2e_p99_ms": e2e.get("p99_ms"),
            "e2e_rooms": e2e.get("rooms"),
            "e2e_errors": e2e.get("errors"),
            "server_cpu_ms_per_call": e2e.get("server_cpu_ms_per_call"),
            "reply_bytes": e2e.get("reply_bytes"),
        }
    )
    return res


# --- commit and fanout: A/B of two client behaviours -----------------------------


def rs_run(bench: Bench, server: load.Server, b: dict[str, Any]) -> dict[str, Any]:
    """One measured fan-out with behaviour ``b`` (see ``RWorker.rs_fanout``)."""
    a = bench.args
    conn = bench.connect(server, a.members, ROOM, False)
    bench.pool.all({"op": "drain", "quiet": 0.5, "limit": 30}, timeout=60)
    pubs = split(a.publishers, bench.pool.n)
    typists = split(b["typists"], bench.pool.n)
    t0, t1 = bench.window(a.duration)
    cmds: list[dict[str, Any] | None] = [
        {
            "op": "rs_fanout",
            "t0": t0,
            "t1": t1,
            "warm": a.warm,
            "room": ROOM,
            "size": 100,
            "window": a.window,
            "publishers": pubs[i],
            "typists": typists[i],
            "marks": b["marks"],
            "mark_interval": b.get("mark_interval", 1.0),
            "mark_every": b.get("mark_every", 0),
            "typing_interval": b.get("typing_interval", 2.0),
            "parse_all": b["parse_all"],
            "publishers_mark": a.publishers_mark == "yes",
            # (an open loop at a fixed rate, shared by the workers' publishers)
            "rate": a.rate * pubs[i] / a.publishers if a.rate else 0.0,
        }
        for i in range(bench.pool.n)
    ]
    w, replies = bench.measure(server, cmds, t0, t1, a.duration + a.warm + 60)
    bench.close_all(server)
    dur = w["seconds"]
    m = w["metrics"]
    tot = {k: sum(r[k] for r in replies) for k in ("rx", "acks", "typing", "errors", "other")}
    tot.update({k: sum(r[k] for r in replies) for k in ("marks_sent", "typing_sent", "sent")})
    committed = m.get("chatd_messages_total", 0.0) / dur
    groups = m.get("chatd_store_group_size_count", 0.0)
    res = {
        "members": conn["opened"],
        "open_after": sum(r["open"] for r in replies),
        "committed_per_s": committed,
        "deliveries_per_s": tot["rx"] / dur,
        "msgs_rx_per_s": tot["rx"] / dur / max(1, conn["opened"]),
        "marks_sent_per_s": tot["marks_sent"] / dur,
        "mark_read_in_per_s": m.get('chatd_frames_in_total{type="mark_read"}', 0.0) / dur,
        "acks_per_s": tot["acks"] / dur,
        "typing_sent_per_s": tot["typing_sent"] / dur,
        "typing_rx_per_s": tot["typing"] / dur,
        "errors": tot["errors"],
        "error_sample": next((r["error_sample"] for r in replies if r["error_sample"]), ""),
        "other_frames": tot["other"],
        "groups_per_s": groups / dur,
        "ops_per_group": m.get("chatd_store_group_size_sum", 0.0) / groups if groups else 0.0,
        "commit_ms_mean": 1e3
        * m.get("chatd_store_commit_seconds_sum", 0.0)
        / max(1.0, m.get("chatd_store_commit_seconds_count", 0.0)),
        "server_cpu": w["server_cpu"],
        "server_us_per_msg": w["server_cpu"] / committed * 1e6 if committed else float("nan"),
        "server_us_per_delivery": w["server_cpu"] / (tot["rx"] / dur) * 1e6
        if tot["rx"]
        else float("nan"),
        "loadgen_cpu": sum(r["cpu"] for r in replies) / dur,
        "machine_cpu": w["machine_cpu"],
        "softirq_cpu": w["softirq_cpu"],
        "metrics": m,
        "connect_errors": conn["errors"],
    }
    # anything else running on the machine (bench/ab.py's note above 0.2)
    res["other_cpu"] = (
        res["machine_cpu"] - res["server_cpu"] - res["loadgen_cpu"] - res["softirq_cpu"]
    )
    return res


def scenario_ab(a: argparse.Namespace, kind: str) -> dict[str, Any]:
    if kind == "commit":
        sides = {
            "A": {"marks": "off", "typists": 0, "parse_all": True},
            "B": {"marks": "every", "typists": 0, "parse_all": True},
        }
        figure, label, budget = "committed_per_s", "committed msgs/s", 0.10
        cost_key, cost_label = "server_us_per_msg", "chatd µs/msg"
        extra = {
            "mark_read_in_per_s": "mark_read in/s",
            "acks_per_s": "acks/s",
            "groups_per_s": "commits/s",
        }
        who = "member" if a.publishers_mark == "yes" else "member but the publishers"
        load = (
            f"{a.publishers} publishers at {a.rate:,.0f} msgs/s in all (open loop)"
            if a.rate
            else f"{a.publishers} publishers x {a.window} in flight"
        )
        what = (
            f"commit rate, room of {a.members}, {load}:"
            f" A no mark_read, B a mark_read per message per {who}"
        )
    else:
        on: dict[str, Any] = {"typists": a.typists, "typing_interval": a.typing_interval}
        if a.mark_every:
            on.update(marks="nth", mark_every=a.mark_every)
            how = f"every {a.mark_every}th message"
        else:
            on.update(marks="interval", mark_interval=a.mark_interval)
            how = f"once per {a.mark_interval:g} s"
        sides = {
            "A": {"marks": "off", "typists": 0, "parse_all": False},
            "B": {**on, "parse_all": False},
        }
        figure, label, budget = "deliveries_per_s", "deliveries/s", 0.05
        cost_key, cost_label = "server_us_per_delivery", "chatd µs/delivery"
        extra = {"mark_read_in_per_s": "mark_read in/s", "typing_rx_per_s": "typing rx/s"}
        what = (
            f"fan-out, room of {a.members}, {a.publishers} publishers x {a.window} in flight:"
            f" A off, B members mark read {how}, {a.typists} typing every"
            f" {a.typing_interval:g} s"
        )
    bench = Bench(a)
    runs: list[dict[str, Any]] = []
    try:
        duration = a.duration
        a.duration = min(1.0, duration)
        server = bench.server()
        log(f"{kind}: warm-up run (A, not counted)")
        try:
            server.start(bench.server_cpus)
            rs_run(bench, server, sides["A"])
        finally:
            server.stop()
            a.duration = duration
        for rnd in range(a.rounds):
            for side in ("A", "B"):
                server = bench.server()
                rec: dict[str, Any] = {"round": rnd, "side": side}
                try:
                    server.start(bench.server_cpus)
                    rec.update(rs_run(bench, server, sides[side]))
                    log(
                        f"  round {rnd} {side}: {rec['committed_per_s']:,.0f} msgs/s committed,"
                        f" {rec['deliveries_per_s']:,.0f} deliveries/s, marks"
                        f" {rec['marks_sent_per_s']:,.0f}/s (in {rec['mark_read_in_per_s']:,.0f}/s,"
                        f" acks {rec['acks_per_s']:,.0f}/s), typing out"
                        f" {rec['typing_rx_per_s']:,.0f}/s, server {rec['server_cpu']:.2f}"
                        f" cores, loadgen {rec['loadgen_cpu']:.2f}"
                    )
                except Exception as exc:  # reported, then the next run
                    log(f"  round {rnd} {side}: FAILED: {type(exc).__name__}: {exc}")
                    rec["failure"] = f"{type(exc).__name__}: {exc}"
                    try:
                        bench.close_all()
                    except Exception:  # noqa: BLE001
                        pass
                finally:
                    alive = server.alive()
                    tail = server.stop()
                    if not alive:
                        rec.setdefault("failure", f"chatd exited: {tail[-1500:]}")
                    errs = [ln for ln in tail.splitlines() if "ERROR" in ln or "Traceback" in ln]
                    if errs:
                        rec["log_errors"] = errs[-10:]
                runs.append(rec)
    finally:
        bench.close()
    pairs: list[dict[str, Any]] = []
    rows = []
    for rnd in range(a.rounds):
        by = {r["side"]: r for r in runs if r["round"] == rnd and "failure" not in r}
        ra, rb = by.get("A"), by.get("B")
        ratio = rb[figure] / ra[figure] if ra and rb and ra[figure] else None
        pairs.append({"round": rnd, "A": ra and ra[figure], "B": rb and rb[figure], "ratio": ratio})

        def f(r: dict[str, Any] | None, k: str, spec: str) -> str:
            return "n/a" if r is None else format(r[k], spec)

        row = [str(rnd), f(ra, figure, ",.0f"), f(rb, figure, ",.0f")]
        row += ["n/a" if ratio is None else f"{ratio:.3f}"]
        row += [f(ra, cost_key, ".2f"), f(rb, cost_key, ".2f")]
        row += [f(rb, k, ",.0f") for k in extra]
        row += [f(ra, "loadgen_cpu", ".2f"), f(rb, "loadgen_cpu", ".2f")]
        rows.append(row)
    ratios = [p["ratio"] for p in pairs if p["ratio"] is not None]
    median_ratio = med(ratios)
    rows.append(
        [
            "median",
            format(med([p["A"] for p in pairs if p["A"]]), ",.0f"),
            format(med([p["B"] for p in pairs if p["B"]]), ",.0f"),
            f"{median_ratio:.3f}",
        ]
        + [""] * (len(rows[0]) - 4 if rows else 0)
    )
    print(f"\n{what}; {a.duration:g} s measured per run")
    head = ["round", f"A {label}", f"B {label}", "B/A", f"A {cost_label}", f"B {cost_label}"]
    head += [f"B {extra[k]}" for k in extra] + ["A loadgen", "B loadgen"]
    table(head, rows)
    for r in runs:
        if r.get("other_cpu", 0.0) > OTHER_CORES:
            print(
                f"  round {r['round']} {r['side']}: other work on the machine took"
                f" {r['other_cpu']:.2f} cores (suspect)"
            )
    failed = [f"round {r['round']} {r['side']}: {r['failure']}" for r in runs if "failure" in r]
    for line in failed:
        print(f"  FAILED {line}")
    errors = sum(r.get("errors", 0) for r in runs)
    if errors:
        sample = next((r["error_sample"] for r in runs if r.get("error_sample")), "")
        print(f"  error frames received: {errors} (e.g. {sample[:120]})")
    cost = 1 - median_ratio if ratios else float("nan")
    print(
        f"  target: B within {budget:.0%} of A: median B/A {median_ratio:.3f}"
        + (f" (rounds {min(ratios):.3f}-{max(ratios):.3f})" if ratios else "")
        + f", B costs {cost:+.1%} -> {'within' if cost <= budget else 'OVER'}"
        + (" (--quick: tiny sizes, not a measurement)" if a.quick else "")
    )
    emit(
        {
            "scenario": kind,
            "quick": a.quick,
            "figure": figure,
            "members": a.members,
            "pairs": [
                {k: round(v, 4) if isinstance(v, float) else v for k, v in p.items()} for p in pairs
            ],
            "median_ratio": median_ratio,
            "budget": budget,
            "failures": failed,
            "error_frames": errors,
        }
    )
    return {"scenario": kind, "sides": sides, "runs": runs, "pairs": pairs, "median": median_ratio}


# --- typing ----------------------------------------------------------------------


def scenario_typing(a: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from chatd.typists import EXPIRY, RELAY_INTERVAL

    bench = Bench(a)
    server = bench.server()
    res: dict[str, Any] = {"scenario": "typing", "quick": a.quick}
    try:
        server.start(bench.server_cpus)
        log(f"typing: {a.members:,} members joining")
        conn = bench.connect(server, a.members, ROOM, False)
        n = conn["opened"]
        bench.pool.all({"op": "drain", "quiet": 1.5, "limit": 60}, timeout=90)
        assert server.db is not None
        stored0 = stored_messages(server.db)
        m0 = scrape(server.port)
        sampler = load.Sampler(server)
        t0 = MONO() + int(1e9)
        watch = a.typing_duration + EXPIRY + 2.0
        t_end = t0 + int(watch * 1e9)
        cmds: list[dict[str, Any] | None] = [
            {
                "op": "typing_storm",
                "t0": t0,
                "t_end": t_end,
                "renew": a.renew,
                "duration": a.typing_duration,
                "room": ROOM,
                "expect": n - 1,
            }
            for _ in range(bench.pool.n)
        ]
        log(f"typing: {n:,} typists from t0 for {a.typing_duration:g} s, watched {watch:g} s")
        replies = bench.pool.call(cmds, timeout=watch + 120)
        sampler.stop()
        m1 = scrape(server.port)
        stored1 = stored_messages(server.db)
        pid = server.pid
        m = delta(m0, m1)
        per = [pc for r in replies for pc in r["per_client"]]
        starts = sorted(pc[0] - pc[1] for pc in per)
        stops = sorted(pc[1] for pc in per)
        full = sorted((pc[2] - t0) / 1e9 for pc in per if pc[2])
        bins: dict[int, int] = {}
        for r in replies:
            for k, v in r["bins"].items():
                bins[int(k)] = bins.get(int(k), 0) + v
        # when the last worker had sent its first round (s after t0)
        firsts = [r["rounds"][0][1] for r in replies if r["rounds"]]
        send_spread = (max(firsts) - t0) / 1e9 if firsts else float("nan")
        # server CPU: first renew period, the whole watch, the busiest second
        first_cores = sampler.cores(t0, t0 + int(a.renew * 1e9), pid)
        all_cores = sampler.cores(t0, t_end, pid)
        per_second = [
            sampler.cores(t0 + int(k * 1e9), t0 + int((k + 1) * 1e9), pid)
            for k in range(int(watch))
        ]
        rx_per_second = [
            sum(v for k, v in bins.items() if s * 10 <= k < (s + 1) * 10) for s in range(int(watch))
        ]
        out_typing = m.get('chatd_frames_out_total{type="typing"}', 0.0)
        in_typing = m.get('chatd_frames_in_total{type="typing"}', 0.0)
        others = max(1, n - 1)
        res.update(
            {
                "members": n,
                "connect_errors": conn["errors"],
                "typing_sent": sum(r["sent"] for r in replies),
                "typing_in_server": in_typing,
                "typing_out_server": out_typing,
                "typing_rx": sum(starts) + sum(stops),
                "per_member_starts": {
                    "min": starts[0] if starts else 0,
                    "median": med(starts),
                    "max": starts[-1] if starts else 0,
                },
                "per_member_stops": {
                    "min": stops[0] if stops else 0,
                    "median": med(stops),
                    "max": stops[-1] if stops else 0,
                },
                "relayed_starts_per_typist": med(starts) / others,
                # [starts, stops] of the first few members
                "sample_members": [[pc[0] - pc[1], pc[1]] for pc in per[:3]],
                "first_round_s": {
                    "members": len(full),
                    "p50": med(full),
                    "max": full[-1] if full else float("nan"),
                },
                "send_round_spread_s": send_spread,
                "server_cpu_first_round": first_cores,
                "server_cpu_watch": all_cores,
                "server_cpu_seconds": all_cores * watch,
                "server_cpu_per_second": per_second,
                "typing_rx_per_second": rx_per_second,
                "errors": sum(r["errors"] for r in replies),
                "error_sample": next((r["error_sample"] for r in replies if r["error_sample"]), ""),
                "open_after": sum(r["open"] for r in replies),
                "stored_before": stored0,
                "stored_after": stored1,
                "messages_counter": m.get("chatd_messages_total", 0.0),
                "slow_consumer_closes": m.get("chatd_slow_consumer_closes_total", 0.0),
                "rate_limited": m.get("chatd_rate_limited_total", 0.0),
                "loadgen_cpu": sum(r["cpu"] for r in replies) / watch,
                "metrics": m,
                "relay_interval": RELAY_INTERVAL,
                "expiry": EXPIRY,
            }
        )
        bench.close_all(server)
    finally:
        tail = server.stop()
        bench.close()
    res["log_errors"] = [ln for ln in tail.splitlines() if "ERROR" in ln or "Traceback" in ln][-10:]
    sends = int(a.typing_duration // a.renew) + 1
    print(
        f"\ntyping: room of {res['members']:,}, every member types at once, renews every"
        f" {a.renew:g} s for {a.typing_duration:g} s ({sends} starts each), then expiry"
        f" ({res['expiry']:g} s); relay at most one start per {res['relay_interval']:g} s"
    )
    s, p = res["per_member_starts"], res["per_member_stops"]
    table(
        ["", "value"],
        [
            ["typing frames sent by members", f"{res['typing_sent']:,}"],
            ["typing frames in (chatd)", f"{res['typing_in_server']:,.0f}"],
            ["typing frames out (chatd)", f"{res['typing_out_server']:,.0f}"],
            ["typing frames received (all members)", f"{res['typing_rx']:,}"],
            [
                "starts per member (min/median/max)",
                f"{s['min']:,} / {s['median']:,.0f} / {s['max']:,}",
            ],
            [
                "stops per member (min/median/max)",
                f"{p['min']:,} / {p['median']:,.0f} / {p['max']:,}",
            ],
            ["relayed starts per typist", f"{res['relayed_starts_per_typist']:.2f} of {sends}"],
            [
                "first round at every member (p50 / max s)",
                f"{res['first_round_s']['p50']:.2f} / {res['first_round_s']['max']:.2f}"
                f" ({res['first_round_s']['members']:,} members)"
                if res["first_round_s"]["members"]
                else "none: at most chatd.typists.ROOM_TYPISTS relayed a room",
            ],
            ["last worker's first sends done (s after t0)", f"{res['send_round_spread_s']:.3f}"],
            ["chatd cores, first renew period", f"{res['server_cpu_first_round']:.2f}"],
            [
                f"chatd cores over the {watch:g} s watched",
                f"{res['server_cpu_watch']:.2f} ({res['server_cpu_seconds']:.1f} CPU s)",
            ],
            ["chatd cores, busiest second", f"{max(res['server_cpu_per_second'], default=0):.2f}"],
            [
                "messages stored before / after (counter)",
                f"{res['stored_before']:,} / {res['stored_after']:,}"
                f" ({res['messages_counter']:,.0f})",
            ],
            [
                "error frames / rate limited / slow consumers",
                f"{res['errors']} / {res['rate_limited']:.0f} / {res['slow_consumer_closes']:.0f}",
            ],
            ["open after", f"{res['open_after']:,} of {res['members']:,}"],
        ],
    )
    print(
        "  chatd cores per second from t0: "
        + " ".join(f"{c:.2f}" for c in res["server_cpu_per_second"])
    )
    print(
        "  typing frames received per second: "
        + " ".join(f"{x:,}" for x in res["typing_rx_per_second"])
    )
    emit(
        {
            k: res[k]
            for k in (
                "scenario",
                "quick",
                "members",
                "typing_sent",
                "typing_in_server",
                "typing_out_server",
                "typing_rx",
                "per_member_starts",
                "per_member_stops",
                "relayed_starts_per_typist",
                "first_round_s",
                "server_cpu_first_round",
                "server_cpu_watch",
                "server_cpu_seconds",
                "stored_before",
                "stored_after",
                "messages_counter",
                "errors",
                "open_after",
            )
        }
    )
    return res


# --- main ------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=["unread", "commit", "typing", "fanout", "all"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script")
    parser.add_argument("--json", help="every run's raw figures, as JSON, here")
    parser.add_argument("--procs", type=int, default=2, help="load-generator processes")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="no CPU pinning")
    g = parser.add_argument_group("unread")
    g.add_argument("--rooms", type=int, help="rooms (1,000; quick 100)")
    g.add_argument("--messages", type=int, help="messages per room (10,000; quick 1,000)")
    g.add_argument("--calls", type=int, help="timed calls (200; quick 50)")
    g.add_argument("--others", type=int, default=99, help="other users with markers")
    g.add_argument("--mention-every", type=int, default=1000, help="user 1 mentioned every N")
    g.add_argument(
        "--cache",
        default=str(Path(tempfile.gettempdir()) / "chatd-bench-readstate"),
        help="where the built databases are kept",
    )
    g.add_argument("--rebuild", action="store_true", help="build the database again")
    g = parser.add_argument_group("commit, fanout, typing")
    g.add_argument("--members", type=int, help="room size (commit/fanout 100, typing 1,000)")
    g.add_argument("--rounds", type=int, help="A/B rounds (4; quick 2)")
    g.add_argument("--duration", type=float, help="s measured per run (5; quick 0.8)")
    g.add_argument("--publishers", type=int, help="publishers (4; quick 2)")
    g.add_argument("--window", type=int, help="messages in flight per publisher (32; quick 8)")
    g.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="commit/fanout: publishers send this many msgs/s in all, open loop"
        " (default 0: closed loop, --window in flight each)",
    )
    g.add_argument(
        "--publishers-mark",
        choices=["yes", "no"],
        default="yes",
        help="commit/fanout B: the publishers mark read too (yes)",
    )
    g.add_argument("--mark-interval", type=float, help="fanout B: s between marks (1; quick 0.25)")
    g.add_argument("--mark-every", type=int, default=0, help="fanout B: mark every N messages")
    g.add_argument("--typists", type=int, help="fanout B: members typing (10; quick 2)")
    g.add_argument(
        "--typing-interval", type=float, help="fanout B: s between starts (2; quick 0.5)"
    )
    g.add_argument("--typing-duration", type=float, help="typing: s of renewals (10; quick 4)")
    g.add_argument("--renew", type=float, default=2.0, help="typing: s between renewals")
    a = parser.parse_args()
    q = a.quick
    for key, full, quick in (
        ("rooms", 1000, 100),
        ("messages", 10_000, 1000),
        ("calls", 200, 50),
        ("rounds", 4, 2),
        ("duration", 5.0, 0.8),
        ("publishers", 4, 2),
        ("window", 32, 8),
        ("typists", 10, 2),
        ("typing_duration", 10.0, 4.0),
        ("mark_interval", 1.0, 0.25),
        ("typing_interval", 2.0, 0.5),
    ):
        if getattr(a, key) is None:
            setattr(a, key, quick if q else full)
    a.warm = 0.2 if q else 1.0
    members = a.members
    raise_nofile()
    out: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "loadavg_before": Path("/proc/loadavg").read_text().strip(),
        "results": [],
    }
    todo = ["unread", "commit", "typing", "fanout"] if a.scenario == "all" else [a.scenario]
    for name in todo:
        if name == "typing":
            a.members = members or (50 if q else 1000)
        else:
            a.members = members or (10 if q else 100)
        if name == "unread":
            out["results"].append(scenario_unread(a))
        elif name == "typing":
            out["results"].append(scenario_typing(a))
        else:
            out["results"].append(scenario_ab(a, name))
    out["loadavg_after"] = Path("/proc/loadavg").read_text().strip()
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1, default=str))
        log(f"wrote {a.json}")
    # Speed is never asserted; a scenario that broke (a run that failed,
    # error frames) is: bench/run.sh --quick runs this in CI.
    broken = [
        f"{r.get('scenario', '?')}: {r.get('failures') or r.get('error_frames') or r.get('errors')}"
        for r in out["results"]
        if isinstance(r, dict)
        and (r.get("failures") or r.get("error_frames") or r.get("errors"))
    ]
    for r in out["results"]:
        for run in r.get("runs", []) if isinstance(r, dict) else []:
            if "failure" in run:
                broken.append(f"{r.get('scenario')}: {run['failure']}")
    if broken:
        log(f"scenarios broken: {broken}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
