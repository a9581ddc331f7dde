"""Coverage-guided fuzz target (atheris) for chatd's frame-to-message path.

Bytes from the fuzzer go where a client's bytes go: into a wsproto server
connection set up as chatd sets up every WebSocket (after the upgrade, with
chatd's ``BoundedDeflate`` and ``SizeGuard`` extensions, permessage-deflate
negotiated), and every complete text message that comes out goes to
``protocol.decode_frame`` as the session would hand it. The target fails
(an uncaught exception) when:

* wsproto or an extension raises instead of reporting a close;
* a message longer than ``MAX_BYTES`` comes out (inflated or not): the size
  guard or the bounded inflater let it through;
* ``decode_frame`` raises anything but ``ChatError(INVALID_FORMAT)``, or
  returns a frame of an unknown type.

The input is read in one of two ways, picked by its first byte: as raw bytes
on the wire, or as a list of frames (header bits, length, payload, maybe
deflated, maybe a repeated payload deflated into a bomb), masked properly, so
the fuzzer gets past the framing quickly.

Long runs, by hand (``pip install atheris==3.1.0`` first)::

    mkdir -p /tmp/corpus && python fuzz/fuzz_frames.py --seeds /tmp/corpus
    python fuzz/fuzz_frames.py -max_total_time=3600 /tmp/corpus

CI runs it for ``-runs=20000`` (seconds) in ``tests/test_fuzz.py``, and, where
atheris is not installed, the same target over its seeds and random
mutations of them in plain Python (``--smoke N``).
"""

from __future__ import annotations

import os
import random
import struct
import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

try:
    import atheris
except ImportError:  # the plain-Python smoke run needs no atheris
    atheris = None

if atheris is not None:
    with atheris.instrument_imports(include=["chatd", "wsproto", "msgspec"]):
        from wsproto import ConnectionType, WSConnection
        from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

        from chatd import protocol
        from chatd.errors import ChatError, ErrorCode
        from chatd.transport.extensions import BoundedDeflate, SizeGuard
else:
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

    from chatd import protocol
    from chatd.errors import ChatError, ErrorCode
    from chatd.transport.extensions import BoundedDeflate, SizeGuard

