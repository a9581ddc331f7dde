"""A/B of two chatd checkouts at the fan-out and latency points (and, on
request, the handshakes), alternating.

Usage (with bench/.venv, which bench/run.sh makes)::

    python bench/ab.py --a DIR_A --b DIR_B [--rounds 4] [--rate MSGS_PER_S]
                       [--duration S] [--quick] [--out FILE]
                       [--handshakes also|only] [--unique-tokens]

DIR_A and DIR_B are chatd checkouts (each with a ``chatd/`` package), e.g. the
base and a branch; a second tree is easiest as an export of a commit::

    mkdir /tmp/chatd-base && git archive main | tar -x -C /tmp/chatd-base

What it measures
----------------
Two of bench/load.py's points, with load.py's own code (``Bench``, ``Server``,
its worker pool and its ``fanout``/``latency`` scenarios) and the parameters
of its full run:

* fan-out: one room of 100 members, 100-byte messages, compression off, 4
  publishers each keeping 32 messages in flight (closed loop), 5 s measured
  after 1 s warm-up: deliveries/s (higher is better). Also shown: chatd's CPU
  per delivery (µs of its core) and the load generator's cores busy;
* latency: a room of 100, one publisher at a FIXED rate, 8 s measured after
  1 s warm-up: publish-to-last-recipient p50/p99/p99.9 in ms (lower is
  better). The rate is ``--rate`` for every run, A and B alike; without it,
  half of A's messages/s in the first fan-out run (as the full run takes half
  of each server's maximum), then fixed for the rest of the run.
* handshakes (``--handshakes also``: after the two points above, on a fresh
  server of their own; ``--handshakes only``: instead of them): load.py's
  handshake scenario (16 loops per worker of connect, upgrade with a token,
  101, ping, pong, close; 1,000 users, each reconnecting with its one token),
  5 s measured after 1 s warm-up, on a fresh server ("fresh"), then again
  right after 10,000 idle connections opened and closed on it ("after 10k"),
  as the full run does: handshakes/s (higher is better) and chatd's CPU per
  handshake (µs of its core). ``--unique-tokens``: every handshake with a
  token signed for it (the first connection of each client after a restart:
  no token seen before).

How
---
Each round runs A then B (the next round B then A, and so on, so that drift
of the machine's load over time falls on both alike); each run is a fresh
chatd process (``python -m chatd --config ...`` with cwd and PYTHONPATH set to
its checkout, the interpreter running this script, SQLite in a temp dir, the
config load.py writes), on CPU 0, with the fan-out point and then the latency
point measured on it. The load generator (bench/worker.py, from the tree this
script is in, the same worker processes for every run) is on the other CPU.
Before the first round, a short fan-out on a fresh server from each checkout
warms the load generator and the checkouts up; it is not counted (and a
checkout whose chatd does not start stops the script there).
``--duration`` sets both measured windows (default 5 s and 8 s); ``--quick``
uses load.py's --quick counts (room of 10, 2 publishers x 8 in flight, 0.8 s
and 1 s windows, 2 rounds) to check that the script works, not to measure.

Reading the result
------------------
One table per point: each round's figures for A and B and the ratio B/A, then
the median over the rounds of each column (the ratio's median is the median
of the per-round ratios, not the ratio of the medians). B costs ``1 - B/A``
of the deliveries/s and ``B/A - 1`` of a latency percentile; the last lines
set the median cost against a 5% budget. On a shared 2-core machine single
runs move by 10-40% (bench/analysis.md), so a round's ratio says little; the
median of several rounds, with the per-round ratios spread narrowly around
it, is the figure; an A/A run (the same checkout as both) shows how far this
machine's noise alone moves it. Where the load generator is at ~1.00 core,
the fan-out row measured its ceiling rather than chatd's: then compare
chatd's µs per delivery. Notes under a table name the runs that shared the
machine with other work (its busy cores minus chatd, the load generator and
the kernel's loopback softirq, over 0.2) and the latency runs where fewer
messages arrived than were offered or some missed a member (percentiles
count only the messages every member got; none at all shows as n/a): such
rounds are suspect. At half the fan-out maximum both cores are about 0.9
busy (bench/analysis.md), so other work on the machine shows there as a
tail of hundreds of ms; a lower ``--rate`` leaves headroom.
The raw results of every run (load.py's dicts for each point) go to
``--out`` as JSON (a temp file by default; its path is printed last). The
exit status is 1 when a run failed.

A run of 4 rounds at the default windows takes about 2.5 minutes (8 fresh
servers of about 18 s each, after a warm-up of about 8 s); ``--quick``
about 25 s. ``--handshakes`` adds about 30 s per run (two measured windows
and the 10,000 idle connections).
"""

