"""The fan-out: corked writes, and runs of a room's messages joined once.

``Fanout.broadcast`` gathers, while corked, consecutive messages to one room
and writes them as one buffer per member when the run ends: at the end of
the cork, or before anything else is written to any connection. These tests
drive real ``WebSocketConnection`` objects on socket pairs, sharing one
``Fanout`` as a node's connections do, and
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

from chatd.transport.fanout import Fanout
from chatd.transport.frames import OutFrame
from chatd.transport.websocket import WebSocketConnection
from tests.helpers.raw import OP_CLOSE, OP_TEXT, connection_pair, parse_frames


class Peer:
    """A server connection and the socket at the other end."""

    def __init__(
        self,
        conn: WebSocketConnection,
        other: trio.SocketStream,
        fanout: Fanout[WebSocketConnection],
    ) -> None:
        self.conn = conn
        self.fanout = fanout
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
async def peers(
    *specs: tuple[int | None, bool], fanout: Fanout[WebSocketConnection] | None = None
) -> AsyncIterator[list[Peer]]:
    """One peer per (compression window bits or None, batch), all on
    ``fanout`` (else on a new one: ``peers[0].fanout``)."""
    made: list[Peer] = []
    shared: Fanout[WebSocketConnection] = fanout if fanout is not None else Fanout()
    try:
        for n, (bits, batch) in enumerate(specs):
            conn, other = connection_pair(
                n + 1,
                f"user{n + 1}",
                shared,
                window_bits=bits,
                send_buffer_bytes=1 << 22,
                batch=batch,
            )
            made.append(Peer(conn, other, shared))
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
        fan = ps[0].fanout
        alice, bob, carol, dave = ps
        room_a = {alice.conn, bob.conn, carol.conn, dave.conn}
        room_b = {bob.conn, carol.conn}
        with fan.corked():
            fan.broadcast(room_a, frame("a1"), alice.conn, frame("a1-own"))
            fan.broadcast(room_a, frame("a2"), bob.conn, frame("a2-own"))
            fan.broadcast(room_b, frame("b1"), None, None)
            carol.conn.send(frame("direct"))
            fan.broadcast(room_a, frame("a3"), None, None)
            dave.conn.send(frame("dave-direct"))  # batched: no write of its own
            fan.broadcast(room_a, frame("a4"), alice.conn, frame("a4-own"))
            assert await alice.received() == []  # corked: nothing written yet
        assert await alice.received() == ["a1-own", "a2", "a3", "a4-own"]
        assert await bob.received() == ["a1", "a2-own", "b1", "a3", "a4"]
        assert await carol.received() == ["a1", "a2", "b1", "direct", "a3", "a4"]
        assert await dave.received() == ["a1", "a2", "a3", "dave-direct", "a4"]


async def test_a_sender_outside_the_room_gets_its_own_copies_only() -> None:
    async with peers((None, False), (None, False)) as (alice, bob):
        fan = alice.fanout
        room = {bob.conn}
        with fan.corked():
            fan.broadcast(room, frame("m1"), alice.conn, frame("m1-own"))
            fan.broadcast(room, frame("m2"), None, None)
            fan.broadcast(room, frame("m3"), alice.conn, frame("m3-own"))
        assert await alice.received() == ["m1-own", "m3-own"]
        assert await bob.received() == ["m1", "m2", "m3"]


async def test_uncorked_broadcast_writes_at_once() -> None:
    async with peers((None, False), (15, False)) as (alice, bob):
        fan = alice.fanout
        room = {alice.conn, bob.conn}
        fan.broadcast(room, frame("m1"), alice.conn, frame("m1-own"))
        assert await alice.received() == ["m1-own"]
        assert await bob.received() == ["m1"]


async def test_buffers_are_shared_between_members() -> None:
    """Inside the cork, before the flush, members with the same settings
    hold the very same joined bytes object (one join, not one per member)."""
    async with peers((None, False), (None, False), (15, False), (15, False)) as ps:
        fan = ps[0].fanout
        room = {p.conn for p in ps}
        with fan.corked():
            fan.broadcast(room, frame("m1"), None, None)
            fan.broadcast(room, frame("m2"), None, None)
            fan.broadcast({ps[0].conn}, frame("solo"), None, None)
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
        fan = alice.fanout
        room = {alice.conn, bob.conn}
        with fan.corked():
            fan.broadcast(room, frame("m1"), None, None)
            alice.conn.close(1000, "bye")
        await trio.testing.wait_all_tasks_blocked()
        alice.buf += os.read(alice.other.socket.fileno(), 1 << 20)
        frames = parse_frames(alice.buf)
        assert [f.opcode for f in frames] == [OP_TEXT, OP_CLOSE]
        assert json.loads(frames[0].payload)["data"]["n"] == "m1"
        assert await bob.received() == ["m1"]


async def test_two_fanouts_are_independent() -> None:
    """Each node (each server in one process) has its own fan-out: one's
    cork neither holds back nor flushes the other's connections."""
    async with peers((None, False)) as (alice,), peers((None, False)) as (bob,):
        assert alice.fanout is not bob.fanout
        with alice.fanout.corked():
            alice.fanout.broadcast({alice.conn}, frame("a1"), None, None)
            bob.fanout.broadcast({bob.conn}, frame("b1"), None, None)
            assert await alice.received() == []  # corked
            assert await bob.received() == ["b1"]  # not corked: written at once
        assert await alice.received() == ["a1"]


async def test_corked_blocks_nest_and_the_outer_one_flushes() -> None:
    async with peers((None, False), (None, False)) as (alice, bob):
        fan = alice.fanout
        room = {alice.conn, bob.conn}
        with fan.corked():
            with fan.corked():
                fan.broadcast(room, frame("m1"), None, None)
            assert await alice.received() == []  # the inner block did not flush
            fan.broadcast(room, frame("m2"), None, None)
        assert await alice.received() == ["m1", "m2"]
        assert await bob.received() == ["m1", "m2"]
