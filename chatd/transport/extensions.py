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


#: RFC 7692 §7's parameters: whether each takes a window size (required,
#: optional) or none.
_DEFLATE_PARAMS = {
    "server_no_context_takeover": "none",
    "client_no_context_takeover": "none",
    "server_max_window_bits": "required",
    "client_max_window_bits": "optional",
}


def valid_deflate_offer(offer: str) -> str | None:
    """A permessage-deflate offer as RFC 7692 §7 lets a server accept it,
    written plainly (a quoted window size unquoted, which wsproto cannot
    read), or None: an unknown parameter, one twice, a flag with a value, a
    window size missing where it is due or not 8 to 15 in digits."""
    seen: set[str] = set()
    out = [PerMessageDeflate.name]
    for part in offer.split(";")[1:]:
        key, has_value, value = part.partition("=")
        key, value = key.strip().lower(), value.strip()
        kind = _DEFLATE_PARAMS.get(key)
        if kind is None or key in seen:
            return None
        seen.add(key)
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if kind == "none" and has_value:
            return None
        if kind == "required" and not has_value:
            return None
        if has_value and not (value.isascii() and value.isdigit() and value[0] != "0"
                              and 8 <= int(value) <= 15):  # fmt: skip
            return None
        out.append(f"{key}={value}" if has_value else key)
    return "; ".join(out)


def choose_offers(offers: list[str], max_bytes: int) -> list[str]:
    """The offers to hand to wsproto's handshake: every offer of another
    extension as it came, and of permessage-deflate only the first that is
    valid (``valid_deflate_offer``) and that chatd's deflate accepts (tried
    on an extension of its own). wsproto's ``server_extensions_handshake``
    gives every offer to the one extension, which keeps what each set: a
    declined first offer's window sizes would outlive it (RFC 7692 §5: the
    server works by the offer it answers)."""
    chosen: list[str] = []
    found = False
    for offer in offers:
        name = offer.split(";", 1)[0].strip()
        if name != PerMessageDeflate.name:
            chosen.append(offer)
        elif not found:
            plain = valid_deflate_offer(offer)
            if plain is not None and BoundedDeflate(max_bytes).accept(plain) is not None:
                chosen.append(plain)
                found = True
    return chosen
