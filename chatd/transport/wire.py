"""An upgraded WebSocket's protocol half: wsproto's frame parser and the
connection's one state.

wsproto's ``WSConnection`` keeps the handshake (an h11 connection, the
request) and its ``Connection`` an event deque (760 bytes even when empty) for
the connection's whole life. ``Wire`` keeps only the ``FrameProtocol`` of the
accepted connection (with the negotiated extensions: taken from a
``WSConnection``, or made by the gate for an upgrade it answered itself) and
does what ``wsproto.connection.Connection`` does with it, event for event,
for the events chatd sends (ping, pong, close) and receives (all). A whole
control frame the connection parsed itself becomes its event here too
(``control``), as wsproto would make it.

The ``FrameProtocol`` itself (about 800 bytes: its decoders, buffer and a
generator) is made on first need: most connections never need it, since the
reader parses their frames and a ping or pong is written here (an
unmasked control frame, which no extension touches). A frame handed to
wsproto, or a close to write, makes it; until then ``Wire`` keeps the
negotiated extensions it will be made with.

The state
---------
``Wire.state`` is the one state of a connection's life; the transport only
reads it, and every transition is made in this module:

* ``OPEN``: data flows both ways.
* ``LOCAL_CLOSING``: our close frame is queued (``send(CloseConnection)``);
  what the peer still sends is read (its close ends the handshake) but not
  handed on, and nothing but control frames is written.
* ``REMOTE_CLOSING``: the peer's close frame arrived (``events``); ours is
  owed and goes at once.
* ``CLOSED``: both close frames have crossed; what is queued is flushed, then
  the socket is closed.
* ``GONE``: the socket is closed or failed (``abort``), from any state:
  nothing more is read or written.

The first four are wsproto's states with wsproto's transitions; ``GONE`` is
chatd's, for a peer that vanished without a closing handshake (a reset, the
idle timeout, the end of the connection's task).
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator

from wsproto import WSConnection
from wsproto.connection import Connection
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.extensions import Extension
from wsproto.frame_protocol import (
    LOCAL_ONLY_CLOSE_REASONS,
    MAX_CLOSE_REASON,
    MAX_PROTOCOL_CLOSE_REASON,
    MIN_CLOSE_REASON,
    CloseReason,
    FrameProtocol,
    Opcode,
    ParseFailed,
)
from wsproto.utilities import LocalProtocolError

from chatd.transport.frames import frame_header


def _control(opcode: Opcode, payload: bytes) -> bytes:
    """A server's ping or pong frame, as ``FrameProtocol`` writes it: FIN,
    unmasked, no RSV bit (extensions leave control frames alone)."""
    if len(payload) > 125:
        raise ValueError("payload too long for control frame")
    return frame_header(len(payload), opcode=opcode) + payload


class State(enum.Enum):
    """A connection's life (see the module's docstring)."""

    OPEN = "open"
    LOCAL_CLOSING = "local_closing"
    REMOTE_CLOSING = "remote_closing"
    CLOSED = "closed"
    GONE = "gone"


OPEN = State.OPEN
LOCAL_CLOSING = State.LOCAL_CLOSING
REMOTE_CLOSING = State.REMOTE_CLOSING
CLOSED = State.CLOSED
GONE = State.GONE
#: States in which a close frame may still be sent.
_CAN_CLOSE = (OPEN, REMOTE_CLOSING)


class Wire:
    """The frame parser of one accepted connection and its state."""

    __slots__ = ("_proto", "state")

    def __init__(self, proto: FrameProtocol | list[Extension]) -> None:
        #: The frame parser, or the extensions to make it with.
        self._proto = proto
        self.state = OPEN

    def _parser(self) -> FrameProtocol:
        proto = self._proto
        if not isinstance(proto, FrameProtocol):
            proto = self._proto = FrameProtocol(False, proto)
        return proto

    @classmethod
    def take(cls, ws: WSConnection) -> Wire:
        """The accepted connection of ``ws`` (``ws`` itself is not kept)."""
        conn = ws.connection
        assert isinstance(conn, Connection), "the upgrade was not accepted"
        # wsproto (pinned) has no public accessor for the frame protocol.
        proto = conn._proto
        assert isinstance(proto, FrameProtocol)
        assert not conn._events, "events pending in the connection"
        return cls(proto)

    def send(self, event: Ping | Pong | CloseConnection) -> bytes:
        """The bytes of a control frame (``Connection.send``); a close frame
        moves OPEN to LOCAL_CLOSING and REMOTE_CLOSING to CLOSED."""
        state = self.state
        if isinstance(event, Ping) and state is OPEN:
            return _control(Opcode.PING, event.payload)
        if isinstance(event, Pong) and state is OPEN:
            return _control(Opcode.PONG, event.payload)
        if isinstance(event, CloseConnection) and state in _CAN_CLOSE:
            data = bytes(self._parser().close(event.code, event.reason))
            self.state = CLOSED if state is REMOTE_CLOSING else LOCAL_CLOSING
            return data
        raise LocalProtocolError(f"Event {event} cannot be sent in state {state}.")

    @property
    def parsing(self) -> bool:
        """Whether the peer's frames are still parsed (``receive_data``)."""
        state = self.state
        return state is OPEN or state is LOCAL_CLOSING

    def can_close(self) -> bool:
        """Whether a close frame may still be sent."""
        return self.state in _CAN_CLOSE

    def abort(self) -> None:
        """The socket is gone: nothing more is read or written."""
        self.state = GONE

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer (``Connection.receive_data``). Once
        ``GONE`` they are dropped: the reader may still hold bytes it read
        before the socket went (a handler it awaited saw the connection
        dropped)."""
        state = self.state
        if state is OPEN or state is LOCAL_CLOSING:
            self._parser().receive_bytes(data)
        elif state is CLOSED:
            raise LocalProtocolError("Connection already closed.")

    def control(self, opcode: int, payload: bytes) -> Ping | Pong | CloseConnection | None:
        """The event of a whole control frame that the connection read itself
        (FIN, no RSV bit, masked, at most 125 bytes: nothing wsproto's frame
        parser would refuse; its extensions do nothing with control frames),
        as ``events`` would give it, with the same transition for a close.
        None: a close wsproto refuses (a 1-byte payload, a code it does not
        allow, a reason that is not UTF-8), to be fed to it instead.

        Only in OPEN and LOCAL_CLOSING, where ``receive_data`` parses."""
        if opcode == 0x9:
            return Ping(payload=payload)
        if opcode == 0xA:
            return Pong(payload=payload)
        assert opcode == 0x8
        if not payload:
            code: int = CloseReason.NO_STATUS_RCVD
            reason = ""
        else:
            # FrameProtocol._process_close, check for check.
            if len(payload) == 1:
                return None
            code = int.from_bytes(payload[:2], "big")
            if code < MIN_CLOSE_REASON or code > MAX_CLOSE_REASON:
                return None
            with contextlib.suppress(ValueError):
                code = CloseReason(code)
            if code in LOCAL_ONLY_CLOSE_REASONS:
                return None
            if not isinstance(code, CloseReason) and code <= MAX_PROTOCOL_CLOSE_REASON:
                return None
            try:
                reason = payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                return None
        self.state = CLOSED if self.state is LOCAL_CLOSING else REMOTE_CLOSING
        return CloseConnection(code=code, reason=reason)

    def events(self) -> Iterator[Event]:
        """The events of the frames received so far (``Connection.events``);
        a close frame moves OPEN to REMOTE_CLOSING and LOCAL_CLOSING to
        CLOSED. A frame wsproto cannot parse is a ``CloseConnection`` with
        the code to send (the state stays: the close is ours to send)."""
        proto = self._proto
        if not isinstance(proto, FrameProtocol):
            return  # nothing was handed to a parser
        try:
            for frame in proto.received_frames():
                opcode = frame.opcode
                if opcode is Opcode.TEXT:
                    assert isinstance(frame.payload, str)
                    yield TextMessage(
                        data=frame.payload,
                        frame_finished=frame.frame_finished,
                        message_finished=frame.message_finished,
                    )
                elif opcode is Opcode.PING:
                    assert isinstance(frame.payload, (bytes, bytearray))
                    yield Ping(payload=frame.payload)
                elif opcode is Opcode.PONG:
                    assert isinstance(frame.payload, (bytes, bytearray))
                    yield Pong(payload=frame.payload)
                elif opcode is Opcode.CLOSE:
                    assert isinstance(frame.payload, tuple)
                    code, reason = frame.payload
                    self.state = CLOSED if self.state is LOCAL_CLOSING else REMOTE_CLOSING
                    yield CloseConnection(code=code, reason=reason)
                elif opcode is Opcode.BINARY:
                    assert isinstance(frame.payload, (bytes, bytearray))
                    yield BytesMessage(
                        data=frame.payload,
                        frame_finished=frame.frame_finished,
                        message_finished=frame.message_finished,
                    )
        except ParseFailed as exc:
            yield CloseConnection(code=exc.code, reason=str(exc))
