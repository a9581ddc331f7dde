"""Runs: a commit group's consecutive messages to one room, joined once.

The transport's ``broadcast`` gathers, while corked, consecutive messages to
one room and writes them as one buffer per member when the run ends: at the
end of the cork, or before anything else is written to any connection.
These tests drive real ``WebSocketConnection`` objects on socket pairs and
read what each peer received, frame by frame: every connection must get
exactly its frames, in the order they were sent, whatever mix of rooms,
direct frames, senders' own copies, compression and batching.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request

from chatd.auth import Identity
from chatd.transport.frames import OutFrame
from chatd.transport.websocket import WebSocketConnection, broadcast, corked
from tests.helpers.raw import OP_CLOSE, OP_TEXT, parse_frames


def _accepted() -> WSConnection:
    ws = WSConnection(ConnectionType.SERVER)
    client = WSConnection(ConnectionType.CLIENT)
    ws.receive_data(client.send(Request(host="localhost", target="/ws/chat")))
    next(ws.events())
    ws.send(AcceptConnection())
    return ws


class Peer:
    """A server connection and the socket at the other end."""

    def __init__(self, conn: WebSocketConnection, other: trio.SocketStream) -> None:
        self.conn = conn
        self.other = other
        self.buf = bytearray()

    async def received(self) -> list[str]:
        """The names carried by every frame received so far, batches opened."""
        await trio.testing.wait_all_tasks_blocked()
        while True:
            try:
                self.buf += os.read(self.other.socket.fileno(), 1 << 20)
            except BlockingIOError:
                break
        names: list[str] = []
        for frame in parse_frames(self.buf):
            assert frame.opcode == OP_TEXT and frame.fin
            payload = frame.payload
            if frame.rsv1:
                payload = zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")
            obj = json.loads(payload)
            if obj["type"] == "message_batch":
                names += [m["data"]["n"] for m in obj["data"]["messages"]]
            else:
                names.append(obj["data"]["n"])
        return names


@asynccontextmanager
async def peers(*specs: tuple[int | None, bool]) -> AsyncIterator[list[Peer]]:
    """One peer per (compression window bits or None, batch)."""
    made: list[Peer] = []
    try:
        for n, (bits, batch) in enumerate(specs):
            a, b = trio.socket.socketpair()
            conn = WebSocketConnection(
                trio.SocketStream(a),
                _accepted(),
                Identity(n + 1, f"user{n + 1}", None),
                window_bits=bits,
                send_buffer_bytes=1 << 22,
                ping_interval=30,
                idle_timeout=75,
                batch=batch,
            )
            made.append(Peer(conn, trio.SocketStream(b)))
        yield made
    finally:
        for p in made:
            p.conn._abort()
            await p.conn._stream.aclose()
            await p.other.aclose()


def frame(name: str) -> OutFrame:
    # long enough to be compressed for the deflate peers
    return OutFrame(
        json.dumps({"type": "room_message", "data": {"n": name, "pad": "x" * 200}}).encode()
    )


async def test_a_run_keeps_each_connections_order() -> None:
    """Two rooms, senders' own copies, a frame outside any run and a member
    of both rooms: each connection gets its frames in the order sent."""
    async with peers((None, False), (None, False), (15, False), (None, True)) as ps:
        alice, bob, carol, dave = ps
        room_a = {alice.conn, bob.conn, carol.conn, dave.conn}
        room_b = {bob.conn, carol.conn}
        with corked():
            broadcast(room_a, frame("a1"), alice.conn, frame("a1-own"))  # type: ignore[arg-type]
            broadcast(room_a, frame("a2"), bob.conn, frame("a2-own"))  # type: ignore[arg-type]
            broadcast(room_b, frame("b1"), None, None)  # type: ignore[arg-type]
            carol.conn.send(frame("direct"))
            broadcast(room_a, frame("a3"), None, None)  # type: ignore[arg-type]
            dave.conn.send(frame("dave-direct"))  # batched: no write of its own
            broadcast(room_a, frame("a4"), alice.conn, frame("a4-own"))  # type: ignore[arg-type]
            assert await alice.received() == []  # corked: nothing written yet
        assert await alice.received() == ["a1-own", "a2", "a3", "a4-own"]
        assert await bob.received() == ["a1", "a2-own", "b1", "a3", "a4"]
        assert await carol.received() == ["a1", "a2", "b1", "direct", "a3", "a4"]
        assert await dave.received() == ["a1", "a2", "a3", "dave-direct", "a4"]


async def test_a_sender_outside_the_room_gets_its_own_copies_only() -> None:
    async with peers((None, False), (None, False)) as (alice, bob):
        room = {bob.conn}
        with corked():
            broadcast(room, frame("m1"), alice.conn, frame("m1-own"))  # type: ignore[arg-type]
            broadcast(room, frame("m2"), None, None)  # type: ignore[arg-type]
            broadcast(room, frame("m3"), alice.conn, frame("m3-own"))  # type: ignore[arg-type]
        assert await alice.received() == ["m1-own", "m3-own"]
        assert await bob.received() == ["m1", "m2", "m3"]


async def test_uncorked_broadcast_writes_at_once() -> None:
    async with peers((None, False), (15, False)) as (alice, bob):
        room = {alice.conn, bob.conn}
        broadcast(room, frame("m1"), alice.conn, frame("m1-own"))  # type: ignore[arg-type]
        assert await alice.received() == ["m1-own"]
        assert await bob.received() == ["m1"]


async def test_buffers_are_shared_between_members() -> None:
    """Inside the cork, before the flush, members with the same settings
    hold the very same joined bytes object (one join, not one per member)."""
    async with peers((None, False), (None, False), (15, False), (15, False)) as ps:
        room = {p.conn for p in ps}
        with corked():
            broadcast(room, frame("m1"), None, None)  # type: ignore[arg-type]
            broadcast(room, frame("m2"), None, None)  # type: ignore[arg-type]
            broadcast({ps[0].conn}, frame("solo"), None, None)  # type: ignore[arg-type]
            plain = [p.conn._out[0] for p in ps[:2]]  # type: ignore[index]
            deflated = [p.conn._out[0] for p in ps[2:]]  # type: ignore[index]
            assert plain[0] is plain[1]
            assert deflated[0] is deflated[1]
            assert plain[0] is not deflated[0]
        assert await ps[0].received() == ["m1", "m2", "solo"]
        assert await ps[3].received() == ["m1", "m2"]


async def test_a_control_frame_during_a_run_goes_after_it() -> None:
    """A close (or ping, pong) queued while a run is gathered: after the
    run's frames, never before them."""
    async with peers((None, False), (None, False)) as (alice, bob):
        room = {alice.conn, bob.conn}
        with corked():
            broadcast(room, frame("m1"), None, None)  # type: ignore[arg-type]
            alice.conn.close(1000, "bye")
        await trio.testing.wait_all_tasks_blocked()
        alice.buf += os.read(alice.other.socket.fileno(), 1 << 20)
        frames = parse_frames(alice.buf)
        assert [f.opcode for f in frames] == [OP_TEXT, OP_CLOSE]
        assert json.loads(frames[0].payload)["data"]["n"] == "m1"
        assert await bob.received() == ["m1"]