from __future__ import annotations

import argparse
import json
import math
import os
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

from load import Bench, Server, log  # noqa: E402
from worker import raise_nofile  # noqa: E402

BUDGET = 0.05
# cores busy with other work (machine - chatd - load generator - softirq)
# above which a run gets a note: it shared the machine
OTHER_CORES = 0.2
PCTS = (("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9"))


def checkout(path: str) -> dict[str, Any]:
    """The checkout's path, git revision and whether its chatd/ has changes."""
    root = Path(path).resolve()

    def git(*cmd: str) -> str:
        try:
            out = subprocess.run(
                ["git", "-C", str(root), *cmd], capture_output=True, text=True, timeout=20
            )
        except (OSError, subprocess.SubprocessError):
            return ""
        return out.stdout.strip() if out.returncode == 0 else ""

    return {
        "root": str(root),
        "rev": git("rev-parse", "--short", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--", "chatd")),
    }


def run_handshakes(bench: Bench, rec: dict[str, Any], root: Path, idle: int, unique: bool) -> None:
    """A fresh chatd from ``root``: handshakes/s fresh, then after ``idle``
    connections opened and closed (load.py's ``handshakes`` and ``idle``)."""
    server = Server("chatd", False, bench.tmp, bench.rooms, root=root)
    try:
        server.start(bench.server_cpus)
        rec["handshakes"] = bench.handshakes(server, unique=unique)
        rec["idle"] = bench.idle(server, idle)
        rec["handshakes_after_idle"] = bench.handshakes(server, unique=unique)
        if not server.alive():
            raise RuntimeError("chatd died during the handshakes")
    except Exception as exc:  # reported, then the next run goes on
        log(f"  round {rec['round']} {rec['side']}: FAILED: {type(exc).__name__}: {exc}")
        rec["failures"].append(f"{type(exc).__name__}: {exc}")
        try:
            bench.close_all()
        except Exception:
            pass
    finally:
        alive = server.alive()
        tail = server.stop()
        if not alive:
            rec["failures"].append(f"chatd exited during the handshakes: {tail[-1500:]}")
        errors = [ln for ln in tail.splitlines() if "ERROR" in ln or "Traceback" in ln]
        if errors:
            rec.setdefault("log_errors", []).extend(errors[-20:])


def run_one(
    bench: Bench,
    side: str,
    root: Path,
    rnd: int,
    rate: float | None,
    p: argparse.Namespace,
) -> dict[str, Any]:
    """One fresh chatd from ``root``: the fan-out point, then the latency point
    at ``rate`` (None: half of this run's fan-out maximum); then, with
    ``--handshakes``, the handshakes on another fresh chatd."""
    rec: dict[str, Any] = {"round": rnd, "side": side, "root": str(root), "failures": []}
    started = time.monotonic()
    if p.points_fanout:
        fanout_latency(bench, rec, root, rate, p.members)
    if p.handshakes:
        log(f"round {rnd} {side}: handshakes (cwd {root})")
        run_handshakes(bench, rec, root, p.idle, p.unique_tokens)
    rec["seconds"] = round(time.monotonic() - started, 1)
    return rec


def fanout_latency(
    bench: Bench, rec: dict[str, Any], root: Path, rate: float | None, members: int
) -> None:
    """The fan-out point, then the latency point, on one fresh chatd."""
    rnd, side = rec["round"], rec["side"]
    server = Server("chatd", False, bench.tmp, bench.rooms, root=root)
    log(f"round {rnd} {side}: {' '.join(server.cmd)} (cwd {root})")
    try:
        server.start(bench.server_cpus)
        fanout = bench.fanout(server, members, 100, False)
        if not server.alive():
            rec["fanout_discarded"] = fanout
            raise RuntimeError("chatd died during fan-out")
        rec["fanout"] = fanout
        if rate is None:
            rate = max(50.0, 0.5 * rec["fanout"]["msgs_per_s"])
            rec["rate_from_this_run"] = True
        rec["latency"] = bench.latency(server, members, rate)
    except Exception as exc:  # reported, then the next run goes on
        log(f"  round {rnd} {side}: FAILED: {type(exc).__name__}: {exc}")
        rec["failures"].append(f"{type(exc).__name__}: {exc}")
        try:
            bench.close_all()
        except Exception:
            pass
    finally:
        alive = server.alive()
        tail = server.stop()
        if not alive:
            rec["failures"].append(f"chatd exited during the run: {tail[-1500:]}")
            if "latency" in rec:  # it died during (or right after) the latency point
                rec["latency_discarded"] = rec.pop("latency")
        errors = [ln for ln in tail.splitlines() if "ERROR" in ln or "Traceback" in ln]
        if errors:
            rec.setdefault("log_errors", []).extend(errors[-20:])


def warm_up(bench: Bench, side: str, root: Path, p: argparse.Namespace) -> dict[str, Any]:
    """A short fan-out on a fresh server from ``root``, not counted: the load
    generator's first run and the checkout's first start (bytecode, page
    cache) fall here, and a checkout whose chatd does not start stops the
    script before any round."""
    server = Server("chatd", False, bench.tmp, bench.rooms, root=root)
    log(f"warm-up {side} (not counted): {' '.join(server.cmd)} (cwd {root})")
    duration = p.duration
    p.duration = min(1.0, duration)
    try:
        server.start(bench.server_cpus)
        if p.points_fanout:
            return bench.fanout(server, p.members, 100, False)
        return bench.handshakes(server, unique=p.unique_tokens)
    finally:
        p.duration = duration
        server.stop()


# --- the tables --------------------------------------------------------------


def value(rec: dict[str, Any] | None, point: str, key: str) -> float | None:
    if rec is None or point not in rec:
        return None
    x = rec[point].get(key)
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return float(x)


def us_per_delivery(rec: dict[str, Any] | None) -> float | None:
    dps = value(rec, "fanout", "deliveries_per_s")
    cpu = value(rec, "fanout", "server_cpu")
    return cpu / dps * 1e6 if dps and cpu is not None else None


def other_cores(rec: dict[str, Any] | None, point: str) -> float | None:
    """Cores busy with anything but chatd, the load generator and loopback
    softirq during the point's window (other jobs on the machine)."""
    keys = ("machine_cpu", "server_cpu", "loadgen_cpu", "softirq_cpu")
    vals = [value(rec, point, k) for k in keys]
    if any(v is None for v in vals):
        return None
    machine, server, loadgen, softirq = (float(v or 0.0) for v in vals)
    return machine - server - loadgen - softirq


def busy_notes(pairs: list[Any], point: str) -> list[str]:
    """A note for each run that shared the machine with other work."""
    notes = []
    for rnd, _, a, b in pairs:
        for side, rec in (("A", a), ("B", b)):
            other = other_cores(rec, point)
            if other is not None and other > OTHER_CORES:
                notes.append(
                    f"  round {rnd} {side}: other work on the machine took {other:.2f} cores"
                )
    return notes


def div(b: float | None, a: float | None) -> float | None:
    return b / a if a and b is not None else None


def median(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    # the first two columns (round, order) to the left, the figures to the right
    lines = [
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [head, *rows]
    ]
    return [lines[0], "  ".join("-" * w for w in widths), *lines[1:]]


def cost_line(
    name: str, ratios: list[float | None], higher_is_better: bool, costs: dict[str, Any]
) -> str:
    """The median ratio as B's cost against the budget (also into ``costs``)."""
    vals = [r for r in ratios if r is not None]
    if not vals:
        return f"  {name}: no ratio"
    med = statistics.median(vals)
    cost = (1 - med) if higher_is_better else (med - 1)
    verdict = "within" if cost <= BUDGET else "OVER"
    costs[name] = {"median_ratio": med, "cost": cost, "within_budget": cost <= BUDGET}
    return (
        f"  {name}: median B/A {med:.3f} (rounds {min(vals):.3f}-{max(vals):.3f},"
        f" {len(vals)} of them): B costs {cost:+.1%} -> {verdict} the {BUDGET:.0%} budget"
    )


def report(runs: list[dict[str, Any]], rounds: int, p: argparse.Namespace) -> dict[str, Any]:
    """Print the two tables; returns the per-round figures and medians."""
    pairs = []
    for rnd in range(rounds):
        by = {r["side"]: r for r in runs if r["round"] == rnd}
        if by:
            pairs.append((rnd, "A,B" if rnd % 2 == 0 else "B,A", by.get("A"), by.get("B")))
    summary: dict[str, Any] = {"fanout": [], "latency": [], "budget": BUDGET, "costs": {}}
    if p.points_fanout:
        report_fanout_latency(pairs, summary, runs, p)
    if p.handshakes:
        report_handshakes(pairs, summary, p)
    return summary


def report_handshakes(pairs: list[Any], summary: dict[str, Any], p: argparse.Namespace) -> None:
    """One table per handshake measurement (fresh, after the idle connections)."""
    tokens = "a new token each" if p.unique_tokens else "1,000 users, one token each"
    for point, label, title in (
        ("handshakes", "fresh", "handshakes, fresh server"),
        ("handshakes_after_idle", "after idle", f"handshakes, right after {p.idle:,} closed"),
    ):
        rows = []
        cols: dict[str, list[float | None]] = {}
        for rnd, order, a, b in pairs:
            d = {"A": value(a, point, "per_s"), "B": value(b, point, "per_s")}
            d["B/A"] = div(d["B"], d["A"])
            d["A_us"], d["B_us"] = us_per_handshake(a, point), us_per_handshake(b, point)
            d["B/A_us"] = div(d["B_us"], d["A_us"])
            d["A_lg"], d["B_lg"] = value(a, point, "loadgen_cpu"), value(b, point, "loadgen_cpu")
            d["A_err"] = errors_of(a, point)
            d["B_err"] = errors_of(b, point)
            for k, v in d.items():
                cols.setdefault(k, []).append(v)
            summary.setdefault(point, []).append({"round": rnd, "order": order, **d})
            rows.append(handshake_row([str(rnd), order], d))
        med = {k: median(v) for k, v in cols.items()}
        summary[f"{point}_median"] = med
        rows.append(handshake_row(["median", ""], med))
        print()
        print(
            f"{title}: {p.hs_concurrency} loops per worker x {p.procs} workers, {tokens},"
            f" {p.duration:g} s measured: handshakes/s (higher is better)"
        )
        head = ["round", "order", "A hs/s", "B hs/s", "B/A", "A µs/hs", "B µs/hs", "B/A"]
        head += ["A loadgen", "B loadgen", "A errors", "B errors"]
        for line in table(head, rows):
            print("  " + line)
        for note in busy_notes(pairs, point):
            print(note)
        print(cost_line(f"handshakes/s ({label})", cols.get("B/A", []), True, summary["costs"]))
        costs = summary["costs"]
        print(cost_line(f"chatd µs/handshake ({label})", cols.get("B/A_us", []), False, costs))


def handshake_row(first: list[str], d: dict[str, float | None]) -> list[str]:
    return (
        first
        + [fmt(d.get(k), ",.0f") for k in ("A", "B")]
        + [fmt(d.get("B/A"), ".3f")]
        + [fmt(d.get(k), ",.0f") for k in ("A_us", "B_us")]
        + [fmt(d.get("B/A_us"), ".3f")]
        + [fmt(d.get(k), ".2f") for k in ("A_lg", "B_lg")]
        + [fmt(d.get(k), ",.0f") for k in ("A_err", "B_err")]
    )


def us_per_handshake(rec: dict[str, Any] | None, point: str) -> float | None:
    per_s = value(rec, point, "per_s")
    cpu = value(rec, point, "server_cpu")
    return cpu / per_s * 1e6 if per_s and cpu is not None else None


def errors_of(rec: dict[str, Any] | None, point: str) -> float | None:
    if rec is None or point not in rec:
        return None
    return float(sum(rec[point]["errors"].values()))


def report_fanout_latency(
    pairs: list[Any], summary: dict[str, Any], runs: list[dict[str, Any]], p: argparse.Namespace
) -> None:
    """The fan-out and latency tables."""
    # fan-out
    rows = []
    cols: dict[str, list[float | None]] = {}
    for rnd, order, a, b in pairs:
        d = {
            "A": value(a, "fanout", "deliveries_per_s"),
            "B": value(b, "fanout", "deliveries_per_s"),
            "A_us": us_per_delivery(a),
            "B_us": us_per_delivery(b),
            "A_lg": value(a, "fanout", "loadgen_cpu"),
            "B_lg": value(b, "fanout", "loadgen_cpu"),
        }
        d["B/A"] = div(d["B"], d["A"])
        d["B/A_us"] = div(d["B_us"], d["A_us"])
        d["A_other"], d["B_other"] = other_cores(a, "fanout"), other_cores(b, "fanout")
        for k, v in d.items():
            cols.setdefault(k, []).append(v)
        summary["fanout"].append({"round": rnd, "order": order, **d})
        rows.append(
            [str(rnd), order]
            + [fmt(d[k], ",.0f") for k in ("A", "B")]
            + [fmt(d["B/A"], ".3f")]
            + [fmt(d[k], ".3f") for k in ("A_us", "B_us")]
            + [fmt(d["B/A_us"], ".3f")]
            + [fmt(d[k], ".2f") for k in ("A_lg", "B_lg")]
        )
    med = {k: median(v) for k, v in cols.items()}
    summary["fanout_median"] = med
    rows.append(
        ["median", ""]
        + [fmt(med.get(k), ",.0f") for k in ("A", "B")]
        + [fmt(med.get("B/A"), ".3f")]
        + [fmt(med.get(k), ".3f") for k in ("A_us", "B_us")]
        + [fmt(med.get("B/A_us"), ".3f")]
        + [fmt(med.get(k), ".2f") for k in ("A_lg", "B_lg")]
    )
    print()
    print(
        f"fan-out: room of {p.members}, 100-byte messages, compression off,"
        f" {p.publishers} publishers x {p.window} in flight, {p.duration:g} s"
        " measured: deliveries/s (higher is better)"
    )
    head = ["round", "order", "A dlv/s", "B dlv/s", "B/A"]
    head += ["A µs/dlv", "B µs/dlv", "B/A", "A loadgen", "B loadgen"]
    for line in table(head, rows):
        print("  " + line)
    for note in busy_notes(pairs, "fanout"):
        print(note)
    print(cost_line("deliveries/s", cols.get("B/A", []), True, summary["costs"]))
    print(cost_line("chatd µs/delivery", cols.get("B/A_us", []), False, summary["costs"]))

    # latency
    rows = []
    cols = {}
    notes = []
    for rnd, order, a, b in pairs:
        d = {}
        for key, label in PCTS:
            d[f"A {label}"] = value(a, "latency", key)
            d[f"B {label}"] = value(b, "latency", key)
            d[f"B/A {label}"] = div(d[f"B {label}"], d[f"A {label}"])
        d["A other"], d["B other"] = other_cores(a, "latency"), other_cores(b, "latency")
        for k, v in d.items():
            cols.setdefault(k, []).append(v)
        summary["latency"].append({"round": rnd, "order": order, **d})
        row = [str(rnd), order]
        for _, label in PCTS:
            row += [fmt(d[f"A {label}"], ".2f"), fmt(d[f"B {label}"], ".2f")]
            row += [fmt(d[f"B/A {label}"], ".3f")]
        rows.append(row)
        for side, rec in (("A", a), ("B", b)):
            if rec is None or "latency" not in rec:
                continue
            lat = rec["latency"]
            # messages sent in the window that reached a member, against the offer
            offered = lat["offered_msgs_per_s"] * p.latency_duration
            if lat["incomplete"] or lat["measured"] < 0.97 * offered:
                notes.append(
                    f"  round {rnd} {side}: {lat['measured']:,} of the window's"
                    f" {offered:,.0f} messages arrived, {lat['incomplete']:,} of them"
                    f" not at every member (chatd busy {lat['server_cpu']:.2f} cores)"
                )
    med = {k: median(v) for k, v in cols.items()}
    summary["latency_median"] = med
    row = ["median", ""]
    for _, label in PCTS:
        row += [fmt(med.get(f"A {label}"), ".2f"), fmt(med.get(f"B {label}"), ".2f")]
        row += [fmt(med.get(f"B/A {label}"), ".3f")]
    rows.append(row)
    rates = sorted({r["latency"]["offered_msgs_per_s"] for r in runs if "latency" in r})
    print()
    print(
        f"latency: room of {p.members}, one publisher at"
        f" {', '.join(f'{x:,.0f}' for x in rates) or '?'} msgs/s, {p.latency_duration:g} s"
        " measured: publish-to-last-recipient ms (lower is better)"
    )
    head = ["round", "order"]
    for _, label in PCTS:
        head += [f"A {label}", f"B {label}", "B/A"]
    for line in table(head, rows):
        print("  " + line)
    for note in notes + busy_notes(pairs, "latency"):
        print(note)
    for _, label in PCTS:
        print(cost_line(label, cols.get(f"B/A {label}", []), False, summary["costs"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", required=True, metavar="DIR_A", help="checkout A (the reference)")
    parser.add_argument("--b", required=True, metavar="DIR_B", help="checkout B (the candidate)")
    parser.add_argument("--rounds", type=int, help="rounds of A and B (default 4, quick 2)")
    parser.add_argument(
        "--rate",
        type=float,
        metavar="MSGS_PER_S",
        help="latency point's msgs/s for every run (default: half of A's first fan-out)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        metavar="S",
        help="seconds measured per point (default 5 fan-out, 8 latency)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny counts: checks the script")
    parser.add_argument("--out", help="raw results as JSON (default: a temp file)")
    parser.add_argument("--procs", type=int, default=2, help="load-generator processes")
    parser.add_argument(
        "--handshakes",
        choices=["also", "only"],
        help="also (or only) load.py's handshakes, fresh and after 10,000 connections closed",
    )
    parser.add_argument(
        "--unique-tokens",
        action="store_true",
        help="with --handshakes: a token never seen before for every handshake",
    )
    args = parser.parse_args()
    sides = {"A": checkout(args.a), "B": checkout(args.b)}
    for side, info in sides.items():
        if not (Path(info["root"]) / "chatd" / "__main__.py").is_file():
            parser.error(f"--{side.lower()} {info['root']}: no chatd/__main__.py there")
    if args.rate is not None and args.rate <= 0:
        parser.error("--rate must be positive")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.unique_tokens and not args.handshakes:
        parser.error("--unique-tokens needs --handshakes")
    # load.py's parameters of the same points (its full run, or its --quick)
    p = argparse.Namespace(procs=args.procs, pin=True, profile=False, commit_conns=0)
    if args.quick:
        p.members, p.duration, p.latency_duration, p.warm = 10, 0.8, 1.0, 0.2
        p.publishers, p.window, p.hs_concurrency, p.idle = 2, 8, 4, 100
    else:
        p.members, p.duration, p.latency_duration, p.warm = 100, 5.0, 8.0, 1.0
        p.publishers, p.window, p.hs_concurrency, p.idle = 4, 32, 16, 10000
    p.points_fanout = args.handshakes != "only"
    p.handshakes = args.handshakes is not None
    p.unique_tokens = args.unique_tokens
    if args.duration is not None:
        p.duration = p.latency_duration = args.duration
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 4)
    out = args.out
    if out is None:
        fd, out = tempfile.mkstemp(prefix="chatd-ab-", suffix=".json")
        os.close(fd)
    for side, info in sides.items():
        dirty = ", chatd/ changed" if info["dirty"] else ""
        log(f"{side}: {info['root']} (rev {info['rev'] or '?'}{dirty})")

    raise_nofile()
    started = time.monotonic()
    result: dict[str, Any] = {
        "quick": args.quick,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "a": sides["A"],
        "b": sides["B"],
        "rounds": rounds,
        "params": {**vars(p), "rate": args.rate},
        "loadavg_before": Path("/proc/loadavg").read_text().strip(),
        "runs": [],
    }
    runs: list[dict[str, Any]] = result["runs"]
    rate = args.rate
    bench = Bench(p)
    try:
        for side in ("A", "B"):
            result.setdefault("warmup", []).append(
                warm_up(bench, side, Path(sides[side]["root"]), p)
            )
        for rnd in range(rounds):
            for side in ("A", "B") if rnd % 2 == 0 else ("B", "A"):
                rec = run_one(bench, side, Path(sides[side]["root"]), rnd, rate, p)
                runs.append(rec)
                if rate is None and "latency" in rec:
                    rate = rec["latency"]["offered_msgs_per_s"]
                    result["params"]["rate_derived"] = rate
                    log(f"latency rate for every run: {rate:,.0f} msgs/s (half of {side}'s)")
    finally:
        bench.pool.close()
        shutil.rmtree(bench.tmp, ignore_errors=True)
        result["seconds"] = round(time.monotonic() - started, 1)
        result["loadavg_after"] = Path("/proc/loadavg").read_text().strip()
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1, default=str))
    print(f"A: {sides['A']['root']} ({sides['A']['rev'] or 'no git rev'})")
    print(f"B: {sides['B']['root']} ({sides['B']['rev'] or 'no git rev'})")
    result["summary"] = report(runs, rounds, p)
    Path(out).write_text(json.dumps(result, indent=1, default=str))
    failures = [f"round {r['round']} {r['side']}: {f}" for r in runs for f in r["failures"]]
    print()
    for f in failures:
        print(f"FAILED {f}")
    print(f"{len(runs)} runs in {result['seconds']:.0f} s; raw results: {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