#: The message size limit of the connection under test (chatd's
#: ``[limits] max_frame_bytes``, small so that the fuzzer reaches it).
MAX_BYTES = 1024
MASK = b"\x12\x34\x56\x78"
UPGRADE_HEADERS = [
    (b"host", b"127.0.0.1"),
    (b"upgrade", b"websocket"),
    (b"connection", b"Upgrade"),
    (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
    (b"sec-websocket-version", b"13"),
    (b"sec-websocket-extensions", b"permessage-deflate; client_max_window_bits"),
]
OPCODES = (0x0, 0x1, 0x2, 0x8, 0x9, 0xA)


def server_connection() -> WSConnection:
    """A server-side connection just past the upgrade, as ``server.py`` makes it."""
    ws = WSConnection(ConnectionType.SERVER)
    ws.initiate_upgrade_connection(UPGRADE_HEADERS, b"/ws/chat?token=x")
    request = next(ws.events())
    assert isinstance(request, Request)
    extensions = [BoundedDeflate(MAX_BYTES), SizeGuard(MAX_BYTES)]
    ws.send(AcceptConnection(extensions=extensions))
    return ws


def deflate(data: bytes) -> bytes:
    comp = zlib.compressobj(6, zlib.DEFLATED, -15)
    return (comp.compress(data) + comp.flush(zlib.Z_SYNC_FLUSH))[:-4]


def frame(opcode: int, payload: bytes, *, fin: bool = True, rsv1: bool = False) -> bytes:
    """One masked client frame."""
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", first, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    return head + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))


def structured(data: bytes) -> bytes:
    """Read ``data`` as a list of frames and build them."""
    out = bytearray()
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        piece = data[pos : pos + n]
        pos += n
        return piece

    while pos < len(data) and len(out) < 1 << 20:
        head = take(1)[0]
        sizes = take(2).ljust(2, b"\0")
        payload = take(sizes[0] + 256 * (sizes[1] & 0x07))
        opcode = head & 0x0F if head & 0x20 else OPCODES[(head & 0x07) % len(OPCODES)]
        rsv1 = bool(head & 0x40)
        if rsv1 and head & 0x10:
            repeat = 1 + (sizes[1] >> 3) * 97  # up to about 3000 times: a bomb
            payload = deflate(payload * repeat)
        elif rsv1 and head & 0x08:
            payload = deflate(payload)
        out += frame(opcode, payload, fin=bool(head & 0x80), rsv1=rsv1)
    return bytes(out)


def TestOneInput(data: bytes) -> None:  # the name atheris expects
    if not data:
        return
    wire = data[1:] if data[0] & 1 else structured(data[1:])
    ws = server_connection()
    ws.receive_data(wire)
    parts: list[str] = []
    size = 0
    for event in ws.events():
        if isinstance(event, TextMessage):
            parts.append(event.data)
            size += len(event.data.encode("utf-8"))
            if size > MAX_BYTES:
                raise AssertionError(f"a message of {size} bytes got past a {MAX_BYTES} limit")
            if event.message_finished:
                text = "".join(parts)
                parts.clear()
                size = 0
                check_decode(text)
        elif isinstance(event, CloseConnection):
            break


def check_decode(text: str) -> None:
    try:
        decoded = protocol.decode_frame(text)
    except ChatError as err:
        if err.code is not ErrorCode.INVALID_FORMAT:
            raise AssertionError(f"decode_frame raised {err!r}") from None
        protocol.peek_request_id(text)
        return
    if decoded.type not in protocol.CLIENT_TYPES:
        raise AssertionError(f"decode_frame returned an unknown type {decoded.type!r}")
    if type(decoded.data) is not protocol.CLIENT_TYPES[decoded.type]:
        raise AssertionError(f"decode_frame returned unvalidated data {decoded.data!r}")


def seeds() -> dict[str, bytes]:
    """A starting corpus: valid frames, fragments, pings between fragments,
    deflated messages and bombs, in both input forms."""
    ping = b'{"type":"ping","data":{},"request_id":"s"}'
    join = b'{"type":"join_room","data":{"room":"general"}}'
    batch = b'{"type":"message_batch","data":{"messages":[{"type":"ping"}]}}'
    raw = {
        "ping": frame(0x1, ping),
        "join": frame(0x1, join),
        "batch": frame(0x1, batch),
        "fragments": frame(0x1, ping[:10], fin=False) + frame(0x9, b"hb") + frame(0x0, ping[10:]),
        "deflated": frame(0x1, deflate(ping + b" " * 300), rsv1=True),
        "bomb": frame(0x1, deflate(ping + b" " * 200_000), rsv1=True),
        "endless": frame(0x1, b"[" * 100, fin=False) + frame(0x0, b"[" * 100, fin=False) * 20,
        "deep": frame(0x1, b'{"type":"ping","data":' + b"[" * 500 + b"]" * 500 + b"}"),
        "bad-utf8": frame(0x1, b'{"type":"ping","x":"\xc3\x28"}'),
        "close": frame(0x8, struct.pack("!H", 1000)),
    }
    corpus = {f"raw-{name}": b"\x01" + wire for name, wire in raw.items()}
    # Structured: a head byte (0x80 fin, 0x40 rsv1, 0x20 the low four bits
    # are the opcode, 0x10 a bomb, 0x08 deflated, else the low three bits
    # pick one of OPCODES), two size bytes, the payload.
    corpus["frames-ping"] = b"\x00" + bytes([0x81, len(ping), 0]) + ping
    corpus["frames-deflated"] = b"\x00" + bytes([0xC9, len(ping), 0]) + ping
    corpus["frames-bomb"] = b"\x00" + bytes([0xD1, len(ping), 0xF8]) + ping
    corpus["frames-fragments"] = (
        b"\x00" + bytes([0x01, 10, 0]) + ping[:10] + bytes([0x80, len(ping) - 10, 0]) + ping[10:]
    )
    return corpus


def mutate(rng: random.Random, data: bytes) -> bytes:
    """A cheap stand-in for libFuzzer's mutations, for the plain-Python run."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        choice = rng.randrange(5)
        if choice == 0 and buf:
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif choice == 1:
            buf.insert(rng.randint(0, len(buf)), rng.randrange(256))
        elif choice == 2 and buf:
            del buf[rng.randrange(len(buf))]
        elif choice == 3 and buf:
            start = rng.randrange(len(buf))
            buf[start:start] = buf[start : start + rng.randint(1, 64)]
        elif buf:
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    return bytes(buf)


def smoke(runs: int, seed: int = 0) -> int:
    """Seeds, then ``runs`` random mutations of them, without atheris."""
    rng = random.Random(seed)
    corpus = list(seeds().values())
    for data in corpus:
        TestOneInput(data)
    for _ in range(runs):
        TestOneInput(mutate(rng, rng.choice(corpus)))
    return len(corpus) + runs


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[1] == "--seeds":
        out = Path(argv[2])
        out.mkdir(parents=True, exist_ok=True)
        for name, data in seeds().items():
            (out / name).write_bytes(data)
        return 0
    if len(argv) >= 2 and argv[1] == "--smoke":
        runs = int(argv[2]) if len(argv) > 2 else 10_000
        print(f"smoke: {smoke(runs, int(os.environ.get('SEED', '0')))} inputs, no failure")
        return 0
    if atheris is None:
        print("atheris is not installed: pip install atheris==3.1.0 (or use --smoke N)")
        return 2
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
