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
        f"x {p['commit_window']} in flight; handshakes: {p['hs_concurrency']} loops per process.",
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

    # handshakes
    L += ["## (e) Handshakes per second, token check included", ""]
    L += [
        "Loop: TCP connect, upgrade with `?token=`, 101, WebSocket ping, pong (the server has "
        "checked the token and runs the connection: chatd checks it right after its 101, the "
        "peers before), close handshake, reset.",
        "",
        "| server | loops | handshakes/s | p50 ms | p99 ms | errors | CPU server / loadgen / machine |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, when in (("handshakes", "fresh"), ("handshakes_after_idle", "after 10k closed")):
        for s in servers:
            x = get(res, s).get(key)
            if x:
                L.append(
                    f"| {NAMES[s]}, {when} | {x['concurrency']} | {num(x['per_s'])} | "
                    f"{x['p50_ms']:.2f} | {x['p99_ms']:.2f} | {sum(x['errors'].values())} | "
                    f"{x['server_cpu']:.2f} / {x['loadgen_cpu']:.2f} / {x['machine_cpu']:.2f} |"
                )
    for key, when in (("handshakes", "fresh"), ("handshakes_after_idle", "after 10k closed")):
        c, w, q = (get(res, s).get(key) for s in ("chatd", "ws", "websockets"))
        if c and w and q:
            L += [
                "",
                f"{when}: chatd/ws {ratio(c['per_s'], w['per_s'])}, chatd/websockets "
                f"{ratio(c['per_s'], q['per_s'])}.",
            ]
    L += [""]

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
