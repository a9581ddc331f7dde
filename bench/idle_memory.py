"""Where an idle chatd connection's memory goes: RSS per connection, and why.

Usage (from the repository root; bench/.venv has the load generator's
packages, chatd runs from the sources)::

    bench/.venv/bin/python bench/idle_memory.py                 # RSS only, 10,000 conns
    bench/.venv/bin/python bench/idle_memory.py --n 1000
    bench/.venv/bin/python bench/idle_memory.py --tracemalloc   # + where it is allocated
    bench/.venv/bin/python bench/idle_memory.py --room big      # all members of one room

What it does
------------
* Starts chatd the way ``bench/load.py`` does (its ``Server``: generated
  config, compression off, ``max_connections`` and
  ``max_connections_per_address`` raised, logging at warning), and the same
  load-generator workers (``--procs``, ``bench/worker.py``; with ``--pin``
  the server gets CPU 0, the workers the others).
* Warms the server up with ``--warm`` connections opened and closed (the
  first connections import and cache what every later one shares; the bench's
  own 10k figure is also taken after its 1k round).
* Reads VmRSS of the server (``/proc/PID/status``), opens ``--n`` idle
  authenticated connections (no room unless ``--room``, no
  permessage-deflate offer), waits
  ``--hold`` seconds, reads VmRSS again: KiB per connection = delta / opened.
  Repeats ``--rounds`` times on the same server (closing in between).
* ``--tracemalloc``: the server runs under a small bootstrap that starts
  ``tracemalloc`` (``--frames`` deep) and, on SIGUSR1, collects garbage and
  dumps a snapshot plus a count and ``sys.getsizeof`` total of the
  gc-tracked objects by type. Snapshots are taken before and after the
  connections open; the script prints the top differences grouped by
  traceback and by type. (tracemalloc's own bookkeeping inflates RSS: read the
  RSS figure from a run without it.)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from load import Bench, Server, log, proc_rss_kib, raise_nofile  # noqa: E402

BOOTSTRAP = r"""
import gc, json, os, signal, sys, tracemalloc
from collections import Counter
tracemalloc.start(int(os.environ["IDLEMEM_FRAMES"]))
_dump = os.environ["IDLEMEM_DUMP"]
_k = [0]
def _snap(signum, frame):
    _k[0] += 1
    gc.collect()
    base = f"{_dump}.{_k[0]}"
    tracemalloc.take_snapshot().dump(base + ".snap.tmp")
    count, size = Counter(), Counter()
    for o in gc.get_objects():
        t = type(o)
        name = f"{t.__module__}.{t.__qualname__}"
        count[name] += 1
        size[name] += sys.getsizeof(o)
    with open(base + ".types.tmp", "w") as f:
        json.dump({"count": count, "size": size}, f)
    os.rename(base + ".types.tmp", base + ".types")
    os.rename(base + ".snap.tmp", base + ".snap")
