"""Overload: chatd offered three times what it can commit, then half of it.

Usage (bench/.venv, which bench/run.sh makes)::

    python bench/overload.py [--quick] [--json FILE]

What it does
------------
* One chatd (this tree) with bench/load.py's config (rate limits raised out
  of the way, a fresh SQLite database), on CPU 0; the load generator (one
  asyncio process, a hand-rolled client as bench/wsclient.py's) on the
  other CPUs. Connections: ``--publishers`` (100) publishers, each alone in
  its room ``ov<k>``; a probe publisher in room ``probe`` sending 50 msgs/s
  throughout; ``--readers`` (4) readers, reader i in ``ov<i>`` and ``probe``,
  sending nothing. Every message's content starts ``o<gid>:<ns>:`` (its
  unique id, the time it was offered) and its ``request_id`` is ``gid``.
* Calibration: the publishers in a closed loop as load.py's commit scenario
  (32 messages in flight each, 3,200 in all, below the store's saturation;
  the next one leaves when the own copy, i.e. the commit, comes back) for
  3 s: R, the node's committed msgs/s.
* Then open loop, on one schedule (each message has its offer time; the
  publishers take turns; a message goes out at its time whatever came back,
  into the client's send buffer when TCP pushes back): 0.5 R for 10 s
  (baseline), 3 R for 60 s (overload), 0.5 R for 30 s (after the drop);
  then no more offers, and the connections stay open (at most 180 s) for
  what is still in flight to be acknowledged.
* Every second: offered, acked (own copies), ``error`` frames by code,
  the bytes the publishers have sent and chatd not received (the client's
  buffers and its sockets' send queues), commit latency (offer to own copy) p50 /
  p99, reader latency (offer to a reader) p50 / p99, the same two for the
  probe's messages (a light sender, no backlog of its own); and from the
  orchestrator: chatd's VmRSS, ``/readyz`` (status, queued, how long it
  took to answer), what waits in the receive queues of its connections
  (``/proc/net/tcp``), and ``/metrics`` (``chatd_store_queued``,
  ``chatd_messages_total``, ``chatd_busy_closes_total``).
* A publisher (or the probe) that chatd closes (1013: it went on sending
  into a saturated node) comes back as a client told to back off would:
  after 2 s (the close's ``retry_after``) x 0.5-1.5 at random, doubling to
  8 s while refused; it rejoins its room and goes on with its sequence. What
  it sent on the closed connection without an answer was dropped with it;
  the offers due while it was away are not sent (``away``).
* At the end chatd is stopped (SIGTERM: it commits what it queued) and its
  database read: every acknowledged id must be there (lost: target 0); of
  those dropped at a close, how many were stored anyway (target 0: the
  client must be able to take no answer as not taken); of those offered on
  a connection still open but neither acknowledged nor refused, how many
  were committed after all; duplicates.
* Targets: no acknowledged message lost; every message refused got an
  ``error`` (``RATE_LIMITED``: a saturated node refuses new messages) or
  was dropped by a close 1013, none stored; ``/readyz`` 503 ``saturated`` during the
  overload and 200 again after; VmRSS under the bound (VmRSS before the
  overload + 10,000 queued writes x 4 KiB, a generous allowance per queued
  message: its objects, its frame, its share of the buffers); recovered
  within 5 s of the drop: the first second from which three seconds in a
  row have a p99 within 1.5x the baseline's p99 (commit and reader
  latencies, the probe's and the publishers').
Nothing is asserted; ``--quick`` (1 s calibration, 2 s + 5 s + 3 s, a 20 s
drain) checks that the script works.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import fcntl
import json
import multiprocessing as mp
import os
import random
import re
import sqlite3
import struct
import sys
import termios
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import jwt  # noqa: E402
from load import SECRET, Server, log, pct, proc_rss_kib  # noqa: E402
from worker import raise_nofile  # noqa: E402

MONO = time.monotonic_ns
PUB, PROBE, READ = 0, 1, 2
GID = 10_000_000  # gid = publisher index * GID + seq
PROBE_RATE = 50.0
SIZE = 100  # content bytes
ZERO_MASK = b"\0\0\0\0"  # a legal mask: the payload goes as it is
QUEUE_BOUND = 10_000  # chatd/store/writer.py MAX_PENDING
PER_ITEM_KIB = 4


def frame(payload: bytes) -> bytes:
    """A masked (with a zero key) client text frame."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, 0x80 | n)) + ZERO_MASK + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 0xFE, n) + ZERO_MASK + payload
    return struct.pack("!BBQ", 0x81, 0xFF, n) + ZERO_MASK + payload


