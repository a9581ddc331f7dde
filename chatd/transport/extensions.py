"""wsproto extensions that bound what a client can make the server hold.

``SizeGuard`` sees every frame header before its payload is read and refuses
(1009) a message whose frames add up to more than ``max_bytes`` on the wire, so
a declared 1 GB frame is refused at its header. ``BoundedDeflate`` is wsproto's
permessage-deflate with a cap on the *inflated* size of each message: it asks
zlib for at most the bytes still allowed, so a compression bomb is refused
after inflating ``max_bytes``, never all of it. It always answers with
``server_no_context_takeover`` (see ``frames.py``).
"""

from __future__ import annotations

from wsproto.extensions import Extension, PerMessageDeflate
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol, Opcode, RsvBits


class SizeGuard(Extension):
    """Not negotiated: always on, counting each message's wire bytes."""

    name = "x-chatd-size-guard"

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._total = 0

    def enabled(self) -> bool:
        return True

    def offer(self) -> bool | str:  # pragma: no cover - never offered
        return False

    def frame_inbound_header(
        self, proto: FrameDecoder | FrameProtocol, opcode: Opcode, rsv: RsvBits, payload_length: int
    ) -> CloseReason | RsvBits:
        if opcode in (Opcode.TEXT, Opcode.BINARY):
            self._total = 0
        if not opcode.iscontrol():
            self._total += payload_length
            if self._total > self.max_bytes:
                return CloseReason.MESSAGE_TOO_BIG
        return RsvBits(False, False, False)


class BoundedDeflate(PerMessageDeflate):
    """permessage-deflate that never inflates a message past ``max_bytes``.

    It also lets a control frame (a ping) come between the fragments of a
    compressed message, as RFC 6455 5.4 allows: wsproto's own extension
    forgets, at the ping, that the message is compressed."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(server_no_context_takeover=True)
        self.max_bytes = max_bytes
        self._inflated = 0
        self._control = False

    def frame_inbound_header(
        self, proto: FrameDecoder | FrameProtocol, opcode: Opcode, rsv: RsvBits, payload_length: int
    ) -> CloseReason | RsvBits:
        self._control = opcode.iscontrol()
        if self._control:  # leave the data message's state alone; RSV1 stays illegal
            return RsvBits(False, False, False)
        return super().frame_inbound_header(proto, opcode, rsv, payload_length)

    def frame_inbound_payload_data(
        self, proto: FrameDecoder | FrameProtocol, data: bytes
    ) -> bytes | CloseReason:
        if self._control or not self._inbound_compressed or not self._inbound_is_compressible:
            return data
        assert self._decompressor is not None
        allowed = self.max_bytes - self._inflated + 1
        try:
            out = self._decompressor.decompress(bytes(data), allowed)
        except Exception:  # zlib.error
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        self._inflated += len(out)
        if self._inflated > self.max_bytes:
            return CloseReason.MESSAGE_TOO_BIG
        return out

    def frame_inbound_complete(
        self, proto: FrameDecoder | FrameProtocol, fin: bool
    ) -> bytes | CloseReason | None:
        if self._control:
            return None
        result = super().frame_inbound_complete(proto, fin)
        if isinstance(result, bytes):
            self._inflated += len(result)
            if self._inflated > self.max_bytes:
                return CloseReason.MESSAGE_TOO_BIG
        if fin:
            self._inflated = 0
        return result

    @property
    def window_bits(self) -> int:
        """The window our compressor must stay within for this client."""
        return self.server_max_window_bits
