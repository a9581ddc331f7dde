"""chatd's load generator: chatd and its peers measured side by side, in one run.

Usage (bench/run.sh does this): ``python bench/load.py [--quick] --out results.json``

How it measures
---------------
* Servers: chatd (``python -m chatd --config <generated toml>``, SQLite in a
  temp dir, rate limits raised out of the way, logging at warning), the Node
  ``ws`` peer and the Python ``websockets`` peer (``bench/peers/``), each on a
  fresh loopback port, one after the other; each is started three times:
  compression off for handshakes on a fresh process; compression off for idle
  memory (from a fresh baseline), handshakes again, fan-out, latency and
  commits; permessage-deflate on for fan-out again (clients offering deflate).
* Load: ``--procs`` worker processes (``bench/worker.py``), each an asyncio loop
  with a hand-rolled client (``bench/wsclient.py``). All times are
  ``time.monotonic_ns()`` (CLOCK_MONOTONIC, one clock for all processes).
  A measured window is [t0, t1]; publishers start ``warm`` s before t0.
* CPU: by default (``--pin``) the server is confined to CPU 0 (all its
  threads) and the load generator to the other CPUs, so on a 2-core machine
  each has one core. Each worker reports its own ``getrusage`` CPU seconds
  over the window; the server's CPU comes from ``/proc/PID/stat``
  (utime+stime, all threads) read at t0 and t1; the whole machine's busy time
  and its softirq part (the kernel's loopback TCP work, charged to no
  process) come from ``/proc/stat``. All are reported as cores busy (CPU s /
  wall s); machine minus server minus load generator minus softirq is
  anything else running on the machine.
* (a) fan-out: one room of N members spread over the workers; each publisher
  (``--publishers``, spread over the workers) keeps ``window`` messages in flight (the next one leaves when its
  own copy, the one with its request_id, comes back); deliveries/s = all
  room_message frames received by all members in the window / window length.
* (b) latency: a room of 100 (10 in quick mode), all its members in one
  load-generator process; one publisher sends at half
  the maximum msgs/s measured in (a) for that server (100-byte content,
  compression off), each content carrying ``L<seq>:<send ns>:``; each worker
  keeps, per message, its latest arrival, the orchestrator takes the latest
  over workers: publish-to-last-recipient latency, p50/p99/p99.9.
* (c) idle: N connections opened (token checked, no room), held 2 s; server
  VmRSS (``/proc/PID/status``) before and after, divided by N; how many are
  still open.
* (d) commits: C connections, each alone in its own room, keep ``window``
  messages in flight and wait for their own copy; for chatd the copy comes
  after the SQLite commit. Peers do not persist: their number is a plain
  request/echo rate, not a commit rate.
* (e) handshakes: ``concurrency`` loops per worker: TCP connect, upgrade with a
  token, 101, ping, pong (so the token check is done on every server, chatd
  checks it after its 101), close handshake, RST. Measured on the fresh
  server, and again right after the 10,000 idle connections closed.
* ``--profile``: py-spy records chatd during a repeat of the room-of-100
  fan-out point, during the commit run and during the second handshake
  measurement (raw collapsed
  stacks next to the results; bench/report.py summarises them).
* ``--only handshakes``: (e) alone, with the idle connections (c) between its
  two measurements, as in the full run; the JSON goes to a temp file unless
  ``--out`` is given (it is not a full result for bench/report.py). E.g.
  ``--servers ws,websockets --only handshakes`` for the peers' figures, or
  ``--servers chatd --only handshakes --profile`` for chatd's profile.
Every loop stops at an absolute deadline and every wait has a timeout.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from worker import raise_nofile, worker_main  # noqa: E402

SECRET = "bench-secret-that-is-at-least-32-bytes-long"
MONO = time.monotonic_ns
CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVER_MAX_SECONDS = 1800


def log(*args: Any) -> None:
    print(time.strftime("%H:%M:%S"), *args, file=sys.stderr, flush=True)


# --- /proc ----------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    """utime+stime of the process (all its threads), seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    rest = stat[stat.rindex(")") + 2 :].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def machine_busy() -> tuple[float, float]:
    """(busy, softirq) CPU seconds of the whole machine (all cores), /proc/stat.
    softirq is mostly the kernel's loopback TCP work, which is charged to no
    process."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK, fields[6] / CLK_TCK


def proc_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- servers -----------------------------------------------------------------


class Server:
    """One server process under test."""

    def __init__(
        self, name: str, deflate: bool, tmp: Path, rooms: list[str], root: Path | None = None
    ) -> None:
        self.name = name
        self.deflate = deflate
        # the chatd checkout it runs from (cwd and PYTHONPATH): this one by default
        self.root = root or ROOT
        self.port = free_port()
        py = sys.executable
        if name == "chatd":
            cfg = tmp / f"chatd-{self.port}.toml"
            db = tmp / f"chatd-{self.port}" / "chatd.db"
            cfg.write_text(
                "\n".join(
                    [
                        "[server]",
                        'host = "127.0.0.1"',
                        f"port = {self.port}",
                        f"compression = {'true' if deflate else 'false'}",
                        "send_buffer_bytes = 4194304",
                        # every load-generator connection comes from 127.0.0.1
                        "max_connections = 1000000",
                        "max_connections_per_address = 1000000",
                        "[auth]",
                        f'jwt_secret = "{SECRET}"',
                        "[storage]",
                        f'sqlite_path = "{db}"',
                        "[rooms]",
                        "public = [" + ", ".join(f'"{r}"' for r in rooms) + "]",
                        "[limits]",
                        "messages_per_minute = 1000000000",
                        "messages_per_hour = 1000000000",
                        "max_content_length = 8192",
                        "reads_per_minute = 1000000000",
                        "invalid_frames_per_minute = 1000",
                        "[logging]",
                        'level = "warning"',
                        "",
                    ]
                )
            )
            self.cmd = [py, "-m", "chatd", "--config", str(cfg)]
            self.cwd = self.root
            self.config_text = cfg.read_text()
        elif name == "ws":
            self.cmd = ["node", str(HERE / "peers/node/server.js"), "--port", str(self.port)]
            self.cmd += ["--secret", SECRET, "--deflate", "1" if deflate else "0"]
            self.cmd += ["--max-seconds", str(SERVER_MAX_SECONDS)]
            self.cwd = HERE / "peers/node"
            self.config_text = ""
        elif name == "websockets":
            self.cmd = [py, str(HERE / "peers/py_websockets/server.py"), "--port", str(self.port)]
            self.cmd += ["--secret", SECRET, "--max-seconds", str(SERVER_MAX_SECONDS)]
            self.cmd += ["--deflate"] if deflate else []
            self.cwd = HERE / "peers/py_websockets"
            self.config_text = ""
        else:
            raise ValueError(name)
        self.logfile = tmp / f"{name}-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, cpus: set[int] | None = None) -> None:
        """Start it (confined to ``cpus``, threads included, when given)."""
        env = dict(os.environ, PYTHONPATH=str(self.root))

        def pin() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)

        with open(self.logfile, "wb") as out:
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=self.cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=pin,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.logfile.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not listen on {self.port} within 30 s")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> str:
        """SIGTERM, then SIGKILL after 15 s; returns the tail of its log."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.logfile.read_text(errors="replace")[-3000:]


