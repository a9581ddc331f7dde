"""chatd's WebSocket edge against the Autobahn|Testsuite case list.

The suite itself cannot run here (autobahntestsuite is Python 2 only), so
its fuzzing client's cases are written out as tests, numbered as Autobahn
numbers them, against an echo server on chatd's own transport
(``tests/helpers/echo.py``: the HTTP layer, the gate's handshake functions,
``WebSocketConnection`` with its reader fast path, wsproto for the rest,
``OutFrame`` and permessage-deflate). Each test names the RFC section that
fixes its outcome (RFC 6455, or RFC 7692 for compression).

The client (``Peer``) is strict about what the server sends: every server
frame is checked (unmasked, no RSV bit but a negotiated RSV1 on the first
frame of a data message, a known opcode, the minimal length encoding,
control frames whole and at most 125 bytes, nothing after the close), its
messages are reassembled from any fragmentation (section 10), inflated when
compressed (with the negotiated window, and a fresh inflater per message
when the server said ``server_no_context_takeover``) and checked as UTF-8.
An outcome is the sequence of what the server sends back (echoes, pongs,
its close frame and code) and the end of the TCP connection that follows
the close.

Frames go out as Autobahn sends them (whole, frame by frame, octet by
octet) and again split at random points (seeded per case). The echo server
runs in the test's Trio run, so each piece is read by the server before the
next is sent (``wait_all_tasks_blocked``): a split is a real split.

Binary messages: the transport hands the application only the fact that a
binary message arrived (``MessageHandler.handle_binary``), so the echo
answers each with the text ``BINARY_NOTICE`` (see ``tests/helpers/echo.py``);
the binary cases check that answer, in order, and that the connection stays
open.

Where the RFC leaves a choice (fail fast on invalid UTF-8 or at the end of
the frame; echo a message that came before a close or not; decline an
offer), either outcome it allows is accepted, and the test says which one
chatd takes. The disagreements with the RFCs these cases found are fixed
(docs/security.md).
"""

from __future__ import annotations

import gc
import json
import os
import random
import re
import select
import struct
import zlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing
from wsproto.events import AcceptConnection
from wsproto.extensions import PerMessageDeflate

from chatd.transport.frames import COMPRESS_MIN_BYTES
from tests.helpers.echo import BINARY_NOTICE, EchoServer, echo_server
from tests.helpers.raw import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RawWS,
    client_frame,
    parse_frames,
    tcp_connect,
)


@pytest.fixture(scope="module", autouse=True)
def _collect_garbage_once() -> Iterator[None]:
    """Garbage is collected once, after the module (after each of its
    hundreds of cases, as ``collect_garbage`` does, would take ten times
    the module's run): a socket left open by the transport is still
    reported (ResourceWarning, an error), by the module's last test."""
    yield
    gc.collect()


NORMAL = 1000
PROTOCOL_ERROR = 1002
INVALID_PAYLOAD = 1007
MESSAGE_TOO_BIG = 1009
#: ``[limits] max_frame_bytes`` of ``small_echo`` (chatd's default).
SMALL_LIMIT = 65536

#: What the server sends, as the client reads it: ("text", str),
#: ("binary", bytes), ("ping", bytes), ("pong", bytes), ("close", code or
#: None for a close frame without a code).
Item = tuple[str, Any]


# --- frames the client sends ------------------------------------------------------


def _mask(payload: bytes, key: bytes) -> bytes:
    """``payload`` XOR ``key`` repeated (RFC 6455 §5.3), fast for megabytes;
    written apart from chatd's ``unmask`` so as not to share its mistakes."""
    n = len(payload)
    if not n:
        return b""
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def frame(
    opcode: int, payload: bytes | str = b"", *, fin: bool = True, rsv: int = 0, mask: bool = True
) -> bytes:
    """A client frame: ``client_frame``'s header, the three RSV bits as
    Autobahn numbers them (``rsv`` 0 to 7, 4 being RSV1), a fresh mask."""
    data = payload.encode() if isinstance(payload, str) else payload
    head = bytearray(client_frame(opcode, b"", fin=fin, mask=False, length=len(data)))
    head[0] |= rsv << 4
    if not mask:
        return bytes(head) + data
    head[1] |= 0x80
    key = os.urandom(4)
    return bytes(head) + key + _mask(data, key)


def text(payload: bytes | str, *, fin: bool = True, rsv: int = 0) -> bytes:
    return frame(OP_TEXT, payload, fin=fin, rsv=rsv)


def binary(payload: bytes, *, fin: bool = True, rsv: int = 0) -> bytes:
    return frame(OP_BINARY, payload, fin=fin, rsv=rsv)


def cont(payload: bytes | str, *, fin: bool = True, rsv: int = 0) -> bytes:
    return frame(OP_CONT, payload, fin=fin, rsv=rsv)


def ping(payload: bytes | str = b"", *, fin: bool = True, rsv: int = 0) -> bytes:
    return frame(OP_PING, payload, fin=fin, rsv=rsv)


def pong(payload: bytes | str = b"", *, fin: bool = True) -> bytes:
    return frame(OP_PONG, payload, fin=fin)


def close(code: int | None = None, reason: bytes | str = b"", *, rsv: int = 0) -> bytes:
    body = b"" if code is None else struct.pack("!H", code)
    body += reason.encode() if isinstance(reason, str) else reason
    return frame(OP_CLOSE, body, rsv=rsv)


def pieces(frames: list[bytes], how: str, rng: random.Random) -> list[bytes]:
    """The bytes of ``frames`` as they are written: ``whole`` (one write),
    ``frames`` (a write per frame), ``octets`` (a write per byte) or
    ``random`` (cut at random points)."""
    data = b"".join(frames)
    if how == "whole":
        return [data]
    if how == "frames":
        return list(frames)
    if how == "octets":
        return [data[i : i + 1] for i in range(len(data))]
    assert how == "random", how
    if len(data) < 2:
        return [data]
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 12))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


# --- permessage-deflate: what was offered, what was agreed -------------------------

_PARAM = re.compile(r"\A([A-Za-z_]+)(?:=(.*))?\Z")
_RESPONSE_PARAMS = (
    "server_no_context_takeover",
    "client_no_context_takeover",
    "server_max_window_bits",
    "client_max_window_bits",
)


def _elements(header: str) -> list[tuple[str, list[tuple[str, str | None]]]]:
    """A Sec-WebSocket-Extensions value: (name, [(param, value or None)])."""
    out = []
    for element in header.split(","):
        name, *params = [part.strip() for part in element.split(";")]
        parsed = []
        for param in params:
            match = _PARAM.match(param)
            assert match, f"malformed extension parameter {param!r} in {header!r}"
            value = match[2].strip().strip('"') if match[2] is not None else None
            parsed.append((match[1], value))
        out.append((name, parsed))
    return out


@dataclass(frozen=True)
class Deflate:
    """The permessage-deflate configuration a response stands for."""

    server_bits: int = 15
    server_no_context: bool = False
    client_bits: int = 15
    client_no_context: bool = False


def _bits(value: str | None, header: str) -> int:
    # RFC 7692 §7.1.2.1/§7.1.2.2: a decimal 8 to 15, no leading zero.
    assert value is not None and re.fullmatch(r"[1-9][0-9]?", value), (value, header)
    bits = int(value)
    assert 8 <= bits <= 15, header
    return bits


def agreed(offer: str, response: str | None) -> Deflate | None:
    """The configuration the server's response agrees to (None: declined),
    after checking that it is a valid answer to one of the offers in
    ``offer`` (RFC 7692 §5, §7.1): exactly one permessage-deflate element,
    only parameters defined for a response, each once, with valid values;
    ``server_no_context_takeover`` if that offer asked for it,
    ``server_max_window_bits`` at most the offered value if it asked for
    one, ``client_max_window_bits`` only if the offer had it and at most
    its value."""
    if response is None:
        return None
    (element,) = _elements(response)  # RFC 7692 §5: one PMCE at most, here the only one
    name, params = element
    assert name == "permessage-deflate", response
    names = [p for p, _ in params]
    assert len(set(names)) == len(names), f"a parameter twice: {response!r}"
    assert set(names) <= set(_RESPONSE_PARAMS), f"not a response parameter: {response!r}"
    got = dict(params)
    for flag in ("server_no_context_takeover", "client_no_context_takeover"):
        assert got.get(flag) is None, f"{flag} takes no value: {response!r}"
    server_bits = (
        _bits(got["server_max_window_bits"], response) if "server_max_window_bits" in got else None
    )
    client_bits = (
        _bits(got["client_max_window_bits"], response) if "client_max_window_bits" in got else None
    )

    def accepts(offered: dict[str, str | None]) -> bool:
        if "server_no_context_takeover" in offered and "server_no_context_takeover" not in got:
            return False
        if "server_max_window_bits" in offered:
            asked = int(offered["server_max_window_bits"] or 15)
            if server_bits is None or server_bits > asked:
                return False
        if "client_max_window_bits" not in offered:
            return client_bits is None
        limit = offered["client_max_window_bits"]
        return client_bits is None or limit is None or client_bits <= int(limit)

    offers = [dict(p) for n, p in _elements(offer) if n == "permessage-deflate"]
    assert any(accepts(o) for o in offers), f"{response!r} accepts none of {offer!r}"
    return Deflate(
        server_bits=server_bits or 15,
        server_no_context="server_no_context_takeover" in got,
        client_bits=client_bits or 15,
        client_no_context="client_no_context_takeover" in got,
    )


