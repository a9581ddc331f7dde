"""WebSocket by hand, for what trio-websocket hides or refuses to send.

``RawWS`` (opened by ``raw_ws``) is a client on wsproto over a plain Trio
stream that records the handshake response and every frame in both
directions (``Frame``: fin, rsv1, opcode, mask, payload), so tests can see
compression bits and frame boundaries. Where wsproto itself would refuse to
send what is tested (unmasked frames, bad UTF-8, a false length, a bare
continuation), ``client_frame`` builds the frame byte by byte and
``RawWS.send_raw`` puts it on the wire. ``parse_frames`` reads frames off a
byte buffer (server-side frames too, for tests below the socket), and
``accepted_server`` is a server-side wsproto connection past its handshake,
to build a ``WebSocketConnection`` or a ``Wire`` on without a server.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import zlib
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Ping,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate

from chatd.auth import Identity
from chatd.transport.fanout import Fanout
from chatd.transport.websocket import WebSocketConnection
from tests.helpers.clients import HasPort, frame_json
from tests.helpers.tokens import make_token

# --- frames built and parsed by hand -------------------------------------------


def accepted_server() -> WSConnection:
    """A server-side wsproto connection that has accepted a client's upgrade."""
    ws = WSConnection(ConnectionType.SERVER)
    client = WSConnection(ConnectionType.CLIENT)
    ws.receive_data(client.send(Request(host="localhost", target="/ws/chat")))
    assert isinstance(next(ws.events()), Request)
    ws.send(AcceptConnection())
    return ws


OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


@dataclass
class Frame:
    """One WebSocket frame as it was on the wire (payload unmasked)."""

    fin: bool
    rsv1: bool
    opcode: int
    masked: bool
    payload: bytes


def parse_frames(buf: bytearray) -> list[Frame]:
    """Take every complete frame off the front of ``buf`` (unmasking)."""
    frames = []
    while len(buf) >= 2:
        b0, b1 = buf[0], buf[1]
        length = b1 & 0x7F
        pos = 2
        if length == 126:
            if len(buf) < 4:
                break
            (length,) = struct.unpack("!H", buf[2:4])
            pos = 4
        elif length == 127:
            if len(buf) < 10:
                break
            (length,) = struct.unpack("!Q", buf[2:10])
            pos = 10
        masked = bool(b1 & 0x80)
        key = b""
        if masked:
            if len(buf) < pos + 4:
                break
            key = bytes(buf[pos : pos + 4])
            pos += 4
        if len(buf) < pos + length:
            break
        payload = bytes(buf[pos : pos + length])
        if masked:
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        del buf[: pos + length]
        frames.append(Frame(bool(b0 & 0x80), bool(b0 & 0x40), b0 & 0x0F, masked, payload))
    return frames


def client_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv1: bool = False,
    mask: bool = True,
    length: int | None = None,
) -> bytes:
    """One client frame built by hand; ``length`` overrides the declared
    payload length (the payload is then sent as given)."""
    declared = len(payload) if length is None else length
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    maskbit = 0x80 if mask else 0
    if declared < 126:
        head = struct.pack("!BB", first, maskbit | declared)
    elif declared < 65536:
        head = struct.pack("!BBH", first, maskbit | 126, declared)
    else:
        head = struct.pack("!BBQ", first, maskbit | 127, declared)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def raw_deflate(data: bytes) -> bytes:
    """``data`` compressed as one permessage-deflate message (RFC 7692 7.2.1)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    out = comp.compress(data) + comp.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


# --- a WebSocket client on wsproto ----------------------------------------------


class RawWS:
    """A WebSocket client on wsproto over a plain Trio stream, which records
    the handshake response and every frame in both directions."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.status: int | None = None
        self.response_head = b""
        self.response_headers: dict[str, str] = {}
        self._in_raw = bytearray()
        self._out_raw = bytearray()
        #: Every complete frame received / sent after the handshake.
        self.frames_in: list[Frame] = []
        self.frames_out: list[Frame] = []
        self._events: deque[Event] = deque()
        self.eof = False
        self.pings = 0

    async def handshake(
        self,
        port: int,
        target: str,
        *,
        extensions: list[Any] | None = None,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
        trailing: bytes = b"",
    ) -> Event:
        """Send the upgrade request (and ``trailing`` bytes in the same write)
        and read the response head."""
        request = Request(
            host=f"127.0.0.1:{port}",
            target=target,
            extensions=extensions or [],
            extra_headers=extra_headers or [],
        )
        await self.stream.send_all(self.ws.send(request) + trailing)
        buf = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in buf:
                data = await self.stream.receive_some(65536)
                assert data, f"EOF during the handshake: {buf!r}"
                buf += data
        head, _, rest = buf.partition(b"\r\n\r\n")
        self.response_head = head
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.response_headers[name.strip().lower()] = value.strip()
        self.ws.receive_data(buf)
        event = next(self.ws.events())
        if isinstance(event, AcceptConnection):
            self._feed_raw(rest)
            # Frames may come in the same read as the 101.
            self._events.extend(self.ws.events())
        return event

    def _feed_raw(self, data: bytes) -> None:
        self._in_raw += data
        self.frames_in += parse_frames(self._in_raw)

    async def send(self, event: Event) -> None:
        data = self.ws.send(event)
        self._out_raw += data
        self.frames_out += parse_frames(self._out_raw)
        await self.stream.send_all(data)

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send_json(
        self, type_: str, data: Any = None, request_id: Any = None, **extra: Any
    ) -> None:
        await self.send(TextMessage(frame_json(type_, data, request_id, **extra)))

    async def next_event(self, timeout: float = 5.0) -> Event | None:  # noqa: ASYNC109
        """The next wsproto event, or None at EOF."""
        with trio.fail_after(timeout):
            while not self._events:
                if self.eof:
                    return None
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:  # connection reset
                    data = b""
                if not data:
                    self.eof = True
                    return None
                self._feed_raw(data)
                self.ws.receive_data(data)
                self._events.extend(self.ws.events())
        return self._events.popleft()

    async def recv_json(self, timeout: float = 5.0) -> dict[str, Any]:  # noqa: ASYNC109
        """The next complete text message as JSON (server pings are counted
        and not answered)."""
        parts: list[str] = []
        while True:
            event = await self.next_event(timeout)
            if isinstance(event, Ping):
                self.pings += 1
                continue
            assert isinstance(event, TextMessage), f"expected a text message, got {event!r}"
            parts.append(event.data)
            if event.message_finished:
                frame: dict[str, Any] = json.loads("".join(parts))
                return frame

    async def expect(self, type_: str, timeout: float = 5.0) -> dict[str, Any]:  # noqa: ASYNC109
        frame = await self.recv_json(timeout)
        assert frame["type"] == type_, frame
        return frame

    async def close_code(self, timeout: float = 5.0) -> int | None:  # noqa: ASYNC109
        """Read until the server's close frame (its code) or EOF (None),
        dropping anything else."""
        while True:
            event = await self.next_event(timeout)
            if event is None:
                return None
            if isinstance(event, CloseConnection):
                return event.code


