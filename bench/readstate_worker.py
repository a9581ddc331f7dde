"""The load-generator side of bench/readstate.py: clients that mark read and type.

bench/worker.py's ``Worker`` and bench/wsclient.py's ``Client``, extended
(nothing in them changed): ``RClient`` is a ``Client`` in a mode of its own
(``MARK``) that the base class hands every whole text frame of a read (its
``_account`` hook, as for the storm's mode), and ``RWorker`` a ``Worker``
whose connections are ``RClient``s, with three more commands:

* ``rs_fanout``: one room; the first ``publishers`` clients publish with
  ``window`` messages in flight (load.py's closed loop: the next one leaves
  when its own copy comes back); every client counts ``room_message`` frames
  between ``t0`` and ``t1``, and reads the ids of those it receives (every
  id with ``parse_all``, else only the newest of each read: the same work
  whether or not it then marks). ``marks``: ``off``; ``every`` (a
  ``mark_read`` for every message received, sent with the read's others in
  one write); ``interval`` (each client marks its newest id once per
  ``mark_interval`` s, the clients' turns spread over that interval);
  ``nth`` (each client marks its newest id after every ``mark_every``
  messages received). ``publishers_mark`` false: the publishers do not
  mark (chatd makes a ``mark_read`` wait for the commit of the sender's
  newest message, and a publisher always has some in flight).
  ``typists`` clients (not publishers) send ``typing start`` every
  ``typing_interval`` s, also spread.
* ``typing_storm``: every client sends ``typing start`` at ``t0`` (all of a
  worker's in one pass of its loop) and again every ``renew`` s while
  ``t0 + duration`` is not past; until ``t_end`` every client counts the
  ``typing`` frames it receives (starts and stops), the worker per 100 ms of
  arrival, and notes when its count first reached ``expect`` (one from every
  other member).
* ``unread_calls``: its first client asks ``unread {}`` ``warm + n`` times,
  one at a time, and times each from the send to the ``unread_counts`` reply.

Client frames sent in bulk (``mark_read``, ``typing``) carry a zero masking
key: legal, and the server's unmasking costs the same for any key, but the
load generator skips the XOR (``wsclient.frame`` draws and applies a fresh
key per frame).
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

import worker
from worker import Worker, cpu_seconds
from wsclient import IDLE, MONO, REQUEST_ID, ROOM_MESSAGE, Client, Stats

#: A mode above the storm's: the base class hands every whole text frame to
#: ``_account`` (wsclient.Client.data_received).
MARK = 6
TYPING = b'{"type":"typing"'
STOP = b'"state":"stop"'
ACK = b'{"type":"mark_read_ack"'
ERROR = b'{"type":"error"'
ID_MARK = b'"id":'
BIN_NS = 100_000_000


def zframe(payload: bytes) -> bytes:
    """A client text frame (FIN) with a zero masking key: the payload as is."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, 0x80 | n)) + b"\0\0\0\0" + payload
    return struct.pack("!BBH", 0x81, 0xFE, n) + b"\0\0\0\0" + payload


class RStats(Stats):
    """wsclient.Stats, and what the read-state scenarios count."""

    def __init__(self) -> None:
        super().__init__()
        self.acks = 0  # mark_read_ack frames (while counting)
        self.typing = 0  # typing frames (while counting)
        self.typing_stop = 0
        self.errors = 0  # error frames (while counting)
        self.error_sample = b""
        self.marks_sent = 0  # mark_read frames sent (while counting)
        self.bin0 = 0
        self.bins: dict[int, int] | None = None  # typing frames per 100 ms from bin0