class _Offer(PerMessageDeflate):
    """Lets wsproto's client handshake take a permessage-deflate response;
    the offer itself is written by hand (``Sec-WebSocket-Extensions`` in
    the request's headers), so this one offers nothing of its own."""

    def offer(self) -> bool | str:
        return False


# --- the client ----------------------------------------------------------------


@dataclass
class Peer:
    """A strict WebSocket client on an open connection (see the module's
    docstring)."""

    stream: trio.SocketStream
    deflate: Deflate | None = None
    rng: random.Random = field(default_factory=random.Random)
    buf: bytearray = field(default_factory=bytearray)
    eof: bool = False
    #: The connection ended with a reset rather than a FIN.
    reset: bool = False
    closed: bool = False
    #: A write found the connection closed by the server.
    write_failed: bool = False
    #: Data frames received with RSV1 (compressed).
    compressed: int = 0
    _parts: list[bytes] = field(default_factory=list)
    _opcode: int | None = None
    _rsv1: bool = False
    _inflater: Any = None
    _compressor: Any = None

    # sending

    async def send(self, *frames: bytes, how: str = "whole", sync: bool = True) -> None:
        """Write ``frames`` in ``how`` pieces (``pieces``); with ``sync``,
        the server reads each piece before the next is written."""
        for piece in pieces(list(frames), how, self.rng):
            try:
                await self.stream.send_all(piece)
            except trio.BrokenResourceError:
                # The server failed the connection before it had it all;
                # what it sent first is still to be read.
                self.write_failed = True
                return
            if sync:
                await trio.testing.wait_all_tasks_blocked()

    def compress(self, data: bytes) -> bytes:
        """One message compressed as this client may (RFC 7692 §7.2.1):
        within the agreed client window, with context takeover unless
        ``client_no_context_takeover`` was agreed."""
        assert self.deflate is not None
        if self._compressor is None or self.deflate.client_no_context:
            self._compressor = zlib.compressobj(6, zlib.DEFLATED, -self.deflate.client_bits)
        out: bytes = self._compressor.compress(data) + self._compressor.flush(zlib.Z_SYNC_FLUSH)
        assert out.endswith(b"\x00\x00\xff\xff")
        return out[:-4]

    # receiving

    async def _fill(self, timeout: float) -> None:  # noqa: ASYNC109
        with trio.fail_after(timeout):
            try:
                data = await self.stream.receive_some(1 << 20)
            except trio.BrokenResourceError:
                self.reset = True
                data = b""
        if data:
            self.buf += data
        else:
            self.eof = True

    def _frame(self) -> tuple[int, bool, bool, bytes] | None:
        """The next whole server frame off the buffer, checked (RFC 6455
        §5.1-§5.5): (opcode, fin, rsv1, payload)."""
        buf = self.buf
        if len(buf) < 2:
            return None
        b0, b1 = buf[0], buf[1]
        head = bytes(buf[:2])
        assert not b1 & 0x80, f"a masked server frame (RFC 6455 §5.1): {head.hex()}"
        assert not b0 & 0x30, f"RSV2/RSV3 set by the server (§5.2): {head.hex()}"
        opcode = b0 & 0x0F
        fin = bool(b0 & 0x80)
        rsv1 = bool(b0 & 0x40)
        assert opcode in (0, 1, 2, 8, 9, 10), f"reserved opcode from the server: {head.hex()}"
        length = b1 & 0x7F
        pos = 2
        if length == 126:
            if len(buf) < 4:
                return None
            length = int.from_bytes(buf[2:4], "big")
            pos = 4
            assert length > 125, f"non-minimal length (§5.2): {bytes(buf[:4]).hex()}"
        elif length == 127:
            if len(buf) < 10:
                return None
            length = int.from_bytes(buf[2:10], "big")
            pos = 10
            assert 65535 < length < 2**63, f"non-minimal length (§5.2): {bytes(buf[:10]).hex()}"
        if opcode >= 8:
            assert fin and length <= 125, f"control frame fragmented or long (§5.5): {head.hex()}"
            assert not rsv1, f"RSV1 on a control frame (RFC 7692 §6): {head.hex()}"
        if rsv1:
            assert self.deflate is not None, f"RSV1 without permessage-deflate (§5.2): {head.hex()}"
            assert opcode in (1, 2), f"RSV1 on a continuation (RFC 7692 §6.1): {head.hex()}"
        if len(buf) < pos + length:
            return None
        payload = bytes(buf[pos : pos + length])
        del buf[: pos + length]
        return opcode, fin, rsv1, payload

    def _take(self, opcode: int, fin: bool, rsv1: bool, payload: bytes) -> Item | None:
        """The item a frame completes (None: a fragment of a message)."""
        assert not self.closed, "a frame after the server's close (RFC 6455 §5.5.1)"
        if opcode == OP_CLOSE:
            self.closed = True
            if not payload:
                return ("close", None)
            assert len(payload) >= 2, f"1-byte close payload: {payload.hex()}"
            code = int.from_bytes(payload[:2], "big")
            assert code in (
                1000,
                1001,
                1002,
                1003,
                1007,
                1008,
                1009,
                1010,
                1011,
                1012,
                1013,
                1014,
            ) or (3000 <= code <= 4999), f"the server sent close code {code} (RFC 6455 §7.4)"
            payload[2:].decode()  # the reason is UTF-8 (§5.5.1)
            return ("close", code)
        if opcode == OP_PING:
            return ("ping", payload)
        if opcode == OP_PONG:
            return ("pong", payload)
        if opcode == OP_CONT:
            assert self._opcode is not None, "a continuation with no message (§5.4)"
        else:
            assert self._opcode is None, "a new message inside a fragmented one (§5.4)"
            self._opcode = opcode
            self._rsv1 = rsv1
        self._parts.append(payload)
        if not fin:
            return None
        data = b"".join(self._parts)
        kind = self._opcode
        self._parts = []
        self._opcode = None
        if self._rsv1:
            self.compressed += 1
            data = self._inflate(data)
        if kind == OP_TEXT:
            return ("text", data.decode())  # strict: the server's text is UTF-8 (§8.1)
        return ("binary", data)

    def _inflate(self, data: bytes) -> bytes:
        """RFC 7692 §7.2.2, with the window the server agreed to stay in."""
        assert self.deflate is not None
        if self._inflater is None or self.deflate.server_no_context:
            self._inflater = zlib.decompressobj(-self.deflate.server_bits)
        out: bytes = self._inflater.decompress(data + b"\x00\x00\xff\xff")
        assert not self._inflater.unused_data
        return out

    async def next(self, timeout: float = 5.0) -> Item | None:  # noqa: ASYNC109
        """The next message, control frame or close from the server; None
        once the connection has ended."""
        while True:
            got = self._frame()
            if got is not None:
                item = self._take(*got)
                if item is not None:
                    return item
                continue
            if self.eof:
                assert not self.buf, f"the connection ended inside a frame: {bytes(self.buf)!r}"
                return None
            await self._fill(timeout)

    def failed_yet(self) -> bool:
        """Whether the server has already sent something (its close, for
        the fail-fast checks), without waiting: the server runs in this
        Trio run, so what it wrote is in the socket by now."""
        if self.buf:
            return True
        poller = select.poll()
        poller.register(self.stream.socket.fileno(), select.POLLIN)
        return bool(poller.poll(0))

    async def expect(self, *items: Item) -> None:
        for want in items:
            got = await self.next()
            if want[0] == "close" and isinstance(want[1], (set, frozenset)):
                assert got is not None and got[0] == "close" and got[1] in want[1], (want, got)
            else:
                assert got == want, f"expected {_short(want)}, got {_short(got)}"

    async def expect_end(self) -> None:
        """The server closes the TCP connection after the closing handshake
        (RFC 6455 §7.1.1: the server closes first)."""
        got = await self.next(timeout=2.0)
        assert got is None, f"expected the end of the connection, got {_short(got)}"

    async def expect_failure(self, code: int | set[int]) -> None:
        """The server fails the connection (RFC 6455 §7.1.7): its close with
        ``code``, then the end of TCP. The client answers the close, as a
        client does (§5.5.1), if the socket still takes it."""
        codes = {code} if isinstance(code, int) else code
        got = await self.next()
        assert got is not None and got[0] == "close" and got[1] in codes, (
            f"expected a close with {sorted(codes)}, got {_short(got)}"
        )
        try:
            await self.stream.send_all(close(got[1]))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        await self.expect_end()

    async def close_cleanly(self) -> None:
        """The client's closing handshake: the server echoes the code
        (RFC 6455 §5.5.1, §7.4.1) and closes TCP."""
        await self.send(close(NORMAL, "bye"))
        await self.expect(("close", NORMAL))
        await self.expect_end()
        assert not self.reset, "a reset, not a clean end of TCP"


def _short(item: Item | None) -> str:
    text_ = repr(item)
    return text_ if len(text_) < 200 else text_[:200] + f"... ({len(text_)} chars)"