def control(opcode: int, payload: bytes) -> bytes:
    return bytes((0x80 | opcode, 0x80 | len(payload))) + ZERO_MASK + payload


# --- load generator (its own process) -----------------------------------------


class Bucket:
    __slots__ = ("acked", "away", "errors", "lat", "offered", "unsent")

    def __init__(self) -> None:
        self.offered = 0
        self.acked = 0
        self.errors: Counter[str] = Counter()
        # commit (own copy), reader, probe commit, probe reader: ms
        self.lat: tuple[list[float], ...] = ([], [], [], [])
        self.unsent = 0
        # offers due while their publisher was away (closed, reconnecting)
        self.away = 0


def unsent(conns: list[Conn]) -> int:
    """Bytes the publishers have sent that chatd has not received: in their
    asyncio buffers and their sockets' send queues (``TIOCOUTQ``: not yet
    sent, or sent and not yet acknowledged by chatd's kernel)."""
    n = 0
    for c in conns:
        t = c.transport
        if t is None or c.lost:
            continue
        n += t.get_write_buffer_size()
        sock = t.get_extra_info("socket")
        if sock is not None:
            try:
                n += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
            except OSError:
                pass
    return n


class Conn(asyncio.Protocol):
    def __init__(
        self, gen: Gen, target: str, kind: int, idx: int, room: str, uid: int, seq: int
    ) -> None:
        self.gen = gen
        self.target = target
        self.kind = kind
        self.idx = idx
        self.uid = uid
        self.room = room
        self.head = b'{"type":"room_message","data":{"room":"' + room.encode() + b'","content":"o'
        # the publisher's sequence goes on over its reconnections
        self.seq = self.first_seq = seq
        self.inflight = 0
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.upgraded = False
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[bool] = loop.create_future()
        self.waiter: asyncio.Future[bytes] | None = None
        self.waiter_key = b""
        self.close_code: int | None = None
        self.lost = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            (
                f"GET {self.target} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        for fut in (self.ready, self.waiter):
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionError("closed"))
        if self.upgraded:
            self.gen.on_lost(self)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.ready.set_exception(ConnectionError(bytes(buf[:60]).decode("latin-1")))
                return
            del buf[: end + 4]
            self.upgraded = True
            self.ready.set_result(True)
        now = MONO()
        i, n = 0, len(buf)
        while n - i >= 2:
            ln = buf[i + 1] & 127
            h = 2
            if ln == 126:
                if n - i < 4:
                    break
                ln, h = (buf[i + 2] << 8) | buf[i + 3], 4
            elif ln == 127:
                if n - i < 10:
                    break
                ln, h = int.from_bytes(buf[i + 2 : i + 10], "big"), 10
            if n - i < h + ln:
                break
            op = buf[i] & 15
            payload = bytes(buf[i + h : i + h + ln])
            i += h + ln
            if op == 1:
                self.gen.on_text(self, payload, now)
            elif op == 9 and self.transport is not None:
                self.transport.write(control(10, payload))
            elif op == 8:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
        del buf[:i]

    def expect(self, key: bytes) -> asyncio.Future[bytes]:
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiter, self.waiter_key = fut, key
        return fut

    def message(self, sent_ns: int) -> bytes:
        gid = self.idx * GID + self.seq
        self.seq += 1
        body = b"%d:%d:" % (gid, sent_ns)
        return frame(
            self.head + body + b"x" * max(0, SIZE - 1 - len(body)) + b'"},"request_id":%d}' % gid
        )


