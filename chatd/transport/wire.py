"""An upgraded WebSocket as the reader needs it: wsproto's frame parser alone.

wsproto's ``WSConnection`` keeps the handshake (an h11 connection, the
request) and its ``Connection`` an event deque (760 bytes even when empty) for
the connection's whole life. ``Wire`` keeps only the ``FrameProtocol`` of the
accepted connection (with the bytes that came after the upgrade request, and
the negotiated extensions) and does what ``wsproto.connection.Connection``
does with it, event for event and state for state, for the events chatd
sends (ping, pong, close) and receives (all).
"""

from __future__ import annotations

from collections.abc import Iterator

from wsproto import WSConnection
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.frame_protocol import FrameProtocol, Opcode, ParseFailed
from wsproto.utilities import LocalProtocolError

_SENDABLE = (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING)


class Wire:
    """The frame parser of one accepted connection and its state."""

    __slots__ = ("_proto", "state")

    def __init__(self, proto: FrameProtocol, state: ConnectionState) -> None:
        self._proto = proto
        self.state = state

    @classmethod
    def take(cls, ws: WSConnection) -> Wire:
        """The accepted connection of ``ws`` (``ws`` itself is not kept)."""
        conn = ws.connection
        assert isinstance(conn, Connection), "the upgrade was not accepted"
        # wsproto (pinned) has no public accessor for the frame protocol.
        proto = conn._proto
        assert isinstance(proto, FrameProtocol)
        assert not conn._events, "events pending in the connection"
        return cls(proto, conn.state)

    def send(self, event: Ping | Pong | CloseConnection) -> bytes:
        """The bytes of a control frame (``Connection.send``)."""
        state = self.state
        if isinstance(event, Ping) and state is ConnectionState.OPEN:
            return bytes(self._proto.ping(event.payload))
        if isinstance(event, Pong) and state is ConnectionState.OPEN:
            return bytes(self._proto.pong(event.payload))
        if isinstance(event, CloseConnection) and state in _SENDABLE:
            data = bytes(self._proto.close(event.code, event.reason))
            if state is ConnectionState.REMOTE_CLOSING:
                self.state = ConnectionState.CLOSED
            else:
                self.state = ConnectionState.LOCAL_CLOSING
            return data
        raise LocalProtocolError(f"Event {event} cannot be sent in state {state}.")

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer (``Connection.receive_data``)."""
        if self.state in (ConnectionState.OPEN, ConnectionState.LOCAL_CLOSING):
            self._proto.receive_bytes(data)
        elif self.state is ConnectionState.CLOSED:
            raise LocalProtocolError("Connection already closed.")

    def events(self) -> Iterator[Event]:
        """The events of the frames received so far (``Connection.events``)."""
        try:
            for frame in self._proto.received_frames():
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
                    if self.state is ConnectionState.LOCAL_CLOSING:
                        self.state = ConnectionState.CLOSED
                    else:
                        self.state = ConnectionState.REMOTE_CLOSING
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