@asynccontextmanager
async def connect(
    server: EchoServer, *, offer: str | None = None, path: str = "/", seed: object = 0
) -> AsyncIterator[Peer]:
    """An open connection to ``server`` (``offer``: Sec-WebSocket-Extensions
    as written by a client), its deflate agreed from the response."""
    stream = await tcp_connect(server.port)
    async with stream:
        raw = RawWS(stream)
        headers = [] if offer is None else [(b"Sec-WebSocket-Extensions", offer.encode())]
        event = await raw.handshake(
            server.port,
            path,
            extensions=[] if offer is None else [_Offer()],
            extra_headers=headers,
        )
        assert isinstance(event, AcceptConnection) and raw.status == 101, raw.response_head
        assert not raw.frames_in, "the server spoke first"
        responses = [
            line.split(b":", 1)[1].strip().decode()
            for line in raw.response_head.split(b"\r\n")[1:]
            if line.split(b":", 1)[0].strip().lower() == b"sec-websocket-extensions"
        ]
        assert len(responses) <= 1, raw.response_head
        response = responses[0] if responses else None
        if offer is None:
            assert response is None, "an extension nobody offered"
        deflate = agreed(offer, response) if offer is not None else None
        yield Peer(stream, deflate, random.Random(repr(seed)))


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    """The echo, ``max_frame_bytes`` 16 MiB (Autobahn's largest message)."""
    async with echo_server() as server:
        yield server


@pytest.fixture
async def small_echo() -> AsyncIterator[EchoServer]:
    """The echo at chatd's default ``max_frame_bytes`` (64 KiB)."""
    async with echo_server(max_message_bytes=SMALL_LIMIT) as server:
        yield server


# --- the case table (sections 1 to 7) ------------------------------------------------


@dataclass
class Case:
    """What the client sends (``how``: as Autobahn writes it) and what the
    server must send back, in order; ``fails``: the close code with which
    the server then fails the connection (else the client closes cleanly)."""

    rfc: str
    frames: list[bytes]
    expect: list[Item]
    fails: int | set[int] | None = None
    how: str = "whole"


CASES: dict[str, Case] = {}


def case(number: str, rfc: str, frames: list[bytes], expect: list[Item], **kw: Any) -> None:
    assert number not in CASES, number
    CASES[number] = Case(rfc, frames, expect, **kw)


def echoed(payload: bytes | str) -> Item:
    return ("text", payload.decode() if isinstance(payload, bytes) else payload)


BIN: Item = ("text", BINARY_NOTICE)

# 1 (RFC 6455 §5.2, §5.6): text and binary messages of each length class
# (7-bit, 16-bit, 64-bit lengths), echoed; 1.x.8 written in 997-byte pieces.
for _n, _size in enumerate([0, 125, 126, 127, 128, 65535, 65536], start=1):
    case(f"1.1.{_n}", "6455 §5.2", [text("*" * _size)], [echoed("*" * _size)])
    case(f"1.2.{_n}", "6455 §5.6", [binary(b"\xfe" * _size)], [BIN])
CASES["1.1.8"] = Case("6455 §5.2", [text("*" * 65536)], [echoed("*" * 65536)], how="chops997")
CASES["1.2.8"] = Case("6455 §5.6", [binary(b"\xfe" * 65536)], [BIN], how="chops997")

# 2 (RFC 6455 §5.5.2, §5.5.3): a ping is answered by a pong with its payload;
# a control frame carries at most 125 bytes; an unsolicited pong is ignored.
case("2.1", "6455 §5.5.2", [ping()], [("pong", b"")])
case("2.2", "6455 §5.5.2", [ping("Hello, world!")], [("pong", b"Hello, world!")])
_BIN8 = b"\x00\xff\xfe\xfd\xfc\xfb\x00\xff"
case("2.3", "6455 §5.5.2", [ping(_BIN8)], [("pong", _BIN8)])
case("2.4", "6455 §5.5.2", [ping(b"\xfe" * 125)], [("pong", b"\xfe" * 125)])
case("2.5", "6455 §5.5", [ping(b"\xfe" * 126)], [], fails=PROTOCOL_ERROR)
case("2.6", "6455 §5.5.2", [ping(b"\xfe" * 125)], [("pong", b"\xfe" * 125)], how="octets")
# Unsolicited pongs: nothing comes back; a ping after them is the barrier.
case("2.7", "6455 §5.5.3", [pong(), ping("barrier")], [("pong", b"barrier")])
case(
    "2.8",
    "6455 §5.5.3",
    [pong("unsolicited pong payload"), ping("barrier")],
    [("pong", b"barrier")],
)
case(
    "2.9",
    "6455 §5.5.3",
    [pong("unsolicited pong payload"), ping("ping payload")],
    [("pong", b"ping payload")],
)
_PINGS = [f"payload-{i}" for i in range(10)]
case("2.10", "6455 §5.5.2", [ping(p) for p in _PINGS], [("pong", p.encode()) for p in _PINGS])
case(
    "2.11",
    "6455 §5.5.2",
    [ping(p) for p in _PINGS],
    [("pong", p.encode()) for p in _PINGS],
    how="octets",
)

# 3 (RFC 6455 §5.2): an RSV bit no extension defines fails the connection;
# what came before it is answered, nothing after it.
_HW = "Hello, world!"
case("3.1", "6455 §5.2", [text(_HW, rsv=1)], [], fails=PROTOCOL_ERROR)
case("3.2", "6455 §5.2", [text(_HW), text(_HW, rsv=2), ping()], [echoed(_HW)], fails=PROTOCOL_ERROR)
case(
    "3.3",
    "6455 §5.2",
    [text(_HW), text(_HW, rsv=3), ping()],
    [echoed(_HW)],
    fails=PROTOCOL_ERROR,
    how="frames",
)
case(
    "3.4",
    "6455 §5.2",
    [text(_HW), text(_HW, rsv=4), ping()],
    [echoed(_HW)],
    fails=PROTOCOL_ERROR,
    how="octets",
)
case(
    "3.5",
    "6455 §5.2",
    [binary(b"\x00\xff\xfe\xfd\xfc\xfb\x00\xff", rsv=5)],
    [],
    fails=PROTOCOL_ERROR,
)
case("3.6", "6455 §5.2", [ping(_HW, rsv=6)], [], fails=PROTOCOL_ERROR)
case("3.7", "6455 §5.2", [close(NORMAL, rsv=7)], [], fails=PROTOCOL_ERROR)

# 4 (RFC 6455 §5.2): a reserved opcode (3-7 data, 11-15 control) fails the
# connection.
for _sub, _ops in (("1", (3, 4, 5, 6, 7)), ("2", (11, 12, 13, 14, 15))):
    case(f"4.{_sub}.1", "6455 §5.2", [frame(_ops[0])], [], fails=PROTOCOL_ERROR)
    case(
        f"4.{_sub}.2",
        "6455 §5.2",
        [frame(_ops[1], "reserved opcode payload")],
        [],
        fails=PROTOCOL_ERROR,
    )
    case(
        f"4.{_sub}.3",
        "6455 §5.2",
        [text(_HW), frame(_ops[2]), ping()],
        [echoed(_HW)],
        fails=PROTOCOL_ERROR,
    )
    for _k, _op in ((4, _ops[3]), (5, _ops[4])):
        case(
            f"4.{_sub}.{_k}",
            "6455 §5.2",
            [text(_HW), frame(_op, "reserved opcode payload"), ping()],
            [echoed(_HW)],
            fails=PROTOCOL_ERROR,
        )

# 5 (RFC 6455 §5.4): fragmentation. Control frames are never fragmented
# but may come between the fragments of a message; a continuation needs a
# message to continue, and a message in progress needs its continuations.
case(
    "5.1",
    "6455 §5.4, §5.5",
    [ping("fragment1", fin=False), cont("fragment2")],
    [],
    fails=PROTOCOL_ERROR,
)
case(
    "5.2",
    "6455 §5.4, §5.5",
    [frame(OP_PONG, "fragment1", fin=False), cont("fragment2")],
    [],
    fails=PROTOCOL_ERROR,
)
_F = [text("fragment1", fin=False), cont("fragment2")]
case("5.3", "6455 §5.4", _F, [echoed("fragment1fragment2")])
case("5.4", "6455 §5.4", _F, [echoed("fragment1fragment2")], how="frames")
case("5.5", "6455 §5.4", _F, [echoed("fragment1fragment2")], how="octets")
_FP = [text("fragment1", fin=False), ping("ping payload"), cont("fragment2")]
_FPX: list[Item] = [("pong", b"ping payload"), echoed("fragment1fragment2")]
case("5.6", "6455 §5.4", _FP, _FPX)
case("5.7", "6455 §5.4", _FP, _FPX, how="frames")
case("5.8", "6455 §5.4", _FP, _FPX, how="octets")
_C = [cont("non-continuation payload"), text(_HW)]
case("5.9", "6455 §5.4", _C, [], fails=PROTOCOL_ERROR)
case("5.10", "6455 §5.4", _C, [], fails=PROTOCOL_ERROR, how="frames")
case("5.11", "6455 §5.4", _C, [], fails=PROTOCOL_ERROR, how="octets")
_C = [cont("non-continuation payload", fin=False), text(_HW)]
case("5.12", "6455 §5.4", _C, [], fails=PROTOCOL_ERROR)
case("5.13", "6455 §5.4", _C, [], fails=PROTOCOL_ERROR, how="frames")
case("5.14", "6455 §5.4", _C, [], fails=PROTOCOL_ERROR, how="octets")
case(
    "5.15",
    "6455 §5.4",
    [
        text("fragment1", fin=False),
        cont("fragment2"),
        cont("fragment3", fin=False),
        text("fragment4"),
    ],
    [echoed("fragment1fragment2")],
    fails=PROTOCOL_ERROR,
)
case(
    "5.16",
    "6455 §5.4",
    2 * [cont("fragment1", fin=False), text("fragment2", fin=False), cont("fragment3")],
    [],
    fails=PROTOCOL_ERROR,
)
case(
    "5.17",
    "6455 §5.4",
    2 * [cont("fragment1"), text("fragment2", fin=False), cont("fragment3")],
    [],
    fails=PROTOCOL_ERROR,
)
case(
    "5.18",
    "6455 §5.4",
    [text("fragment1", fin=False), text("fragment2")],
    [],
    fails=PROTOCOL_ERROR,
)
_F19 = [
    text("fragment1", fin=False),
    cont("fragment2", fin=False),
    ping("pongme 1!"),
    cont("fragment3", fin=False),
    cont("fragment4", fin=False),
    ping("pongme 2!"),
    cont("fragment5"),
]
_F19X: list[Item] = [
    ("pong", b"pongme 1!"),
    ("pong", b"pongme 2!"),
    echoed("fragment1fragment2fragment3fragment4fragment5"),
]
case("5.19", "6455 §5.4", _F19, _F19X)
case("5.20", "6455 §5.4", _F19, _F19X, how="frames")
# Not numbered by Autobahn: a message in fragments of one byte each.
case(
    "5.x-1-byte-fragments",
    "6455 §5.4",
    [text(b"H", fin=False), *[cont(bytes([c]), fin=False) for c in _HW.encode()[1:-1]], cont(b"!")],
    [echoed(_HW)],
)

