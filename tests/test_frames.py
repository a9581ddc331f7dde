"""chatd.transport.frames and chatd.transport.extensions, without sockets.

Server frames are checked byte for byte and then fed to a real wsproto
*client* connection, so a real decoder reads them. The inbound guards are
driven through a wsproto *server* connection fed with frames that wsproto's
client-side FrameProtocol builds (masked, compressed or fragmented).
"""

from __future__ import annotations

import json
import os
import struct
import zlib

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, Event, Ping, TextMessage
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason, FrameProtocol, Opcode, RsvBits, XorMaskerSimple

from chatd.transport import frames
from chatd.transport.extensions import BoundedDeflate, SizeGuard
from chatd.transport.frames import COMPRESS_MIN_BYTES, OutFrame, deflate, frame_header

MAX = 65536


def inflate(body: bytes, window_bits: int = 15) -> bytes:
    return zlib.decompressobj(-window_bits).decompress(body + b"\x00\x00\xff\xff")


def payload(size: int) -> bytes:
    """A JSON-ish payload of exactly ``size`` bytes."""
    text = json.dumps({"type": "room_message", "data": {"content": "x" * size}}).encode()
    return text[:size] if len(text) >= size else text + b" " * (size - len(text))


# --- frame_header ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "expected"),
    [
        (0, b"\x81\x00"),
        (1, b"\x81\x01"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
        (2**32, b"\x81\x7f\x00\x00\x00\x01\x00\x00\x00\x00"),
    ],
)
def test_frame_header(length: int, expected: bytes) -> None:
    assert frame_header(length) == expected


def test_frame_header_rsv1_and_opcode() -> None:
    assert frame_header(5, rsv1=True) == b"\xc1\x05"
    assert frame_header(5, opcode=0x2) == b"\x82\x05"
    assert frame_header(300, rsv1=True)[:2] == b"\xc1\x7e"


# --- OutFrame ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 10, 125, 126, 65535, 65536, 70000])
def test_plain(size: int) -> None:
    data = payload(size)
    frame = OutFrame(data)
    assert frame.plain() == frame_header(size) + data
    assert frame.payload is data


def test_wire_none_is_plain() -> None:
    frame = OutFrame(payload(1000))
    assert frame.wire(None) is frame.plain()


@pytest.mark.parametrize("size", [0, 1, COMPRESS_MIN_BYTES - 1])
@pytest.mark.parametrize("bits", [9, 15])
def test_small_payloads_never_compressed(size: int, bits: int) -> None:
    frame = OutFrame(payload(size))
    assert frame.wire(bits) is frame.plain()
    assert frame.wire(bits)[0] & 0x40 == 0


@pytest.mark.parametrize("size", [COMPRESS_MIN_BYTES, 1000, 70000])
@pytest.mark.parametrize("bits", [9, 12, 15])
def test_wire_compressed(size: int, bits: int) -> None:
    data = payload(size)
    wire = OutFrame(data).wire(bits)
    first, second = wire[0], wire[1]
    assert first == 0xC1  # FIN | RSV1 | text
    assert second & 0x80 == 0  # server frames are unmasked
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", wire[2:4])
        body = wire[4:]
    elif length == 127:
        (length,) = struct.unpack("!Q", wire[2:10])
        body = wire[10:]
    else:
        body = wire[2:]
    assert len(body) == length
    assert inflate(body, bits) == data
    assert len(body) < len(data)


def test_deflate_has_no_sync_tail_and_no_context() -> None:
    data = payload(500)
    first = deflate(data)
    assert not first.endswith(b"\x00\x00\xff\xff")
    # No context takeover: the same input compresses the same way every time.
    assert deflate(data) == first


def test_wire_cached() -> None:
    frame = OutFrame(payload(1000))
    assert frame.plain() is frame.plain()
    assert frame.wire(15) is frame.wire(15)
    assert frame.wire(10) is frame.wire(10)
    assert frame.wire(10) is not frame.wire(15)
    assert frame.wire(15) is not frame.plain()


# --- a real wsproto client reads the frames -------------------------------------------


def client(bits: int | None) -> Connection:
    extensions = []
    if bits is not None:
        pmd = PerMessageDeflate()
        pmd.finalize(
            f"permessage-deflate; server_no_context_takeover; server_max_window_bits={bits}"
        )
        extensions.append(pmd)
    return Connection(ConnectionType.CLIENT, extensions=extensions)


def texts(events: list[Event]) -> list[str]:
    assert all(isinstance(e, TextMessage) and e.message_finished for e in events), events
    return [e.data for e in events if isinstance(e, TextMessage)]


