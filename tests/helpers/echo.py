"""An echo server on chatd's own WebSocket edge, for the conformance tests
(``tests/test_autobahn.py``, ``tests/test_wire_differential.py``).

It is chatd's transport with the chat taken out, nothing copied: the
listener and the HTTP layer (``transport.http.serve_listener``,
``serve_connection``, the direct upgrade reader), the gate's handshake
functions (``handshake.open_direct`` / ``open_wsproto``: the 101, and
permessage-deflate agreed by wsproto's function with chatd's
``BoundedDeflate`` and ``SizeGuard``, bounded by ``[limits]
max_frame_bytes``), and a ``WebSocketConnection`` built as the gate builds
one (the reader's fast path, wsproto for the rest, the outbound ``OutFrame``
path, deflated when agreed, the heartbeat timer). What differs from the
gate: no token, no admission, no session, and any path is upgraded (the
request is handed to the gate's functions as if for ``/ws/chat``).

Every complete text message is sent back as one text frame (``OutFrame``,
compressed as chatd compresses). A binary message cannot be echoed: the
transport hands the application only the fact that one arrived
(``MessageHandler.handle_binary``, no data), and its outbound path builds
text frames only. So the echo answers each binary message with the text
``BINARY_NOTICE``, in order with everything else, and the connection stays
open: that is the transport's contract for binary.

What each connection received is kept (``EchoServer.sessions``) for tests
that look past the wire: its text messages (None for a binary one) and its
close code.

Tests only: nothing in ``chatd/`` imports this module, the zipapp holds only
``chatd/``, and no config reaches it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import h11
import trio

from chatd.auth import Identity
from chatd.config import Config, from_dict
from chatd.handshake import WS_PATH, open_direct, open_wsproto
from chatd.transport.fanout import Fanout
from chatd.transport.frames import OutFrame
from chatd.transport.http import (
    Response,
    UpgradeRequest,
    json_error,
    serve_connection,
    serve_listener,
)
from chatd.transport.upgrade import Upgrade
from chatd.transport.websocket import WebSocketConnection

#: What the echo sends back for each binary message (see the docstring).
BINARY_NOTICE = "binary message received"
#: ``[limits] max_frame_bytes`` of ``echo_server`` unless a test asks.
DEFAULT_MAX_MESSAGE = 16 << 20
_ECHO = Identity(0, "echo", None)


def echo_config(
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE,
    compression: bool = True,
    send_buffer_bytes: int = 64 << 20,
) -> Config:
    """A validated config for the echo: what its transport reads of it."""
    return from_dict(
        {
            "server": {
                "host": "127.0.0.1",
                "port": 0,
                "compression": compression,
                "send_buffer_bytes": send_buffer_bytes,
            },
            "auth": {"jwt_secret": "echo-server-secret-not-used-for-anything-here"},
            "limits": {"max_frame_bytes": max_message_bytes},
        },
        source="echo",
    )


@dataclass
class EchoSession:
    """What one connection received: text messages in order (None for a
    binary one), and its close code once closed (sent or received)."""

    conn: WebSocketConnection
    messages: list[str | None] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)

    @property
    def close_code(self) -> int | None:
        return self.conn.close_code

    async def handle_text(self, raw: str) -> None:
        self.messages.append(raw)
        self.conn.send(OutFrame(raw.encode()))

    async def handle_binary(self) -> None:
        self.messages.append(None)
        self.conn.send(OutFrame(BINARY_NOTICE.encode()))


def _as_chat_path(request: UpgradeRequest) -> UpgradeRequest:
    """The same request for ``WS_PATH``, the one path the gate's functions
    upgrade (the query is kept)."""
    if isinstance(request, Upgrade):
        target = WS_PATH + (f"?{request.query}" if request.query else "")
        return Upgrade(
            target.encode("ascii"),
            request.headers,
            request.key,
            request.extensions,
            request.subprotocols,
        )
    query = urlsplit(request.target.decode("latin-1")).query
    target = WS_PATH + (f"?{query}" if query else "")
    return h11.Request(
        method=request.method,
        target=target.encode("latin-1"),
        headers=list(request.headers),
        http_version=request.http_version,
    )


class EchoServer:
    """The app (``transport.http.App``) of the echo: plain HTTP is a 404,
    every upgrade an echo."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.handshake_timeout = config.server.handshake_timeout_seconds
        self.port = 0
        self.fanout: Fanout[WebSocketConnection] = Fanout()
        self.sessions: list[EchoSession] = []

    async def http(self, request: h11.Request, body: bytes, remote: str) -> Response:
        return json_error(404, "not found")

    def websocket(
        self, stream: trio.SocketStream, request: UpgradeRequest, trailing: bytes, remote: str
    ) -> Response | Awaitable[None]:
        request = _as_chat_path(request)
        if isinstance(request, Upgrade):
            opened = open_direct(self.config, request)
        else:
            opened = open_wsproto(self.config, request)
        if isinstance(opened, Response):
            return opened
        wire, accept, deflate, _query = opened
        bits = deflate.window_bits if deflate is not None and deflate.enabled() else None
        server = self.config.server
        conn = WebSocketConnection(
            stream,
            wire,
            _ECHO,
            self.fanout,
            window_bits=bits,
            send_buffer_bytes=server.send_buffer_bytes,
            ping_interval=server.ping_interval_seconds,
            idle_timeout=server.idle_timeout_seconds,
            max_message_bytes=self.config.limits.max_frame_bytes,
            received=trailing,
        )
        return self._serve(conn, accept)

    async def _serve(self, conn: WebSocketConnection, accept: bytes) -> None:
        session = EchoSession(conn)
        self.sessions.append(session)
        conn.send_raw(accept)
        try:
            await conn.run(session)
        finally:
            session.done.set()


@asynccontextmanager
async def echo_server(config: Config | None = None, **options: Any) -> AsyncIterator[EchoServer]:
    """An ``EchoServer`` listening on a free loopback port for the block
    (``options``: ``echo_config``'s, when no ``config`` is given)."""
    app = EchoServer(config if config is not None else echo_config(**options))
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    app.port = listener.socket.getsockname()[1]
    phases: dict[trio.SocketStream, trio.CancelScope] = {}
    async with trio.open_nursery() as nursery:
        handler = partial(serve_connection, app=app, phases=phases)
        nursery.start_soon(serve_listener, listener, nursery, handler)
        try:
            yield app
        finally:
            nursery.cancel_scope.cancel()
    await listener.aclose()