# 6 (RFC 6455 §5.6, §8.1; RFC 3629): text is UTF-8; a text message that is
# not fails the connection with 1007.
case("6.1.1", "6455 §5.6", [text("")], [echoed("")])
case("6.1.2", "6455 §5.4", [text("", fin=False), cont("", fin=False), cont("")], [echoed("")])
case(
    "6.1.3",
    "6455 §5.4",
    [text("", fin=False), cont("middle frame payload", fin=False), cont("")],
    [echoed("middle frame payload")],
)
_HELLO = "Hello-µ@ßöäüàá-UTF-8!!".encode()
case("6.2.1", "6455 §8.1", [text(_HELLO)], [echoed(_HELLO)])
case("6.2.2", "6455 §8.1", [text(_HELLO[:12], fin=False), cont(_HELLO[12:])], [echoed(_HELLO)])


def _one_octet_frames(data: bytes) -> list[bytes]:
    if len(data) == 1:
        return [text(data)]
    return [
        text(data[:1], fin=False),
        *[cont(data[i : i + 1], fin=False) for i in range(1, len(data) - 1)],
        cont(data[-1:]),
    ]


_KOSME = b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5"
case("6.2.3", "6455 §8.1", _one_octet_frames(_HELLO), [echoed(_HELLO)])
case("6.2.4", "6455 §8.1", _one_octet_frames(_KOSME), [echoed(_KOSME)])
_BAD = _KOSME + b"\xed\xa0\x80" + b"edited"  # a surrogate inside
case("6.3.1", "6455 §8.1", [text(_BAD)], [], fails=INVALID_PAYLOAD)
case("6.3.2", "6455 §8.1", _one_octet_frames(_BAD), [], fails=INVALID_PAYLOAD)


def _utf8_sequences() -> list[tuple[str, list[tuple[bool, bytes]]]]:
    """Autobahn's UTF-8 sequences (6.5 to 6.23), from Markus Kuhn's
    UTF-8-test.txt: (valid, bytes) by group, in Autobahn's order."""
    groups: list[tuple[str, list[tuple[bool, bytes]]]] = []
    groups.append(
        (
            "valid sequences",
            [
                (True, b"hello\x24world"),
                (True, b"hello\xc2\xa2world"),
                (True, b"hello\xe2\x82\xacworld"),
                (True, b"hello\xf0\xa4\xad\xa2world"),
                (True, _KOSME),
            ],
        )
    )
    prefixes = []
    for i in range(1, len(_KOSME) + 1):
        try:
            _KOSME[:i].decode()
            prefixes.append((True, _KOSME[:i]))
        except UnicodeDecodeError:
            prefixes.append((False, _KOSME[:i]))
    groups.append(("all prefixes of a valid string", prefixes))
    groups.append(
        (
            "first possible sequence of a length",
            [
                (True, b"\x00"),
                (True, b"\xc2\x80"),
                (True, b"\xe0\xa0\x80"),
                (True, b"\xf0\x90\x80\x80"),
            ],
        )
    )
    groups.append(
        (
            "first 5/6-byte sequences",
            [(False, b"\xf8\x88\x80\x80\x80"), (False, b"\xfc\x84\x80\x80\x80\x80")],
        )
    )
    groups.append(
        (
            "last possible sequence of a length",
            [
                (True, b"\x7f"),
                (True, b"\xdf\xbf"),
                (True, b"\xef\xbf\xbf"),
                (True, b"\xf4\x8f\xbf\xbf"),
            ],
        )
    )
    groups.append(
        (
            "last 4/5/6-byte sequences (past U+10FFFF)",
            [
                (False, b"\xf7\xbf\xbf\xbf"),
                (False, b"\xfb\xbf\xbf\xbf\xbf"),
                (False, b"\xfd\xbf\xbf\xbf\xbf\xbf"),
            ],
        )
    )
    groups.append(
        (
            "other boundary conditions",
            [
                (True, b"\xed\x9f\xbf"),
                (True, b"\xee\x80\x80"),
                (True, b"\xef\xbf\xbd"),
                (True, b"\xf4\x8f\xbf\xbf"),
                (False, b"\xf4\x90\x80\x80"),  # U+110000
            ],
        )
    )
    continuation = [
        (False, b"\x80"),
        (False, b"\xbf"),
        (False, b"\x80\xbf"),
        (False, b"\x80\xbf\x80"),
        (False, b"\x80\xbf\x80\xbf"),
        (False, b"\x80\xbf\x80\xbf\x80"),
        (False, b"\x80\xbf\x80\xbf\x80\xbf"),
        (False, bytes(range(0x80, 0xBF))),
    ]
    groups.append(("unexpected continuation bytes", continuation))
    lonely = [
        (False, b"".join(bytes([i, 0x20]) for i in range(lo, hi)))
        for lo, hi in ((0xC0, 0xDF), (0xE0, 0xEF), (0xF0, 0xF7), (0xF8, 0xFB), (0xFC, 0xFD))
    ]
    groups.append(("lonely start characters", lonely))
    missing = [
        b"\xc0",
        b"\xe0\x80",
        b"\xf0\x80\x80",
        b"\xf8\x80\x80\x80",
        b"\xfc\x80\x80\x80\x80",
        b"\xdf",
        b"\xef\xbf",
        b"\xf7\xbf\xbf",
        b"\xfb\xbf\xbf\xbf",
        b"\xfd\xbf\xbf\xbf\xbf",
    ]
    groups.append(("last continuation byte missing", [(False, m) for m in missing]))
    groups.append(("concatenated incomplete sequences", [(False, b"".join(missing))]))
    groups.append(
        ("impossible bytes", [(False, b"\xfe"), (False, b"\xff"), (False, b"\xfe\xfe\xff\xff")])
    )
    groups.append(
        (
            "overlong ASCII",
            [
                (False, b"\xc0\xaf"),
                (False, b"\xe0\x80\xaf"),
                (False, b"\xf0\x80\x80\xaf"),
                (False, b"\xf8\x80\x80\x80\xaf"),
                (False, b"\xfc\x80\x80\x80\x80\xaf"),
            ],
        )
    )
    groups.append(
        (
            "maximum overlong sequences",
            [
                (False, b"\xc1\xbf"),
                (False, b"\xe0\x9f\xbf"),
                (False, b"\xf0\x8f\xbf\xbf"),
                (False, b"\xf8\x87\xbf\xbf\xbf"),
                (False, b"\xfc\x83\xbf\xbf\xbf\xbf"),
            ],
        )
    )
    groups.append(
        (
            "overlong NUL",
            [
                (False, b"\xc0\x80"),
                (False, b"\xe0\x80\x80"),
                (False, b"\xf0\x80\x80\x80"),
                (False, b"\xf8\x80\x80\x80\x80"),
                (False, b"\xfc\x80\x80\x80\x80\x80"),
            ],
        )
    )
    singles = [b"\xed\xa0\x80", b"\xed\xad\xbf", b"\xed\xae\x80", b"\xed\xaf\xbf", b"\xed\xb0\x80"]
    singles += [b"\xed\xbe\x80", b"\xed\xbf\xbf"]
    groups.append(("single UTF-16 surrogates", [(False, s) for s in singles]))
    pairs = []
    for high in (b"\xed\xa0\x80", b"\xed\xad\xbf", b"\xed\xae\x80", b"\xed\xaf\xbf"):
        for low in (b"\xed\xb0\x80", b"\xed\xbf\xbf"):
            pairs.append((False, high + low))
    groups.append(("paired UTF-16 surrogates", pairs))
    nonchars = [(True, b"\xef\xbf\xbe"), (True, b"\xef\xbf\xbf")]
    for z1 in (0xF0, 0xF1, 0xF2, 0xF3, 0xF4):
        for z2 in (0x8F, 0x9F, 0xAF, 0xBF):
            if z1 == 0xF4 and z2 != 0x8F:
                continue  # past U+10FFFF
            for z3 in (0xBE, 0xBF):
                seq = bytes([z1, z2, 0xBF, z3])
                if seq not in (b"\xf0\x8f\xbf\xbe", b"\xf0\x8f\xbf\xbf"):  # overlong
                    nonchars.append((True, seq))
    groups.append(("non-characters (valid UTF-8)", nonchars))
    specials = [(True, bytes([0xEF, 0xBF, c])) for c in range(0xB9, 0xC0)]
    groups.append(("Unicode specials", specials))
    return groups