class Gen:
    """All the load generator's connections and what they received."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.pubs: list[Conn] = []
        self.probe: Conn | None = None
        self.readers: list[Conn] = []
        self.buckets: dict[int, Bucket] = {}
        self.t0 = 0
        self.acked: set[int] = set()
        self.errored: set[int] = set()
        self.errors_total: Counter[str] = Counter()
        self.closed_loop = False
        self.calib_acks: list[int] = []
        self.over: tuple[int, int] | None = None  # the overload's span, ns
        # publishers reconnect once closed (a saturated node closes 1013 the
        # connections that go on sending) while this is set
        self.reconnecting = False
        self.closes: Counter[str] = Counter()
        # (publisher, first seq, end seq) of each connection lost: what it
        # sent and had no answer for was dropped with it
        self.lost_spans: list[tuple[int, int, int]] = []
        self.dropped_at_close = 0
        self.reconnects = 0
        self.reconnect_failures = 0
        self.tasks: set[asyncio.Task[None]] = set()
        # per publisher (its index; the probe's is len(pubs)), during the
        # overload: own copies, and the longest wait between two (or from
        # the overload's start to the first)
        self.over_acks: Counter[int] = Counter()
        self.last_ack: dict[int, int] = {}
        self.max_gap: Counter[int] = Counter()

    def bucket(self, ns: int) -> Bucket:
        if not self.t0:  # (calibration: not in the series)
            return Bucket()
        k = (ns - self.t0) // 1_000_000_000
        b = self.buckets.get(k)
        if b is None:
            b = self.buckets[k] = Bucket()
        return b

    def on_text(self, c: Conn, p: bytes, now: int) -> None:
        if c.waiter is not None and c.waiter_key in p and not c.waiter.done():
            c.waiter.set_result(p)
            return
        if p.startswith(b'{"type":"room_message"'):
            j = p.find(b'"content":"o')
            if j < 0:
                return
            j += 12
            k = p.index(b":", j)
            gid = int(p[j:k])
            sent = int(p[k + 1 : p.index(b":", k + 1)])
            ms = (now - sent) / 1e6
            b = self.bucket(now)
            probe = gid // GID == len(self.pubs)
            if c.kind == READ:
                b.lat[3 if probe else 1].append(ms)
                return
            if gid // GID != c.idx or b'"request_id"' not in p:
                return
            self.acked.add(gid)
            b.acked += 1
            if self.over and self.over[0] <= now < self.over[1]:
                i = c.idx
                self.over_acks[i] += 1
                self.max_gap[i] = max(
                    self.max_gap[i], now - max(self.last_ack.get(i, 0), self.over[0])
                )
                self.last_ack[i] = now
            b.lat[2 if probe else 0].append(ms)
            c.inflight -= 1
            if self.closed_loop and c.kind == PUB and c.transport is not None:
                self.calib_acks.append(now)
                c.inflight += 1
                c.transport.write(c.message(MONO()))
        elif p.startswith(b'{"type":"error"'):
            d = json.loads(p)
            code = str((d.get("data") or {}).get("code"))
            self.errors_total[code] += 1
            self.bucket(now).errors[code] += 1
            rid = d.get("request_id")
            if isinstance(rid, int):
                self.errored.add(rid)
                c.inflight -= 1

    def on_lost(self, c: Conn) -> None:
        """A connection closed: what it sent without an answer is dropped
        with it; a publisher (or the probe) comes back after a pause."""
        self.closes[str(c.close_code)] += 1
        if c.kind == READ:
            return
        self.lost_spans.append((c.idx, c.first_seq, c.seq))
        self.dropped_at_close += max(0, c.inflight)
        c.inflight = 0
        if self.reconnecting:
            task = asyncio.get_running_loop().create_task(self.reconnect(c))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def reconnect(self, old: Conn) -> None:
        """Back after 2 s (the close's ``retry_after``) x 0.5-1.5 at random,
        then doubling (at most 8 s) while the node refuses."""
        delay = 2.0
        while self.reconnecting:
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            try:
                c = await self.open(old.uid, old.kind, old.idx, [old.room], old.seq)
            except (OSError, ConnectionError, asyncio.TimeoutError):
                self.reconnect_failures += 1
                delay = min(8.0, delay * 2)
                continue
            if old.kind == PROBE:
                self.probe = c
            else:
                self.pubs[old.idx] = c
            self.reconnects += 1
            return

    async def open(self, uid: int, kind: int, idx: int, rooms: list[str], seq: int = 0) -> Conn:
        loop = asyncio.get_running_loop()
        now = int(time.time())
        tok = jwt.encode(
            {"user_id": uid, "username": f"u{uid}", "iat": now, "exp": now + 7200},
            SECRET,
            algorithm="HS256",
        )
        _, c = await loop.create_connection(
            lambda: Conn(
                self, f"/ws/chat?token={tok}", kind, idx, rooms[0] if rooms else "", uid, seq
            ),
            "127.0.0.1",
            self.port,
        )
        await asyncio.wait_for(c.ready, 10)
        for room in rooms:
            ack = c.expect(b'"join_room_ack"')
            assert c.transport is not None
            c.transport.write(
                frame(json.dumps({"type": "join_room", "data": {"room": room}}).encode())
            )
            await asyncio.wait_for(ack, 10)
        c.waiter = None
        return c

    async def connect(self, publishers: int, readers: int) -> None:
        for k in range(publishers):
            self.pubs.append(await self.open(1000 + k, PUB, k, [f"ov{k}"]))
        self.probe = await self.open(900, PROBE, publishers, ["probe"])
        for r in range(readers):
            self.readers.append(await self.open(800 + r, READ, -1, [f"ov{r}", "probe"]))

    async def calibrate(self, warm: float, duration: float, window: int) -> dict[str, Any]:
        self.closed_loop = True
        for c in self.pubs:
            assert c.transport is not None
            c.inflight += window
            c.transport.write(b"".join(c.message(MONO()) for _ in range(window)))
        t0 = MONO() + int(warm * 1e9)
        t1 = t0 + int(duration * 1e9)
        await asyncio.sleep((t1 - MONO()) / 1e9)
        self.closed_loop = False
        n = sum(1 for t in self.calib_acks if t0 <= t < t1)
        deadline = time.monotonic() + 10
        while any(c.inflight > 0 for c in self.pubs) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return {"acked_per_s": n / duration, "seconds": duration, "window": window}

    async def run(self, t0: int, phases: list[tuple[float, float]], drain: float) -> None:
        """Open loop: ``phases`` (seconds, msgs/s) one after the other from
        ``t0``; the probe at PROBE_RATE throughout; then wait (at most
        ``drain`` s) for every offer to be acknowledged or refused."""
        self.t0 = t0
        spans = []
        t = t0
        for secs, rate in phases:
            spans.append((t, t + int(secs * 1e9), rate))
            t += int(secs * 1e9)
        end = t
        if len(spans) >= 2:
            self.over = spans[1][:2]
        self.reconnecting = True
        pubs = self.pubs
        assert self.probe is not None
        P = len(pubs)
        made = 0  # offers made by the publishers (all phases)
        rr = 0
        probe_made = 0
        span_i, span_base = 0, 0  # the phase being offered, offers before it
        sampled = -1  # the last second whose unsent bytes were read
        await asyncio.sleep(max(0.0, (t0 - MONO()) / 1e9))
        while True:
            now = MONO()
            out: dict[int, list[bytes]] = {}
            while span_i < len(spans):
                s0, s1, rate = spans[span_i]
                due = span_base + int(rate * (min(now, s1) - s0) / 1e9)
                while made < due:
                    at = s0 + int((made - span_base) * 1e9 / rate)
                    c = pubs[rr]
                    if c.lost:
                        self.bucket(at).away += 1
                    else:
                        out.setdefault(rr, []).append(c.message(at))
                        c.inflight += 1
                        self.bucket(at).offered += 1
                    rr = (rr + 1) % P
                    made += 1
                if now < s1:
                    break
                span_i += 1
                span_base = made
            for k, frames in out.items():
                c = pubs[k]
                if c.transport is not None and not c.transport.is_closing():
                    c.transport.write(b"".join(frames))
            pdue = int(PROBE_RATE * (min(now, end) - t0) / 1e9)
            probe = self.probe
            while probe_made < pdue:
                at = t0 + int(probe_made * 1e9 / PROBE_RATE)
                if probe.lost or probe.transport is None:
                    self.bucket(at).away += 1
                else:
                    probe.inflight += 1
                    probe.transport.write(probe.message(at))
                    self.bucket(at).offered += 1
                probe_made += 1
            if (now - t0) // 1_000_000_000 != sampled:
                sampled = (now - t0) // 1_000_000_000
                self.bucket(now).unsent = unsent(pubs)
            if now >= end:
                break
            await asyncio.sleep(0.005)
        self.reconnecting = False
        probe = self.probe
        self.end_unaccounted = sum(c.inflight for c in pubs) + probe.inflight
        self.end_unsent_bytes = self.bucket(end).unsent
        deadline = time.monotonic() + drain
        while time.monotonic() < deadline:
            live = [c for c in pubs + [probe] if not c.lost]
            if sum(max(0, c.inflight) for c in live) == 0:
                break
            self.bucket(MONO()).unsent = unsent(pubs)
            await asyncio.sleep(0.1)
        self.drain_seconds = drain - max(0.0, deadline - time.monotonic())
        self.after_drain_unaccounted = sum(max(0, c.inflight) for c in pubs + [probe] if not c.lost)

    def result(self) -> dict[str, Any]:
        series = []
        for k in sorted(self.buckets):
            b = self.buckets[k]
            row: dict[str, Any] = {
                "s": k,
                "offered": b.offered,
                "acked": b.acked,
                "errors": dict(b.errors),
                "away": b.away,
                "unsent_bytes": b.unsent,
            }
            for name, lat in zip(("commit", "reader", "probe_commit", "probe_reader"), b.lat):
                row[f"{name}_n"] = len(lat)
                row[f"{name}_p50_ms"] = round(pct(lat, 0.5), 2) if lat else None
                row[f"{name}_p99_ms"] = round(pct(lat, 0.99), 2) if lat else None
            series.append(row)
        # each phase's latencies, whole (for the baselines)
        return {
            "series": series,
            "lat_raw": {k: [list(x) for x in b.lat] for k, b in self.buckets.items()},
            "sent": {c.idx: c.seq for c in self.pubs + [self.probe] if c is not None},
            "acked": sorted(self.acked),
            "errored": sorted(self.errored),
            "errors": dict(self.errors_total),
            "end_unaccounted": self.end_unaccounted,
            "end_unsent_bytes": self.end_unsent_bytes,
            "drain_seconds": self.drain_seconds,
            "after_drain_unaccounted": self.after_drain_unaccounted,
            # per publisher (the probe last): own copies during the
            # overload, and the longest wait for one, s
            "over_acks": [self.over_acks[i] for i in range(len(self.pubs) + 1)],
            "over_max_gap_s": [
                round(
                    max(self.max_gap[i], self.over[1] - max(self.last_ack.get(i, 0), self.over[0]))
                    / 1e9,
                    2,
                )
                for i in range(len(self.pubs) + 1)
                if self.over
            ],
            "closes": dict(self.closes),
            "lost_spans": self.lost_spans,
            "dropped_at_close": self.dropped_at_close,
            "reconnects": self.reconnects,
            "reconnect_failures": self.reconnect_failures,
        }

    def close(self) -> None:
        for c in self.pubs + self.readers + [self.probe]:
            if c is not None and c.transport is not None:
                c.transport.abort()


def gen_main(conn: Any, cpus: set[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    raise_nofile()

    async def serve() -> None:
        gen: Gen | None = None
        loop = asyncio.get_running_loop()
        while True:
            cmd = await loop.run_in_executor(None, conn.recv)
            op = cmd["op"]
            try:
                if op == "connect":
                    gen = Gen(cmd["port"])
                    await gen.connect(cmd["publishers"], cmd["readers"])
                    reply: dict[str, Any] = {"ok": True}
                elif op == "calibrate":
                    assert gen is not None
                    reply = await gen.calibrate(cmd["warm"], cmd["duration"], cmd["window"])
                elif op == "run":
                    assert gen is not None
                    await gen.run(cmd["t0"], cmd["phases"], cmd["drain"])
                    reply = gen.result()
                elif op == "close":
                    if gen is not None:
                        gen.close()
                    reply = {"ok": True}
                else:
                    conn.send({"ok": True})
                    return
            except Exception as exc:  # noqa: BLE001 - reported to the orchestrator
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            conn.send(reply)

    asyncio.run(serve())


# --- the orchestrator ----------------------------------------------------------


def get(port: int, path: str, timeout: float) -> tuple[int, str, float]:
    started = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            status, body = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read().decode()
    except OSError as e:
        status, body = 0, f"{type(e).__name__}: {e}"
    return status, body, time.monotonic() - started


def metric(text: str, name: str) -> float | None:
    vals = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if (line.startswith(name + " ") or line.startswith(name + "{"))
    ]
    return sum(vals) if vals else None


def unread(port: int) -> int:
    """Bytes waiting in the receive queues of chatd's connections (the
    sockets whose local port is ``port``, ``/proc/net/tcp``'s rx_queue)."""
    n = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[1].rsplit(":", 1)[1], 16) == port:
            n += int(f[4].split(":")[1], 16)
    return n


