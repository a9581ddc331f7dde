"""Render a results JSON of ``bench/load.py`` into Markdown and a PNG plot.

``python bench/report.py results/latest.json --md ../docs/benchmarks.md --png ../docs/benchmarks-fanout.png``

Everything in the page comes from the JSON (and, when present, the py-spy
raw profile next to it and the hand-written ``bench/analysis.md``, included
as it is): numbers, ratios chatd/peer, the targets met or missed.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PEERS = ("ws", "websockets")
NAMES = {"chatd": "chatd", "ws": "Node ws", "websockets": "Python websockets"}


def num(x: float | None, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    if not a or not b or math.isnan(a) or math.isnan(b):
        return "n/a"
    return f"{a / b:.2f}x"


def get(res: dict[str, Any], name: str) -> dict[str, Any]:
    return res["servers"].get(name, {})


def fanout_point(srv: dict[str, Any], n: int, size: int, deflate: bool) -> dict[str, Any] | None:
    for f in srv.get("fanout", []):
        if f["members"] == n and f["size"] == size and f["deflate"] == deflate:
            return f
    return None


def profile_summary(path: Path, top: int = 18) -> list[str]:
    """Self and inclusive time per function from py-spy's raw (collapsed) output."""
    if not path.exists():
        return []
    self_t: Counter[str] = Counter()  # per source line
    self_f: Counter[str] = Counter()  # per function
    incl: Counter[str] = Counter()
    by_file: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        c = int(count)
        total += c
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        leaf = frames[-1]
        self_t[leaf] += c
        self_f[nolines(leaf)] += c
        file = leaf.rsplit("(", 1)[-1].split(":")[0]
        by_file[short(file)] += c
        for f in {nolines(f) for f in frames}:
            incl[f] += c
    if not total:
        return []
    out = [
        f"{total:,} samples (100 Hz, idle samples left out) of chatd's threads: the Trio "
        "thread and the SQLite writer thread.",
        "",
    ]
    out += ["Self time by source file (where the samples' innermost frame was):", ""]
    out += ["| file | self |", "|---|---:|"]
    for f, c in by_file.most_common(12):
        out.append(f"| `{f}` | {100 * c / total:.1f}% |")
    out += ["", "Functions by self time:", "", "| function | self | inclusive |", "|---|---:|---:|"]
    for f, c in self_f.most_common(top):
        out.append(f"| `{short(f)}` | {100 * c / total:.1f}% | {100 * incl[f] / total:.1f}% |")
    out += ["", "Source lines by self time:", "", "| line | self |", "|---|---:|"]
    for f, c in self_t.most_common(8):
        out.append(f"| `{short(f)}` | {100 * c / total:.1f}% |")
    out += ["", "chatd functions by inclusive time:", "", "| function | inclusive |", "|---|---:|"]
    chatd = [(f, c) for f, c in sorted(incl.items(), key=lambda kv: (-kv[1], kv[0])) if "chatd/" in f]
    for f, c in chatd[:top]:
        out.append(f"| `{short(f)}` | {100 * c / total:.1f}% |")
    return out


def nolines(frame: str) -> str:
    """``f (path:12)`` -> ``f (path)``."""
    head, sep, tail = frame.rpartition(":")
    return f"{head})" if sep and tail.rstrip(")").isdigit() else frame


def short(frame: str) -> str:
    for marker in ("site-packages/", "/chatd/", "lib/python3.11/"):
        if marker in frame:
            head, _, tail = frame.partition(marker)
            prefix = head.split("(")[0] + "(" if "(" in head else ""
            return prefix + ("chatd/" if marker == "/chatd/" else "") + tail
    return frame