for _g, (_name, _seqs) in enumerate(_utf8_sequences(), start=5):
    for _j, (_valid, _seq) in enumerate(_seqs, start=1):
        if _valid:
            case(f"6.{_g}.{_j}", "6455 §8.1", [text(_seq)], [echoed(_seq)])
        else:
            case(f"6.{_g}.{_j}", "6455 §8.1", [text(_seq)], [], fails=INVALID_PAYLOAD)

# 7 (RFC 6455 §5.5.1, §7.1.5, §7.4): the closing handshake. The server
# answers a close with a close (echoing the code) and closes TCP; nothing
# sent after a close is processed; a close payload is empty or a valid code
# and a UTF-8 reason, at most 125 bytes.
case("7.1.1", "6455 §5.5.1", [text(_HW), close(NORMAL)], [echoed(_HW), ("close", NORMAL)])
case("7.1.2", "6455 §5.5.1", [close(NORMAL), close(NORMAL)], [("close", NORMAL)])
case("7.1.3", "6455 §5.5.1", [close(NORMAL), ping(_HW)], [("close", NORMAL)])
case("7.1.4", "6455 §5.5.1", [close(NORMAL), text(_HW)], [("close", NORMAL)])
case(
    "7.1.5",
    "6455 §5.5.1",
    [text("fragment1", fin=False), close(NORMAL), cont("fragment2")],
    [("close", NORMAL)],
)
# 7.3.1: no code received, so none to echo (1005 is never sent, §7.4.1):
# an empty close or 1000.
case("7.3.1", "6455 §5.5.1", [close()], [("close", frozenset({None, NORMAL}))])
case("7.3.2", "6455 §5.5.1", [frame(OP_CLOSE, b"\x03")], [], fails=PROTOCOL_ERROR)
case("7.3.3", "6455 §5.5.1", [close(NORMAL)], [("close", NORMAL)])
case("7.3.4", "6455 §5.5.1", [close(NORMAL, _HW)], [("close", NORMAL)])
case("7.3.5", "6455 §5.5", [close(NORMAL, "*" * 123)], [("close", NORMAL)])
case("7.3.6", "6455 §5.5", [close(NORMAL, "*" * 124)], [], fails=PROTOCOL_ERROR)
case("7.5.1", "6455 §5.5.1, §8.1", [close(NORMAL, _BAD)], [], fails=INVALID_PAYLOAD)
_VALID = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999]
for _j, _code in enumerate(_VALID, start=1):
    # "Clean close with normal or echoed code": chatd echoes it.
    case(f"7.7.{_j}", "6455 §7.4.1", [close(_code)], [("close", frozenset({NORMAL, _code}))])
_INVALID = [0, 999, 1004, 1005, 1006, 1016, 1100, 2000, 2999]
for _j, _code in enumerate(_INVALID, start=1):
    case(f"7.9.{_j}", "6455 §7.4.1, §7.4.2", [close(_code)], [], fails=PROTOCOL_ERROR)
# Not numbered by Autobahn: 1015 is reserved like 1005 and 1006 (§7.4.1: never
# sent in a close frame); IANA's 1012 and 1013 are echoed.
case("7.9.x-1015", "6455 §7.4.1", [close(1015)], [], fails=PROTOCOL_ERROR)
case("7.7.x-1012", "6455 §7.4.2 (IANA)", [close(1012)], [("close", frozenset({NORMAL, 1012}))])
case("7.7.x-1013", "6455 §7.4.2 (IANA)", [close(1013)], [("close", frozenset({NORMAL, 1013}))])
# 7.13 (informational in Autobahn): codes past 4999 are in no range of §7.4.2;
# chatd fails them, which the RFC allows.
case("7.13.1", "6455 §7.4.2", [close(5000)], [], fails=PROTOCOL_ERROR)
case("7.13.2", "6455 §7.4.2", [close(65535)], [], fails=PROTOCOL_ERROR)

_CLOSED_BY_CLIENT = {n for n, c in CASES.items() if any(i[0] == "close" for i in c.expect)}


def _chop997(frames: list[bytes]) -> list[bytes]:
    data = b"".join(frames)
    return [data[i : i + 997] for i in range(0, len(data), 997)]


@pytest.mark.parametrize("split", ["as-sent", "random-split"])
@pytest.mark.parametrize("number", list(CASES))
async def test_case(echo: EchoServer, number: str, split: str) -> None:
    """Autobahn's cases 1 to 7: the frames, written as Autobahn writes them
    and split at random points; what comes back, in order; then the close
    (the server's, or the client's clean one)."""
    spec = CASES[number]
    try:
        await _run_case(echo, number, split, spec)
    except AssertionError as exc:
        raise AssertionError(f"Autobahn {number} (RFC {spec.rfc}), {split}: {exc}") from exc


async def _run_case(echo: EchoServer, number: str, split: str, spec: Case) -> None:
    async with connect(echo, seed=(number, split)) as peer:
        if split == "random-split":
            await peer.send(*spec.frames, how="random")
        elif spec.how == "chops997":
            await peer.send(*_chop997(spec.frames), how="frames")
        else:
            await peer.send(*spec.frames, how=spec.how)
        await peer.expect(*spec.expect)
        if spec.fails is not None:
            await peer.expect_failure(spec.fails)
        elif number in _CLOSED_BY_CLIENT:
            await peer.expect_end()
        else:
            await peer.close_cleanly()
    session = echo.sessions[-1]
    with trio.fail_after(2):
        await session.done.wait()
    if spec.fails is not None:
        codes = {spec.fails} if isinstance(spec.fails, int) else spec.fails
        assert session.close_code in codes, session.close_code


def test_case_table_is_complete() -> None:
    """Every numbered case of Autobahn's sections 1 to 7 is in the table."""
    want = {f"1.1.{i}" for i in range(1, 9)} | {f"1.2.{i}" for i in range(1, 9)}
    want |= {f"2.{i}" for i in range(1, 12)}
    want |= {f"3.{i}" for i in range(1, 8)}
    want |= {f"4.{a}.{b}" for a in (1, 2) for b in range(1, 6)}
    want |= {f"5.{i}" for i in range(1, 21)}
    want |= {"6.1.1", "6.1.2", "6.1.3", "6.2.1", "6.2.2", "6.2.3", "6.2.4", "6.3.1", "6.3.2"}
    sizes = [5, 11, 4, 2, 4, 3, 5, 8, 5, 10, 1, 3, 5, 5, 5, 7, 8, 34, 7]
    want |= {f"6.{g}.{j}" for g, n in enumerate(sizes, start=5) for j in range(1, n + 1)}
    want |= {f"7.1.{i}" for i in range(1, 6)} | {f"7.3.{i}" for i in range(1, 7)} | {"7.5.1"}
    want |= {f"7.7.{i}" for i in range(1, 14)} | {f"7.9.{i}" for i in range(1, 10)}
    want |= {"7.13.1", "7.13.2"}
    assert want <= set(CASES), sorted(want - set(CASES))


# --- cases with a choice, or timing -----------------------------------------------

_P1, _P2, _P3 = _KOSME, b"\xf4\x90\x80\x80", b"edited"  # 6.4.1: PART2 is U+110000


@pytest.mark.parametrize(
    ("number", "parts", "same_frame"),
    [
        ("6.4.1", (_P1, _P2, _P3), False),
        ("6.4.2", ((_P1 + _P2)[:12], (_P1 + _P2)[12:13], (_P1 + _P2 + _P3)[13:]), False),
        ("6.4.3", (_P1, _P2, _P3), True),
        ("6.4.4", ((_P1 + _P2)[:12], (_P1 + _P2)[12:13], (_P1 + _P2 + _P3)[13:]), True),
    ],
)
async def test_invalid_utf8_fails_fast_or_at_the_end(
    echo: EchoServer, number: str, parts: tuple[bytes, bytes, bytes], same_frame: bool
) -> None:
    """6.4.1-6.4.4 (RFC 6455 §8.1): a text message whose second part makes
    it invalid UTF-8, in three frames (6.4.1, 6.4.2) or three pieces of one
    frame (6.4.3, 6.4.4). The RFC asks only that the connection be failed
    (1007); Autobahn grades failing at the second part "OK" and at the
    third "NON-STRICT". The first part alone must not fail it.

    chatd: fails fast on fragments (wsproto decodes each frame as it comes),
    but a single frame only once it is whole (the reader's fast path waits
    for the whole frame before decoding): NON-STRICT for 6.4.3 and 6.4.4."""
    async with connect(echo) as peer:
        if same_frame:
            whole = text(b"".join(parts))
            head = len(whole) - sum(map(len, parts))
            cut1, cut2 = head + len(parts[0]), head + len(parts[0]) + len(parts[1])
            writes = [whole[:cut1], whole[cut1:cut2], whole[cut2:]]
        else:
            writes = [text(parts[0], fin=False), cont(parts[1], fin=False), cont(parts[2])]
        await peer.send(writes[0])
        assert not peer.failed_yet(), f"{number}: failed on the valid first part"
        await peer.send(writes[1])
        fast = peer.failed_yet()
        if not fast:
            await peer.send(writes[2])
        await peer.expect_failure(INVALID_PAYLOAD)
    # What chatd does today (either is allowed; see the docstring).
    assert fast is (not same_frame), f"{number}: fail-fast {fast}"


