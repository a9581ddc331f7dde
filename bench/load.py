"""chatd's load generator: chatd and its peers measured side by side, in one run.

Usage (bench/run.sh does this): ``python bench/load.py [--quick] --out results.json``

How it measures
---------------
* Servers: chatd (``python -m chatd --config <generated toml>``, SQLite in a
  temp dir, rate limits raised out of the way, logging at warning), the Node
  ``ws`` peer and the Python ``websockets`` peer (``bench/peers/``), each on a
  fresh loopback port, one after the other; each is started four times:
  compression off for handshakes on a fresh process; compression off for idle
  memory (from a fresh baseline), handshakes again, fan-out, latency and
  commits; permessage-deflate on for fan-out again (clients offering deflate);
  compression off for the big room (from a fresh baseline) and the reconnect
  storm after it, which restarts that server once more.
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
* (b2) latency at a fixed rate: as (b), at ``fixed_rate`` (500) msgs/s for
  every server, so that the servers are compared at one offered load.
* (d2) commits with batching clients: as (d), with ``batch_conns`` (10)
  connections each keeping ``batch_window`` (400) messages in flight, sent in
  ``message_batch`` frames of at most 100 entries (the own copies back from
  one read are replaced by one batch). A batch of one message first probes
  whether the server understands batches (the peers do not: their row says
  what they answered). For reference, SQLite's own insert rate for the same
  rows on the server's CPU (``bench/commits.py --sqlite``).
* (f) one big room: ``--big`` (10,000) connections opened on a fresh server
  (token checked, no room, idle), then every one sends ``join_room {room:
  "big"}`` at one instant t0 (each worker its own); joins/s from the first
  join sent to the last ``join_room_ack``, at most ``--big-deadline`` (60) s,
  after which the scenario reports how many joined. Server CPU over that span
  (sampled every 0.1 s, cut at the last ack); RSS per connection with the
  membership (as (c), once nothing more arrives); frames, presence frames
  (``user_connected``, or chatd's summarised ``room_presence``) and bytes
  received per member.
* (g) reconnect storm, on the big room's members (joins still missing at the
  deadline get ``big_late`` (15) s more, then those without an ack are closed
  and left out): a publisher (one member) sends ``--storm-rate`` msgs/s with
  probes (by default 50,000 deliveries/s: 5 msgs/s into 10,000), then after
  ``storm_before`` (3) s the server gets SIGTERM, is waited for (at most
  ``storm_stop_grace`` (20) s, then SIGKILL, reported) and started again on
  the same port (chatd: the same database, whose newest id of the room, read
  while nothing runs, is each member's target). Every member reconnects with
  the back-off of bench/worker.py and rejoins (chatd's with ``since_id``).
  From the new server's listen, at most ``--storm-deadline`` (20) s: all
  back, all caught up (back, and every id of the room up to the target
  received), the server's CPU, its RSS before / peak / after (at caught up
  and 2 s later, the larger), the p50/p99 publish-to-last-recipient of the
  messages sent in that span, and every chatd member's ids checked against
  the database (missing, duplicates).
* ``--profile``: py-spy records chatd during a repeat of the room-of-100
  fan-out point, during the commit run, during the second handshake
  measurement and during the big room's joins (3 s at 1,000 samples/s;
  raw collapsed stacks next to the results; bench/report.py summarises
  the first three).
* ``--only handshakes``: (e) alone, with the idle connections (c) between its
  two measurements, as in the full run; the JSON goes to a temp file unless
  ``--out`` is given (it is not a full result for bench/report.py). E.g.
  ``--servers ws,websockets --only handshakes`` for the peers' figures, or
  ``--servers chatd --only handshakes --profile`` for chatd's profile.
* ``--only big``: the big room (f) and the storm after it, alone.
Every loop stops at an absolute deadline and every wait has a timeout.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
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


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process whose parent it is (PostgreSQL's backends)."""
    out = [pid]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, ValueError):
            continue
    return out


def pin_tree(pid: int, cpus: set[int]) -> int:
    """Confine a process and its children to ``cpus``; how many were."""
    n = 0
    for p in process_tree(pid):
        try:
            os.sched_setaffinity(p, cpus)
            n += 1
        except OSError:
            pass
    return n


def cpu_of(pids: list[int]) -> float:
    """CPU seconds of these processes now (one that has ended counts 0)."""
    total = 0.0
    for pid in pids:
        try:
            total += proc_cpu(pid)
        except (OSError, ValueError):
            pass
    return total


