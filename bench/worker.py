"""One load-generator process: many client connections on one asyncio loop.

The orchestrator (``bench/load.py``) starts a few of these with
multiprocessing and drives them over a Pipe with small command dicts; each
command runs to completion and is answered with one reply dict. Every phase
is bounded: connects and joins have timeouts, every measured phase ends at an
absolute ``t1`` (CLOCK_MONOTONIC ns), and draining stops after a few seconds
at most.

Measured phases share one shape: the orchestrator picks ``t0``/``t1`` a little
in the future; publishers start ``warm`` seconds before ``t0``; received
frames are counted only between ``t0`` and ``t1`` (a flag flipped by timers at
those instants), and the process's own CPU time (``resource.getrusage``) is
read at the same instants, so the reply says how much CPU the load generator
itself burnt for what it measured.

The big-room and reconnect-storm scenarios keep a ``Member`` per simulated
user, which outlives its connections: ``big_join`` sends every member's
``join_room`` at one instant and waits (up to a deadline) for the acks;
``storm_start`` starts, in the background, a task per member that notices
the connection's loss and reconnects with the back-off below, and a
publisher; ``storm_target``, ``storm_status`` and ``storm_stop`` are served
while those tasks run (the orchestrator restarts the server meanwhile).

Reconnect back-off (``backoff``): a member whose connection is lost waits a
random 0-``first_jitter`` s (100 ms by default), then connects; after a
failed attempt (connection refused, no 101 within the timeout, or closed
before its ``join_room_ack``, e.g. 1013 "Server full" / "try again later")
it waits ``min(cap, base * 2**(k-1))`` s times a random factor in [0.5, 1.5)
before attempt k+1 (base 0.1 s, cap 1 s by default), until the scenario's
deadline; it never gives up before that. The storm's publisher alone retries
every 50 ms from its loss on (a TCP connect given 1 s), and the others make
their first attempt once it is back (``storm_go``, at most 1 s after the
restarted server listens), so that the storm has its traffic from its first
moment; without that head start the publisher, one of 10,000, came back
with the last of them and the storm had no messages to time. The reference ``WebSocketClient``
(``chatd/web/websocket-client.js``) waits 1 s, 2 s, ... 5 s without jitter
and gives up after 5 attempts: 10,000 of those would come back in lockstep,
and 6 s or more after a quick restart.
"""

from __future__ import annotations

import asyncio
import bisect
import gc
import json
import os
import random
import resource
import time
from collections import Counter
from functools import partial
from typing import Any

import jwt
from wsclient import (
    COUNT,
    IDLE,
    LATENCY,
    MONO,
    OWN,
    PRESENCE,
    STORM,
    Client,
    Stats,
    frame,
    probe,
    probes,
)

CONNECT_TIMEOUT = 20.0
JOIN_TIMEOUT = 60.0
ACK_KEY = b'"join_room_ack"'
#: commands answered at once, between the steps of a running storm: no
#: garbage collection after them (a full collection over 10,000 connections
#: pauses the process for tens of ms)
LIGHT = {"held", "storm_target", "storm_status", "storm_go", "reconnect_status"}


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def backoff(k: int, base: float, cap: float) -> float:
    """Seconds to wait after the k-th failed reconnect attempt (k >= 1)."""
    return min(cap, base * 2 ** (k - 1)) * random.uniform(0.5, 1.5)


class Member:
    """One simulated user of the big room and the storm: its connection of
    the moment and what it has received, across reconnects."""

    __slots__ = (
        "ack_ns",
        "attempts",
        "back_ns",
        "caught_ns",
        "client",
        "dups",
        "joined",
        "last_id",
        "lost_ns",
        "n_after",
        "n_pre",
        "not_recovered",
        "since0",
        "uid",
    )

    def __init__(self, uid: int, client: Client | None) -> None:
        self.uid = uid
        self.client = client
        self.joined = False  # on its current connection
        self.last_id = 0  # the newest room message id it has received
        self.since0 = -1  # last_id when its connection was first lost (-1: not yet)
        self.lost_ns = 0
        self.back_ns = 0  # join_room_ack received after the loss
        self.caught_ns = 0  # back, and every message up to the target received
        self.attempts = 0  # connection attempts after the loss
        self.n_pre = 0  # ids in (since0, target] received after the loss
        self.n_after = 0  # ids above since0 received after the loss (none twice)
        self.dups = 0  # ids received again (at or below last_id) after the loss
        self.not_recovered = False
        self.ack_ns = 0  # big room: when its join_room_ack arrived