async def tcp_connect(port: int, *, rcvbuf: int | None = None) -> trio.SocketStream:
    """A TCP connection to 127.0.0.1:``port`` (``rcvbuf``: a small receive
    buffer, for a client that stops reading)."""
    if rcvbuf is None:
        return await trio.open_tcp_stream("127.0.0.1", port)
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


@asynccontextmanager
async def raw_ws(
    server: HasPort,
    token: str | None = None,
    *,
    user_id: int = 1,
    username: str = "alice",
    path: str = "/ws/chat",
    deflate: bool | PerMessageDeflate = False,
    rcvbuf: int | None = None,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> AsyncIterator[RawWS]:
    """An open, authenticated raw client (the handshake must succeed)."""
    if token is None:
        token = make_token(user_id, username)
    stream = await tcp_connect(server.port, rcvbuf=rcvbuf)
    async with stream:
        client = RawWS(stream)
        extensions: list[Any] = []
        if deflate is True:
            extensions = [PerMessageDeflate()]
        elif isinstance(deflate, PerMessageDeflate):
            extensions = [deflate]
        event = await client.handshake(
            server.port, f"{path}?token={token}", extensions=extensions, extra_headers=extra_headers
        )
        assert isinstance(event, AcceptConnection), event
        assert client.status == 101
        yield client


def connection_pair(
    user_id: int,
    username: str,
    fanout: Fanout[WebSocketConnection] | None = None,
    *,
    window_bits: int | None = None,
    send_buffer_bytes: int = 1 << 20,
    max_message_bytes: int | None = None,
    batch: bool = False,
    sndbuf: int | None = None,
    tcp: bool = False,
) -> tuple[WebSocketConnection, trio.SocketStream]:
    """A server ``WebSocketConnection`` on one end of a socket pair (its
    upgrade already accepted) and the peer's end: a connection without a
    server, for the transport's own tests. ``sndbuf``: the kernel's send
    buffer of the server's end (small, to fill it). ``tcp``: a loopback
    TCP connection instead of a Unix pair, the peer's send buffer 4 MiB:
    the peer gets megabytes ahead of its reader, as a network client can,
    whenever it runs (a Unix pair lets the writer go on only once its
    reader has taken 3/4 of what waits)."""
    if tcp:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            near = socket.create_connection(listener.getsockname())
            near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            far, _ = listener.accept()
        near.setblocking(False)
        far.setblocking(False)
        a, b = trio.socket.from_stdlib_socket(far), trio.socket.from_stdlib_socket(near)
    else:
        a, b = trio.socket.socketpair()
    if sndbuf is not None:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    conn = WebSocketConnection(
        trio.SocketStream(a),
        accepted_server(),
        Identity(user_id, username, None),
        fanout if fanout is not None else Fanout(),
        window_bits=window_bits,
        send_buffer_bytes=send_buffer_bytes,
        ping_interval=30,
        idle_timeout=75,
        max_message_bytes=max_message_bytes,
        batch=batch,
    )
    return conn, trio.SocketStream(b)