def machine_busy() -> tuple[float, float]:
    """(busy, softirq) CPU seconds of the whole machine (all cores), /proc/stat.
    softirq is mostly the kernel's loopback TCP work, which is charged to no
    process."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK, fields[6] / CLK_TCK


def proc_rss_kib(pid: int, key: str = "VmRSS") -> int:
    """VmRSS (or ``key``: VmHWM, the peak) of the process, KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
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
            self.db: Path | None = db
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
            self.db = None
            self.cmd = ["node", str(HERE / "peers/node/server.js"), "--port", str(self.port)]
            self.cmd += ["--secret", SECRET, "--deflate", "1" if deflate else "0"]
            self.cmd += ["--max-seconds", str(SERVER_MAX_SECONDS)]
            self.cwd = HERE / "peers/node"
            self.config_text = ""
        elif name == "websockets":
            self.db = None
            self.cmd = [py, str(HERE / "peers/py_websockets/server.py"), "--port", str(self.port)]
            self.cmd += ["--secret", SECRET, "--max-seconds", str(SERVER_MAX_SECONDS)]
            self.cmd += ["--deflate"] if deflate else []
            self.cwd = HERE / "peers/py_websockets"
            self.config_text = ""
        else:
            raise ValueError(name)
        self.logfile = tmp / f"{name}-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, cpus: set[int] | None = None, restart: bool = False) -> None:
        """Start it (confined to ``cpus``, threads included, when given);
        ``restart``: again, on the same port (and database), its log appended."""
        env = dict(os.environ, PYTHONPATH=str(self.root))

        def pin() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)

        with open(self.logfile, "ab" if restart else "wb") as out:
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

    def stop(self, grace: float = 15.0) -> str:
        """SIGTERM, then SIGKILL after ``grace`` s; returns the tail of its log.
        ``killed`` says whether it needed the SIGKILL."""
        self.killed = False
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.killed = True
                self.proc.kill()
                self.proc.wait(5)
        return self.logfile.read_text(errors="replace")[-3000:]