class RClient(Client):
    """A ``Client`` that reads message ids, marks read and counts typing."""

    def __init__(self, stats: RStats, target: str, deflate: bool) -> None:
        super().__init__(stats, target, deflate)
        self.stats: RStats = stats
        self.room = ""
        self.parse_all = False  # read every room_message's id (else the newest of a read)
        self.mark_all = False  # ... and mark each read
        self.mark_every = 0  # mark the newest after every this many (0: not)
        self.since_mark = 0
        self.mark_prefix = b""
        self.last_id = 0  # the newest room_message id received
        self.marked_id = 0  # the newest id marked read
        self.typing_rx = 0
        self.typing_stop_rx = 0
        self.expect_typing = 0  # typing frames that make a full round
        self.full_ns = 0  # when typing_rx first reached expect_typing

    def set_room(self, room: str) -> None:
        self.room = room
        self.mark_prefix = (
            b'{"type":"mark_read","data":{"room":"' + room.encode() + b'","message_id":'
        )

    def mark(self, message_id: bytes) -> bytes:
        return zframe(self.mark_prefix + message_id + b"}}")

    def _account(self, buf: bytes, lo: int, hi: int, frames: int, now: int) -> None:
        """``frames`` whole text frames in ``buf[lo:hi]`` (headers included)."""
        stats = self.stats
        stats.last_rx_ns = now
        self.frames_rx += frames
        counting = stats.counting
        rm = buf.count(ROOM_MESSAGE, lo, hi)
        if frames > rm:
            t = buf.count(TYPING, lo, hi)
            a = buf.count(ACK, lo, hi)
            e = buf.count(ERROR, lo, hi)
            if t:
                s = buf.count(STOP, lo, hi)
                self.typing_rx += t
                self.typing_stop_rx += s
                if not self.full_ns and self.expect_typing and self.typing_rx >= self.expect_typing:
                    self.full_ns = now
                if stats.bins is not None:
                    k = (now - stats.bin0) // BIN_NS
                    stats.bins[k] = stats.bins.get(k, 0) + t
                if counting:
                    stats.typing += t
                    stats.typing_stop += s
            if e and not stats.error_sample:
                j = buf.find(ERROR, lo, hi)
                stats.error_sample = bytes(buf[j : j + 200])
            if counting:
                stats.acks += a
                stats.errors += e
                stats.other += frames - rm - t - a - e
            if self.waiter is not None and buf.find(self.waiter_key, lo, hi) >= 0:
                self.ack_ns = now
                waiter, self.waiter = self.waiter, None
                if not waiter.done():
                    waiter.set_result(b"")
        if rm:
            if counting:
                stats.rx += rm
            if self.parse_all:
                marks = []
                p = buf.find(ROOM_MESSAGE, lo, hi)
                while p >= 0:
                    j = buf.find(ID_MARK, p, hi) + len(ID_MARK)
                    e = buf.find(b",", j, hi)
                    marks.append(buf[j:e])
                    p = buf.find(ROOM_MESSAGE, e, hi)
                self.last_id = int(marks[-1])
                if self.mark_all:
                    self.send_raw(b"".join([self.mark(m) for m in marks]))
                    self.marked_id = self.last_id
                    if counting:
                        stats.marks_sent += len(marks)
            else:
                p = buf.rfind(ROOM_MESSAGE, lo, hi)
                j = buf.find(ID_MARK, p, hi) + len(ID_MARK)
                newest = buf[j : buf.find(b",", j, hi)]
                self.last_id = int(newest)
                if self.mark_every:
                    self.since_mark += rm
                    if self.since_mark >= self.mark_every:
                        self.since_mark = 0
                        self.send_raw(self.mark(newest))
                        self.marked_id = self.last_id
                        if counting:
                            stats.marks_sent += 1
        # own copies (and refusals) of this client's messages: they carry its request_id
        own = buf.count(REQUEST_ID, lo, hi) if self.sent else 0
        for _ in range(own):
            if not self.sent:
                break
            sent = self.sent.popleft()
            if counting:
                stats.own_rx += 1
                stats.own_lat.append(now - sent)
            if self.on_own is not None:
                self.on_own(self, now)


