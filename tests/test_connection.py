"""``WebSocketConnection`` below the server: a connection on a socket pair,
its handler a stand-in, for what no client can provoke through a real
session.
"""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from chatd.transport.websocket import CLOSE_TIMEOUT
from chatd.transport.wire import State
from tests.helpers.raw import (
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_TEXT,
    client_frame,
    connection_pair,
    parse_frames,
)


class Failing:
    """A handler with a bug: every text message raises."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def handle_text(self, raw: str) -> None:
        self.seen.append(raw)
        raise RuntimeError("a bug in a handler")

    async def handle_binary(self) -> None:
        raise AssertionError("no binary frame is sent")


async def test_a_handler_that_raises_ends_its_connection_not_the_node(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The exception is logged, the connection closes with 1011, and
    ``run`` returns (the server's nursery never sees it)."""
    conn, peer = connection_pair(7, "grace", max_message_bytes=65536)
    handler = Failing()
    await peer.send_all(client_frame(OP_TEXT, b'{"type": "ping"}'))
    with trio.fail_after(10):
        await conn.run(handler)
        received = bytearray()
        while chunk := await peer.receive_some(1 << 16):
            received += chunk
    assert handler.seen == ['{"type": "ping"}']
    (close,) = parse_frames(received)
    assert close.opcode == OP_CLOSE and int.from_bytes(close.payload[:2], "big") == 1011
    assert conn.close_code == 1011 and conn.state is State.GONE
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and errors[0].exc_info and "UserID=7" in errors[0].getMessage()
    await peer.aclose()


class Stalled:
    """A handler whose first message waits, shielded, like a read on a
    worker thread that a cancellation cannot interrupt."""

    def __init__(self) -> None:
        self.gate = trio.Event()
        self.entered = trio.Event()

    async def handle_text(self, raw: str) -> None:
        self.entered.set()
        with trio.CancelScope(shield=True):
            await self.gate.wait()

    async def handle_binary(self) -> None:
        raise AssertionError("no binary frame is sent")


async def test_bytes_read_before_the_connection_was_dropped_are_dropped_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The connection is dropped (the idle timeout, a reset) while its
    reader waits in a handler, with more frames already read: once the
    handler returns, they are dropped without an error."""
    conn, peer = connection_pair(8, "hal", max_message_bytes=65536)
    handler = Stalled()
    # Two frames in one write: the reader has both once it reads.
    await peer.send_all(client_frame(OP_TEXT, b"first") + client_frame(OP_PING, b"p"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run, handler)
        await handler.entered.wait()
        try:
            conn.on_timer(conn.last_seen + 1000)  # silent for too long: dropped
        finally:
            handler.gate.set()
        assert conn.state is State.GONE
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    await peer.aclose()


async def test_a_peer_that_spoke_while_its_reader_was_busy_is_not_idle() -> None:
    """Idleness is judged by what the peer sent, read or not: while the
    reader waits in a handler (a join in a reconnect storm), the peer's
    pongs and frames wait in the socket, and the connection stays."""
    conn, peer = connection_pair(9, "ida", max_message_bytes=65536)
    handler = Stalled()
    await peer.send_all(client_frame(OP_TEXT, b"first"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run, handler)
        await handler.entered.wait()
        try:
            silent_since = conn.last_seen
            await peer.send_all(client_frame(OP_PING, b"still here"))
            await trio.testing.wait_all_tasks_blocked()
            conn.on_timer(silent_since + 1000)
            alive = conn.state
        finally:
            handler.gate.set()
        assert alive is State.OPEN  # the ping was in the socket: alive
        await trio.testing.wait_all_tasks_blocked()
        conn.on_timer(conn.last_seen + 1000)  # read, and silent since: dropped
        assert conn.state is State.GONE
    await peer.aclose()


class Closing:
    """A session that closes its connection on the first message (a refused
    token refresh, a client sending on into a saturated node)."""

    def __init__(self, conn: object) -> None:
        self.conn = conn
        self.seen: list[str] = []

    async def handle_text(self, raw: str) -> None:
        self.seen.append(raw)
        self.conn.close(1013, "busy")  # type: ignore[attr-defined]

    async def handle_binary(self) -> None:
        raise AssertionError("no binary frame is sent")


@pytest.mark.parametrize("fragmented", [False, True], ids=["whole", "fragmented"])
async def test_a_connection_its_session_closed_reads_no_more(
    fragmented: bool, autojump_clock: trio.testing.MockClock
) -> None:
    """Once the session has closed the connection, the reader stops: the
    frames after are dropped unread, and the socket ends (our close, then
    EOF) at once, without waiting ``CLOSE_TIMEOUT`` for the peer's close
    frame, which here never comes. Whether the closing message came on the
    reader's own path (whole) or through wsproto (fragmented)."""
    conn, peer = connection_pair(9, "ida", max_message_bytes=65536)
    handler = Closing(conn)
    if fragmented:
        first = client_frame(OP_TEXT, b"fir", fin=False) + client_frame(OP_CONT, b"st")
    else:
        first = client_frame(OP_TEXT, b"first")
    after = b"".join(client_frame(OP_TEXT, b"after %d" % i) for i in range(50))
    await peer.send_all(first + after)
    started = trio.current_time()
    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run, handler)
        while chunk := await peer.receive_some(1 << 16):
            received += chunk
        ended = trio.current_time()
    assert handler.seen == ["first"]
    (close,) = parse_frames(received)
    assert close.opcode == OP_CLOSE and int.from_bytes(close.payload[:2], "big") == 1013
    assert ended - started < CLOSE_TIMEOUT
    assert conn.state is State.GONE
    await peer.aclose()