def targets(res: dict[str, Any]) -> list[str]:
    chatd, ws, pw = get(res, "chatd"), get(res, "ws"), get(res, "websockets")
    n = res["params"]["latency_room"]
    out = ["| target | measured | verdict |", "|---|---|---|"]
    c = fanout_point(chatd, n, 100, False)
    w = fanout_point(ws, n, 100, False)
    p = fanout_point(pw, n, 100, False)
    if c and w and p:
        rw = c["deliveries_per_s"] / w["deliveries_per_s"]
        rp = c["deliveries_per_s"] / p["deliveries_per_s"]

        def us(f: dict[str, Any]) -> float:
            return 1e6 * f["server_cpu"] / f["deliveries_per_s"]

        cpu_note = (
            f"; server CPU per delivery {us(c):.2f} / {us(w):.2f} / {us(p):.2f} µs "
            f"(chatd / ws / websockets), load generator {c['loadgen_cpu']:.2f} / "
            f"{w['loadgen_cpu']:.2f} / {p['loadgen_cpu']:.2f} cores"
        )
        out.append(
            f"| fan-out, room of {n}, 100 B, off: >= 1.0x ws | {rw:.2f}x "
            f"({num(c['deliveries_per_s'])} vs {num(w['deliveries_per_s'])}/s{cpu_note}) | "
            + ("met" if rw >= 1.0 else f"missed by {100 * (1 - rw):.0f}%")
            + " |"
        )
        out.append(
            f"| fan-out, room of {n}, 100 B, off: >= 1.3x websockets | {rp:.2f}x "
            f"({num(c['deliveries_per_s'])} vs {num(p['deliveries_per_s'])}/s) | "
            + ("met" if rp >= 1.3 else f"missed by {100 * (1 - rp / 1.3):.0f}% ({rp:.2f}x of 1.3x)")
            + " |"
        )
    idle = [i for i in chatd.get("idle", []) if i["connections"] == max(res["params"]["idle"])]
    if idle:
        i = idle[0]
        ok = i["held"] >= i["connections"] and i["kib_per_conn"] <= 10
        out.append(
            f"| {i['connections']:,} idle connections held, <= 10 KiB each | held "
            f"{i['held']:,}, {i['kib_per_conn']:.1f} KiB each | "
            + (
                "met"
                if ok
                else f"missed: {i['kib_per_conn'] / 10:.1f}x the budget"
                + ("" if i["held"] >= i["connections"] else f", {i['held']:,} held")
            )
            + " |"
        )
    lat = chatd.get("latency")
    if lat:
        p99 = lat["p99_ms"]
        out.append(
            f"| p99 publish-to-last-recipient < 10 ms at half max, room of {lat['members']} | "
            f"{p99:.1f} ms at {num(lat['offered_msgs_per_s'])} msgs/s | "
            + ("met" if p99 < 10 else f"missed: {p99 / 10:.1f}x over")
            + " |"
        )
    com = chatd.get("commit")
    if com:
        r = com["acked_per_s"]
        out.append(
            f"| >= 100,000 committed msgs/s, acknowledged | {num(r)}/s (p99 {com['p99_ms']:.1f} ms) | "
            + ("met" if r >= 100_000 else f"missed: {100_000 / r:.1f}x short")
            + " |"
        )
    out += new_targets(res)
    return out


def better_peer(res: dict[str, Any], key: str, field: str) -> tuple[str, float] | None:
    """The peer with the lower ``field`` in ``key`` (a latency dict), and that value."""
    vals = [
        (s, get(res, s)[key][field])
        for s in PEERS
        if get(res, s).get(key) and not math.isnan(get(res, s)[key][field])
    ]
    return min(vals, key=lambda kv: kv[1]) if vals else None


def new_targets(res: dict[str, Any]) -> list[str]:
    """The targets of big rooms, the reconnect storm, handshakes and the tail at 500 msgs/s."""
    chatd = get(res, "chatd")
    out: list[str] = []
    big = chatd.get("bigroom")
    if big:
        n = big["connections"]
        rate, joined = big["joins_per_s"], big["joined"]
        ok = rate >= 5000 and joined >= n
        miss = []
        if rate < 5000:
            miss.append(f"{5000 / rate:.0f}x short" if rate else "no join")
        if joined < n:
            miss.append(f"{n - joined:,} not joined after {big['deadline_s']:.0f} s")
        out.append(
            f"| one room of {n:,}: >= 5,000 joins/s, all joined | {num(rate)} joins/s, "
            f"{joined:,}/{n:,} joined | " + ("met" if ok else "missed: " + ", ".join(miss)) + " |"
        )
        kib = big["kib_per_conn"]
        out.append(
            f"| one room of {n:,}: RSS per connection with the membership <= 8 KiB | "
            f"{kib:.1f} KiB ({joined:,} members) | "
            + ("met" if kib <= 8 and joined >= n else f"missed: {kib / 8:.1f}x the budget")
            + ("" if joined >= n else " (not all joined)")
            + " |"
        )
    st = chatd.get("storm")
    if st:
        n = st["members"]
        t = st["all_caught_up_s"]
        out.append(
            f"| reconnect storm, {n:,} clients: all back and caught up within 10 s | "
            + (
                f"{t:.1f} s after the restart ({st['down_s']:.1f} s down before it)"
                if t is not None
                else f"{st['caught_up']:,}/{n:,} caught up after {st['deadline_s']:.0f} s"
            )
            + " | "
            + ("met" if t is not None and t <= 10 else "missed")
            + " |"
        )
        r = st["rss_ratio"]
        out.append(
            f"| reconnect storm: RSS after within 1.5x of before | "
            f"{st['rss_before_kib'] / 1024:.0f} -> {st['rss_after_kib'] / 1024:.0f} MiB "
            f"({r:.2f}x; peak {st['rss_peak_kib'] / 1024:.0f} MiB) | "
            + ("met" if r <= 1.5 and t is not None else "missed")
            + ("" if t is not None else " (not all caught up)")
            + " |"
        )
    for key, what in (("handshakes", "each user's token again"), ("handshakes_unique", "a new token each")):
        c = chatd.get(key)
        if not c:
            continue
        for peer, limit in (("websockets", 1.0), ("ws", 0.5)):
            p = get(res, peer).get(key)
            if not p:
                continue
            r = c["per_s"] / p["per_s"]
            out.append(
                f"| handshakes ({what}): >= {limit}x {NAMES[peer]} | {r:.2f}x "
                f"({num(c['per_s'])} vs {num(p['per_s'])}/s) | "
                + ("met" if r >= limit else f"missed: {r / limit:.2f} of it")
                + " |"
            )
    lat = chatd.get("latency_fixed")
    if lat:
        for field, label, limit in (("p99_ms", "p99", 1.2), ("p999_ms", "p99.9", 1.5)):
            best = better_peer(res, "latency_fixed", field)
            if best is None:
                continue
            peer, v = best
            r = lat[field] / v if v else float("nan")
            out.append(
                f"| {num(lat['offered_msgs_per_s'])} msgs/s, room of {lat['members']}: {label} <= "
                f"{limit}x the better peer | {lat[field]:.2f} ms vs {v:.2f} ms ({NAMES[peer]}): "
                f"{r:.2f}x | " + ("met" if r <= limit else f"missed: {r / limit:.2f}x over") + " |"
            )
    return out