async def test_7_1_6_message_then_close_then_ping(echo: EchoServer) -> None:
    """7.1.6 (RFC 6455 §5.5.1, §7.1.2): a 256 KiB message, a close and a
    ping in one write. The message came before the close, so it may be
    echoed (Autobahn: informational); the ping, after the close, is not
    answered; the close is. chatd echoes the message."""
    big = "BAsd7&jh23" * 26214 + "Bs"
    assert len(big) == 262142
    async with connect(echo) as peer:
        await peer.send(text(big), close(NORMAL), ping(_HW))
        got = await peer.next()
        if got == ("text", big):
            got = await peer.next()
        assert got == ("close", NORMAL), _short(got)
        await peer.expect_end()


async def test_close_code_registered_after_rfc6455(echo: EchoServer) -> None:
    """Not in Autobahn (RFC 6455 §7.4.2, IANA registry): 1014 (Bad Gateway)
    was registered after RFC 6455, like 1012 and 1013. A receiver may echo
    it or fail the connection as for any code it does not know. chatd
    (wsproto) echoes 1012 and 1013 but fails 1014 with 1002."""
    code = 1014
    async with connect(echo) as peer:
        await peer.send(close(code))
        got = await peer.next()
        assert got in (("close", code), ("close", NORMAL), ("close", PROTOCOL_ERROR)), got
        if got != ("close", PROTOCOL_ERROR):
            await peer.expect_end()
    assert got == ("close", PROTOCOL_ERROR)  # what chatd does today


async def test_7_x_failure_with_unread_input_reaches_the_client(echo: EchoServer) -> None:
    """Not in Autobahn (RFC 6455 §5.5.1, §7.1.1, §7.1.7; RFC 9112 §9.6). In
    one write: a 200 000-byte text message, a frame with reserved opcode 3
    (``83 80`` and a mask) and a 100 000-byte binary message, the client
    reading as it goes with a small receive buffer (8 KiB). The server
    echoes the text, fails the connection with 1002 with the binary message
    still unread, and the client must get the echo and the close frame,
    then the end of TCP: not a reset. (Closing a socket with unread bytes
    in it makes the kernel reset the connection and drop what the peer has
    not taken in yet, close frame included: chatd lingers instead, ending
    its side and reading and dropping until the client closes.)"""
    payload = _payload(200_000, 3)
    stream = await tcp_connect(echo.port, rcvbuf=8192)
    async with stream:
        event = await RawWS(stream).handshake(echo.port, "/")
        assert isinstance(event, AcceptConnection)
        session = echo.sessions[-1]
        received = bytearray()
        reset = False

        async def read() -> None:
            nonlocal reset
            while True:
                try:
                    data = await stream.receive_some(8192)
                except trio.BrokenResourceError:
                    reset = True
                    return
                if not data:
                    return
                received.extend(data)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                await stream.send_all(text(payload) + frame(3) + binary(b"\x00" * 100_000))
                await session.done.wait()
                assert session.close_code == PROTOCOL_ERROR
    frames = parse_frames(received)
    got = [(f.opcode, f.payload[:2] if f.opcode == OP_CLOSE else len(f.payload)) for f in frames]
    want = [(OP_TEXT, len(payload)), (OP_CLOSE, struct.pack("!H", PROTOCOL_ERROR))]
    assert got == want and not reset, (
        f"got {got} and {len(received)} bytes of a frame, then {'a reset' if reset else 'EOF'}"
    )


# --- 9: limits and performance --------------------------------------------------------

_MiB = 1 << 20