class Sampling:
    """A session that takes 10 ms a message and notes, for each, whether
    its connection was ``behind`` then."""

    def __init__(self, conn: object, n: int) -> None:
        self.conn = conn
        self.behind: list[bool] = []
        self.n = n
        self.all_seen = trio.Event()

    async def handle_text(self, raw: str) -> None:
        self.behind.append(self.conn.behind)  # type: ignore[attr-defined]
        if len(self.behind) == self.n:
            self.all_seen.set()
        await trio.sleep(0.01)

    async def handle_binary(self) -> None:
        raise AssertionError("no binary frame is sent")


@pytest.mark.parametrize("pace", [0.0, 0.02], ids=["flood", "paced"])
async def test_a_peer_that_sends_faster_than_the_node_reads_is_behind(
    pace: float, autojump_clock: trio.testing.MockClock
) -> None:
    """``behind`` once, from a read that found more waiting than it takes,
    ``BEHIND`` seconds pass without a read finding the socket empty (a peer
    flooding a node that handles 100 messages a second); no longer once
    one does; never for a peer that sends slower than the node handles."""
    conn, peer = connection_pair(10, "joy", max_message_bytes=65536, tcp=True)
    n = 1500  # 1.5 MiB: 15 s of handling
    handler = Sampling(conn, n)

    async def send() -> None:
        frames = [client_frame(OP_TEXT, b"%04d" % i + b"x" * 1020) for i in range(n)]
        if pace:
            for frame in frames:
                await peer.send_all(frame)
                await trio.sleep(pace)
        else:  # at once, into the kernel's buffers
            await peer.send_all(b"".join(frames))
        await handler.all_seen.wait()
        await trio.sleep(0.1)  # (the read after the last one finds nothing)
        await peer.send_all(client_frame(OP_CLOSE, (1000).to_bytes(2, "big")))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run, handler)
        nursery.start_soon(send)
    assert len(handler.behind) == n
    assert not conn.behind  # (a read found the socket empty before the close came)
    if pace:
        assert not any(handler.behind)
    else:
        assert handler.behind[:50] == [False] * 50  # (the first second)
        assert handler.behind.count(True) > n // 2
    await peer.aclose()