signal.signal(signal.SIGUSR1, _snap)
from chatd.cli import main
sys.exit(main(sys.argv[1:]))
"""


def snapshot(server: Server, dump: Path, k: int) -> tuple[tracemalloc.Snapshot, dict[str, Any]]:
    os.kill(server.pid, signal.SIGUSR1)
    snap, types = Path(f"{dump}.{k}.snap"), Path(f"{dump}.{k}.types")
    deadline = time.monotonic() + 300
    while not (snap.exists() and types.exists()):
        if time.monotonic() > deadline:
            raise TimeoutError("no snapshot from the server")
        time.sleep(0.2)
    return tracemalloc.Snapshot.load(str(snap)), json.loads(types.read_text())


def short(frame: tracemalloc.Frame) -> str:
    name = frame.filename
    for cut in ("site-packages/", f"{HERE.parent.name}/", "python3.11/"):
        if cut in name:
            name = name.split(cut, 1)[1]
            break
    return f"{name}:{frame.lineno}"


def report(
    before: tuple[tracemalloc.Snapshot, dict[str, Any]],
    after: tuple[tracemalloc.Snapshot, dict[str, Any]],
    n: int,
    top: int,
) -> None:
    snap0, types0 = before
    snap1, types1 = after
    stats = snap1.compare_to(snap0, "traceback")
    total = sum(s.size_diff for s in stats)
    print(f"\ntracemalloc: {total / 1024 / n:.2f} KiB per connection traced (Python heap)")
    # Grouped by the innermost chatd frame (what in chatd caused it) and the
    # innermost frame (what allocated it): B per connection, blocks per connection.
    by_site: Counter[tuple[str, str]] = Counter()
    blocks: Counter[tuple[str, str]] = Counter()
    by_chatd: Counter[str] = Counter()
    for s in stats:
        frames = list(s.traceback)
        ours = next((short(f) for f in reversed(frames) if "chatd/" in f.filename), "-")
        key = (ours, short(frames[-1]))
        by_site[key] += s.size_diff
        blocks[key] += s.count_diff
        by_chatd[ours] += s.size_diff
    print(f"top {top} by innermost chatd frame (B per connection):")
    for site, size in by_chatd.most_common(top):
        print(f"  {size / n:8.1f} B  {site}")
    print(f"\ntop {top} by (innermost chatd frame, allocating frame):")
    for key, size in by_site.most_common(top):
        print(f"  {size / n:8.1f} B  {blocks[key] / n:6.2f}  {key[0]:40s} {key[1]}")
    print("\ngc-tracked objects by type (per connection: count, getsizeof bytes):")
    rows = []
    for name, size in types1["size"].items():
        d = size - types0["size"].get(name, 0)
        c = types1["count"][name] - types0["count"].get(name, 0)
        if c or d:
            rows.append((d, c, name))
    rows.sort(reverse=True)
    for d, c, name in rows[:top]:
        print(f"  {c / n:6.2f}  {d / n:8.1f} B  {name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="idle connections")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--warm", type=int, default=500, help="connections opened first")
    parser.add_argument("--hold", type=float, default=2.0, help="seconds before reading RSS")
    parser.add_argument("--procs", type=int, default=2, help="load-generator processes")
    parser.add_argument("--no-pin", dest="pin", action="store_false")
    parser.add_argument("--tracemalloc", action="store_true")
    parser.add_argument("--frames", type=int, default=12, help="tracemalloc depth")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--room", help="every connection joins this room as it connects (a public one: big)"
    )
    a = parser.parse_args()
    raise_nofile()
    bench = Bench(SimpleNamespace(procs=a.procs, pin=a.pin, commit_conns=0, warm=0.0))
    server = Server("chatd", False, bench.tmp, bench.rooms)
    dump = bench.tmp / "idlemem"
    if a.tracemalloc:
        server.cmd[1:3] = ["-c", BOOTSTRAP]
        os.environ.update(IDLEMEM_FRAMES=str(a.frames), IDLEMEM_DUMP=str(dump))
    server.start(bench.server_cpus)
    k = 0
    try:
        if a.warm:
            bench.connect(server, a.warm, None, False)
            bench.close_all(server)
        for r in range(a.rounds):
            time.sleep(0.5)
            if a.tracemalloc:
                k += 1
                before = snapshot(server, dump, k)
            rss0 = proc_rss_kib(server.pid)
            conn = bench.connect(server, a.n, a.room, False)
            time.sleep(a.hold)
            rss1 = proc_rss_kib(server.pid)
            held = sum(x["open"] for x in bench.pool.all({"op": "held"}, timeout=30))
            opened = conn["opened"]
            per = (rss1 - rss0) / max(1, opened)
            log(
                f"round {r + 1}: opened {opened}/{a.n} in {conn['seconds']:.1f} s, held {held};"
                f" RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB: {per:.2f} KiB per connection"
            )
            if conn["errors"]:
                log(f"  errors: {conn['errors']}")
            if a.tracemalloc:
                k += 1
                after = snapshot(server, dump, k)
                report(before, after, max(1, opened), a.top)
            bench.close_all(server)
    finally:
        bench.pool.close()
        tail = server.stop()
        errors = [ln for ln in tail.splitlines() if "ERROR" in ln or "Traceback" in ln]
        for line in errors[-10:]:
            log("server: " + line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