def _payload(size: int, seed: int) -> str:
    """``size`` ASCII characters, not all alike."""
    rng = random.Random(seed)
    chunk = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789 ") for _ in range(4096))
    return (chunk * (size // 4096 + 1))[:size]


@pytest.mark.parametrize(
    ("number", "size"),
    [
        ("9.1.1", 64 * 1024),
        ("9.1.2", 256 * 1024),
        ("9.1.3", _MiB),
        ("9.1.4", 4 * _MiB),
        ("9.1.5", 8 * _MiB),
        ("9.1.6", 16 * _MiB),
    ],
)
async def test_9_1_large_text(echo: EchoServer, number: str, size: int) -> None:
    """9.1.x (RFC 6455 §5.2, §10.4): one text frame of up to 16 MiB, the
    echo's ``max_frame_bytes``: echoed whole."""
    payload = _payload(size, size)
    async with connect(echo) as peer:
        await peer.send(text(payload), sync=False)
        await peer.expect(("text", payload))
        await peer.close_cleanly()


@pytest.mark.parametrize(
    ("number", "size"),
    [("9.2.1", 64 * 1024), ("9.2.3", _MiB), ("9.2.6", 16 * _MiB)],
)
async def test_9_2_large_binary(echo: EchoServer, number: str, size: int) -> None:
    """9.2.x (RFC 6455 §5.6): one binary frame of up to 16 MiB: taken (the
    echo's notice), the connection open."""
    async with connect(echo) as peer:
        await peer.send(binary(os.urandom(size)), sync=False)
        await peer.expect(BIN)
        await peer.close_cleanly()


@pytest.mark.parametrize(
    ("number", "fragment"),
    [
        ("9.3.1", 64),
        ("9.3.2", 256),
        ("9.3.3", 1024),
        ("9.3.4", 4096),
        ("9.3.5", 16384),
        ("9.3.6", 65536),
        ("9.3.7", 256 * 1024),
        ("9.3.8", _MiB),
        ("9.3.9", 4 * _MiB),
    ],
)
async def test_9_3_fragmented_text(echo: EchoServer, number: str, fragment: int) -> None:
    """9.3.x (RFC 6455 §5.4): a 4 MiB text message in fragments of 64 bytes
    to 4 MiB: reassembled and echoed."""
    payload = _payload(4 * _MiB, fragment).encode()
    chunks = [payload[i : i + fragment] for i in range(0, len(payload), fragment)]
    frames = [text(chunks[0], fin=len(chunks) == 1)]
    frames += [cont(c, fin=i == len(chunks) - 1) for i, c in enumerate(chunks) if i]
    async with connect(echo) as peer:
        await peer.send(b"".join(frames), sync=False)
        await peer.expect(echoed(payload))
        await peer.close_cleanly()


@pytest.mark.parametrize(
    ("number", "fragment"), [("9.4.1", 64), ("9.4.5", 16384), ("9.4.9", 4 * _MiB)]
)
async def test_9_4_fragmented_binary(echo: EchoServer, number: str, fragment: int) -> None:
    """9.4.x (RFC 6455 §5.4): a 4 MiB binary message in fragments."""
    payload = os.urandom(4 * _MiB)
    chunks = [payload[i : i + fragment] for i in range(0, len(payload), fragment)]
    frames = [binary(chunks[0], fin=len(chunks) == 1)]
    frames += [cont(c, fin=i == len(chunks) - 1) for i, c in enumerate(chunks) if i]
    async with connect(echo) as peer:
        await peer.send(b"".join(frames), sync=False)
        await peer.expect(BIN)
        await peer.close_cleanly()


@pytest.mark.parametrize(
    ("number", "chop"),
    [
        ("9.5.1", 64),
        ("9.5.2", 128),
        ("9.5.3", 256),
        ("9.5.4", 512),
        ("9.5.5", 1024),
        ("9.5.6", 2048),
    ],
)
async def test_9_5_text_in_chops(echo: EchoServer, number: str, chop: int) -> None:
    """9.5.x (RFC 6455 §5.2): a 1 MiB text frame written in pieces of 64 to
    2048 bytes: put together and echoed."""
    payload = _payload(_MiB, chop)
    data = text(payload)
    async with connect(echo) as peer:
        for i in range(0, len(data), chop):
            await peer.stream.send_all(data[i : i + chop])
        await peer.expect(("text", payload))
        await peer.close_cleanly()


@pytest.mark.parametrize(
    ("number", "size"),
    [("9.7.1", 0), ("9.7.2", 16), ("9.7.3", 64), ("9.7.4", 256), ("9.7.5", 1024), ("9.7.6", 4096)],
)
async def test_9_7_many_text_messages(echo: EchoServer, number: str, size: int) -> None:
    """9.7.x (RFC 6455 §5.6): 1000 text messages, each echoed before the
    next is sent."""
    payload = _payload(size, size)
    async with connect(echo) as peer:
        for _ in range(1000):
            await peer.send(text(payload), sync=False)
            await peer.expect(("text", payload))
        await peer.close_cleanly()


async def test_9_8_many_binary_messages(echo: EchoServer) -> None:
    """9.8.x (RFC 6455 §5.6): 1000 binary messages, each taken in turn."""
    payload = os.urandom(1024)
    async with connect(echo) as peer:
        for _ in range(1000):
            await peer.send(binary(payload), sync=False)
            await peer.expect(BIN)
        await peer.close_cleanly()


# Past the limit (not in Autobahn): RFC 6455 §7.4.1 1009 "a message that is too
# big for it to process"; §10.4 lets an endpoint bound frame and message sizes.


async def test_9_x_message_at_the_limit_is_echoed(small_echo: EchoServer) -> None:
    """A text message of exactly ``max_frame_bytes``, whole and in two
    fragments: echoed."""
    payload = _payload(SMALL_LIMIT, 1)
    async with connect(small_echo) as peer:
        await peer.send(text(payload), sync=False)
        await peer.expect(("text", payload))
        await peer.send(text(payload[:100], fin=False), cont(payload[100:]), sync=False)
        await peer.expect(("text", payload))
        await peer.close_cleanly()


@pytest.mark.parametrize(
    "shape", ["text frame", "binary frame", "text fragments", "declared length only", "deflated"]
)
async def test_9_x_message_over_the_limit_fails_1009(small_echo: EchoServer, shape: str) -> None:
    """One byte past ``max_frame_bytes``, whole, binary, in fragments that
    are each under it, a header alone that declares 2**40 bytes, or a
    compressed message that inflates past it: closed 1009."""
    payload = _payload(SMALL_LIMIT + 1, 2)
    offer = "permessage-deflate" if shape == "deflated" else None
    async with connect(small_echo, offer=offer) as peer:
        if shape == "text frame":
            await peer.send(text(payload), sync=False)
        elif shape == "binary frame":
            await peer.send(binary(payload.encode()), sync=False)
        elif shape == "text fragments":
            half = SMALL_LIMIT // 2
            await peer.send(text(payload[:half], fin=False), cont(payload[half:]), sync=False)
        elif shape == "declared length only":
            await peer.send(struct.pack("!BBQ", 0x81, 0x80 | 127, 2**40) + os.urandom(4))
        else:
            body = peer.compress(("x" * (SMALL_LIMIT + 1)).encode())
            assert len(body) < 1000
            await peer.send(text(body, rsv=4))
        await peer.expect_failure(MESSAGE_TOO_BIG)


# --- 10: auto-fragmentation ----------------------------------------------------------


async def test_10_1_1_auto_fragmented_text(echo: EchoServer) -> None:
    """10.1.1 (RFC 6455 §5.4): a 65536-byte text message sent in 1300-byte
    fragments: echoed (the server may fragment its answer; the client
    reassembles whatever comes)."""
    payload = _payload(65536, 10).encode()
    chunks = [payload[i : i + 1300] for i in range(0, len(payload), 1300)]
    frames = [text(chunks[0], fin=False)]
    frames += [cont(c, fin=i == len(chunks) - 1) for i, c in enumerate(chunks) if i]
    async with connect(echo) as peer:
        await peer.send(*frames, how="frames")
        await peer.expect(echoed(payload))
        await peer.close_cleanly()


# --- 12 and 13: permessage-deflate (RFC 7692) ----------------------------------------


def _corpus() -> str:
    """About 200 KB of text to slice messages from, as Autobahn does from its
    data files: JSON, German prose (multi-byte UTF-8) and HTML."""
    rng = random.Random(7692)
    words = "Habe nun, ach! Philosophie, Juristerei und Medizin, und leider auch Theologie"
    words += " durchaus studiert, mit heißem Bemühn. Da steh ich nun, ich armer Tor! Größe"
    vocab = words.split()
    records = [
        {
            "id": i,
            "name": " ".join(rng.choice(vocab) for _ in range(3)),
            "score": rng.random(),
            "tags": rng.sample(vocab, 3),
        }
        for i in range(600)
    ]
    prose = " ".join(rng.choice(vocab) for _ in range(8000))
    html = "".join(
        f"<li class='w{rng.randint(0, 9)}'>{rng.choice(vocab)}</li>\n" for _ in range(2000)
    )
    return json.dumps(records) + "\n" + prose + "\n<ul>\n" + html + "</ul>\n"


CORPUS = _corpus()


def _messages(size: int, count: int, start: int) -> list[str]:
    """``count`` consecutive slices of ``size`` characters of the corpus."""
    out = []
    pos = start
    for _ in range(count):
        doubled = CORPUS + CORPUS
        out.append(doubled[pos : pos + size])
        pos = (pos + size) % len(CORPUS)
    return out


async def _deflate_echo(
    peer: Peer, messages: list[str], fragment: int = 0, *, ping_between: bool = False
) -> None:
    """Send each message compressed (``fragment``: in frames of that many
    bytes, RSV1 on the first only, RFC 7692 §6.1), every fifth one
    uncompressed (allowed per message, §6), and check each echo."""
    assert peer.deflate is not None
    for i, message in enumerate(messages):
        raw = message.encode()
        squeeze = i % 5 != 4
        body = peer.compress(raw) if squeeze else raw
        rsv = 4 if squeeze else 0
        if fragment and len(body) > fragment:
            chunks = [body[j : j + fragment] for j in range(0, len(body), fragment)]
            frames = [text(chunks[0], fin=False, rsv=rsv)]
            for j, chunk in enumerate(chunks[1:], start=1):
                if ping_between and j == 1:
                    frames.append(ping(b"between"))
                frames.append(cont(chunk, fin=j == len(chunks) - 1))
            await peer.send(*frames, sync=False)
            if ping_between:
                await peer.expect(("pong", b"between"))
        else:
            await peer.send(text(body, rsv=rsv), sync=False)
        await peer.expect(("text", message))


#: Autobahn 12.x's (payload size, auto-fragment size); it sends 1000 of each,
#: these 3 (12.x) or 2 (13.x).
MSG_SIZES = [
    (16, 0),
    (64, 0),
    (256, 0),
    (1024, 0),
    (4096, 0),
    (8192, 0),
    (16384, 0),
    (32768, 0),
    (65536, 0),
    (131072, 0),
    (8192, 256),
    (16384, 256),
    (32768, 256),
    (65536, 256),
    (131072, 256),
    (131072, 1024),
    (131072, 4096),
    (131072, 32768),
]
#: Autobahn's default offer (autobahn's PerMessageDeflateOffer()).
AUTOBAHN_OFFER = "permessage-deflate; client_no_context_takeover; client_max_window_bits"


@pytest.mark.parametrize(
    ("size", "fragment"), MSG_SIZES, ids=[f"12.1.{i}" for i in range(1, len(MSG_SIZES) + 1)]
)
async def test_12_compressed_echo(echo: EchoServer, size: int, fragment: int) -> None:
    """12.1.x (RFC 7692 §7.2): Autobahn's default offer; messages of 16 B to
    128 KiB sliced from a text corpus, compressed by the client (in
    fragments for the last eight), echoed compressed by the server and
    inflated with the agreed window."""
    async with connect(echo, offer=AUTOBAHN_OFFER) as peer:
        assert peer.deflate is not None
        await _deflate_echo(peer, _messages(size, 3, size), fragment)
        if size >= COMPRESS_MIN_BYTES:
            # chatd compresses what is worth it (frames.COMPRESS_MIN_BYTES):
            # so the inflate above was exercised.
            assert peer.compressed >= 2
        await peer.close_cleanly()


#: Autobahn 13.1-13.7's offers, (requestNoContextTakeover, requestMaxWindowBits)
#: written as autobahn writes them.
AUTOBAHN_13 = {
    "13.1": AUTOBAHN_OFFER,
    "13.2": AUTOBAHN_OFFER + "; server_no_context_takeover",
    "13.3": AUTOBAHN_OFFER + "; server_max_window_bits=8",
    "13.4": AUTOBAHN_OFFER + "; server_max_window_bits=15",
    "13.5": AUTOBAHN_OFFER + "; server_no_context_takeover; server_max_window_bits=8",
    "13.6": AUTOBAHN_OFFER + "; server_no_context_takeover; server_max_window_bits=15",
    "13.7": ", ".join(
        [
            AUTOBAHN_OFFER + "; server_no_context_takeover; server_max_window_bits=8",
            AUTOBAHN_OFFER + "; server_no_context_takeover",
            AUTOBAHN_OFFER,
        ]
    ),
}
#: What browsers and libraries offer, and each parameter alone and together.
OFFERS = {
    "firefox": "permessage-deflate",
    "chrome": "permessage-deflate; client_max_window_bits",
    "wsproto": "permessage-deflate; client_max_window_bits=15; server_max_window_bits=15",
    "server_no_context_takeover": "permessage-deflate; server_no_context_takeover",
    "client_no_context_takeover": "permessage-deflate; client_no_context_takeover",
    "both_no_context_takeover": (
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    ),
    **{
        f"server_max_window_bits={b}": f"permessage-deflate; server_max_window_bits={b}"
        for b in range(9, 16)
    },
    **{
        f"client_max_window_bits={b}": f"permessage-deflate; client_max_window_bits={b}"
        for b in (9, 10, 12, 15)
    },
    "all": (
        "permessage-deflate; client_max_window_bits=10; server_max_window_bits=11; "
        "client_no_context_takeover; server_no_context_takeover"
    ),
    "small windows, context kept": (
        "permessage-deflate; client_max_window_bits=9; server_max_window_bits=9"
    ),
    "rfc7692 §7.1.3 fallback": (
        "permessage-deflate; client_max_window_bits; server_max_window_bits=10, "
        "permessage-deflate; client_max_window_bits"
    ),
    "declined: server_max_window_bits=8": "permessage-deflate; server_max_window_bits=8",
    "declined: client_max_window_bits=8": "permessage-deflate; client_max_window_bits=8",
    "declined: server_max_window_bits=16": "permessage-deflate; server_max_window_bits=16",
    "unknown extension too": "x-webkit-deflate-frame, permessage-deflate; client_max_window_bits",
}
_SHORT_SIZES = [(16, 0), (127, 0), (128, 0), (1024, 0), (4096, 0), (65536, 0), (131072, 4096)]


@pytest.mark.parametrize(
    "offer",
    [pytest.param(o, id=n) for n, o in AUTOBAHN_13.items()]
    + [pytest.param(o, id=f"13.x-{n}") for n, o in OFFERS.items()],
)
async def test_13_offers(echo: EchoServer, offer: str) -> None:
    """13.1-13.7 and the offers browsers and libraries send (RFC 7692 §5,
    §7.1, §7.2): the response is a valid answer to one of the offers (or
    declines them all, always allowed: then messages go uncompressed); the
    client then compresses within the agreed client window (with context
    takeover unless agreed otherwise), the server's messages inflate with
    the agreed server window, and every echo is the message sent.

    chatd (wsproto's ``PerMessageDeflate``) always answers
    ``server_no_context_takeover`` (allowed by §7.1.1.1), answers
    ``client_max_window_bits`` with a value when offered without one
    (§7.1.2.2), and declines a window of 8 bits, which zlib cannot do
    (§7.1.2: a server declines what it does not support): 13.3 and 13.5
    are then uncompressed, as Autobahn's "UNIMPLEMENTED"."""
    async with connect(echo, offer=offer) as peer:
        if peer.deflate is None:
            assert "=8" in offer or "=16" in offer, offer
            for message in _messages(300, 3, 0):
                await peer.send(text(message), sync=False)
                await peer.expect(("text", message))
            assert peer.compressed == 0
            await peer.close_cleanly()
            return
        for n, (size, fragment) in enumerate(_SHORT_SIZES):
            await _deflate_echo(peer, _messages(size, 2, 1000 * n), fragment)
        assert peer.compressed >= 2
        await peer.close_cleanly()


async def test_13_x_ping_between_compressed_fragments(echo: EchoServer) -> None:
    """Not in Autobahn (RFC 6455 §5.4, RFC 7692 §6.1): a ping between the
    fragments of a compressed message is answered, and the message still
    inflates."""
    async with connect(echo, offer="permessage-deflate") as peer:
        await _deflate_echo(peer, _messages(20000, 4, 5), 512, ping_between=True)
        await peer.close_cleanly()


@pytest.mark.parametrize(
    ("what", "frames", "code"),
    [
        ("RSV1 on a ping", [ping(b"x", rsv=4)], PROTOCOL_ERROR),
        ("RSV1 on a close", [close(NORMAL, rsv=4)], PROTOCOL_ERROR),
        ("RSV1 on a continuation", [text(b"ab", fin=False), cont(b"cd", rsv=4)], PROTOCOL_ERROR),
        ("RSV2 with deflate", [text(b"ab", rsv=2)], PROTOCOL_ERROR),
        ("RSV3 with deflate", [text(b"ab", rsv=1)], PROTOCOL_ERROR),
        ("not deflate data", [text(b"\xff\xff\xff\xff garbage", rsv=4)], INVALID_PAYLOAD),
        ("inflates to bad UTF-8", [text(zlib.compress(b"\xc3\x28")[2:-4], rsv=4)], INVALID_PAYLOAD),
    ],
)
async def test_13_x_bad_compressed_frames(
    echo: EchoServer, what: str, frames: list[bytes], code: int
) -> None:
    """Not in Autobahn (RFC 7692 §6, §6.1; RFC 6455 §5.2, §8.1): with
    permessage-deflate agreed, RSV1 is allowed only on the first frame of
    a data message, RSV2/RSV3 never; data that does not inflate, or that
    inflates to invalid UTF-8, fails the connection."""
    async with connect(echo, offer="permessage-deflate") as peer:
        assert peer.deflate is not None
        await peer.send(*frames)
        await peer.expect_failure(code)


@pytest.mark.parametrize(
    "offer",
    [
        pytest.param("permessage-deflate; foo", id="unknown parameter"),
        pytest.param(
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            id="parameter twice",
        ),
        pytest.param(
            "permessage-deflate; server_max_window_bits",
            id="server_max_window_bits without a value",
        ),
        pytest.param("permessage-deflate; server_no_context_takeover=1", id="flag with a value"),
    ],
)
async def test_13_x_invalid_offers_are_declined(echo: EchoServer, offer: str) -> None:
    async with connect(echo, offer=offer) as peer:
        assert peer.deflate is None, "accepted an offer RFC 7692 §7 says to decline"


async def test_13_x_offer_with_a_non_numeric_value_is_declined(echo: EchoServer) -> None:
    async with connect(echo, offer="permessage-deflate; client_max_window_bits=abc") as peer:
        assert peer.deflate is None


async def test_13_x_a_quoted_window_size_is_read(echo: EchoServer) -> None:
    """RFC 7692 §7.1 (a parameter's value as RFC 6455 §9.1's quoted-string
    is read unquoted): accepted with that window. Not in Autobahn."""
    async with connect(echo, offer='permessage-deflate; client_max_window_bits="10"') as peer:
        assert peer.deflate is not None and peer.deflate.client_bits == 10
        await _deflate_echo(peer, _messages(4096, 2, 0))
        await peer.close_cleanly()


async def test_13_x_declined_offer_leaves_no_trace(echo: EchoServer) -> None:
    """RFC 7692 §5, §7.1.2.2: the response answers one offer, and the server
    works by that offer. Here the first offer cannot be accepted (it asks
    for server_max_window_bits=8); the response answers the second, which
    does not limit the client's window, so the client compresses with 15
    bits. Not in Autobahn."""
    offer = (
        "permessage-deflate; client_max_window_bits=9; server_max_window_bits=8, permessage-deflate"
    )
    async with connect(echo, offer=offer) as peer:
        assert peer.deflate is not None and peer.deflate.client_bits == 15
        await _deflate_echo(peer, _messages(8192, 3, 0))
        await peer.close_cleanly()


# --- the handshake (RFC 6455 §4.2.2) ---------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/ws/chat", "/any/path?x=1&y=2"])
async def test_upgrade_on_any_path(echo: EchoServer, path: str) -> None:
    """The echo upgrades any path (through the gate's own functions)."""
    async with connect(echo, path=path) as peer:
        await peer.send(text(_HW))
        await peer.expect(echoed(_HW))
        await peer.close_cleanly()


async def test_frames_in_the_upgrade_request_write(echo: EchoServer) -> None:
    """Frames written with the upgrade request, in the same segment, are
    read after the 101 (RFC 6455 §4.1: a client may send once it has the
    101; a server must not lose what came early)."""
    stream = await tcp_connect(echo.port)
    async with stream:
        raw = RawWS(stream)
        event = await raw.handshake(echo.port, "/", trailing=text(_HW) + ping(b"early"))
        assert isinstance(event, AcceptConnection)
        peer = Peer(stream)
        # The 101 and the answers may come in one read: what RawWS read
        # past the head is its frames.
        got = [
            ("text", f.payload.decode()) if f.opcode == OP_TEXT else ("pong", f.payload)
            for f in raw.frames_in
        ]
        while len(got) < 2:
            item = await peer.next()
            assert item is not None
            got.append(item)
        assert got == [echoed(_HW), ("pong", b"early")]
        await peer.close_cleanly()


async def test_upgrade_read_by_h11(echo: EchoServer) -> None:
    """An upgrade request whose head comes in two reads is not the direct
    reader's (``transport.upgrade``): h11 reads it and wsproto's handshake
    answers it (``handshake.open_wsproto``), permessage-deflate too."""
    stream = await tcp_connect(echo.port)
    async with stream:
        head = (
            b"GET /elsewhere?q=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n"
        )
        await stream.send_all(head[:40])
        await trio.testing.wait_all_tasks_blocked()
        await stream.send_all(head[40:])
        response = b""
        while b"\r\n\r\n" not in response:
            response += await stream.receive_some(4096)
        answer, _, rest = response.partition(b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 101 "), answer
        # RFC 6455 §1.3's example key and its accept value.
        assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in answer
        extensions = [
            line.split(b":", 1)[1].strip().decode()
            for line in answer.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-extensions:")
        ]
        deflate = agreed("permessage-deflate; client_max_window_bits", extensions[0])
        assert deflate is not None
        peer = Peer(stream, deflate)
        peer.buf += rest
        await _deflate_echo(peer, _messages(1000, 3, 0))
        await peer.close_cleanly()