class Scraper(threading.Thread):
    """Every second from ``t0``: VmRSS, /readyz, /metrics."""

    def __init__(self, server: Server, t0: int, until: int) -> None:
        super().__init__(daemon=True)
        self.server, self.t0, self.until = server, t0, until
        self.rows: list[dict[str, Any]] = []
        self.halt = threading.Event()
        self.start()

    def run(self) -> None:
        k = 0
        while not self.halt.is_set() and MONO() < self.until:
            at = self.t0 + k * 1_000_000_000
            wait = (at - MONO()) / 1e9
            if wait > 0 and self.halt.wait(wait):
                break
            k = (MONO() - self.t0) // 1_000_000_000 + 1
            now = MONO()
            row: dict[str, Any] = {"s": (now - self.t0) // 1_000_000_000}
            try:
                row["rss_kib"] = proc_rss_kib(self.server.pid)
            except OSError:
                row["rss_kib"] = None
            st, body, took = get(self.server.port, "/readyz", 3)
            row["readyz"] = st
            m = re.search(r'"status":\s*"([^"]+)"', body)
            row["readyz_status"] = m.group(1) if m else body[:60]
            m = re.search(r'"queued":\s*(\d+)', body)
            row["readyz_queued"] = int(m.group(1)) if m else None
            row["readyz_ms"] = round(took * 1000, 1)
            row["unread_bytes"] = unread(self.server.port)
            st, body, took = get(self.server.port, "/metrics", 3)
            row["metrics_ms"] = round(took * 1000, 1)
            row["store_queued"] = metric(body, "chatd_store_queued") if st == 200 else None
            row["messages_total"] = metric(body, "chatd_messages_total") if st == 200 else None
            row["busy_closes"] = metric(body, "chatd_busy_closes_total") if st == 200 else None
            self.rows.append(row)

    def stop(self) -> None:
        self.halt.set()
        self.join(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
    parser.add_argument("--publishers", type=int, default=100)
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--factor", type=float, default=3.0, help="overload, x R")
    parser.add_argument("--after", type=float, default=0.5, help="after the drop, x R")
    parser.add_argument("--overload-seconds", type=float)
    parser.add_argument("--after-seconds", type=float)
    parser.add_argument("--no-pin", dest="pin", action="store_false")
    a = parser.parse_args()
    q = a.quick
    base_s = 2.0 if q else 10.0
    over_s = a.overload_seconds or (5.0 if q else 60.0)
    after_s = a.after_seconds or (3.0 if q else 30.0)
    drain = 20.0 if q else 180.0
    calib = (0.3, 1.0) if q else (1.0, 3.0)
    raise_nofile()
    ncpu = os.cpu_count() or 1
    server_cpus = {0} if a.pin and ncpu > 1 else None
    load_cpus = set(range(1, ncpu)) if server_cpus else None
    if load_cpus:
        os.sched_setaffinity(0, load_cpus)
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="chatd-overload-"))
    rooms = [f"ov{k}" for k in range(a.publishers)] + ["probe"]
    server = Server("chatd", False, tmp, rooms)
    parent, child = mp.Pipe()
    proc = mp.Process(target=gen_main, args=(child, load_cpus), daemon=True)
    proc.start()

    def call(cmd: dict[str, Any], timeout: float) -> dict[str, Any]:
        parent.send(cmd)
        if not parent.poll(timeout):
            raise TimeoutError(f"load generator: no answer to {cmd['op']} in {timeout} s")
        r: dict[str, Any] = parent.recv()
        if "error" in r:
            raise RuntimeError(f"load generator: {cmd['op']}: {r['error']}")
        return r

    out: dict[str, Any] = {"quick": q, "loadavg_before": Path("/proc/loadavg").read_text().strip()}
    out["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    scraper: Scraper | None = None
    try:
        log(f"chatd: {' '.join(server.cmd)}")
        server.start(server_cpus)
        rss_start = proc_rss_kib(server.pid)
        call({"op": "connect", "port": server.port, "publishers": a.publishers,
              "readers": a.readers}, 120)  # fmt: skip
        cal = call({"op": "calibrate", "warm": calib[0], "duration": calib[1], "window": 32}, 60)
        R = cal["acked_per_s"]
        log(f"calibration: R = {R:,.0f} committed msgs/s")
        if R <= 0:
            raise RuntimeError("calibration: nothing committed")
        phases = [(base_s, a.after * R), (over_s, a.factor * R), (after_s, a.after * R)]
        t0 = MONO() + 500_000_000
        total = base_s + over_s + after_s
        scraper = Scraper(server, t0, t0 + int((total + drain + 5) * 1e9))
        log(f"open loop: {a.after * R:,.0f} msgs/s for {base_s:g} s, {a.factor * R:,.0f} for"
            f" {over_s:g} s, {a.after * R:,.0f} for {after_s:g} s; then at most {drain:g} s"
            " for the acks")  # fmt: skip
        res = call({"op": "run", "t0": t0, "phases": phases, "drain": drain}, total + drain + 60)
        scraper.stop()
        rss_peak_hwm = proc_rss_kib(server.pid, "VmHWM")
        call({"op": "close"}, 30)
        tail = server.stop(grace=60)
        db = server.db
        assert db is not None
        stored: Counter[int] = Counter()
        with sqlite3.connect(db) as conn:
            for (content,) in conn.execute("SELECT content FROM messages WHERE content LIKE 'o%'"):
                stored[int(content[1 : content.index(":")])] += 1
    finally:
        if scraper is not None:
            scraper.stop()
        try:
            parent.send({"op": "exit"})
        except OSError:
            pass
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
        if server.alive():
            server.stop(grace=10)
    out["loadavg_after"] = Path("/proc/loadavg").read_text().strip()

    # --- per second ---------------------------------------------------------
    srv = {r["s"]: r for r in scraper.rows} if scraper else {}
    series = []
    for row in res["series"]:
        row = dict(row, **{k: v for k, v in srv.get(row["s"], {}).items() if k != "s"})
        series.append(row)
    drop = int(base_s + over_s)  # second index of the drop
    over0 = int(base_s)
    raw = {int(k): v for k, v in res["lat_raw"].items()}

    def phase_lat(i: int, s0: int, s1: int) -> list[float]:
        return [x for k, v in raw.items() if s0 <= k < s1 for x in v[i]]

    names = ("commit", "reader", "probe_commit", "probe_reader")
    baseline = {n: pct(phase_lat(i, 0, over0), 0.99) for i, n in enumerate(names)}
    recovery: dict[str, Any] = {}
    by_s = {r["s"]: r for r in series}
    last = max(by_s) if by_s else 0
    for n in names:
        lim = 1.5 * baseline[n]
        rec = None
        for s in range(drop, last - 1):
            rows = [by_s.get(s + j) for j in range(3)]
            if all(r and r[f"{n}_p99_ms"] is not None and r[f"{n}_p99_ms"] <= lim for r in rows):
                rec = s - drop
                break
        recovery[n] = rec

    # --- losses -----------------------------------------------------------------
    acked, errored = set(res["acked"]), set(res["errored"])
    sent_ids = [i * GID + s for i, n in res["sent"].items() for s in range(n)]
    lost = [g for g in acked if g not in stored]
    unanswered = [g for g in sent_ids if g not in acked and g not in errored]
    # sent on a connection chatd closed, no answer: dropped with it
    spans: dict[int, list[tuple[int, int]]] = {}
    for i, s0, s1 in res["lost_spans"]:
        spans.setdefault(i, []).append((s0, s1))
    dropped = [
        g for g in unanswered if any(s0 <= g % GID < s1 for s0, s1 in spans.get(g // GID, ()))
    ]
    dropped_set = set(dropped)
    unaccounted = [g for g in unanswered if g not in dropped_set]
    committed_after = sum(1 for g in unaccounted if g in stored)
    dropped_stored = sum(1 for g in dropped if g in stored)
    dups = sum(1 for v in stored.values() if v > 1)
    errored_stored = sum(1 for g in errored if g in stored)

    rss = [r["rss_kib"] for r in series if r.get("rss_kib")]
    rss_before = next(
        (r["rss_kib"] for r in reversed(series) if r["s"] < over0 and r.get("rss_kib")), rss_start
    )
    bound = rss_before + QUEUE_BOUND * PER_ITEM_KIB
    over_rows = [r for r in series if over0 <= r["s"] < drop]
    after_rows = [r for r in series if r["s"] >= drop]
    sat = [r["s"] for r in over_rows if r.get("readyz") == 503]
    ready_again = next((r["s"] - drop for r in after_rows if r.get("readyz") == 200), None)
    with_rss = [r for r in over_rows if r.get("rss_kib")]
    half = with_rss[len(with_rss) // 2 :]
    rss_slope = (
        (half[-1]["rss_kib"] - half[0]["rss_kib"]) / 1024 / max(1, half[-1]["s"] - half[0]["s"])
        if len(half) >= 2 and half[0].get("rss_kib") and half[-1].get("rss_kib")
        else None
    )
    n_over = max(1, len(over_rows))
    summary = {
        "R_committed_per_s": round(R),
        "phases": {
            "baseline": [base_s, round(a.after * R)],
            "overload": [over_s, round(a.factor * R)],
            "after": [after_s, round(a.after * R)],
        },  # fmt: skip
        "offered_per_s_overload": round(sum(r["offered"] for r in over_rows) / n_over),
        "acked_per_s_overload": round(sum(r["acked"] for r in over_rows) / n_over),
        "acked_per_s_after": round(
            sum(r["acked"] for r in after_rows if r["s"] < drop + after_s) / max(1, after_s)
        ),
        "per_publisher_acked_per_s_overload": {
            "min": round(min(res["over_acks"][:-1]) / over_s, 1),
            "median": round(sorted(res["over_acks"][:-1])[a.publishers // 2] / over_s, 1),
            "max": round(max(res["over_acks"][:-1]) / over_s, 1),
            "probe": round(res["over_acks"][-1] / over_s, 1),
        },
        "longest_wait_for_an_ack_in_overload_s": {
            "publishers_median": sorted(res["over_max_gap_s"][:-1])[a.publishers // 2],
            "publishers_max": max(res["over_max_gap_s"][:-1]),
            "probe": res["over_max_gap_s"][-1],
        },
        "errors": res["errors"],
        "closes": dict(res["closes"]),
        "reconnects": res["reconnects"],
        "reconnect_failures": res["reconnect_failures"],
        "not_sent_while_away": sum(r.get("away", 0) for r in series),
        "dropped_at_close": len(dropped),
        "dropped_at_close_but_stored": dropped_stored,
        "acked": len(acked),
        "acked_lost": len(lost),
        "duplicates_stored": dups,
        "errored_but_stored": errored_stored,
        "unaccounted_at_end": res["end_unaccounted"],
        "client_unsent_bytes_at_end": res["end_unsent_bytes"],
        "drain_seconds": round(res["drain_seconds"], 1),
        "unaccounted_after_drain": len(unaccounted),
        "unaccounted_committed_after_all": committed_after,
        "rss_start_mib": round(rss_start / 1024, 1),
        "rss_before_overload_mib": round(rss_before / 1024, 1),
        "rss_max_mib": round(max(rss, default=0) / 1024, 1),
        "rss_hwm_mib": round(rss_peak_hwm / 1024, 1),
        "rss_bound_mib": round(bound / 1024, 1),
        "rss_slope_mib_per_s_late_overload": round(rss_slope, 3) if rss_slope is not None else None,
        "store_queued_max": max((r.get("store_queued") or 0 for r in series), default=0),
        "readyz_503_seconds_in_overload": len(sat),
        "readyz_first_503_s_after_overload_start": (sat[0] - over0) if sat else None,
        "readyz_200_again_s_after_drop": ready_again,
        "readyz_max_ms": max((r.get("readyz_ms") or 0 for r in series), default=0),
        "baseline_p99_ms": {k: round(v, 2) for k, v in baseline.items()},
        "recovered_s_after_drop": recovery,
        "log_errors": [ln for ln in tail.splitlines() if "ERROR" in ln or "Traceback" in ln][-10:],
    }
    out.update(summary=summary, series=series, config=server.config_text)

    cols = ["s", "offered", "acked", "unsent_bytes", "unread_bytes", "commit_p50_ms",
            "commit_p99_ms",
            "reader_p99_ms", "probe_commit_p99_ms", "probe_reader_p99_ms", "rss_kib",
            "store_queued", "readyz", "busy_closes", "away", "errors"]  # fmt: skip
    print("\noverload: per second (s from the baseline's start; the overload at"
          f" {over0}, the drop at {drop})")  # fmt: skip
    print("  " + " ".join(f"{c[:14]:>14}" for c in cols))
    for r in series:
        print("  " + " ".join(f"{str(r.get(c, '')):>14}" for c in cols))
    print("\nsummary")
    for k, v in summary.items():
        print(f"  {k}: {v}")
    print(json.dumps({"scenario": "overload", "R": summary["R_committed_per_s"],
                      "acked_lost": len(lost), "recovered_s_after_drop": recovery}))  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1, default=str))
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if not lost and len(acked) > 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