@pytest.mark.parametrize("bits", [None, 9, 15])
def test_wsproto_client_decodes_frames(bits: int | None) -> None:
    conn = client(bits)
    messages = [payload(n) for n in (2, 127, 128, 5000, 65535, 65536, 100_000)]
    messages.append(payload(5000))  # repeated: each compressed message stands alone
    for data in messages:
        conn.receive_data(OutFrame(data).wire(bits))
    assert texts(list(conn.events())) == [m.decode() for m in messages]


def test_wsproto_client_decodes_shared_frame_in_pieces() -> None:
    """One cached frame fed to two clients, one byte at a time to one of them."""
    frame = OutFrame(payload(3000))
    a, b = client(15), client(15)
    a.receive_data(frame.wire(15))
    wire = frame.wire(15)
    for i in range(len(wire)):
        b.receive_data(wire[i : i + 1])
    assert texts(list(a.events())) == texts(list(b.events())) == [payload(3000).decode()]


# --- SizeGuard -------------------------------------------------------------------------


def guarded(max_bytes: int = MAX) -> Connection:
    return Connection(ConnectionType.SERVER, [SizeGuard(max_bytes)])


def masked_header(length: int, *, fin: bool = True, opcode: int = 0x1) -> bytes:
    first = (0x80 if fin else 0) | opcode
    if length < 126:
        return struct.pack("!BB", first, 0x80 | length)
    if length < 65536:
        return struct.pack("!BBH", first, 0x80 | 126, length)
    return struct.pack("!BBQ", first, 0x80 | 127, length)


def last_event_is_close(conn: Connection, code: int) -> None:
    """The last event ``conn`` has for us is a close with ``code``."""
    events = list(conn.events())
    assert events, "no event"
    assert isinstance(events[-1], CloseConnection), events
    assert events[-1].code == code


def test_size_guard_refuses_at_the_header() -> None:
    conn = guarded()
    conn.receive_data(masked_header(2**30))  # 1 GB declared, no payload sent
    last_event_is_close(conn, CloseReason.MESSAGE_TOO_BIG)


def test_size_guard_limit_is_inclusive() -> None:
    cli = FrameProtocol(True, [])
    conn = guarded(1024)
    conn.receive_data(bytes(cli.send_data("a" * 1024)))
    assert texts(list(conn.events())) == ["a" * 1024]
    conn.receive_data(bytes(cli.send_data("a" * 1025)))
    last_event_is_close(conn, CloseReason.MESSAGE_TOO_BIG)


def test_size_guard_counts_continuation_frames() -> None:
    cli = FrameProtocol(True, [])
    conn = guarded(1024)
    conn.receive_data(bytes(cli.send_data("a" * 600, fin=False)))
    conn.receive_data(bytes(cli.ping(b"p")))  # control frames do not reset the count
    first = list(conn.events())
    assert any(isinstance(e, TextMessage) for e in first)
    assert not any(isinstance(e, CloseConnection) for e in first)
    conn.receive_data(bytes(masked_header(500, fin=True, opcode=0x0)))  # header only
    last_event_is_close(conn, CloseReason.MESSAGE_TOO_BIG)


def test_size_guard_resets_per_message() -> None:
    cli = FrameProtocol(True, [])
    conn = guarded(1024)
    for _ in range(5):
        conn.receive_data(bytes(cli.send_data("b" * 400, fin=False)))
        conn.receive_data(bytes(cli.send_data("b" * 400, fin=True)))
    events = list(conn.events())
    assert not any(isinstance(e, CloseConnection) for e in events)
    assert "".join(e.data for e in events if isinstance(e, TextMessage)) == "b" * 4000


def test_size_guard_ignores_control_frames() -> None:
    cli = FrameProtocol(True, [])
    conn = guarded(1024)
    for _ in range(20):
        conn.receive_data(bytes(cli.ping(b"x" * 125)))
    events = list(conn.events())
    assert len(events) == 20 and all(isinstance(e, Ping) for e in events)


# --- BoundedDeflate ----------------------------------------------------------------------


def deflating_pair(max_bytes: int = MAX) -> tuple[FrameProtocol, Connection, BoundedDeflate]:
    """A compressing client FrameProtocol and a chatd-style server connection."""
    bounded = BoundedDeflate(max_bytes)
    assert bounded.accept("permessage-deflate") == "server_no_context_takeover"
    server = Connection(ConnectionType.SERVER, [bounded, SizeGuard(max_bytes)])
    pmd = PerMessageDeflate()
    pmd.finalize("permessage-deflate; server_no_context_takeover")
    return FrameProtocol(True, [pmd]), server, bounded


def test_bounded_deflate_passes_normal_messages() -> None:
    cli, server, bounded = deflating_pair()
    sent = [
        json.dumps({"type": "room_message", "data": {"content": f"hello {i} " * 500}})
        for i in range(3)
    ]
    for text in sent:
        wire = bytes(cli.send_data(text))
        assert wire[0] & 0x40  # compressed
        server.receive_data(wire)
    assert texts(list(server.events())) == sent
    assert bounded._inflated == 0