class Sampler(threading.Thread):
    """The server's CPU seconds and RSS every ``period`` s, in a thread
    (following ``server.pid`` across a restart), so that a phase whose end
    is known only afterwards (the last ack) can be cut at that instant."""

    def __init__(self, server: Server, period: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.period = period
        self.samples: list[tuple[int, int, float, int]] = []  # (ns, pid, cpu s, rss KiB)
        self.halt = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                pid = self.server.pid
                self.samples.append((MONO(), pid, proc_cpu(pid), proc_rss_kib(pid)))
            except (OSError, ValueError, IndexError, AssertionError):
                pass
            self.halt.wait(self.period)

    def stop(self) -> None:
        self.halt.set()
        self.join(5)

    def cpu_at(self, t: int, pid: int) -> float:
        """CPU seconds of ``pid`` at ``t``, interpolated between samples."""
        pts = [(ns, cpu) for ns, p, cpu, _ in self.samples if p == pid]
        if not pts:
            return float("nan")
        if t <= pts[0][0]:
            return pts[0][1]
        for (a, ca), (b, cb) in itertools.pairwise(pts):
            if a <= t <= b:
                return ca + (cb - ca) * (t - a) / max(1, b - a)
        return pts[-1][1]

    def cores(self, t0: int, t1: int, pid: int) -> float:
        """Cores busy (CPU s / wall s) of ``pid`` over [t0, t1]."""
        if t1 <= t0:
            return float("nan")
        return (self.cpu_at(t1, pid) - self.cpu_at(t0, pid)) / ((t1 - t0) / 1e9)

    def peak_rss(self, t0: int, t1: int, pid: int) -> int:
        return max((r for ns, p, _, r in self.samples if p == pid and t0 <= ns <= t1), default=0)


# --- workers -------------------------------------------------------------------


class Pool:
    """The worker processes and a bounded request/reply over their pipes."""

    #: Each worker process's entry (bench/readstate.py's pool has its own).
    entry = staticmethod(worker_main)

    def __init__(self, procs: int, cpus: set[int] | None) -> None:
        self.conns = []
        self.procs = []
        for i in range(procs):
            parent, child = mp.Pipe()
            p = mp.Process(target=self.entry, args=(child, i, SECRET, cpus), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)

    def call(self, cmds: list[dict[str, Any] | None], timeout: float) -> list[dict[str, Any]]:
        self.send(cmds)
        return self.gather(cmds, timeout)

    def send(self, cmds: list[dict[str, Any] | None]) -> None:
        """Each worker its command (None: that worker none)."""
        for conn, cmd in zip(self.conns, cmds, strict=True):
            if cmd is not None:
                conn.send(cmd)

    def gather(self, cmds: list[dict[str, Any] | None], timeout: float) -> list[dict[str, Any]]:
        """The workers' answers to ``cmds`` ({} where a worker had none)."""
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
        self.rooms = ["fan10", "fan100", "fan1000", "lat", "idle", "big"] + [
            f"c{k}" for k in range(max(args.commit_conns, getattr(args, "batch_conns", 0)))
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
        if server is None or not server.alive():
            time.sleep(0.5)
            return 0.0
        return self.settle(server, 60)

    def settle(self, server: Server, limit: float) -> float:
        """Wait (at most ``limit`` s) until the server is idle (under 5% of
        a core over 0.3 s); returns the seconds waited."""
        started = time.monotonic()
        while time.monotonic() - started < limit:
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

    def spy(
        self, server: Server, profile: Path | None, duration: float | None = None, rate: int = 100
    ) -> subprocess.Popen[bytes] | None:
        """py-spy record (raw collapsed stacks) of the server for one window
        (``duration`` s, by default a measurement's; ``rate`` samples/s)."""
        if profile is None:
            return None
        if duration is None:
            duration = self.args.duration + self.args.warm
        return subprocess.Popen(
            [
                str(Path(sys.executable).parent / "py-spy"),
                "record",
                "--pid",
                str(server.pid),
                "--duration",
                str(max(1, round(duration))),
                "--format",
                "raw",
                "--nonblocking",
                "--rate",
                str(rate),
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
        server_cpu, replies = self.timed(server, cmds, t0, t1, a.duration + a.warm + 60)
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

    def latency(
        self, server: Server, n: int, rate: float, duration: float | None = None
    ) -> dict[str, Any]:
        a = self.args
        duration = duration or a.latency_duration
        # One load-generator process holds every member and the publisher: at
        # half the maximum it has CPU to spare, and a second process on the
        # same core would add its own scheduling delays to the measurement.
        conn = self.connect(server, n, "lat", False, procs=1)
        self.pool.all({"op": "drain", "quiet": 0.5, "limit": 30}, timeout=60)
        t0, t1 = self.window(duration)
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
        server_cpu, replies = self.timed(server, cmds, t0, t1, duration + a.warm + 60)
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
        if getattr(a, "commit_contents", None):  # (bench/commits.py --content words)
            cmd["contents"] = a.commit_contents
        spy = self.spy(server, profile)
        cmds = [dict(cmd) for _ in self.pool.conns]
        server_cpu, replies = self.timed(server, cmds, t0, t1, a.duration + a.warm + 60)
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

    def timed(
        self,
        server: Server,
        cmds: list[dict[str, Any] | None],
        t0: int,
        t1: int,
        timeout: float,
    ) -> tuple[float, list[dict[str, Any]]]:
        """Start ``cmds`` on the workers, sample the server's CPU over the
        window t0..t1, then gather the answers: (server cores, answers)."""
        self.pool.send(cmds)
        server_cpu = self.sample_cpu(server, t0, t1)
        return server_cpu, self.pool.gather(cmds, timeout)

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
        server_cpu, replies = self.timed(server, cmds, t0, t1, a.duration + a.warm + 60)
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
        what = " (a new token each)" if unique else ""
        log(f"  handshakes{what}: {res['per_s']:,.0f}/s, errors {sum(errors.values())}")
        self.close_all(server)
        return res

    def commit_batch(self, server: Server) -> dict[str, Any]:
        """(d2) Commits with batching clients: C connections, each alone in
        its own room, keep ``batch_window`` messages in flight, sent in
        ``message_batch`` frames of at most 100 entries. First, one batch of
        one message probes whether the server understands batches at all."""
        a = self.args
        rooms = [f"c{k}" for k in range(a.batch_conns)]
        conn = self.connect(server, a.batch_conns, None, False, rooms=rooms)
        probe = self.pool.call(
            [{"op": "batch_probe", "timeout": 3.0}] + [None] * (self.pool.n - 1), timeout=30
        )[0]
        res: dict[str, Any] = {
            "connections": conn["opened"],
            "window": a.batch_window,
            "batch": 100,
            "supported": probe["supported"],
            "probe_answer": probe["answer"],
            "persisted": server.name == "chatd",
        }
        if not probe["supported"]:
            self.close_all(server)
            log(f"  commit (batches): not supported: {probe['answer'][:120]}")
            return res
        t0, t1 = self.window(a.duration)
        cmd = {"op": "commit_batch", "t0": t0, "t1": t1, "warm": a.warm, "size": 100}
        cmd.update(window=a.batch_window, batch=100)
        cmds = [dict(cmd) for _ in self.pool.conns]
        server_cpu, replies = self.timed(server, cmds, t0, t1, a.duration + a.warm + 60)
        self.close_all(server)
        dur = (t1 - t0) / 1e9
        lat = [x / 1e6 for r in replies for x in r["lat_ns"]]
        acked = sum(r["acked"] for r in replies)
        res.update(
            {
                "acked_per_s": acked / dur,
                "batches_per_s": sum(r["batches"] for r in replies) / dur,
                "error_frames": sum(r["other"] for r in replies),
                "p50_ms": pct(lat, 0.5),
                "p99_ms": pct(lat, 0.99),
                "server_cpu": server_cpu,
                "cpu_us_per_msg": 1e6 * server_cpu * dur / max(1, acked),
                "machine_cpu": self.machine_cores,
                "softirq_cpu": self.softirq_cores,
                "loadgen_cpu": sum(r["cpu"] for r in replies) / dur,
                "open_after": sum(r["open"] for r in replies),
            }
        )
        log(
            f"  commit (batches of <= 100, {a.batch_conns} x {a.batch_window} in flight):"
            f" {res['acked_per_s']:,.0f} msgs/s acked, p99 {res['p99_ms']:.2f} ms,"
            f" {res['cpu_us_per_msg']:.1f} µs of server CPU a message"
        )
        return res

    def sqlite_rate(self) -> dict[str, Any]:
        """SQLite's own insert rate for the rows of (d2), on the server's
        CPU: ``bench/commits.py --sqlite`` in a process of its own."""
        a = self.args
        cpus = self.server_cpus

        def pin() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)

        cmd = [sys.executable, str(HERE / "commits.py"), "--sqlite", "--sqlite-rows"]
        cmd += [str(a.sqlite_rows), "--conns", str(a.batch_conns)]
        out = subprocess.run(
            cmd,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            preexec_fn=pin,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        if out.returncode != 0:
            raise RuntimeError(f"commits.py --sqlite: {out.stderr[-500:]}")
        res: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        log(
            "  SQLite alone: "
            + ", ".join(
                f"groups of {g['group']}: {g['rows_per_s']:,.0f} rows/s"
                f" ({g['cpu_us_per_row']:.1f} µs CPU a row)"
                for g in res["groups"]
            )
        )
        return res

    def bigroom(self, server: Server) -> dict[str, Any]:
        """(f) One big room: N idle connections (token checked, no room) on a
        fresh server, then all of them join the room "big" at one instant
        (every worker sends its members' join_room at t0); up to
        ``big_deadline`` s for the acks."""
        a = self.args
        n = a.big
        time.sleep(a.big_rest)
        before = proc_rss_kib(server.pid)
        conn = self.connect(server, n, None, False)
        time.sleep(2 * a.big_rest)
        idle_rss = proc_rss_kib(server.pid)
        sampler = Sampler(server)
        t0 = MONO() + int(min(0.3, a.big_rest) * 1e9)
        deadline = t0 + int(a.big_deadline * 1e9)
        prof = self.tmp / "chatd-bigroom.txt" if server.name == "chatd" and a.profile else None
        spy = self.spy(server, prof, 3.0, rate=1000)  # (the joins take about a second)
        try:
            replies = self.pool.all(
                {
                    "op": "big_join",
                    "room": "big",
                    "t0": t0,
                    "deadline": deadline,
                    "quiet": min(0.5, 2 * a.big_rest),
                },
                timeout=a.big_deadline + 60,
            )
        finally:
            sampler.stop()
        if spy is not None:
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
            if prof is not None and prof.exists():
                shutil.copy(prof, Path(a.out).parent / "chatd-bigroom.pyspy.txt")
        after = proc_rss_kib(server.pid)
        acks = sorted(x for r in replies for x in r["acks"])
        first = min((r["first_sent"] for r in replies if r["first_sent"]), default=t0)
        joined = len(acks)
        members = sum(r["members"] for r in replies)
        last = acks[-1] if acks else deadline
        span = (last - first) / 1e9

        def at(q: float) -> float | None:
            """Seconds from the first join sent until a share q of the N had their ack."""
            k = math.ceil(q * n)
            return (acks[k - 1] - first) / 1e9 if 0 < k <= joined else None

        errors: dict[str, int] = {}
        closes: dict[str, int] = {}
        for r in replies:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
            for k, v in r["closes"].items():
                closes[k] = closes.get(k, 0) + v

        def total(key: str) -> int:
            return sum(r[key] for r in replies)

        res = {
            "connections": n,
            "opened": conn["opened"],
            "connect_seconds": round(conn["seconds"], 2),
            "members": members,
            "joined": joined,
            "deadline_s": a.big_deadline,
            "all_joined": joined >= n,
            "join_span_s": span,
            "joins_per_s": joined / span if span > 0 else float("nan"),
            "s_to_50pct": at(0.5),
            "s_to_99pct": at(0.99),
            "s_to_all": at(1.0),
            "server_cpu": sampler.cores(first, last, server.pid),
            "loadgen_cpu": total("cpu") / span if span > 0 else float("nan"),
            "rss_before_kib": before,
            "rss_idle_kib": idle_rss,
            "rss_after_kib": after,
            "kib_per_conn": (after - before) / max(1, conn["opened"]),
            "kib_idle_per_conn": (idle_rss - before) / max(1, conn["opened"]),
            "kib_membership_per_join": (after - idle_rss) / max(1, joined),
            "rss_peak_kib": sampler.peak_rss(first, MONO(), server.pid),
            "frames_per_client": total("frames") / max(1, members),
            "frames_max": max(r["frames_max"] for r in replies),
            "presence_frames": total("presence_frames"),
            "presence_per_client": total("presence_frames") / max(1, members),
            "user_presence_frames": total("user_presence"),
            "room_presence_frames": total("room_presence"),
            "bytes_per_client": total("rx_bytes") / max(1, members),
            "bytes_max": max(r["rx_bytes_max"] for r in replies),
            "open_after": total("open"),
            "errors": {**conn["errors"], **errors},
            "closes": closes,
        }
        log(
            f"  big room {n}: {joined:,}/{n:,} joined in {span:.1f} s"
            f" ({res['joins_per_s']:,.0f} joins/s), server {res['server_cpu']:.2f} cores,"
            f" loadgen {res['loadgen_cpu']:.2f},"
            f" {res['kib_per_conn']:.1f} KiB/conn with the membership,"
            f" {res['presence_per_client']:,.0f} presence frames and"
            f" {res['bytes_per_client'] / 1024:,.0f} KiB received per client"
        )
        return res

    def room_ids(self, server: Server) -> list[int] | None:
        """The ids of the room "big" in chatd's database (None: not readable),
        read-only (the server may be writing)."""
        if server.db is None or not server.db.exists():
            return None
        try:
            db = sqlite3.connect(f"file:{server.db}?mode=ro", uri=True, timeout=10)
            try:
                rows = db.execute(
                    "SELECT id FROM messages WHERE channel = ? ORDER BY id", ("r:big",)
                ).fetchall()
            finally:
                db.close()
        except sqlite3.Error as exc:
            log(f"  {server.name}: database not readable: {exc}")
            return None
        return [r[0] for r in rows]

    def storm(self, server: Server) -> dict[str, Any]:
        """(g) A reconnect storm, on the big room's members: a publisher at a
        low fixed rate (probes in the content), then the server is restarted
        (SIGTERM, wait for its exit, start again on the same port and
        database) and every member reconnects and rejoins (chatd's with
        ``since_id``, the newest id it had received), with the back-off of
        bench/worker.py. Measured from the new server's listen: all back
        (rejoined), all caught up (every message committed before the
        restart that a member had not received, then live)."""
        a = self.args
        # the joins still on their way finish first (bounded), the rest leave
        status = self.pool.all({"op": "storm_status"}, timeout=30)
        members = sum(r["members"] for r in status)
        started = time.monotonic()
        replies = self.pool.all(
            {"op": "big_wait", "deadline": MONO() + int(a.big_late * 1e9)},
            timeout=a.big_late + 60,
        )
        late_s = time.monotonic() - started
        late_errors: dict[str, int] = {}
        for r in replies:
            for k, v in r["errors"].items():
                late_errors[k] = late_errors.get(k, 0) + v
        dropped = sum(r["dropped"] for r in self.pool.all({"op": "big_drop"}, timeout=30))
        n = members - dropped
        if dropped:
            log(
                f"  storm: {dropped} members got no join ack in {late_s:.1f} s more: left out"
                f" (closed); {late_errors or 'no errors'}; pending/waited"
                f" {[(r['pending'], round(r['waited_s'], 1)) for r in replies]}"
            )
        if n <= 0:
            raise RuntimeError("storm: no member in the room")
        # what the dropped ones left to do (bounded), then a quiet server
        settled = self.settle(server, 10) if dropped else 0.0
        rate = a.storm_rate or min(100.0, a.storm_deliveries / n)
        chatd = server.name == "chatd"
        cmds: list[dict[str, Any] | None] = [
            {
                "op": "storm_start",
                "room": "big",
                "port": server.port,
                "publish": i == 0,
                "rate": rate,
                "since": chatd,
                "ids": chatd,
                "deadline": MONO() + int((a.storm_before + 60 + a.storm_deadline) * 1e9),
                "backoff_base": a.backoff_base,
                "backoff_cap": a.backoff_cap,
                "first_jitter": a.first_jitter,
            }
            for i in range(self.pool.n)
        ]
        self.pool.call(cmds, timeout=30)
        time.sleep(a.storm_before)
        rss_before = proc_rss_kib(server.pid)
        sampler = Sampler(server)
        try:
            t_term = MONO()
            tail = server.stop(grace=a.storm_stop_grace)
            t_exit = MONO()
            killed = server.killed
            ids = self.room_ids(server) if chatd else None
            target = ids[-1] if ids else 0

            def storm_target(deadline: int) -> None:
                """Tell the members what to catch up to, and until when."""
                self.pool.all(
                    {
                        "op": "storm_target",
                        "target": target if ids is not None else None,
                        "ids": ids or [],
                        "deadline": deadline,
                    },
                    timeout=30,
                )

            storm_target(MONO() + int((30 + a.storm_deadline) * 1e9))
            server.start(self.server_cpus, restart=True)
            t_listen = MONO()
            deadline = t_listen + int(a.storm_deadline * 1e9)
            # the members stop trying at the storm's deadline
            storm_target(deadline)
            # the publisher first (it retries every 50 ms), so that the
            # storm has its traffic; then, or after 1 s, everyone else
            head_start = MONO()
            while MONO() - head_start < 1e9:
                st = self.pool.all({"op": "storm_status"}, timeout=30)
                if any(r["publisher_back"] for r in st):
                    break
                time.sleep(0.02)
            head_start = MONO() - head_start
            self.pool.all({"op": "storm_go"}, timeout=30)
            caught = back = 0
            first_poll: tuple[int, float] | None = None
            while MONO() < deadline:
                st = self.pool.all({"op": "storm_status"}, timeout=30)
                cpu = sum(r["cpu"] for r in st)
                first_poll = first_poll or (MONO(), cpu)
                caught = sum(r["caught"] for r in st)
                back = sum(r["back"] for r in st)
                if caught >= n:
                    break
                time.sleep(0.2)
            t_seen = MONO()
            # the load generator's cores over the storm (between the polls)
            loadgen = float("nan")
            if first_poll is not None and t_seen > first_poll[0]:
                loadgen = (cpu - first_poll[1]) / ((t_seen - first_poll[0]) / 1e9)
            rss_at = proc_rss_kib(server.pid)
            time.sleep(min(2.0, a.storm_settle))
            rss_settled = proc_rss_kib(server.pid)
            hwm = proc_rss_kib(server.pid, "VmHWM")
            replies = self.pool.all(
                {"op": "storm_stop", "drain": min(0.5, a.storm_settle)}, timeout=60
            )
        finally:
            sampler.stop()
        new_pid = server.pid
        rows = [m for r in replies for m in r["members"]]
        # per member: since0, lost, back, caught, attempts, n_after, last_id, dups, not_recovered
        backs = sorted(m[2] for m in rows if m[2])
        caughts = sorted(m[3] for m in rows if m[3])
        t_all = caughts[-1] if len(caughts) >= n else None
        t_back = backs[-1] if len(backs) >= n else None
        end = t_all or t_seen

        def s_from(t: int | None, origin: int) -> float | None:
            return (t - origin) / 1e9 if t else None

        def share(times: list[int], q: float) -> float | None:
            k = math.ceil(q * n)
            return s_from(times[k - 1], t_listen) if 0 < k <= len(times) else None

        missing = dups = incomplete_members = 0
        final_ids = self.room_ids(server) if chatd else None
        if final_ids is not None:
            for since0, _, _, _, _, n_after, last_id, d, _ in rows:
                if since0 < 0:
                    continue
                expected = bisect.bisect_right(final_ids, last_id) - bisect.bisect_right(
                    final_ids, since0
                )
                if n_after < expected:
                    missing += expected - n_after
                    incomplete_members += 1
                dups += d
        # publish-to-last-recipient of the messages sent during the storm
        sent_at: list[int] = replies[0]["sent_at"]
        arrivals: dict[int, list[int]] = {}
        for r in replies:
            for seq, (last, count) in r["arrivals"].items():
                seq = int(seq)
                m = arrivals.get(seq)
                if m is None:
                    arrivals[seq] = [last, count]
                else:
                    m[0] = max(m[0], last)
                    m[1] += count
        during = [(seq, at) for seq, at in enumerate(sent_at) if at and t_listen <= at <= end]
        lat = [(arrivals[seq][0] - at) / 1e6 for seq, at in during if seq in arrivals]
        complete = sum(1 for seq, _ in during if arrivals.get(seq, [0, 0])[1] >= n)
        pre = [seq for seq, at in enumerate(sent_at) if at and at < t_exit]
        attempts = sorted(m[4] for m in rows)
        closes: dict[str, int] = {}
        errors: dict[str, int] = {}
        for r in replies:
            for k, v in r["closes"].items():
                closes[k] = closes.get(k, 0) + v
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        res = {
            "members": n,
            "dropped_before": dropped,
            "late_join_s": late_s,
            "late_errors": late_errors,
            "settle_s": settled,
            "rate_msgs_per_s": rate,
            "history": chatd,
            "rss_before_kib": rss_before,
            "stop_s": (t_exit - t_term) / 1e9,
            "stop_killed": killed,
            "down_s": (t_listen - t_term) / 1e9,
            "publisher_head_start_s": head_start / 1e9,
            "target_id": target,
            "pre_restart_sent": len(pre),  # before the old server's exit
            "pre_restart_committed": len(ids) if ids is not None else None,
            "back": len(backs),
            "caught_up": len(caughts),
            "all_back_s": s_from(t_back, t_listen),
            "all_caught_up_s": s_from(t_all, t_listen),
            "all_caught_up_from_term_s": s_from(t_all, t_term),
            # from the listen until half (99%) of the N were caught up
            "p50_caught_up_s": share(caughts, 0.5),
            "p99_caught_up_s": share(caughts, 0.99),
            "deadline_s": a.storm_deadline,
            "seen_back_at_deadline": back,
            "server_cpu": sampler.cores(t_listen, end, new_pid),
            "loadgen_cpu": loadgen,
            "rss_at_caught_up_kib": rss_at,
            "rss_settled_kib": rss_settled,
            "rss_after_kib": max(rss_at, rss_settled),
            "rss_peak_kib": max(hwm, sampler.peak_rss(t_listen, MONO(), new_pid)),
            "storm_msgs": len(during),
            "storm_msgs_complete": complete,
            "storm_p50_ms": pct(lat, 0.5),
            "storm_p99_ms": pct(lat, 0.99),
            "storm_max_ms": max(lat) if lat else float("nan"),
            "missing": missing if final_ids is not None else None,
            "incomplete_members": incomplete_members if final_ids is not None else None,
            "duplicates": dups if final_ids is not None else None,
            "not_recovered": sum(m[8] for m in rows),
            "attempts_p50": attempts[len(attempts) // 2] if attempts else 0,
            "attempts_max": attempts[-1] if attempts else 0,
            "closes": closes,
            "errors": errors,
            "presence_per_client": sum(r["presence_frames"] for r in replies) / max(1, n),
            "bytes_per_client": sum(r["rx_bytes"] for r in replies) / max(1, n),
            "open_after": sum(r["open"] for r in replies),
            "stop_log": [ln for ln in tail.splitlines() if "ERROR" in ln or "Traceback" in ln][-5:],
        }
        res["rss_ratio"] = res["rss_after_kib"] / max(1, rss_before)
        log(
            f"  storm {n}: down {res['down_s']:.1f} s (exit {res['stop_s']:.1f} s), back"
            f" {len(backs):,}/{n:,}"
            + (f" in {res['all_back_s']:.1f} s" if t_back else "")
            + f", caught up {len(caughts):,}/{n:,}"
            + (f" in {res['all_caught_up_s']:.1f} s" if t_all else f" after {a.storm_deadline} s")
            + f", server {res['server_cpu']:.2f} cores, RSS {rss_before / 1024:.0f} ->"
            f" peak {res['rss_peak_kib'] / 1024:.0f} -> {res['rss_after_kib'] / 1024:.0f} MiB,"
            f" loadgen {loadgen:.2f}, storm p99 {res['storm_p99_ms']:.1f} ms over {len(lat)} msgs"
            + (f", missing {missing}, dups {dups}" if final_ids is not None else "")
        )
        # the server is stopped next: no close handshakes, no wait for it
        self.pool.all({"op": "close_all", "abort": True}, timeout=60)
        return res

    # --- one server ------------------------------------------------------------

    def run_server(self, name: str) -> dict[str, Any]:
        a = self.args
        out: dict[str, Any] = {"fanout": [], "idle": [], "failures": []}
        # Three fresh server processes: handshakes on a fresh server; idle
        # memory from a fresh server's baseline, then the rest; deflate.
        # a fourth for the big room and the storm after it (which restarts it)
        phases = [("handshakes", False), ("main", False), ("deflate", True), ("big", False)]
        if a.only == "handshakes":  # the first two, up to the handshakes after idle
            phases = phases[:2]
        elif a.only == "big":
            phases = phases[3:]
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
                    # a token never seen before for every handshake: what a
                    # server that remembers tokens pays after a restart
                    out["handshakes_unique"] = self.handshakes(server, unique=True)
                    continue
                if phase == "big":
                    out["bigroom"] = self.bigroom(server)
                    out["storm"] = self.storm(server)
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
                    out["latency_fixed"] = self.latency(
                        server, a.latency_room, a.fixed_rate, a.fixed_duration
                    )
                    prof = self.tmp / "commit.txt" if name == "chatd" and a.profile else None
                    out["commit"] = self.commit(server, prof)
                    if prof is not None and prof.exists():
                        shutil.copy(prof, Path(a.out).parent / "chatd-commit.pyspy.txt")
                    out["commit_batch"] = self.commit_batch(server)
                    if name == "chatd":
                        out["sqlite"] = self.sqlite_rate()
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
                # (after the storm its clients are gone: a short grace)
                tail = server.stop(grace=5.0 if phase == "big" else 15.0)
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
    parser.add_argument("--profile", action="store_true", help="py-spy chatd (see above)")
    parser.add_argument(
        "--only",
        choices=["handshakes", "big"],
        help="only this scenario (for a look, not for report.py): handshakes fresh, "
        "idle memory, handshakes after idle; or the big room and the storm",
    )
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not confine the server to CPU 0 and the load generator to the others",
    )
    parser.add_argument("--big", type=int, help="big room / storm members (10,000; quick 50)")
    parser.add_argument("--big-deadline", type=float, help="s for the big room's joins (60)")
    parser.add_argument("--storm-deadline", type=float, help="s for the storm, from restart (20)")
    parser.add_argument(
        "--storm-rate", type=float, default=0.0, help="storm publisher msgs/s (0: see --help)"
    )
    args = parser.parse_args()
    # the big room, the storm, latency at a fixed rate, batching clients
    big = {
        "big": 50 if args.quick else 10_000,
        "big_deadline": 10.0 if args.quick else 60.0,
        "storm_deadline": 10.0 if args.quick else 20.0,
    }
    for k, v in big.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    # the storm's joins left over from the big room's deadline: this long more
    args.big_late = 10.0 if args.quick else 15.0
    # how long the storm's SIGTERM may take before SIGKILL (reported)
    args.storm_stop_grace = 10.0 if args.quick else 20.0
    # the storm: traffic before the restart (s), RSS settle after (s), and
    # the publisher's rate when not given: min(100, storm_deliveries / N)
    # msgs/s, i.e. 5 msgs/s into 10,000 members (100 msgs/s there would be
    # 1M deliveries/s: 8x what the ws peer fans out at its maximum, and more
    # than the load generator parses)
    args.storm_before = 0.3 if args.quick else 3.0
    args.storm_settle = 0.3 if args.quick else 2.0
    # rests around the big room's connects (RSS read after them)
    args.big_rest = 0.2 if args.quick else 0.5
    args.storm_deliveries = 50_000.0
    args.backoff_base, args.backoff_cap, args.first_jitter = 0.1, 1.0, 0.1
    args.fixed_rate = 500.0
    args.fixed_duration = 0.5 if args.quick else 8.0
    args.batch_conns, args.batch_window = (4, 200) if args.quick else (10, 400)
    args.sqlite_rows = 2_000 if args.quick else 100_000
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
