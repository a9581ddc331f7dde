"""Server WebSocket frames, built once and shared by every recipient.

Server frames are unmasked, so one message is the same bytes for every
connection. ``OutFrame`` holds a message's JSON and builds its
frame lazily: plain once, and deflated once per window size for the
connections that negotiated permessage-deflate. chatd always answers the
extension with ``server_no_context_takeover``, so each compressed message
stands alone and one compressed frame serves all. Small payloads are sent
uncompressed (RFC 7692 allows it per message): deflate would not shrink them.

Inbound, ``unmask`` undoes a client frame's XOR mask for the reader's fast
path (``websocket.py``), which parses the common client frame itself.

Pure: no I/O, so it is unit-tested without a socket.
"""

from __future__ import annotations

import struct
import zlib

OP_TEXT = 0x1
FIN = 0x80
RSV1 = 0x40
#: Payloads shorter than this are not worth compressing.
COMPRESS_MIN_BYTES = 128

#: Payloads up to this size are unmasked as one big integer (about 2x faster
#: than four ``translate`` calls for a chat message); larger ones by bytes.
_UNMASK_INT_MAX = 2048
_XOR_TABLES = [bytes(a ^ b for a in range(256)) for b in range(256)]

_pristine = {bits: zlib.compressobj(6, zlib.DEFLATED, -bits, 8) for bits in range(9, 16)}


def frame_header(length: int, *, opcode: int = OP_TEXT, rsv1: bool = False) -> bytes:
    """The header of one unmasked, final frame carrying ``length`` bytes."""
    first = FIN | (RSV1 if rsv1 else 0) | opcode
    if length < 126:
        return struct.pack("!BB", first, length)
    if length < 65536:
        return struct.pack("!BBH", first, 126, length)
    return struct.pack("!BBQ", first, 127, length)


def deflate(payload: bytes, window_bits: int = 15) -> bytes:
    """Compress one message on its own (no context takeover), RFC 7692 7.2.1."""
    compressor = _pristine[window_bits].copy()
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return data[:-4]  # drop the 00 00 ff ff tail


class OutFrame:
    """One outgoing text message, framed on demand and cached."""

    __slots__ = ("_deflated", "_plain", "payload")

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self._plain: bytes | None = None
        self._deflated: dict[int, bytes] | None = None

    def plain(self) -> bytes:
        """The uncompressed frame."""
        if self._plain is None:
            self._plain = frame_header(len(self.payload)) + self.payload
        return self._plain

    def wire(self, window_bits: int | None) -> bytes:
        """The frame for a connection: deflated with ``window_bits`` when it
        negotiated compression (None when it did not)."""
        if window_bits is None or len(self.payload) < COMPRESS_MIN_BYTES:
            return self.plain()
        if self._deflated is None:
            self._deflated = {}
        frame = self._deflated.get(window_bits)
        if frame is None:
            body = deflate(self.payload, window_bits)
            frame = frame_header(len(body), rsv1=True) + body
            self._deflated[window_bits] = frame
        return frame


def unmask(payload: bytes | bytearray, key: bytes | bytearray) -> bytes:
    """``payload`` XOR the 4-byte masking ``key`` repeated (RFC 6455 5.3)."""
    n = len(payload)
    if n <= _UNMASK_INT_MAX:
        stream = (bytes(key) * ((n >> 2) + 1))[:n]
        mixed = int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")
        return mixed.to_bytes(n, "little")
    out = bytearray(payload)
    for i in range(4):
        out[i::4] = out[i::4].translate(_XOR_TABLES[key[i]])
    return bytes(out)
