"""Webhooks on and off: what they cost the commit rate and the fan-out.

Usage (bench/.venv, which bench/run.sh makes)::

    python bench/webhooks.py [--quick] [--rounds 3] [--json FILE]

Three sides, alternating (off, on, down, off, on, down, ...), each run a
fresh chatd (fresh database) with bench/load.py's config, on CPU 0:

* ``off``: no ``[webhooks]``;
* ``on``: ``[webhooks]`` with both events, to a receiver that answers 204 at
  once (``webhook_receiver.py``, a process of its own on the load
  generator's CPUs), which counts what it gets;
* ``down``: the same config, to an address nothing listens on: every
  attempt is refused and retried with backoff, deliveries pile up on disk.

Two points per run, with bench/readstate.py's machinery (its ``Bench`` and
``rs_run``: load.py's fan-out closed loop, 4 publishers x 32 messages of
100 bytes in flight, 5 s measured after 1 s warm-up): the room of 100's
committed messages per second (chatd's own counter) and its deliveries per
second (the messages mention no one: ``message.unread`` is not exercised
here, only ``message.created``). Target: ``on`` and ``down`` within 10% of
``off``. Figures as
medians of per-round ratios; nothing is asserted (``--quick`` checks that
the script works: its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import readstate  # noqa: E402
from load import log  # noqa: E402

SECRET = "whsec_" + base64.b64encode(b"bench-webhook-secret-0123456789").decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def with_hooks(server: Any, url: str) -> None:
    """Add ``[webhooks]`` to a not yet started server's config."""
    cfg = Path(server.cmd[-1])
    text = cfg.read_text() + (
        "[webhooks]\n"
        f'url = "{url}"\n'
        f'secret = "{SECRET}"\n'
        'events = ["message.created", "message.unread"]\n'
        "debounce_seconds = 1\n"
        "max_attempts = 1000\n"
    )
    cfg.write_text(text)
    server.config_text = text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--json")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--no-pin", dest="pin", action="store_false")
    a = parser.parse_args()
    q = a.quick
    a.rounds = a.rounds or (1 if q else 3)
    a.members = 10 if q else 100
    a.duration, a.warm = (0.8, 0.2) if q else (5.0, 1.0)
    a.publishers, a.window = (2, 8) if q else (4, 32)
    a.rate = 0.0
    a.publishers_mark = "no"
    readstate.raise_nofile()
    bench = readstate.Bench(a)
    port = free_port()
    receiver = subprocess.Popen(
        [sys.executable, str(HERE / "webhook_receiver.py"), str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)
    behaviour = {"marks": "off", "typists": 0, "parse_all": False}
    runs: list[dict[str, Any]] = []
    try:
        if bench.load_cpus:
            os.sched_setaffinity(receiver.pid, bench.load_cpus)
        for rnd in range(a.rounds):
            for side in ("off", "on", "down"):
                server = bench.server()
                if side == "on":
                    with_hooks(server, f"http://127.0.0.1:{port}/hooks")
                elif side == "down":
                    with_hooks(server, f"http://127.0.0.1:{free_port()}/hooks")
                try:
                    server.start(bench.server_cpus)
                    res = readstate.rs_run(bench, server, behaviour)
                finally:
                    server.stop()
                res.pop("metrics")
                res.update(round=rnd, side=side)
                runs.append(res)
                log(
                    f"  round {rnd} {side}: {res['committed_per_s']:,.0f} msgs/s committed,"
                    f" {res['deliveries_per_s']:,.0f} deliveries/s, server"
                    f" {res['server_cpu']:.2f} cores"
                )
    finally:
        bench.close()
        receiver.terminate()
        got = receiver.communicate(timeout=10)[0].strip()
    out: dict[str, Any] = {"runs": runs, "receiver": got, "quick": q}
    print(f"\nwebhooks: room of {a.members}, {a.publishers} publishers x {a.window} in flight")
    print(f"  {'round':6} {'side':5} {'committed/s':>12} {'deliveries/s':>13} {'vs off':>7}")
    ratios: dict[str, list[float]] = {"on": [], "down": []}
    for rnd in range(a.rounds):
        by = {r["side"]: r for r in runs if r["round"] == rnd}
        for side in ("off", "on", "down"):
            r = by[side]
            ratio = r["committed_per_s"] / by["off"]["committed_per_s"]
            if side != "off":
                ratios[side].append(ratio)
            print(
                f"  {rnd:<6} {side:5} {r['committed_per_s']:>12,.0f}"
                f" {r['deliveries_per_s']:>13,.0f} {ratio:>7.3f}"
            )
    for side, values in ratios.items():
        print(f"  {side}: median committed/s ratio to off {statistics.median(values):.3f}"
              f" (rounds {min(values):.3f}-{max(values):.3f}); target within 10%")  # fmt: skip
    print(f"  receiver: {got}")
    out["median_ratio"] = {side: statistics.median(v) for side, v in ratios.items()}
    print(json.dumps({"scenario": "webhooks", **out["median_ratio"]}))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1, default=str))
    broken = [r for r in runs if r.get("errors")]
    received = json.loads(got or "{}").get("messages", 0)
    if broken or not received:
        log(f"broken: errors in {len(broken)} runs, messages received {received}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