def test_bounded_deflate_limit_is_inclusive() -> None:
    cli, server, _ = deflating_pair(4096)
    server.receive_data(bytes(cli.send_data("z" * 4096)))
    assert texts(list(server.events())) == ["z" * 4096]
    server.receive_data(bytes(cli.send_data("z" * 4097)))
    last_event_is_close(server, CloseReason.MESSAGE_TOO_BIG)


def test_bounded_deflate_refuses_compression_bomb() -> None:
    cli, server, bounded = deflating_pair()
    bomb = bytes(cli.send_data(b"\x00" * 10_000_000))
    assert len(bomb) < 20_000  # ~10 KB on the wire passes the SizeGuard
    server.receive_data(bomb)
    last_event_is_close(server, CloseReason.MESSAGE_TOO_BIG)
    # zlib was asked for at most max_bytes + 1 bytes, never the 10 MB.
    assert bounded._inflated == MAX + 1


def test_bounded_deflate_direct_call_returns_close_reason() -> None:
    bounded = BoundedDeflate(1000)
    bounded.accept("permessage-deflate")
    body = deflate(b"\x00" * 1_000_000)
    proto = FrameProtocol(False, [bounded])
    bounded.frame_inbound_header(proto, Opcode.TEXT, RsvBits(True, False, False), len(body))
    assert bounded.frame_inbound_payload_data(proto, body) is CloseReason.MESSAGE_TOO_BIG
    assert bounded._inflated == 1001


def test_bounded_deflate_counts_across_fragments() -> None:
    cli, server, _ = deflating_pair(4096)
    server.receive_data(bytes(cli.send_data("q" * 3000, fin=False)))
    first = list(server.events())
    assert not any(isinstance(e, CloseConnection) for e in first)
    server.receive_data(bytes(cli.send_data("q" * 3000, fin=True)))
    last_event_is_close(server, CloseReason.MESSAGE_TOO_BIG)


def test_bounded_deflate_fragments_within_limit() -> None:
    cli, server, bounded = deflating_pair(4096)
    for _ in range(3):
        server.receive_data(bytes(cli.send_data("r" * 2000, fin=False)))
        server.receive_data(bytes(cli.send_data("r" * 2000, fin=True)))
    events = list(server.events())
    assert not any(isinstance(e, CloseConnection) for e in events)
    assert "".join(e.data for e in events if isinstance(e, TextMessage)) == "r" * 12000
    assert bounded._inflated == 0


def test_bounded_deflate_uncompressed_messages_pass() -> None:
    bounded = BoundedDeflate(4096)
    bounded.accept("permessage-deflate")
    server = Connection(ConnectionType.SERVER, [bounded, SizeGuard(4096)])
    server.receive_data(bytes(FrameProtocol(True, []).send_data("plain")))
    assert texts(list(server.events())) == ["plain"]


def test_bounded_deflate_corrupt_data() -> None:
    cli, server, _ = deflating_pair()
    wire = bytearray(cli.send_data("x" * 1000))
    # Replace the compressed body (after the 2-byte header and 4-byte mask) with junk.
    header = bytes(wire[:2]) + b"\x00\x00\x00\x00"
    junk = b"\xff" * (wire[1] & 0x7F)
    server.receive_data(header + junk)
    last_event_is_close(server, CloseReason.INVALID_FRAME_PAYLOAD_DATA)


def test_bounded_deflate_window_bits() -> None:
    bounded = BoundedDeflate(MAX)
    bounded.accept("permessage-deflate; server_max_window_bits=10")
    assert bounded.window_bits == 10


def test_bounded_deflate_ping_between_fragments() -> None:
    cli, server, _ = deflating_pair(4096)
    server.receive_data(bytes(cli.send_data("q" * 1000, fin=False)))
    server.receive_data(bytes(cli.ping(b"p")))
    server.receive_data(bytes(cli.send_data("q" * 1000, fin=True)))
    events = list(server.events())
    assert not any(isinstance(e, CloseConnection) for e in events), events
    assert "".join(e.data for e in events if isinstance(e, TextMessage)) == "q" * 2000


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 125, 126, 2047, 2048, 2049, 70_000])
def test_unmask_matches_wsproto(n: int) -> None:
    """Both ways (one big integer for small payloads, translate for large)
    give wsproto's result, at every length modulo 4."""
    payload = os.urandom(n)
    key = os.urandom(4)
    expected = bytes(XorMaskerSimple(key).process(bytearray(payload)))
    assert frames.unmask(payload, key) == expected
    assert frames.unmask(bytearray(payload), bytearray(key)) == expected
    assert frames.unmask(frames.unmask(payload, key), key) == payload
