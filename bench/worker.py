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
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import resource
import time
from collections import Counter
from functools import partial
from typing import Any

import jwt
from wsclient import COUNT, IDLE, LATENCY, MONO, OWN, Client, Stats, frame, probe, probes

CONNECT_TIMEOUT = 20.0
JOIN_TIMEOUT = 60.0


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class Worker:
    def __init__(self, index: int, secret: str) -> None:
        self.index = index
        self.secret = secret
        self.stats = Stats()
        self.clients: list[Client] = []
        self.errors: Counter[str] = Counter()
        self.cpu_window = 0.0

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
                    lambda: Client(self.stats, target, deflate), "127.0.0.1", port
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
        for c in self.clients:
            c.mode = IDLE
            c.on_own = None
            c.start_close()
        pending = [c.closed for c in self.clients if not c.closed.done()]
        if pending:
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

        def payload(c: Client) -> bytes:
            return (
                b'{"type":"room_message","data":{"room":"'
                + c.room.encode()  # type: ignore[attr-defined]
                + b'","content":"'
                + b"x" * size
                + b'"},"request_id":1}'
            )

        def send(c: Client, now: int) -> None:
            nonlocal sent
            if now < t1 and c.is_open:
                c.sent.append(MONO())
                c.send_text(c.pl)  # type: ignore[attr-defined]
                sent += 1

        await asyncio.sleep(max(0.0, (t0 - warm - MONO()) / 1e9))
        for c in publishers:
            c.pl = payload(c)  # type: ignore[attr-defined]
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
                if op == "held":
                    reply = worker.held(cmd)
                else:
                    reply = await getattr(worker, op)(cmd)
                conn.send(reply)
                gc.collect()

    asyncio.run(serve())
