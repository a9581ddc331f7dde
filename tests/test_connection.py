"""``WebSocketConnection`` below the server: a connection on a socket pair,
its handler a stand-in, for what no client can provoke through a real
session.
"""

from __future__ import annotations

import logging

import pytest
import trio

from chatd.auth import Identity
from chatd.transport.fanout import Fanout
from chatd.transport.websocket import WebSocketConnection
from chatd.transport.wire import State
from tests.helpers.raw import OP_CLOSE, OP_TEXT, accepted_server, client_frame, parse_frames


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
    a, b = trio.socket.socketpair()
    conn = WebSocketConnection(
        trio.SocketStream(a),
        accepted_server(),
        Identity(7, "grace", None),
        Fanout(),
        window_bits=None,
        send_buffer_bytes=1 << 20,
        ping_interval=30,
        idle_timeout=75,
        max_message_bytes=65536,
    )
    peer = trio.SocketStream(b)
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
