"""The commit scenario (load.py's (d)) alone, for A/B runs of chatd versions.

Usage::

    python bench/commits.py [--rounds 5] [--profile DIR] [ROOT ...]

Each ROOT is a chatd source tree (default: this one); every round runs the
scenario once against a fresh server from each ROOT, alternating, so that
other load on the machine falls on all versions alike. Same parameters as
the full run: 100 connections x 4 in flight, 5 s measured after 1 s warm-up,
server on CPU 0 and the load generator on CPU 1. Prints one line per run and
the medians per ROOT; ``--json`` writes every run.

``--content words``: each message about 100 bytes of words (bench/search.py's
vocabulary, Zipf-drawn, 4,096 texts taken in turn) instead of 100 ``x`` (one
word), so that a full-text index has real text to index; the default is the
x's. With more than one ROOT, each one's median msgs/s is also given as a
ratio to the first ROOT's.

A second tree is easiest as an export of a commit::

    mkdir /tmp/chatd-base && git archive main | tar -x -C /tmp/chatd-base

``python bench/commits.py --sqlite [--sqlite-rows N] [--conns C]`` measures
SQLite alone instead, for reference (load.py runs it on the server's CPU next
to the batching-clients scenario): the rows that scenario commits (100-byte
content, C rooms, users ``u<id>``), stored with chatd's own schema, pragmas
and ``insert_message`` in a fresh database, in transactions of 100 rows (one
batch) and of 512 (the writer's largest group), as chatd's writer does
(``BEGIN IMMEDIATE`` .. ``COMMIT``); prints one JSON line: rows/s and CPU
µs a row for each group size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import load  # noqa: E402


def sqlite_rates(rows: int, conns: int, size: int = 100) -> dict[str, Any]:
    """Rows/s and CPU µs a row of chatd's INSERT alone, per group size."""
    sys.path.insert(0, str(HERE.parent))
    from chatd.store import NewMessage
    from chatd.store.schema import connect, migrate
    from chatd.store.sqlite import insert_message

    content = "x" * size
    messages = [
        NewMessage(
            user_id=1000 + k,
            username=f"u{1000 + k}",
            content=content,
            message_type="text",
            created_at="2024-01-01T00:00:00.000Z",
            room=f"c{k}",
        )
        for k in range(conns)
    ]
    out: dict[str, Any] = {"rows": rows, "rooms": conns, "size": size, "groups": []}
    for group in (100, 512):
        with tempfile.TemporaryDirectory(prefix="chatd-sqlite-") as tmp:
            conn = connect(str(Path(tmp) / "chatd.db"))
            migrate(conn)
            seqs: dict[str, int] = {}
            wall, cpu = time.perf_counter(), time.process_time()
            done = 0
            while done < rows:
                k = min(group, rows - done)
                conn.execute("BEGIN IMMEDIATE")
                for i in range(done, done + k):
                    insert_message(conn, messages[i % conns], seqs)
                conn.execute("COMMIT")
                done += k
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            conn.close()
        out["groups"].append(
            {"group": group, "rows_per_s": rows / wall, "cpu_us_per_row": 1e6 * cpu / rows}
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("roots", nargs="*", default=[str(HERE.parent)])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--conns", type=int, default=100)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--profile", help="py-spy each run (raw collapsed stacks) into this dir")
    parser.add_argument(
        "--gil", action="store_true", help="py-spy samples only the thread holding the GIL"
    )
    parser.add_argument("--json", help="write every run here")
    parser.add_argument("--perf", help="perf record (no call graphs) each run into this dir")
    parser.add_argument("--sqlite", action="store_true", help="SQLite's insert rate alone")
    parser.add_argument("--sqlite-rows", type=int, default=100_000)
    parser.add_argument(
        "--content",
        choices=["x", "words"],
        default="x",
        help="messages of 100 x's (default) or of about 100 bytes of words",
    )
    args = parser.parse_args()
    if args.sqlite:
        print(json.dumps(sqlite_rates(args.sqlite_rows, args.conns)))
        return 0
    ns = argparse.Namespace(
        procs=2,
        pin=True,
        profile=bool(args.profile),
        duration=args.duration,
        warm=1.0,
        commit_conns=args.conns,
        commit_window=args.window,
    )
    if args.content == "words":
        import search

        ns.commit_contents = search.contents(4096)
    load.raise_nofile()
    bench = load.Bench(ns)
    if args.gil:
        spy = bench.spy

        def spy_gil(server: load.Server, profile: Path | None) -> Any:
            proc = spy(server, profile)
            return proc

        original = subprocess.Popen

        def popen(cmd: Any, *a: Any, **k: Any) -> Any:
            if isinstance(cmd, list) and cmd and str(cmd[0]).endswith("py-spy"):
                cmd = [*cmd, "--gil"]
            return original(cmd, *a, **k)

        load.subprocess.Popen = popen  # type: ignore[assignment,misc]
        bench.spy = spy_gil  # type: ignore[method-assign]
    runs: list[dict[str, Any]] = []
    try:
        for rnd in range(args.rounds):
            for i, root in enumerate(args.roots):
                load.ROOT = Path(root).resolve()
                server = load.Server("chatd", False, bench.tmp, bench.rooms)
                server.start(bench.server_cpus)
                prof = None
                if args.profile:
                    Path(args.profile).mkdir(parents=True, exist_ok=True)
                    prof = Path(args.profile) / f"commit-{i}-{rnd}.txt"
                perf = None
                if args.perf:
                    Path(args.perf).mkdir(parents=True, exist_ok=True)
                    out = Path(args.perf) / f"perf-{i}-{rnd}.data"
                    # starts with the warm-up, as py-spy does
                    perf = subprocess.Popen(
                        ["perf", "record", "-q", "-o", str(out), "-p", str(server.pid),
                         "--", "sleep", str(int(args.duration + 2))],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                try:
                    time.sleep(0.5)
                    res = bench.commit(server, prof)
                finally:
                    if perf is not None:
                        perf.wait(60)
                    server.stop()
                res.update(root=root, round=rnd, content=args.content)
                res["cpu_us_per_msg"] = res["server_cpu"] / max(1.0, res["acked_per_s"]) * 1e6
                runs.append(res)
                print(
                    f"round {rnd} {root}: {res['acked_per_s']:,.0f} msgs/s, p50"
                    f" {res['p50_ms']:.2f} ms, p99 {res['p99_ms']:.2f} ms, server"
                    f" {res['server_cpu']:.2f} cores = {res['cpu_us_per_msg']:.1f} µs/msg,"
                    f" loadgen {res['loadgen_cpu']:.2f}, machine {res['machine_cpu']:.2f}",
                    flush=True,
                )
    finally:
        bench.pool.close()
        shutil.rmtree(bench.tmp, ignore_errors=True)
    first = None
    for root in args.roots:
        mine = [r for r in runs if r["root"] == root]
        if not mine:
            continue
        med = {
            k: statistics.median(r[k] for r in mine)
            for k in ("acked_per_s", "p50_ms", "p99_ms", "server_cpu", "cpu_us_per_msg")
        }
        print(
            f"median of {len(mine)} {root}: {med['acked_per_s']:,.0f} msgs/s, p50"
            f" {med['p50_ms']:.2f} ms, p99 {med['p99_ms']:.2f} ms, server"
            f" {med['server_cpu']:.2f} cores, {med['cpu_us_per_msg']:.1f} µs/msg"
        )
        if first is None:
            first = med["acked_per_s"]
        elif first:
            print(f"  {root} / {args.roots[0]}: {med['acked_per_s'] / first:.3f} of its msgs/s")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