def render(res: dict[str, Any], png_name: str, raw_profile: Path) -> str:
    m = res["machine"]
    servers = [s for s in ("chatd", *PEERS) if s in res["servers"]]
    L: list[str] = []
    L += ["# Benchmarks: chatd against Node ws and Python websockets", ""]
    L += [
        "Generated by `bash bench/run.sh` (`bench/load.py` measures, `bench/report.py` writes "
        "this page); do not edit by hand: `bench/analysis.md` holds the notes included below.",
        "",
        f"Run {res['started']}, {res['seconds']:.0f} s"
        + (" (**quick mode: tiny counts, not a measurement**)" if res["quick"] else "")
        + ".",
        "",
    ]
    L += ["## Targets", ""] + targets(res) + [""]
    L += ["## Machine and versions", ""]
    L += [
        f"- CPU: {m['cpu']}, `nproc` = {m['nproc']}; kernel {m['kernel']}",
        f"- load average before / after the run: `{m['loadavg_before']}` / "
        f"`{m.get('loadavg_after', '')}`",
        f"- Python {m['python']}, Node {m['node']}, ws {m['ws']}, websockets {m['websockets']}, "
        f"chatd at `{m['chatd_rev']}`" + (" (chatd/ modified)" if m["chatd_dirty"] else ""),
        f"- open files hard limit {m['nofile_hard']}",
        "",
        "```",
        m["free"],
        "```",
        "",
    ]
    L += ["## Commands", "", "```", "bash bench/run.sh", res["command"]]
    for s in servers:
        L += get(res, s).get("commands", [])
    L += ["```", ""]
    if get(res, "chatd").get("config"):
        L += [
            "chatd's generated config (its two runs differ only in `compression` and `port`):",
            "",
            "```toml",
        ]
        L += [get(res, "chatd")["config"].strip(), "```", ""]
    p = res["params"]
    L += [
        f"Load: {p['procs']} load-generator processes; fan-out: {p['publishers']} publishers, "
        f"{p['window']} messages in flight each, {p['duration']} s measured after {p['warm']} s "
        f"warm-up; latency {p['latency_duration']} s; commits: {p['commit_conns']} connections "
        f"x {p['commit_window']} in flight; handshakes: {p['hs_concurrency']} loops per process."
        + (
            f" Big room and storm: {p['big']:,} connections, joins deadline "
            f"{p['big_deadline']:g} s, storm deadline {p['storm_deadline']:g} s; fixed-rate "
            f"latency at {num(p['fixed_rate'])} msgs/s; batching clients: {p['batch_conns']} x "
            f"{p['batch_window']} in flight."
            if "big" in p
            else ""
        ),
        "",
    ]

    # fan-out
    L += ["## (a) Fan-out deliveries per second, one room", ""]
    L += [
        "Deliveries/s = `room_message` frames received by all members per second. CPU columns: "
        "cores busy during the window, for chatd / ws / websockets in that order: the server, "
        "the load generator, the whole machine (which includes anything else running on it) "
        "and the machine's softirq time (the kernel's loopback TCP work, charged to no process)."
        + (
            " The server was confined to CPU 0 and the load generator to CPU 1."
            if p.get("pin")
            else " Nothing was pinned: server, load generator and kernel shared both cores."
        ),
        "",
    ]
    head = "| members | content | deflate | " + " | ".join(NAMES[s] for s in servers)
    head += " | chatd/ws | chatd/websockets | CPU server (" + " / ".join(servers) + ")"
    head += " | CPU loadgen | CPU machine | of which softirq |"
    L += [head, "|" + "---|" * (5 + len(servers) + 4)]
    for deflate in (False, True):
        for n in p["rooms"]:
            for size in p["sizes"]:
                pts = {s: fanout_point(get(res, s), n, size, deflate) for s in servers}
                vals = {s: (pts[s] or {}).get("deliveries_per_s") for s in servers}
                row = f"| {n} | {size} B | {'on' if deflate else 'off'} | "
                row += " | ".join(num(vals[s]) for s in servers)
                row += f" | {ratio(vals.get('chatd'), vals.get('ws'))}"
                row += f" | {ratio(vals.get('chatd'), vals.get('websockets'))} | "
                row += " / ".join(num((pts[s] or {}).get("server_cpu"), 2) for s in servers)
                row += " | " + " / ".join(
                    num((pts[s] or {}).get("loadgen_cpu"), 2) for s in servers
                )
                row += " | " + " / ".join(
                    num((pts[s] or {}).get("machine_cpu"), 2) for s in servers
                )
                row += " | " + " / ".join(
                    num((pts[s] or {}).get("softirq_cpu"), 2) for s in servers
                )
                L.append(row + " |")
    L += [
        "",
        "Server CPU per delivery (server CPU seconds / deliveries, microseconds; lower is "
        "better). Where the load generator's core is saturated (CPU loadgen near 1.00), the "
        "deliveries/s above are the load generator's ceiling, not the server's, and this is the "
        "fairer comparison:",
        "",
        "| members | content | deflate | "
        + " | ".join(f"{NAMES[s]} µs" for s in servers)
        + " | chatd/ws | chatd/websockets |",
        "|" + "---|" * (3 + len(servers) + 2),
    ]
    for deflate in (False, True):
        for n in p["rooms"]:
            for size in p["sizes"]:
                us: dict[str, float | None] = {}
                for s in servers:
                    f = fanout_point(get(res, s), n, size, deflate)
                    us[s] = (
                        1e6 * f["server_cpu"] / f["deliveries_per_s"]
                        if f and f["deliveries_per_s"]
                        else None
                    )
                L.append(
                    f"| {n} | {size} B | {'on' if deflate else 'off'} | "
                    + " | ".join(num(us[s], 2) for s in servers)
                    + f" | {ratio(us.get('chatd'), us.get('ws'))}"
                    + f" | {ratio(us.get('chatd'), us.get('websockets'))} |"
                )
    problems = []
    for s in servers:
        for f in get(res, s).get("fanout", []):
            if f["opened"] < f["members"] or f["open_after"] < f["opened"] or f["errors"]:
                problems.append(
                    f"- {NAMES[s]}, room of {f['members']}, {f['size']} B, deflate "
                    f"{f['deflate']}: opened {f['opened']}/{f['members']}, still open after "
                    f"{f['open_after']}, errors {f['errors']}"
                )
    if problems:
        L += ["", "Connection problems during fan-out:", ""] + problems
    L += ["", f"![fan-out deliveries per second]({png_name})", ""]

    # latency
    L += ["## (b) Publish-to-last-recipient latency at half the maximum load", ""]
    L += [
        "One publisher at half the msgs/s that server reached in (a) for the same room "
        "(100-byte content, no compression); latency of a message = the last member's "
        "arrival time minus its send time, one CLOCK_MONOTONIC for all processes.",
        "",
        "| server | members | offered msgs/s | messages | incomplete | p50 ms | p99 ms "
        "| p99.9 ms | max ms | CPU server / loadgen / machine |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in servers:
        x = get(res, s).get("latency")
        if x:
            L.append(
                f"| {NAMES[s]} | {x['members']} | {num(x['offered_msgs_per_s'])} | "
                f"{num(x['measured'])} | {x['incomplete']} | {x['p50_ms']:.2f} | "
                f"{x['p99_ms']:.2f} | {x['p999_ms']:.2f} | {x['max_ms']:.2f} | "
                f"{x['server_cpu']:.2f} / {x['loadgen_cpu']:.2f} / {x['machine_cpu']:.2f} |"
            )
    c, w, q = (get(res, s).get("latency") for s in ("chatd", "ws", "websockets"))
    if c and w and q:
        L += [
            "",
            f"p99 ratio chatd/ws {ratio(c['p99_ms'], w['p99_ms'])}, chatd/websockets "
            f"{ratio(c['p99_ms'], q['p99_ms'])} (lower is better; each server runs at its "
            "own half-maximum, so the offered loads differ).",
        ]
    L += [""]
    L += latency_fixed_section(res, servers)

    # idle
    L += ["## (c) Idle connections and resident memory (compression off)", ""]
    L += [
        "| server | connections | held after 2 s | connect time s | RSS before MiB | "
        "RSS after MiB | KiB per connection |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in servers:
        for i in get(res, s).get("idle", []):
            L.append(
                f"| {NAMES[s]} | {i['connections']:,} | {i['held']:,} | {i['connect_seconds']} | "
                f"{i['rss_before_kib'] / 1024:.1f} | {i['rss_after_kib'] / 1024:.1f} | "
                f"{i['kib_per_conn']:.1f} |"
            )
    for n in p["idle"]:
        vals = {
            s: next(
                (i["kib_per_conn"] for i in get(res, s).get("idle", []) if i["connections"] == n),
                None,
            )
            for s in servers
        }
        L.append("")
        L.append(
            f"{n:,} connections: memory per connection chatd/ws "
            f"{ratio(vals.get('chatd'), vals.get('ws'))}, chatd/websockets "
            f"{ratio(vals.get('chatd'), vals.get('websockets'))} (lower is better)."
        )
    L += [""]

    # commit
    L += ["## (d) Committed messages per second, acknowledged", ""]
    L += [
        "Each connection alone in its own room keeps a few messages in flight and waits for "
        "its own copy. chatd commits every message to SQLite (WAL, synchronous=normal) before "
        "delivering it; **the peers persist nothing**, so theirs is a plain request/echo rate "
        "given as an upper bound, not a like-for-like commit rate.",
        "",
        "| server | connections x in flight | msgs/s | p50 ms | p99 ms | persisted | "
        "CPU server / loadgen / machine |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in servers:
        x = get(res, s).get("commit")
        if x:
            L.append(
                f"| {NAMES[s]} | {x['connections']} x {x['window']} | {num(x['acked_per_s'])} | "
                f"{x['p50_ms']:.2f} | {x['p99_ms']:.2f} | {'yes' if x['persisted'] else 'no'} | "
                f"{x['server_cpu']:.2f} / {x['loadgen_cpu']:.2f} / {x['machine_cpu']:.2f} |"
            )
    c, w, q = (get(res, s).get("commit") for s in ("chatd", "ws", "websockets"))
    if c and w and q:
        L += [
            "",
            f"chatd/ws {ratio(c['acked_per_s'], w['acked_per_s'])}, chatd/websockets "
            f"{ratio(c['acked_per_s'], q['acked_per_s'])}.",
        ]
    L += [""]
    L += batch_section(res, servers)

    # handshakes
    L += ["## (e) Handshakes per second, token check included", ""]
    L += [
        "Loop: TCP connect, upgrade with `?token=`, 101, WebSocket ping, pong (the server has "
        "checked the token and runs the connection: chatd checks it right after its 101, the "
        "peers before), close handshake, reset. Each of 1,000 users reconnects with its one "
        "token, again and again (chatd answers a token it has verified from its cache; the peers "
        "verify every time), except in the rows \"a new token each\", where every handshake "
        "brings a token signed for it, as after a restart.",
        "",
        "| server | loops | handshakes/s | p50 ms | p99 ms | errors | CPU server / loadgen / machine |",
        "|---|---|---|---|---|---|---|",
    ]
    kinds = (
        ("handshakes", "fresh"),
        ("handshakes_unique", "fresh, a new token each"),
        ("handshakes_after_idle", "after 10k closed"),
    )
    for key, when in kinds:
        for s in servers:
            x = get(res, s).get(key)
            if x:
                L.append(
                    f"| {NAMES[s]}, {when} | {x['concurrency']} | {num(x['per_s'])} | "
                    f"{x['p50_ms']:.2f} | {x['p99_ms']:.2f} | {sum(x['errors'].values())} | "
                    f"{x['server_cpu']:.2f} / {x['loadgen_cpu']:.2f} / {x['machine_cpu']:.2f} |"
                )
    for key, when in kinds:
        c, w, q = (get(res, s).get(key) for s in ("chatd", "ws", "websockets"))
        if c and w and q:
            L += [
                "",
                f"{when}: chatd/ws {ratio(c['per_s'], w['per_s'])}, chatd/websockets "
                f"{ratio(c['per_s'], q['per_s'])}.",
            ]
    L += [""]

    L += bigroom_section(res, servers)
    L += storm_section(res, servers)

    fails = {s: get(res, s).get("failures") for s in servers if get(res, s).get("failures")}
    logs = {s: get(res, s).get("log_errors") for s in servers if get(res, s).get("log_errors")}
    if fails or logs:
        L += ["## Failures seen during the run", ""]
        for s, f in fails.items():
            L += [f"- {NAMES[s]}: {x}" for x in f]
        for s, f in logs.items():
            L += [f"- {NAMES[s]} log: `{x[:200]}`" for x in f[:10]]
        L += [""]

    hs_prof = profile_summary(raw_profile.parent / "chatd-handshakes.pyspy.txt", 12)
    prof = profile_summary(raw_profile)
    if prof:
        run = get(res, "chatd").get("profile_run", {})
        L += ["## Profile: chatd under the room-of-100 fan-out (py-spy)", ""]
        L += (
            [
                f"`py-spy record --format raw --nonblocking` for {p['duration'] + p['warm']:.0f} s during a repeat "
                f"of the room-of-{p['latency_room']}, 100 B, no-compression point (that repeat ran at "
                f"{num(run.get('deliveries_per_s'))} deliveries/s with the sampler attached; it is "
                "not counted above).",
                "",
            ]
            + prof
            + [""]
        )
    commit_prof = profile_summary(raw_profile.parent / "chatd-commit.pyspy.txt", 12)
    if commit_prof:
        L += ["## Profile: chatd during the commit run (d)", ""]
        L += commit_prof + [""]
    if hs_prof:
        L += ["## Profile: chatd during handshakes right after 10,000 connections closed", ""]
        L += hs_prof + [""]
    notes = HERE / "analysis.md"
    if notes.exists() and not res["quick"]:
        L += [notes.read_text().strip(), ""]
    return "\n".join(L)


def latency_fixed_section(res: dict[str, Any], servers: list[str]) -> list[str]:
    rows = [(s, get(res, s).get("latency_fixed")) for s in servers]
    rows = [(s, x) for s, x in rows if x]
    if not rows:
        return []
    rate = rows[0][1]["offered_msgs_per_s"]
    L = [f"## (b2) Publish-to-last-recipient latency at a fixed {num(rate)} msgs/s", ""]
    L += [
        "The same measurement as (b), at one offered load for every server: one publisher at "
        f"{num(rate)} msgs/s into a room of {rows[0][1]['members']} (100-byte content, no "
        "compression).",
        "",
        "| server | members | messages | incomplete | p50 ms | p99 ms | p99.9 ms | max ms "
        "| CPU server / loadgen / machine |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s, x in rows:
        L.append(
            f"| {NAMES[s]} | {x['members']} | {num(x['measured'])} | {x['incomplete']} | "
            f"{x['p50_ms']:.2f} | {x['p99_ms']:.2f} | {x['p999_ms']:.2f} | {x['max_ms']:.2f} | "
            f"{x['server_cpu']:.2f} / {x['loadgen_cpu']:.2f} / {x['machine_cpu']:.2f} |"
        )
    c = get(res, "chatd").get("latency_fixed")
    notes = []
    for field, label in (("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9")):
        best = better_peer(res, "latency_fixed", field)
        if c and best:
            notes.append(f"{label} {ratio(c[field], best[1])} ({NAMES[best[0]]})")
    if notes:
        L += ["", "chatd / the better peer: " + ", ".join(notes) + " (lower is better)."]
    return [*L, ""]


def answer(text: str) -> str:
    """A server's answer to the batch probe, short: an error's code and message."""
    try:
        frame = json.loads(text)
        data = frame.get("data", {})
        return f'`{frame["type"]}` {data.get("code", "")} "{data.get("message", "")}"'
    except (ValueError, KeyError, AttributeError, TypeError):
        return f"`{text[:80]}`"


def closes(counts: dict[str, int]) -> str:
    """Close codes seen, "None" (the connection ended without a close frame) spelt out."""
    return ", ".join(
        f"{'no close frame' if k == 'None' else k}: {v:,}" for k, v in sorted(counts.items())
    )


def batch_section(res: dict[str, Any], servers: list[str]) -> list[str]:
    rows = [(s, get(res, s).get("commit_batch")) for s in servers]
    rows = [(s, x) for s, x in rows if x]
    if not rows:
        return []
    L = ["## (d2) Committed messages per second, clients sending `message_batch`", ""]
    x0 = rows[0][1]
    L += [
        f"Like (d), but each of {x0['connections']} connections (each alone in its own room) "
        f"keeps {x0['window']} messages in flight and sends them in `message_batch` frames of at "
        f"most {x0['batch']} entries: the own copies that come back in one read are replaced by "
        "one batch. Each entry carries its `request_id`; a message counts when its own copy "
        "is back (for chatd: after its commit). A batch of one message is sent first to see "
        "whether the server understands batches at all.",
        "",
        "| server | connections x in flight | msgs/s | batches/s | p50 ms | p99 ms | "
        "server CPU µs a message | errors | persisted | CPU server / loadgen / machine |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s, x in rows:
        if not x["supported"]:
            L.append(
                f"| {NAMES[s]} | {x['connections']} x {x['window']} | not run: no `message_batch` "
                f"(it answered {answer(x['probe_answer'])}) | | | | | | no | |"
            )
            continue
        L.append(
            f"| {NAMES[s]} | {x['connections']} x {x['window']} | {num(x['acked_per_s'])} | "
            f"{num(x['batches_per_s'])} | {x['p50_ms']:.2f} | {x['p99_ms']:.2f} | "
            f"{x['cpu_us_per_msg']:.1f} | {x['error_frames']} | "
            f"{'yes' if x['persisted'] else 'no'} | "
            f"{x['server_cpu']:.2f} / {x['loadgen_cpu']:.2f} / {x['machine_cpu']:.2f} |"
        )
    one = get(res, "chatd").get("commit")
    bat = get(res, "chatd").get("commit_batch")
    if one and bat and bat.get("supported"):
        L += [
            "",
            f"chatd with batches / without (d): {ratio(bat['acked_per_s'], one['acked_per_s'])}.",
        ]
    sq = get(res, "chatd").get("sqlite")
    if sq:
        L += [
            "",
            f"For reference, SQLite alone on the server's CPU (`bench/commits.py --sqlite`: "
            f"{num(sq['rows'])} rows of {sq['size']} bytes over {sq['rooms']} rooms, chatd's "
            "schema, pragmas and `insert_message`, one transaction per group, nothing else "
            "running in the process): "
            + "; ".join(
                f"groups of {g['group']}: {num(g['rows_per_s'])} rows/s, "
                f"{g['cpu_us_per_row']:.1f} µs of CPU a row"
                for g in sq["groups"]
            )
            + ".",
        ]
    peers = [NAMES[s] for s, x in rows if not x["supported"]]
    if peers:
        L += [
            "",
            f"{' and '.join(peers)} do not understand `message_batch` (their servers in "
            "`bench/peers/` speak only `join_room` and `room_message`), so they have no row "
            "here; their plain echo rate is in (d).",
        ]
    return [*L, ""]


def sec(v: float | None) -> str:
    """Seconds to one decimal, or "-" when not reached."""
    return "-" if v is None else f"{v:.1f}"


def bigroom_section(res: dict[str, Any], servers: list[str]) -> list[str]:
    rows = [(s, get(res, s).get("bigroom")) for s in servers]
    rows = [(s, x) for s, x in rows if x]
    if not rows:
        return []
    x0 = rows[0][1]
    L = [f"## (f) One big room: {x0['connections']:,} connections join at once", ""]
    L += [
        f"{x0['connections']:,} connections opened first on a fresh server (token checked, in "
        'no room, idle), then every one sends `join_room {room: "big"}` at the same instant '
        "(spread over the load-generator processes). Joins/s = acks received / time from the "
        f"first join sent to the last `join_room_ack` received; deadline {x0['deadline_s']:.0f} "
        "s, after which the joins not acknowledged are counted as not joined. CPU: cores busy "
        "over the same span. RSS per connection = (RSS with every connection in the room, "
        "once nothing more arrives - RSS of the fresh server) / connections; idle part = "
        "before the joins, membership part = what the joins added, per member. Presence: "
        "the `user_connected` frames (or summarised `room_presence` frames) every member "
        "receives while the others join; bytes = everything a member received in the phase "
        "(its own `join_room_ack`, which lists the members, included). The peers send no "
        "presence events: their rows count their acks alone.",
        "",
        "| server | joined | joins/s | s to 50% / 99% / all | CPU server / loadgen | "
        "KiB per conn (idle + membership) | presence frames per member (max) | "
        "KiB received per member (max) | RSS after / peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    for s, x in rows:
        L.append(
            f"| {NAMES[s]} | {x['joined']:,}/{x['connections']:,} | {num(x['joins_per_s'])} | "
            f"{sec(x['s_to_50pct'])} / {sec(x['s_to_99pct'])} / {sec(x['s_to_all'])} | "
            f"{x['server_cpu']:.2f} / {x.get('loadgen_cpu', float('nan')):.2f} | "
            f"{x['kib_per_conn']:.1f} ({x['kib_idle_per_conn']:.1f} + "
            f"{x['kib_membership_per_join']:.1f}) | "
            f"{num(x['presence_per_client'])} ({num(x['frames_max'])}) | "
            f"{num(x['bytes_per_client'] / 1024)} ({num(x['bytes_max'] / 1024)}) | "
            f"{x['rss_after_kib'] / 1024:.0f} / {x['rss_peak_kib'] / 1024:.0f} |"
        )
    extra = [
        f"- {NAMES[s]}: {x['user_presence_frames']:,} `user_connected`/`user_disconnected` and "
        f"{x['room_presence_frames']:,} `room_presence` frames in all"
        + (f"; errors {x['errors']}" if x["errors"] else "")
        + (f"; closes {closes(x['closes'])}" if x["closes"] else "")
        + (f"; {x['open_after']:,} open after" if x["open_after"] < x["opened"] else "")
        for s, x in rows
    ]
    return [*L, "", *extra, ""]


def storm_section(res: dict[str, Any], servers: list[str]) -> list[str]:
    rows = [(s, get(res, s).get("storm")) for s in servers]
    rows = [(s, x) for s, x in rows if x]
    if not rows:
        return []
    p = res["params"]
    L = ["## (g) Reconnect storm: the server restarted under its members", ""]
    L += [
        "On the big room's members (f), each server in turn: a publisher (one of the members) "
        "sends at a fixed low rate, each content carrying its send time; after "
        f"{p.get('storm_before', 0):g} s the server gets SIGTERM; once it has exited, it is "
        "started again on the same port (chatd: the same database). Every member notices the "
        "loss and reconnects: a random 0-"
        f"{1000 * p.get('first_jitter', 0):.0f} ms after the publisher is back (below), then, "
        "after each failed attempt (refused, "
        "no 101, closed before its ack: 1013 included), min("
        f"{p.get('backoff_cap', 0):g} s, {p.get('backoff_base', 0):g} s x 2^(k-1)) times a random "
        "factor 0.5-1.5, until the deadline. The publisher alone retries every 50 ms from its "
        "loss on, and the others wait for it to be back (at most 1 s after the restarted "
        "server listens), so that the storm has its traffic from the start. A member "
        "rejoins the room: chatd's members with `since_id` = the newest id they had received. "
        "**Back** = its `join_room_ack` arrived; **caught up** = back, and it has received "
        "every message of the room committed before the restart (chatd's database, read once "
        "the old process had exited) that it had not seen, i.e. its replay; then live. Times "
        "are from the moment the restarted server listens (down = from the SIGTERM to then). "
        "Latency = publish-to-last-recipient of the messages sent from that moment until all "
        "were caught up (or the deadline), the replay included; a message counts as complete "
        "when every member got it. At the end every chatd member's ids are checked against "
        "the database: missing = ids after its last id before the restart, up to its newest, "
        "it never received; duplicates = ids received twice. **The peers keep no history**: "
        "their ids restart at 1, nothing is replayed, so for them caught up = back, a member "
        "misses what was sent while it was away, and their messages are never complete.",
        "",
        "| server | members | msgs/s | down s (exit s) | back | caught up | s to 50% / 99% "
        "| CPU server / loadgen | RSS before / peak / after MiB | storm msgs: p50 / p99 / max ms "
        "(complete) | missing / dups | attempts p50 / max |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    for s, x in rows:
        back = f"{x['back']:,}" + (
            f" in {x['all_back_s']:.1f} s" if x["all_back_s"] is not None else ""
        )
        caught = f"{x['caught_up']:,}" + (
            f" in {x['all_caught_up_s']:.1f} s"
            if x["all_caught_up_s"] is not None
            else f" after {x['deadline_s']:.0f} s"
        )
        L.append(
            f"| {NAMES[s]} | {x['members']:,} | {num(x['rate_msgs_per_s'], 1)} | "
            f"{x['down_s']:.1f} ({x['stop_s']:.1f}{', killed' if x['stop_killed'] else ''}) | "
            f"{back} | {caught} | {sec(x['p50_caught_up_s'])} / {sec(x['p99_caught_up_s'])} | "
            f"{x['server_cpu']:.2f} / {x.get('loadgen_cpu', float('nan')):.2f} | "
            f"{x['rss_before_kib'] / 1024:.0f} / "
            f"{x['rss_peak_kib'] / 1024:.0f} / {x['rss_after_kib'] / 1024:.0f} | "
            f"{num(x['storm_p50_ms'], 1)} / {num(x['storm_p99_ms'], 1)} / "
            f"{num(x['storm_max_ms'], 1)} ({x['storm_msgs_complete']}/{x['storm_msgs']}) | "
            + (
                f"{x['missing']} / {x['duplicates']}"
                if x["missing"] is not None
                else "n/a (no history)"
            )
            + f" | {x['attempts_p50']} / {x['attempts_max']} |"
        )
    L += [""]
    for s, x in rows:
        L.append(
            f"- {NAMES[s]}: connections ended by ({closes(x['closes'])}); failed attempts "
            f"({closes(x['errors']) or 'none'})"
            + (
                f"; {x['pre_restart_committed']} messages committed before the restart "
                f"({x['pre_restart_sent']} sent before the old process exited)"
                if x["pre_restart_committed"] is not None
                else ""
            )
            + (f"; {x['not_recovered']} acks said `recovered: false`" if x["not_recovered"] else "")
            + (
                f"; {x['dropped_before']} members without a join ack were left out"
                if x["dropped_before"]
                else ""
            )
        )
    return [*L, ""]


def plot(res: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = res["params"]
    servers = [s for s in ("chatd", *PEERS) if s in res["servers"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, deflate in zip(axes, (False, True), strict=True):
        labels = [f"{n} x {s} B" for n in p["rooms"] for s in p["sizes"]]
        width = 0.8 / len(servers)
        for k, s in enumerate(servers):
            vals = [
                (fanout_point(get(res, s), n, size, deflate) or {}).get("deliveries_per_s", 0)
                for n in p["rooms"]
                for size in p["sizes"]
            ]
            xs = [i + (k - (len(servers) - 1) / 2) * width for i in range(len(labels))]
            ax.bar(xs, vals, width, label=NAMES[s])
        ax.set_xticks(range(len(labels)), labels, rotation=20)
        ax.set_title(f"compression {'on' if deflate else 'off'}")
        ax.set_xlabel("room members x content size")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("deliveries / s")
    axes[1].legend(loc="upper right")
    where = (
        "server on CPU 0, load generator on CPU 1"
        if p.get("pin")
        else f"{res['machine']['nproc']} cores shared by server and load generator"
    )
    fig.suptitle(f"Fan-out deliveries/s in one room ({where})")
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results")
    parser.add_argument("--md", required=True)
    parser.add_argument("--png", required=True)
    args = parser.parse_args()
    res = json.loads(Path(args.results).read_text())
    raw = Path(args.results).parent / "chatd-fanout100.pyspy.txt"
    png = Path(args.png)
    Path(args.md).write_text(render(res, png.name, raw))
    plot(res, png)
    print(f"wrote {args.md} and {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