class RWorker(Worker):
    stats: RStats
    client_class = RClient

    def __init__(self, index: int, secret: str) -> None:
        super().__init__(index, secret)
        self.stats = RStats()

    def reset(self) -> None:
        super().reset()
        s = self.stats
        s.acks = s.typing = s.typing_stop = s.errors = s.marks_sent = 0
        s.error_sample = b""
        s.bins = None

    def counts(self) -> dict[str, Any]:
        s = self.stats
        return {
            "rx": s.rx,
            "own_rx": s.own_rx,
            "acks": s.acks,
            "typing": s.typing,
            "typing_stop": s.typing_stop,
            "errors": s.errors,
            "error_sample": s.error_sample.decode("utf-8", "replace"),
            "other": s.other,
            "marks_sent": s.marks_sent,
            "cpu": self.cpu_window,
            "open": sum(1 for c in self.clients if c.is_open),
        }

    async def rs_fanout(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Fan-out with members marking read (and some typing): see the module."""
        self.reset()
        t0, t1, warm = cmd["t0"], cmd["t1"], int(cmd["warm"] * 1e9)
        clients: list[RClient] = self.clients  # type: ignore[assignment]
        marks = cmd["marks"]
        for c in clients:
            c.mode = MARK
            c.set_room(cmd["room"])
            c.parse_all = cmd["parse_all"]
            c.mark_all = marks == "every"
            c.mark_every = cmd["mark_every"] if marks == "nth" else 0
            c.last_id = c.marked_id = c.since_mark = 0
        pubs = clients[: cmd["publishers"]]
        if not cmd.get("publishers_mark", True):
            for c in pubs:
                c.mark_all = False
                c.mark_every = 0
        typists = clients[cmd["publishers"] : cmd["publishers"] + cmd["typists"]]
        payload = (
            b'{"type":"room_message","data":{"room":"'
            + cmd["room"].encode()
            + b'","content":"'
            + b"x" * cmd["size"]
            + b'"},"request_id":1}'
        )
        sent = 0
        typed = 0

        def send(c: Client, now: int) -> None:
            nonlocal sent
            if now < t1 and c.is_open:
                c.sent.append(MONO())
                c.send_text(payload)
                sent += 1

        async def interval_marks() -> None:
            """Each client marks its newest id once per mark_interval."""
            slots = 20
            tick = int(cmd["mark_interval"] * 1e9 / slots)
            k = 0
            while MONO() < t1:
                for c in clients[k % slots :: slots]:
                    if c.last_id > c.marked_id and c.is_open:
                        c.send_raw(c.mark(b"%d" % c.last_id))
                        c.marked_id = c.last_id
                        if self.stats.counting:
                            self.stats.marks_sent += 1
                k += 1
                await asyncio.sleep(max(0.0, (start + k * tick - MONO()) / 1e9))

        async def typing() -> None:
            """Each typist sends a start every typing_interval s (spread)."""
            nonlocal typed
            every = int(cmd["typing_interval"] * 1e9)
            frame = zframe(
                b'{"type":"typing","data":{"room":"' + cmd["room"].encode() + b'","state":"start"}}'
            )
            due = [start + every * i // max(1, len(typists)) for i in range(len(typists))]
            while MONO() < t1:
                now = MONO()
                for i, c in enumerate(typists):
                    if due[i] <= now:
                        due[i] += every
                        if c.is_open:
                            c.send_raw(frame)
                            if self.stats.counting:
                                typed += 1
                await asyncio.sleep(0.05)

        async def paced(rate: float) -> None:
            """An open loop: ``rate`` msgs/s from this worker's publishers in
            turn, whatever the replies."""
            tick = min(0.005, 0.25 / rate)
            k = 0
            while MONO() < t1:
                due = int((MONO() - start) * rate / 1e9) + 1
                while k < due:
                    send(pubs[k % len(pubs)], MONO())
                    k += 1
                await asyncio.sleep(tick)

        await asyncio.sleep(max(0.0, (t0 - warm - MONO()) / 1e9))
        start = MONO()
        tasks = [asyncio.ensure_future(self.window(t0, t1))]
        if marks == "interval":
            tasks.append(asyncio.ensure_future(interval_marks()))
        if typists:
            tasks.append(asyncio.ensure_future(typing()))
        rate = cmd.get("rate", 0.0)
        if rate and pubs:
            tasks.append(asyncio.ensure_future(paced(rate)))
        else:
            for c in pubs:
                c.on_own = send
                for _ in range(cmd["window"]):
                    send(c, MONO())
        await asyncio.gather(*tasks)
        for c in pubs:
            c.on_own = None
        await self.drain({"quiet": 0.3, "limit": 5})
        for c in clients:
            c.mark_all = False
            c.mark_every = 0
            c.sent.clear()
        out = self.counts()
        out.update(sent=sent, typing_sent=typed)
        return out

    async def typing_storm(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Every client types at t0 and renews: see the module."""
        self.reset()
        t0, t_end = cmd["t0"], cmd["t_end"]
        renew, duration = int(cmd["renew"] * 1e9), int(cmd["duration"] * 1e9)
        clients: list[RClient] = self.clients  # type: ignore[assignment]
        frame = zframe(
            b'{"type":"typing","data":{"room":"' + cmd["room"].encode() + b'","state":"start"}}'
        )
        for c in clients:
            c.mode = MARK
            c.set_room(cmd["room"])
            c.parse_all = c.mark_all = False
            c.typing_rx = c.typing_stop_rx = 0
            c.expect_typing = cmd["expect"]
            c.full_ns = 0
        s = self.stats
        s.bins = {}
        s.bin0 = t0
        sent = 0
        rounds: list[list[int]] = []  # [start ns, end ns] of each round of sends
        await asyncio.sleep(max(0.0, (t0 - MONO()) / 1e9))
        s.counting = True
        c0 = cpu_seconds()
        k = 0
        while t0 + k * renew <= t0 + duration:
            await asyncio.sleep(max(0.0, (t0 + k * renew - MONO()) / 1e9))
            began = MONO()
            for c in clients:
                if c.is_open:
                    c.send_raw(frame)
                    sent += 1
            rounds.append([began, MONO()])
            k += 1
        await asyncio.sleep(max(0.0, (t_end - MONO()) / 1e9))
        s.counting = False
        self.cpu_window = cpu_seconds() - c0
        bins = dict(s.bins)
        s.bins = None
        out = self.counts()
        out.update(
            sent=sent,
            rounds=rounds,
            bins=bins,
            per_client=[[c.typing_rx, c.typing_stop_rx, c.full_ns] for c in clients],
        )
        return out

    async def unread_calls(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """``unread {}`` asked ``warm + n`` times in a row by the first client."""
        c: RClient = self.clients[0]  # type: ignore[assignment]
        c.mode = IDLE
        lat: list[int] = []
        payload = b""
        errors = 0
        for i in range(cmd["warm"] + cmd["n"]):
            fut = c.expect(b'"unread_counts"')
            t = MONO()
            c.send_text(b'{"type":"unread","data":{},"request_id":%d}' % i)
            try:
                payload = await asyncio.wait_for(fut, cmd.get("timeout", 30.0))
            except Exception:  # noqa: BLE001 - counted; the reply shows what came
                errors += 1
                continue
            if i >= cmd["warm"]:
                lat.append(MONO() - t)
        reply = json.loads(payload) if payload else {}
        data = reply.get("data") or {}
        rooms = data.get("rooms") or []
        return {
            "lat_ns": lat,
            "errors": errors,
            "reply_bytes": len(payload),
            "rooms": len(rooms),
            "direct": len(data.get("direct") or []),
            "unread_sum": sum(r.get("unread", 0) for r in rooms),
            "mentions_sum": sum(r.get("mentions", 0) for r in rooms),
        }


def rs_worker_main(conn: Any, index: int, secret: str, cpus: set[int] | None = None) -> None:
    """Process entry: bench/worker.py's loop, serving an ``RWorker``."""
    # (this forked process's module only: worker_main builds a ``worker.Worker``)
    worker.Worker = RWorker  # type: ignore[misc]
    worker.worker_main(conn, index, secret, cpus)