# --- workers -------------------------------------------------------------------


class Pool:
    """The worker processes and a bounded request/reply over their pipes."""

    def __init__(self, procs: int, cpus: set[int] | None) -> None:
        self.conns = []
        self.procs = []
        for i in range(procs):
            parent, child = mp.Pipe()
            p = mp.Process(target=worker_main, args=(child, i, SECRET, cpus), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)

    def call(self, cmds: list[dict[str, Any] | None], timeout: float) -> list[dict[str, Any]]:
        for conn, cmd in zip(self.conns, cmds, strict=True):
            if cmd is not None:
                conn.send(cmd)
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        for conn, cmd in zip(self.conns, cmds, strict=True):
            if cmd is None:
                out.append({})
                continue
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"worker did not answer {cmd['op']} within {timeout} s")
            out.append(conn.recv())
        return out

    def all(self, cmd: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
        return self.call([dict(cmd) for _ in self.conns], timeout)

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send({"op": "exit"})
            except OSError:
                pass
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.terminate()

    @property
    def n(self) -> int:
        return len(self.conns)


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        ncpu = os.cpu_count() or 1
        # --pin: the server gets CPU 0, the load generator the others.
        self.server_cpus = {0} if args.pin and ncpu > 1 else None
        self.load_cpus = set(range(1, ncpu)) if self.server_cpus else None
        if self.load_cpus:
            os.sched_setaffinity(0, self.load_cpus)
        self.pool = Pool(args.procs, self.load_cpus)
        self.tmp = Path(tempfile.mkdtemp(prefix="chatd-bench-"))
        self.rooms = ["fan10", "fan100", "fan1000", "lat", "idle"] + [
            f"c{k}" for k in range(args.commit_conns)
        ]
        self.uid = 0

    def uids(self, n: int) -> int:
        """A fresh block of user ids."""
        self.uid += n + 1000
        return self.uid - n

    def window(self, duration: float) -> tuple[int, int]:
        t0 = MONO() + int((self.args.warm + 0.3) * 1e9)
        return t0, t0 + int(duration * 1e9)

    def sample_cpu(self, server: Server, t0: int, t1: int) -> float:
        """Server CPU cores busy in [t0, t1] (sleeps until t1). The whole
        machine's busy cores in the same window go to ``self.machine_cores``."""
        time.sleep(max(0.0, (t0 - MONO()) / 1e9))
        c0, (m0, s0) = proc_cpu(server.pid), machine_busy()
        time.sleep(max(0.0, (t1 - MONO()) / 1e9))
        dur = (t1 - t0) / 1e9
        m1, s1 = machine_busy()
        self.machine_cores = (m1 - m0) / dur
        self.softirq_cores = (s1 - s0) / dur
        return (proc_cpu(server.pid) - c0) / dur

    def connect(
        self,
        server: Server,
        n: int,
        room: str | None,
        deflate: bool,
        rooms: list[str] | None = None,
        procs: int | None = None,
    ) -> dict[str, Any]:
        """Open ``n`` clients spread over the first ``procs`` workers (all)."""
        used = procs or self.pool.n
        parts = split(n, used) + [0] * (self.pool.n - used)
        base = self.uids(n)
        cmds: list[dict[str, Any] | None] = []
        offset = 0
        for p in parts:
            cmd = {"op": "connect", "n": p, "port": server.port, "deflate": deflate}
            cmd.update(room=room, uid0=base + offset, concurrency=50)
            if rooms:
                cmd["rooms"] = rooms[offset : offset + p]
            cmds.append(cmd)
            offset += p
        started = time.monotonic()
        replies = self.pool.call(cmds, timeout=120 + n / 50)
        opened = sum(r["opened"] for r in replies)
        errors: dict[str, int] = {}
        for r in replies:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        info = {
            "wanted": n,
            "opened": opened,
            "deflate_negotiated": sum(r["deflate_negotiated"] for r in replies),
            "seconds": time.monotonic() - started,
            "errors": errors,
        }
        if opened < n:
            log(f"  {server.name}: opened {opened}/{n}: {errors}")
        return info

    def close_all(self, server: Server | None = None) -> float:
        """Close every client; then wait (at most 60 s) until the server is
        idle again (under 5% of a core over 0.3 s), so that one scenario's
        teardown is not measured in the next. Returns the seconds waited."""
        self.pool.all({"op": "close_all", "limit": 5.0}, timeout=60)
        started = time.monotonic()
        if server is None or not server.alive():
            time.sleep(0.5)
            return 0.0
        while time.monotonic() - started < 60:
            c0 = proc_cpu(server.pid)
            time.sleep(0.3)
            if proc_cpu(server.pid) - c0 < 0.015:
                break
        return time.monotonic() - started

    # --- scenarios -------------------------------------------------------------

    def idle(self, server: Server, n: int) -> dict[str, Any]:
        time.sleep(0.5)
        before = proc_rss_kib(server.pid)
        conn = self.connect(server, n, None, False)
        time.sleep(2.0)
        after = proc_rss_kib(server.pid)
        held = sum(r["open"] for r in self.pool.all({"op": "held"}, timeout=30))
        settle = self.close_all(server)
        res = {
            "connections": n,
            "opened": conn["opened"],
            "held": held,
            "connect_seconds": round(conn["seconds"], 2),
            "rss_before_kib": before,
            "rss_after_kib": after,
            "kib_per_conn": (after - before) / max(1, conn["opened"]),
            "teardown_seconds": round(settle, 2),
            "errors": conn["errors"],
        }
        log(f"  idle {n}: held {held}, {res['kib_per_conn']:.1f} KiB/conn")
        return res

    def spy(self, server: Server, profile: Path | None) -> subprocess.Popen[bytes] | None:
        """py-spy record (raw collapsed stacks) of the server for one window."""
        if profile is None:
            return None
        return subprocess.Popen(
            [
                str(Path(sys.executable).parent / "py-spy"),
                "record",
                "--pid",
                str(server.pid),
                "--duration",
                str(int(self.args.duration + self.args.warm)),
                "--format",
                "raw",
                "--nonblocking",
                "-o",
                str(profile),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def fanout(
        self, server: Server, n: int, size: int, deflate: bool, profile: Path | None = None
    ) -> dict[str, Any]:
        a = self.args
        room = f"fan{n}"
        conn = self.connect(server, n, room, deflate)
        self.pool.all({"op": "drain", "quiet": 0.5, "limit": 30}, timeout=60)
        pubs = split(a.publishers, self.pool.n)
        t0, t1 = self.window(a.duration)
        cmds: list[dict[str, Any] | None] = []
        for i in range(self.pool.n):
            cmds.append(
                {
                    "op": "fanout",
                    "t0": t0,
                    "t1": t1,
                    "warm": a.warm,
                    "room": room,
                    "size": size,
                    "window": a.window,
                    "publishers": pubs[i],
                }
            )
        spy = self.spy(server, profile)
        for conn_, cmd in zip(self.pool.conns, cmds, strict=True):
            conn_.send(cmd)
        server_cpu = self.sample_cpu(server, t0, t1)
        replies = []
        for conn_ in self.pool.conns:
            if not conn_.poll(a.duration + a.warm + 60):
                raise TimeoutError("fanout: a worker did not answer")
            replies.append(conn_.recv())
        if spy is not None:
            try:
                spy.wait(a.duration + 30)
            except subprocess.TimeoutExpired:
                spy.kill()
        dur = (t1 - t0) / 1e9
        rx = sum(r["rx"] for r in replies)
        open_after = sum(r["open"] for r in replies)
        self.close_all(server)
        res = {
            "members": n,
            "size": size,
            "deflate": deflate,
            "deflate_negotiated": conn["deflate_negotiated"],
            "opened": conn["opened"],
            "open_after": open_after,
            "join_seconds": round(conn["seconds"], 2),
            "deliveries_per_s": rx / dur,
            "msgs_per_s": rx / dur / max(1, conn["opened"]),
            "published": sum(r["sent"] for r in replies),
            "other_frames": sum(r["other"] for r in replies),
            "server_cpu": server_cpu,
            "machine_cpu": self.machine_cores,
            "softirq_cpu": self.softirq_cores,
            "loadgen_cpu": sum(r["cpu"] for r in replies) / dur,
            "errors": conn["errors"],
        }
        log(
            f"  fanout n={n} size={size} deflate={deflate}: {res['deliveries_per_s']:,.0f}"
            f" deliveries/s, server {server_cpu:.2f} cores, loadgen {res['loadgen_cpu']:.2f}"
            + (f", open after {open_after}/{conn['opened']}" if open_after < conn["opened"] else "")
        )
        return res

    def latency(self, server: Server, n: int, rate: float) -> dict[str, Any]:
        a = self.args
        # One load-generator process holds every member and the publisher: at
        # half the maximum it has CPU to spare, and a second process on the
        # same core would add its own scheduling delays to the measurement.
        conn = self.connect(server, n, "lat", False, procs=1)
        self.pool.all({"op": "drain", "quiet": 0.5, "limit": 30}, timeout=60)
        t0, t1 = self.window(a.latency_duration)
        cmds: list[dict[str, Any] | None] = [
            {
                "op": "latency",
                "t0": t0,
                "t1": t1,
                "warm": a.warm,
                "room": "lat",
                "size": 100,
                "rate": rate,
                "publish": i == 0,
            }
            for i in range(self.pool.n)
        ]
        for conn_, cmd in zip(self.pool.conns, cmds, strict=True):
            conn_.send(cmd)
        server_cpu = self.sample_cpu(server, t0, t1)
        replies = []
        for conn_ in self.pool.conns:
            if not conn_.poll(a.latency_duration + a.warm + 60):
                raise TimeoutError("latency: a worker did not answer")
            replies.append(conn_.recv())
        self.close_all(server)
        merged: dict[int, list[int]] = {}
        for r in replies:
            for seq, (sent, last, count) in r["latency"].items():
                m = merged.get(seq)
                if m is None:
                    merged[seq] = [sent, last, count]
                else:
                    m[0] = max(m[0], sent)
                    m[1] = max(m[1], last)
                    m[2] += count
        members = conn["opened"]
        # messages sent inside the window
        in_window = {s: m for s, m in merged.items() if t0 <= m[0] <= t1}
        complete = [(m[1] - m[0]) / 1e6 for m in in_window.values() if m[2] >= members]
        # the 20 slowest (ms, sent at s after t0): a stall shows as a run of
        # neighbours, a slow path as scattered ones
        worst = sorted(
            ((m[1] - m[0]) / 1e6, (m[0] - t0) / 1e9) for m in in_window.values() if m[2] >= members
        )[-20:][::-1]
        dur = (t1 - t0) / 1e9
        sent_total = replies[0]["sent"]
        res = {
            "members": members,
            "offered_msgs_per_s": rate,
            "sent": sent_total,
            "measured": len(in_window),
            "complete": len(complete),
            "incomplete": len(in_window) - len(complete),
            # received chunks whose probes were not consecutive (none expected)
            "out_of_order": sum(r.get("out_of_order", 0) for r in replies),
            "p50_ms": pct(complete, 0.50),
            "p99_ms": pct(complete, 0.99),
            "p999_ms": pct(complete, 0.999),
            "max_ms": max(complete) if complete else float("nan"),
            "server_cpu": server_cpu,
            "machine_cpu": self.machine_cores,
            "softirq_cpu": self.softirq_cores,
            "loadgen_cpu": sum(r["cpu"] for r in replies) / dur,
            "worst": [[round(ms, 2), round(at, 4)] for ms, at in worst],
        }
        log(
            f"  latency n={members} at {rate:,.0f} msgs/s: p50 {res['p50_ms']:.2f} ms,"
            f" p99 {res['p99_ms']:.2f} ms, p99.9 {res['p999_ms']:.2f} ms,"
            f" incomplete {res['incomplete']}"
        )
        return res

    def commit(self, server: Server, profile: Path | None = None) -> dict[str, Any]:
        a = self.args
        rooms = [f"c{k}" for k in range(a.commit_conns)]
        conn = self.connect(server, a.commit_conns, None, False, rooms=rooms)
        t0, t1 = self.window(a.duration)
        cmd = {"op": "commit", "t0": t0, "t1": t1, "warm": a.warm, "size": 100}
        cmd["window"] = a.commit_window
        spy = self.spy(server, profile)
        for conn_ in self.pool.conns:
            conn_.send(dict(cmd))
        server_cpu = self.sample_cpu(server, t0, t1)
        replies = []
        for conn_ in self.pool.conns:
            if not conn_.poll(a.duration + a.warm + 60):
                raise TimeoutError("commit: a worker did not answer")
            replies.append(conn_.recv())
        if spy is not None:
            try:
                spy.wait(a.duration + 30)
            except subprocess.TimeoutExpired:
                spy.kill()
        self.close_all(server)
        dur = (t1 - t0) / 1e9
        lat = [x / 1e6 for r in replies for x in r["lat_ns"]]
        res = {
            "connections": conn["opened"],
            "window": a.commit_window,
            "acked_per_s": sum(r["acked"] for r in replies) / dur,
            "p50_ms": pct(lat, 0.5),
            "p99_ms": pct(lat, 0.99),
            "server_cpu": server_cpu,
            "machine_cpu": self.machine_cores,
            "softirq_cpu": self.softirq_cores,
            "loadgen_cpu": sum(r["cpu"] for r in replies) / dur,
            "open_after": sum(r["open"] for r in replies),
            "persisted": server.name == "chatd",
        }
        log(f"  commit: {res['acked_per_s']:,.0f} msgs/s acked, p99 {res['p99_ms']:.2f} ms")
        return res

    def handshakes(
        self, server: Server, profile: Path | None = None, unique: bool = False
    ) -> dict[str, Any]:
        """Handshakes/s; ``unique``: every handshake with a token signed for
        it, never seen before (by default each of the 1,000 users reconnects
        with its one token, again and again)."""
        a = self.args
        t0, t1 = self.window(a.duration)
        base = self.uids(1000)
        cmds: list[dict[str, Any] | None] = [
            {
                "op": "handshakes",
                "port": server.port,
                "t0": t0,
                "t1": t1,
                "warm": a.warm,
                "concurrency": a.hs_concurrency,
                "users": 500,
                "uid0": base + 500 * (i % 2),
                "unique": unique,
            }
            for i in range(self.pool.n)
        ]
        spy = self.spy(server, profile)
        for conn_, cmd in zip(self.pool.conns, cmds, strict=True):
            conn_.send(cmd)
        server_cpu = self.sample_cpu(server, t0, t1)
        replies = []
        for conn_ in self.pool.conns:
            if not conn_.poll(a.duration + a.warm + 60):
                raise TimeoutError("handshakes: a worker did not answer")
            replies.append(conn_.recv())
        dur = (t1 - t0) / 1e9
        errors: dict[str, int] = {}
        for r in replies:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        lat = [x / 1e6 for r in replies for x in r["lat_ns"]]
        res = {
            "per_s": sum(r["done"] for r in replies) / dur,
            "concurrency": a.hs_concurrency * self.pool.n,
            "p50_ms": pct(lat, 0.5),
            "p99_ms": pct(lat, 0.99),
            "errors": errors,
            "server_cpu": server_cpu,
            "machine_cpu": self.machine_cores,
            "softirq_cpu": self.softirq_cores,
            "loadgen_cpu": sum(r["cpu"] for r in replies) / dur,
        }
        if unique:
            res["unique_tokens"] = True
        if spy is not None:
            try:
                spy.wait(a.duration + 30)
            except subprocess.TimeoutExpired:
                spy.kill()
        log(f"  handshakes: {res['per_s']:,.0f}/s, errors {sum(errors.values())}")
        self.close_all(server)
        return res

    # --- one server ------------------------------------------------------------

    def run_server(self, name: str) -> dict[str, Any]:
        a = self.args
        out: dict[str, Any] = {"fanout": [], "idle": [], "failures": []}
        # Three fresh server processes: handshakes on a fresh server; idle
        # memory from a fresh server's baseline, then the rest; deflate.
        phases = [("handshakes", False), ("main", False), ("deflate", True)]
        if a.only == "handshakes":  # the first two, up to the handshakes after idle
            phases = phases[:2]
        for phase, deflate in phases:
            server = Server(name, deflate, self.tmp, self.rooms)
            log(
                f"{name} ({phase}, compression {'on' if deflate else 'off'}): {' '.join(server.cmd)}"
            )
            server.start(self.server_cpus)
            if phase != "handshakes":
                out.setdefault("commands", []).append(" ".join(server.cmd))
            if server.config_text and not deflate:
                out["config"] = server.config_text
            try:
                if phase == "handshakes":
                    out["handshakes"] = self.handshakes(server)
                    continue
                if phase == "main":
                    out["idle"] = [self.idle(server, n) for n in a.idle]
                    # again, right after the idle connections closed
                    prof = self.tmp / "hs.txt" if name == "chatd" and a.profile else None
                    out["handshakes_after_idle"] = self.handshakes(server, prof)
                    if prof is not None and prof.exists():
                        shutil.copy(prof, Path(a.out).parent / "chatd-handshakes.pyspy.txt")
                    if a.only == "handshakes":
                        continue
                for n in a.rooms:
                    for size in a.sizes:
                        out["fanout"].append(self.fanout(server, n, size, deflate))
                        if not server.alive():
                            raise RuntimeError(f"{name} died during fan-out")
                if not deflate:
                    ref = [
                        f
                        for f in out["fanout"]
                        if f["members"] == a.latency_room and f["size"] == 100
                    ]
                    rate = max(50.0, 0.5 * ref[0]["msgs_per_s"]) if ref else 100.0
                    out["latency"] = self.latency(server, a.latency_room, rate)
                    prof = self.tmp / "commit.txt" if name == "chatd" and a.profile else None
                    out["commit"] = self.commit(server, prof)
                    if prof is not None and prof.exists():
                        shutil.copy(prof, Path(a.out).parent / "chatd-commit.pyspy.txt")
                    if name == "chatd" and a.profile:
                        prof = self.tmp / "chatd-fanout100.txt"
                        log("  profiling chatd (py-spy) under the room-of-100 fan-out")
                        out["profile_run"] = self.fanout(server, a.latency_room, 100, False, prof)
                        out["profile_raw"] = str(prof)
                        if prof.exists():
                            shutil.copy(prof, Path(a.out).parent / "chatd-fanout100.pyspy.txt")
            except Exception as exc:  # noqa: BLE001 - reported, then the next server runs
                log(f"  {name}: FAILED: {type(exc).__name__}: {exc}")
                out["failures"].append(f"{type(exc).__name__}: {exc}")
                try:
                    self.close_all()
                except Exception:  # noqa: BLE001
                    pass
            finally:
                alive = server.alive()
                tail = server.stop()
                if not alive:
                    out["failures"].append(f"{name} exited during the run: {tail[-1500:]}")
                errors = [ln for ln in tail.splitlines() if "ERROR" in ln or "Traceback" in ln]
                if errors:
                    out.setdefault("log_errors", []).extend(errors[-20:])
        return out


def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break

    def run(cmd: list[str], cwd: Path = ROOT) -> str:
        try:
            return subprocess.run(
                cmd, cwd=cwd, capture_output=True, text=True, timeout=20
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    import websockets

    ws_pkg = HERE / "peers/node/node_modules/ws/package.json"
    return {
        "cpu": model,
        "nproc": os.cpu_count(),
        "free": run(["free", "-h"]),
        "kernel": platform.release(),
        "loadavg_before": Path("/proc/loadavg").read_text().strip(),
        "python": platform.python_version(),
        "node": run(["node", "--version"]),
        "ws": json.loads(ws_pkg.read_text())["version"] if ws_pkg.exists() else "",
        "websockets": websockets.__version__,
        "chatd_rev": run(["git", "rev-parse", "--short", "HEAD"]),
        "chatd_dirty": bool(run(["git", "status", "--porcelain", "--", "chatd"])),
        "nofile_hard": raise_nofile(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts, for CI")
    parser.add_argument(
        "--out", help="results JSON (default results/latest.json; with --only, a temp file)"
    )
    parser.add_argument("--servers", default="chatd,ws,websockets")
    parser.add_argument("--procs", type=int, default=2, help="load-generator processes")
    parser.add_argument("--profile", action="store_true", help="py-spy chatd's room-of-100")
    parser.add_argument(
        "--only",
        choices=["handshakes"],
        help="only this scenario (for a look, not for report.py): handshakes fresh, "
        "idle memory, handshakes after idle",
    )
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not confine the server to CPU 0 and the load generator to the others",
    )
    args = parser.parse_args()
    if args.out is None:
        if args.only:
            fd, args.out = tempfile.mkstemp(prefix=f"chatd-load-{args.only}-", suffix=".json")
            os.close(fd)
        else:
            args.out = str(HERE / "results/latest.json")
    if args.quick:
        args.rooms, args.sizes, args.idle = [10], [100], [100]
        args.duration, args.latency_duration, args.warm = 0.8, 1.0, 0.2
        args.latency_room, args.commit_conns, args.commit_window = 10, 10, 2
        args.hs_concurrency, args.publishers, args.window = 4, 2, 8
        args.profile = False
    else:
        args.rooms, args.sizes, args.idle = [10, 100, 1000], [100, 1024], [1000, 10000]
        args.duration, args.latency_duration, args.warm = 5.0, 8.0, 1.0
        args.latency_room, args.commit_conns, args.commit_window = 100, 100, 4
        args.hs_concurrency, args.publishers, args.window = 16, 4, 32
    raise_nofile()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    bench = Bench(args)
    result: dict[str, Any] = {
        "quick": args.quick,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "params": {
            k: v
            for k, v in vars(args).items()
            if k not in ("out", "servers", "quick") and not (k == "only" and v is None)
        },
        "servers": {},
    }
    try:
        for name in args.servers.split(","):
            result["servers"][name] = bench.run_server(name)
    finally:
        bench.pool.close()
        shutil.rmtree(bench.tmp, ignore_errors=True)
    result["seconds"] = round(time.monotonic() - started, 1)
    result["machine"]["loadavg_after"] = Path("/proc/loadavg").read_text().strip()
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    log(f"wrote {args.out} after {result['seconds']} s")
    failures = {k: v["failures"] for k, v in result["servers"].items() if v["failures"]}
    if failures:
        log(f"failures: {failures}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