class Worker:
    #: The client class ``open_one`` makes (bench/readstate_worker.py's
    #: worker makes its own).
    client_class: type[Client] = Client

    def __init__(self, index: int, secret: str) -> None:
        self.index = index
        self.secret = secret
        self.stats = Stats()
        self.clients: list[Client] = []
        self.errors: Counter[str] = Counter()
        self.cpu_window = 0.0
        self.members: list[Member] = []
        self.acks: list[asyncio.Future[bytes]] = []
        self.quiet = 0.5  # big room: nothing received this long = the presence is all in
        self.storm: dict[str, Any] | None = None
        self.reconnecting: dict[str, Any] | None = None

    def token(self, user_id: int, jti: int | None = None) -> str:
        """A token for ``user_id``; a ``jti`` makes it unlike any other."""
        now = int(time.time())
        body: dict[str, Any] = {
            "user_id": user_id,
            "username": f"u{user_id}",
            "iat": now,
            "exp": now + 7200,
        }
        if jti is not None:
            body["jti"] = f"{self.index}-{jti}"
        return jwt.encode(body, self.secret, algorithm="HS256")

    # --- connections ---------------------------------------------------------

    async def open_one(
        self, port: int, user_id: int, deflate: bool, room: str | None
    ) -> Client | None:
        loop = asyncio.get_running_loop()
        target = f"/ws/chat?token={self.token(user_id)}"
        client: Client | None = None
        try:
            _, client = await asyncio.wait_for(
                loop.create_connection(
                    partial(self.client_class, self.stats, target, deflate), "127.0.0.1", port
                ),
                CONNECT_TIMEOUT,
            )
            await asyncio.wait_for(client.ready, CONNECT_TIMEOUT)
            if room is not None:
                ack = client.expect(b'"join_room_ack"')
                client.send_text(json.dumps({"type": "join_room", "data": {"room": room}}).encode())
                await asyncio.wait_for(ack, JOIN_TIMEOUT)
            return client
        except Exception as exc:  # noqa: BLE001 - every failure is counted, none is fatal
            self.errors[f"connect: {type(exc).__name__}: {str(exc)[:60]}"] += 1
            if client is not None:
                client.abort()
            return None

    async def connect(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Open ``n`` connections (users ``uid0``..), join ``room`` (or per-client rooms)."""
        n, port, deflate = cmd["n"], cmd["port"], cmd["deflate"]
        room, rooms = cmd.get("room"), cmd.get("rooms")
        sem = asyncio.Semaphore(cmd.get("concurrency", 50))
        started = MONO()

        async def one(k: int) -> Client | None:
            async with sem:
                r = rooms[k] if rooms else room
                c = await self.open_one(port, cmd["uid0"] + k, deflate, r)
                if c is not None:
                    c.own_room = r  # type: ignore[attr-defined]
                    c.uid = cmd["uid0"] + k  # type: ignore[attr-defined]
                    c.port = port  # type: ignore[attr-defined]
                return c

        got = await asyncio.gather(*(one(k) for k in range(n)))
        new = [c for c in got if c is not None]
        self.clients.extend(new)
        deflated = sum(1 for c in new if c.inflater is not None)
        return {
            "opened": len(new),
            "deflate_negotiated": deflated,
            "seconds": (MONO() - started) / 1e9,
            "errors": dict(self.errors),
        }

    async def drain(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Wait until nothing arrived for ``quiet`` s (at most ``limit`` s)."""
        quiet = int(cmd.get("quiet", 0.3) * 1e9)
        deadline = MONO() + int(cmd.get("limit", 10) * 1e9)
        while MONO() < deadline:
            if MONO() - self.stats.last_rx_ns > quiet:
                break
            await asyncio.sleep(0.05)
        return {"open": sum(1 for c in self.clients if c.is_open)}

    async def close_all(self, cmd: dict[str, Any]) -> dict[str, Any]:
        if self.storm is not None:
            await self.storm_stop({"drain": 0})
        have = {id(c) for c in self.clients}
        for m in self.members:
            if m.client is not None and id(m.client) not in have:
                self.clients.append(m.client)
        self.members = []
        self.acks = []
        for c in self.clients:
            c.mode = IDLE
            c.on_own = None
            if not cmd.get("abort"):  # (abort: a reset for all, at once)
                c.start_close()
        pending = [c.closed for c in self.clients if not c.closed.done()]
        if pending and not cmd.get("abort"):
            await asyncio.wait(pending, timeout=cmd.get("limit", 5.0))
        for c in self.clients:
            if not c.closed.done():
                c.abort()
        n = len(self.clients)
        self.clients = []
        self.errors.clear()
        return {"closed": n}

    def held(self, cmd: dict[str, Any]) -> dict[str, Any]:
        return {"open": sum(1 for c in self.clients if c.is_open), "total": len(self.clients)}

    # --- measured phases -----------------------------------------------------

    async def window(self, t0: int, t1: int) -> None:
        """Flip the counting flag and read CPU at t0 and t1."""
        await asyncio.sleep(max(0.0, (t0 - MONO()) / 1e9))
        self.stats.counting = True
        c0 = cpu_seconds()
        await asyncio.sleep(max(0.0, (t1 - MONO()) / 1e9))
        self.stats.counting = False
        self.cpu_window = cpu_seconds() - c0

    def reset(self) -> None:
        s = self.stats
        s.rx = s.other = s.own_rx = 0
        s.lat_chunks = []
        s.own_lat = []
        self.cpu_window = 0.0

    async def closed_loop(self, cmd: dict[str, Any], publishers: list[Client]) -> int:
        """Each publisher keeps ``window`` messages in flight: a new one goes out
        when its own copy (the one carrying its request_id) comes back."""
        t0, t1, warm = cmd["t0"], cmd["t1"], int(cmd["warm"] * 1e9)
        size = cmd["size"]
        sent = 0
        # ``contents`` (optional): texts the messages take in turn (all
        # publishers of this worker together) instead of ``size`` x's
        texts = [t.encode() for t in cmd.get("contents") or ()]
        turn = 0

        def payload(c: Client) -> bytes:
            return (
                b'{"type":"room_message","data":{"room":"'
                + c.room.encode()  # type: ignore[attr-defined]
                + b'","content":"'
                + b"x" * size
                + b'"},"request_id":1}'
            )

        def send(c: Client, now: int) -> None:
            nonlocal sent, turn
            if now < t1 and c.is_open:
                c.sent.append(MONO())
                if texts:
                    turn = (turn + 1) % len(texts)
                    head = c.head  # type: ignore[attr-defined]
                    c.send_text(head + texts[turn] + b'"},"request_id":1}')
                else:
                    c.send_text(c.pl)  # type: ignore[attr-defined]
                sent += 1

        await asyncio.sleep(max(0.0, (t0 - warm - MONO()) / 1e9))
        for c in publishers:
            c.pl = payload(c)  # type: ignore[attr-defined]
            c.head = c.pl[: c.pl.index(b'"content":"') + 11]  # type: ignore[attr-defined]
            c.mode = OWN
            c.on_own = send
            for _ in range(cmd["window"]):
                send(c, MONO())
        await self.window(t0, t1)
        for c in publishers:
            c.on_own = None
        return sent

    async def fanout(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Deliveries/s: every client counts room_message frames; the first
        ``publishers`` clients of this worker also publish (closed loop)."""
        self.reset()
        for c in self.clients:
            c.mode = COUNT
            c.room = cmd["room"]  # type: ignore[attr-defined]
        pubs = self.clients[: cmd["publishers"]]
        sent = await self.closed_loop(cmd, pubs)
        await self.drain({"quiet": 0.3, "limit": 5})
        for c in pubs:
            c.mode = COUNT
        return {
            "rx": self.stats.rx,
            "other": self.stats.other,
            "sent": sent,
            "cpu": self.cpu_window,
            "open": sum(1 for c in self.clients if c.is_open),
        }

    async def commit(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Every client publishes in its own room and waits for its own copy."""
        self.reset()
        for c in self.clients:
            c.room = c.own_room  # type: ignore[attr-defined]
        sent = await self.closed_loop(cmd, self.clients)
        await self.drain({"quiet": 0.3, "limit": 5})
        lat = self.stats.own_lat
        return {
            "acked": self.stats.own_rx,
            "sent": sent,
            "cpu": self.cpu_window,
            "lat_ns": lat[:: max(1, len(lat) // 200_000)],
            "open": sum(1 for c in self.clients if c.is_open),
        }

    async def latency(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """A fixed offered load: the publisher (if any) sends ``rate`` msgs/s,
        each carrying its sequence number and send time; receivers note each
        received chunk's first and last probe, and after the window that
        becomes, per message, the latest arrival among this worker's clients
        and how many of them it reached."""
        self.reset()
        for c in self.clients:
            c.mode = LATENCY
        t0, t1, warm = cmd["t0"], cmd["t1"], int(cmd["warm"] * 1e9)
        sent = 0
        pub = self.clients[0] if cmd["publish"] and self.clients else None
        room = cmd["room"].encode()
        pad = cmd["size"]
        sent_at: list[int] = []

        async def publish() -> None:
            nonlocal sent
            start = t0 - warm
            await asyncio.sleep(max(0.0, (start - MONO()) / 1e9))
            rate = cmd["rate"]
            while True:
                now = MONO()
                if now >= t1 or pub is None or not pub.is_open:
                    break
                due = int((now - start) * rate / 1e9) + 1
                while sent < due:
                    at = MONO()
                    sent_at.append(at)
                    stamp = probe(sent, at)
                    content = stamp + b"x" * max(0, pad - len(stamp))
                    pub.send_text(
                        b'{"type":"room_message","data":{"room":"'
                        + room
                        + b'","content":"'
                        + content
                        + b'"}}'
                    )
                    sent += 1
                await asyncio.sleep(0.0005)

        tasks = [asyncio.ensure_future(self.window(t0, t1))]
        if pub is not None:
            tasks.append(asyncio.ensure_future(publish()))
        await asyncio.gather(*tasks)
        await self.drain({"quiet": 0.5, "limit": 5})
        arrived, out_of_order = probes(self.stats.lat_chunks)
        self.stats.lat_chunks = []
        return {
            "sent": sent,
            "cpu": self.cpu_window,
            # seq -> [send ns (0: published elsewhere), latest arrival, reached]
            "latency": {
                seq: [sent_at[seq] if seq < len(sent_at) else 0, last, count]
                for seq, (last, count) in arrived.items()
            },
            "out_of_order": out_of_order,
            "open": sum(1 for c in self.clients if c.is_open),
        }

    async def handshakes(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """``concurrency`` loops of: connect, upgrade with a token, 101, ping,
        pong (the server has checked the token and runs the connection), close
        frame, the server's close frame, reset. The ``users`` users take turns;
        each has one token, used again and again, or with ``unique`` a new
        token for every handshake (signed here, before its connect: no
        server has seen it)."""
        self.reset()
        port, t0, t1 = cmd["port"], cmd["t0"], cmd["t1"]
        users = cmd["users"]
        unique = cmd.get("unique", False)
        tokens = [self.token(cmd["uid0"] + k) for k in range(users)]
        issued = 0
        loop = asyncio.get_running_loop()
        done = 0
        times: list[int] = []
        errors: Counter[str] = Counter()
        warm = int(cmd["warm"] * 1e9)

        async def one(k: int) -> None:
            nonlocal done, issued
            await asyncio.sleep(max(0.0, (t0 - warm - MONO()) / 1e9))
            i = k
            while MONO() < t1:
                i = (i + cmd["concurrency"]) % users
                if unique:
                    issued += 1
                    token = self.token(cmd["uid0"] + i, issued)
                else:
                    token = tokens[i]
                started = MONO()
                client: Client | None = None
                try:
                    _, client = await asyncio.wait_for(
                        loop.create_connection(
                            partial(Client, self.stats, f"/ws/chat?token={token}", False),
                            "127.0.0.1",
                            port,
                        ),
                        CONNECT_TIMEOUT,
                    )
                    await asyncio.wait_for(client.ready, CONNECT_TIMEOUT)
                    pong = client.expect(b"<pong>")
                    client.send_raw(frame(b"hs", 9))
                    await asyncio.wait_for(pong, CONNECT_TIMEOUT)
                    if self.stats.counting:
                        done += 1
                        times.append(MONO() - started)
                    closing = client.expect(b"<close>")
                    client.start_close()
                    await asyncio.wait_for(asyncio.shield(closing), 2.0)
                except Exception as exc:  # noqa: BLE001
                    errors[f"{type(exc).__name__}: {str(exc)[:60]}"] += 1
                    await asyncio.sleep(0.01)
                finally:
                    if client is not None:
                        client.abort()

        await asyncio.gather(self.window(t0, t1), *(one(k) for k in range(cmd["concurrency"])))
        return {"done": done, "cpu": self.cpu_window, "errors": dict(errors), "lat_ns": times}

    # --- batching clients -----------------------------------------------------

    async def commit_batch(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Like ``commit``, but every client sends its messages in
        ``message_batch`` frames (at most ``batch`` entries each), keeping
        ``window`` messages in flight: the own copies that came back in one
        read (or in one pass of the event loop) are replaced by one batch."""
        self.reset()
        loop = asyncio.get_running_loop()
        t0, t1, warm = cmd["t0"], cmd["t1"], int(cmd["warm"] * 1e9)
        per_batch, content = cmd["batch"], b"x" * cmd["size"]
        sent = batches = 0
        rid = 0

        def flush(c: Client) -> None:
            nonlocal sent, batches, rid
            c.flushing = False  # type: ignore[attr-defined]
            now = MONO()
            if now >= t1 or not c.is_open:
                return
            head = c.entry  # type: ignore[attr-defined]
            while c.free > 0:  # type: ignore[attr-defined]
                k = min(c.free, per_batch)  # type: ignore[attr-defined]
                entries = []
                for _ in range(k):
                    rid += 1
                    entries.append(head + b"%d}" % rid)
                c.sent.extend([now] * k)
                c.send_text(
                    b'{"type":"message_batch","data":{"messages":[' + b",".join(entries) + b"]}}"
                )
                c.free -= k  # type: ignore[attr-defined]
                sent += k
                batches += 1

        def on_own(c: Client, now: int) -> None:
            c.free += 1  # type: ignore[attr-defined]
            if not c.flushing:  # type: ignore[attr-defined]
                c.flushing = True  # type: ignore[attr-defined]
                loop.call_soon(flush, c)

        await asyncio.sleep(max(0.0, (t0 - warm - MONO()) / 1e9))
        for c in self.clients:
            c.entry = (  # type: ignore[attr-defined]
                b'{"type":"room_message","data":{"room":"'
                + c.own_room.encode()  # type: ignore[attr-defined]
                + b'","content":"'
                + content
                + b'"},"request_id":'
            )
            c.mode = OWN
            c.on_own = on_own
            c.free = cmd["window"]  # type: ignore[attr-defined]
            c.flushing = False  # type: ignore[attr-defined]
            flush(c)
        await self.window(t0, t1)
        for c in self.clients:
            c.on_own = None
        await self.drain({"quiet": 0.3, "limit": 5})
        lat = self.stats.own_lat
        return {
            "acked": self.stats.own_rx,
            "sent": sent,
            "batches": batches,
            "other": self.stats.other,
            "cpu": self.cpu_window,
            "lat_ns": lat[:: max(1, len(lat) // 200_000)],
            "open": sum(1 for c in self.clients if c.is_open),
        }

    async def batch_probe(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Does the server understand ``message_batch``? One batch of one
        message from the first client: its own copy back (yes), or an error
        frame (no), within ``timeout`` s."""
        if not self.clients:
            return {"answer": "no client"}
        c = self.clients[0]
        loop = asyncio.get_running_loop()
        copy: asyncio.Future[bytes] = loop.create_future()
        error = c.expect(b'"error"')

        def on_own(_c: Client, _now: int) -> None:
            if not copy.done():
                copy.set_result(b"copy")

        c.mode = OWN
        c.on_own = on_own
        c.sent.append(MONO())
        room = c.own_room.encode()  # type: ignore[attr-defined]
        c.send_text(
            b'{"type":"message_batch","data":{"messages":[{"type":"room_message","data":'
            b'{"room":"' + room + b'","content":"probe"},"request_id":1}]}}'
        )
        done, _ = await asyncio.wait(
            {copy, error}, timeout=cmd.get("timeout", 3.0), return_when=asyncio.FIRST_COMPLETED
        )
        c.on_own = None
        c.mode = IDLE
        c.waiter = None
        c.sent.clear()
        if copy in done:
            answer = "copy"
        elif error in done and not error.exception():
            answer = bytes(error.result()[:300]).decode("utf-8", "replace")
        else:
            answer = "no answer"
        await self.drain({"quiet": 0.2, "limit": 2})
        return {"supported": copy in done, "answer": answer}

    # --- one big room -----------------------------------------------------------

    def _member_counts(self) -> dict[str, Any]:
        ms = self.members
        rx = [m.client.rx_bytes if m.client else 0 for m in ms]
        frames = [m.client.frames_rx if m.client else 0 for m in ms]
        pres = [m.client.presence_rx if m.client else 0 for m in ms]
        return {
            "rx_bytes": sum(rx),
            "rx_bytes_max": max(rx, default=0),
            "frames": sum(frames),
            "frames_max": max(frames, default=0),
            "presence_frames": sum(pres),
            "presence_frames_max": max(pres, default=0),
            "user_presence": self.stats.presence,
            "room_presence": self.stats.summaries,
        }

    async def big_join(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Every open connection becomes a member and, at ``t0``, sends
        ``join_room``; wait for the acks until ``deadline`` (ns); then until
        nothing has arrived for 0.5 s (the presence frames still on their
        way), at most 10 s. Frames and bytes received are counted per
        connection from ``t0``."""
        self.quiet = cmd.get("quiet", 0.5)
        self.members = [Member(c.uid, c) for c in self.clients if c.is_open]  # type: ignore[attr-defined]
        self.clients = []
        self.stats.presence = self.stats.summaries = 0
        join = json.dumps({"type": "join_room", "data": {"room": cmd["room"]}}).encode()
        for m in self.members:
            c = m.client
            assert c is not None
            c.mode = PRESENCE
            c.rx_bytes = c.frames_rx = c.presence_rx = 0
        await asyncio.sleep(max(0.0, (cmd["t0"] - MONO()) / 1e9))
        self.cpu_window = cpu_seconds()
        first = MONO()
        self.acks = []
        for m in self.members:
            c = m.client
            assert c is not None
            self.acks.append(c.expect(ACK_KEY))
            c.send_text(join)
        last_sent = MONO()
        return await self._big_wait(cmd["deadline"], first, last_sent)

    async def big_wait(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Wait (until ``deadline``) for the joins still without an ack."""
        return await self._big_wait(cmd["deadline"], 0, 0)

    async def _big_wait(self, deadline: int, first: int, last_sent: int) -> dict[str, Any]:
        pending = [f for f in self.acks if not f.done()]
        waited = MONO()
        if pending:
            await asyncio.wait(pending, timeout=max(0.0, (deadline - MONO()) / 1e9))
        waited = MONO() - waited
        # this process's CPU seconds from the joins sent until the last ack
        cpu = cpu_seconds() - self.cpu_window if first else 0.0
        errors: Counter[str] = Counter()
        acks = []
        for m, f in zip(self.members, self.acks, strict=True):
            if f.done():
                if f.exception() is None:
                    m.joined = True
                    m.ack_ns = m.client.ack_ns if m.client else 0
                    acks.append(m.ack_ns)
                else:
                    errors[f"{type(f.exception()).__name__}: {f.exception()}"[:80]] += 1
        if first or pending:  # the presence frames still on their way
            await self.drain({"quiet": self.quiet, "limit": 10})
        out = {
            "members": len(self.members),
            "joined": len(acks),
            "first_sent": first,
            "last_sent": last_sent,
            "cpu": cpu,
            "pending": len(pending),
            "waited_s": waited / 1e9,
            "acks": acks,
            "open": sum(1 for m in self.members if m.client and m.client.is_open),
            "errors": dict(errors),
            "closes": dict(
                Counter(
                    str(m.client.close_code)
                    for m in self.members
                    if m.client and m.client.close_code is not None
                )
            ),
        }
        out.update(self._member_counts())
        return out

    def big_drop(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Close (RST) the members whose join got no ack: they are not in the room."""
        keep, dropped = [], 0
        for m in self.members:
            if m.joined:
                keep.append(m)
            else:
                dropped += 1
                if m.client is not None:
                    m.client.abort()
        self.members = keep
        self.acks = []
        return {"dropped": dropped, "members": len(keep)}

    # --- idle connections reconnecting after a restart (bench/connections.py) ----

    async def reconnect_start(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """For every open client, in the background: once its connection is
        lost, reconnect (the same user, no room) with ``backoff`` until it
        is back or ``deadline`` (ns); return at once."""
        st: dict[str, Any] = {"back": 0, "attempts": 0, "tasks": []}
        base, cap, deadline = cmd["backoff_base"], cmd["backoff_cap"], cmd["deadline"]
        port = cmd.get("port")

        async def life(c: Client) -> None:
            await asyncio.shield(c.closed)
            k = 0
            while MONO() < deadline:
                k += 1
                await asyncio.sleep(backoff(k, base, cap))
                st["attempts"] += 1
                new = await self.open_one(port or c.port, c.uid, False, None)  # type: ignore[attr-defined]
                if new is not None:
                    new.uid = c.uid  # type: ignore[attr-defined]
                    new.port = port or c.port  # type: ignore[attr-defined]
                    self.clients.append(new)
                    st["back"] += 1
                    return

        for c in list(self.clients):
            if c.is_open:
                st["tasks"].append(asyncio.ensure_future(life(c)))
        self.reconnecting = st
        return {"waiting": len(st["tasks"])}

    def reconnect_status(self, cmd: dict[str, Any]) -> dict[str, Any]:
        st = self.reconnecting
        return {"back": st["back"], "attempts": st["attempts"]} if st else {"back": 0}

    async def reconnect_stop(self, cmd: dict[str, Any]) -> dict[str, Any]:
        st = self.reconnecting
        if st:
            for task in st["tasks"]:
                task.cancel()
            await asyncio.gather(*st["tasks"], return_exceptions=True)
        self.reconnecting = None
        self.clients = [c for c in self.clients if c.is_open]
        return {"open": len(self.clients), "errors": dict(self.errors)}

    # --- reconnect storm -------------------------------------------------------

    async def storm_start(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Start, in the background, one task per member (it notices the
        loss of its connection and reconnects, see ``backoff``) and, when
        ``publish``, a publisher (the first member) sending ``rate`` msgs/s
        with probes; return at once. ``since``: rejoin with ``since_id`` (the
        newest id received); ``ids``: room ids increase across the restart
        (the server keeps history), so ids are checked."""
        loop = asyncio.get_running_loop()
        st: dict[str, Any] = {
            "target": None,  # the newest id committed before the restart
            "ids": [],  # the room's ids up to target, sorted
            "deadline": cmd["deadline"],
            "arrivals": {},  # seq -> [latest arrival, members reached]
            "sent_at": [],  # seq -> send ns (0: not sent, the publisher was away)
            "closes": Counter(),
            "errors": Counter(),
            "stop": loop.create_future(),
            # the members (not the publisher) make their first attempt once
            # this is set: when the publisher is back (``storm_go``)
            "go": asyncio.Event(),
        }
        self.storm = st
        self.stats.presence = self.stats.summaries = 0
        room = cmd["room"]
        since, check_ids = cmd["since"], cmd["ids"]
        base, cap, jitter = cmd["backoff_base"], cmd["backoff_cap"], cmd["first_jitter"]
        arrivals: dict[int, list[int]] = st["arrivals"]
        port = cmd["port"]

        def caught(m: Member, now: int) -> None:
            target = st["target"]
            if not check_ids:
                m.caught_ns = m.back_ns
                return
            if target is None or m.last_id < target:
                return
            ids = st["ids"]
            expected = bisect.bisect_right(ids, target) - bisect.bisect_right(ids, m.since0)
            if m.n_pre >= expected:
                m.caught_ns = now

        def on_msg(c: Client, msg_id: int, seq: int, now: int) -> None:
            m: Member = c.member  # type: ignore[attr-defined]
            if seq >= 0:
                rec = arrivals.get(seq)
                if rec is None:
                    arrivals[seq] = [now, 1]
                else:
                    rec[1] += 1
                    if now > rec[0]:
                        rec[0] = now
            if m.since0 < 0 or not check_ids:
                m.last_id = max(m.last_id, msg_id)
                return
            if msg_id <= m.last_id:
                m.dups += 1
                return
            m.last_id = msg_id
            m.n_after += 1
            target = st["target"]
            if target is not None and msg_id <= target:
                m.n_pre += 1
            if not m.caught_ns and m.back_ns:
                caught(m, now)

        def attach(m: Member, c: Client) -> None:
            c.member = m  # type: ignore[attr-defined]
            c.mode = STORM
            c.on_msg = on_msg
            m.client = c

        async def life(m: Member) -> None:
            loop = asyncio.get_running_loop()
            stop = st["stop"]
            c = m.client
            if c is not None and c.is_open:
                await asyncio.shield(c.closed)
            m.lost_ns = MONO()
            m.since0 = m.last_id
            m.joined = False
            st["closes"][str(c.close_code) if c is not None else "none"] += 1
            delay = 0.0 if m is publisher else random.uniform(0, jitter)
            if m is not publisher:
                go = asyncio.ensure_future(st["go"].wait())
                await asyncio.wait(
                    {go, stop},
                    timeout=max(0.0, (st["deadline"] - MONO()) / 1e9),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                go.cancel()
            k = 0
            while True:
                await asyncio.sleep(delay)
                left = (st["deadline"] - MONO()) / 1e9
                if left <= 0 or stop.done():
                    return
                m.attempts += 1
                k += 1
                # the publisher comes back as soon as it can: the storm's traffic
                delay = 0.05 if m is publisher else backoff(k, base, cap)
                c = None
                target = targets[m.uid]
                # the publisher does not sit out a dropped SYN's retransmits
                timeout = min(CONNECT_TIMEOUT, left)
                tcp_timeout = min(1.0, timeout) if m is publisher else timeout
                try:
                    _, c = await asyncio.wait_for(
                        loop.create_connection(
                            partial(Client, self.stats, target, False),
                            "127.0.0.1",
                            port,
                        ),
                        tcp_timeout,
                    )
                    attach(m, c)
                    await asyncio.wait_for(c.ready, timeout)
                    ack = c.expect(ACK_KEY)
                    data: dict[str, Any] = {"room": room}
                    if since:
                        data["since_id"] = m.last_id
                    c.send_text(json.dumps({"type": "join_room", "data": data}).encode())
                    # in slices: the deadline can move closer meanwhile
                    while not ack.done():
                        left = (st["deadline"] - MONO()) / 1e9
                        if left <= 0 or stop.done():
                            raise TimeoutError("no join_room_ack before the deadline")
                        await asyncio.wait({ack}, timeout=min(0.5, left))
                    ack.result()
                except Exception as exc:  # counted, then the next attempt
                    if c is not None and c.close_code is not None:  # refused: 1013, ...
                        st["errors"][f"closed {c.close_code} {c.close_reason}"[:60]] += 1
                    elif isinstance(exc, OSError) and exc.errno:
                        st["errors"][f"{type(exc).__name__} (errno {exc.errno})"] += 1
                    elif isinstance(exc, TimeoutError) and not str(exc):
                        st["errors"]["TimeoutError: no connection or no 101 in time"] += 1
                    else:
                        st["errors"][f"{type(exc).__name__}: {str(exc)[:50]}"] += 1
                    if c is not None:
                        c.abort()
                    continue
                m.joined = True
                m.back_ns = c.ack_ns
                m.not_recovered = c.not_recovered
                if not m.caught_ns:
                    caught(m, c.ack_ns)
                await asyncio.shield(c.closed)  # a second loss: around again
                if stop.done():
                    return
                m.joined = False
                st["closes"][str(c.close_code)] += 1
                delay = random.uniform(0, jitter)
                k = 0

        async def publish(pub: Member, rate: float) -> None:
            sent_at: list[int] = st["sent_at"]
            start = MONO()
            seq = 0
            tick = min(0.005, 0.25 / rate)
            while MONO() < st["deadline"] and not st["stop"].done():
                due = int((MONO() - start) * rate / 1e9) + 1
                while seq < due:
                    c = pub.client
                    if c is not None and c.is_open and pub.joined:
                        at = MONO()
                        sent_at.append(at)
                        stamp = probe(seq, at)
                        c.send_text(
                            b'{"type":"room_message","data":{"room":"'
                            + room.encode()
                            + b'","content":"'
                            + stamp
                            + b"x" * max(0, 100 - len(stamp))
                            + b'"}}'
                        )
                    else:
                        sent_at.append(0)
                    seq += 1
                await asyncio.sleep(tick)

        publisher = self.members[0] if cmd["publish"] and self.members else None
        st["publisher"] = publisher
        # tokens made now, not in the storm (a JWT costs tens of µs here)
        targets = {m.uid: f"/ws/chat?token={self.token(m.uid)}" for m in self.members}
        for m in self.members:
            if m.client is not None:
                attach(m, m.client)
                c = m.client
                c.rx_bytes = c.frames_rx = c.presence_rx = 0
        st["tasks"] = [asyncio.ensure_future(life(m)) for m in self.members]
        if publisher is not None:
            st["tasks"].append(asyncio.ensure_future(publish(publisher, cmd["rate"])))
        return {"members": len(self.members)}

    def storm_target(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """The newest room id committed before the restart, and the room's ids."""
        st = self.storm
        if st is not None:
            st["target"] = cmd["target"]
            st["ids"] = sorted(cmd["ids"])
            st["deadline"] = cmd.get("deadline", st["deadline"])
        return {}

    def storm_go(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """The members may start reconnecting."""
        if self.storm is not None:
            self.storm["go"].set()
        return {}

    def storm_status(self, cmd: dict[str, Any]) -> dict[str, Any]:
        ms = self.members
        st = self.storm
        pub = st["publisher"] if st is not None else None
        return {
            "publisher_back": pub is not None and pub.joined and pub.lost_ns > 0,
            "cpu": cpu_seconds(),
            "members": len(ms),
            "lost": sum(1 for m in ms if m.lost_ns),
            "back": sum(1 for m in ms if m.back_ns),
            "caught": sum(1 for m in ms if m.caught_ns),
        }

    async def storm_stop(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Stop the publisher and the member tasks; after ``drain`` s of quiet
        (at most 5 s), report per member and the latency arrivals."""
        st = self.storm
        if st is None:
            return {}
        if not st["stop"].done():
            st["stop"].set_result(True)
        for t in st["tasks"]:
            t.cancel()
        # (asyncio.wait_for of Python 3.11 can swallow a cancel: the stop
        # flag ends those tasks at their next step, and this wait is bounded)
        if st["tasks"]:
            await asyncio.wait(st["tasks"], timeout=5)
        if cmd.get("drain", 0.5):
            await self.drain({"quiet": cmd.get("drain", 0.5), "limit": 5})
        self.storm = None
        ms = self.members
        out = {
            "members": [
                [
                    m.since0,
                    m.lost_ns,
                    m.back_ns,
                    m.caught_ns,
                    m.attempts,
                    m.n_after,
                    m.last_id,
                    m.dups,
                    int(m.not_recovered),
                ]
                for m in ms
            ],
            "arrivals": st["arrivals"],
            "sent_at": st["sent_at"],
            "closes": dict(st["closes"]),
            "errors": dict(st["errors"]),
            "open": sum(1 for m in ms if m.client and m.client.is_open),
        }
        out.update(self._member_counts())
        return out


def worker_main(conn: Any, index: int, secret: str, cpus: set[int] | None = None) -> None:
    """Process entry: serve commands from ``conn`` until ``exit`` (or EOF)."""
    raise_nofile()
    if cpus:
        os.sched_setaffinity(0, cpus)
    worker = Worker(index, secret)
    # The garbage collector runs between commands, never during one: a full
    # collection over a phase's per-message records paused this process for
    # ~20 ms mid-window, which the latency phase then reported as chatd's.
    gc.disable()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        loop.add_reader(conn.fileno(), ready.set)
        while True:
            await ready.wait()
            ready.clear()
            while conn.poll():
                try:
                    cmd = conn.recv()
                except EOFError:
                    return
                op = cmd["op"]
                if op == "exit":
                    return
                fn = getattr(worker, op)
                reply = await fn(cmd) if asyncio.iscoroutinefunction(fn) else fn(cmd)
                conn.send(reply)
                if op not in LIGHT:
                    gc.collect()

    asyncio.run(serve())
