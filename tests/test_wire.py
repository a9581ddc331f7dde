"""``Wire``: an upgraded connection's frame parser and its one state.

It stands in for wsproto's ``Connection`` (which keeps the handshake's state
for a connection's whole life): for every sequence of frames, it must yield
the same events and pass through the same states as wsproto's, and send the
same bytes. Beyond wsproto, it has ``GONE``: the socket is closed or failed,
from any state, and nothing more is read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from wsproto.connection import Connection, ConnectionState
from wsproto.events import CloseConnection, Ping, Pong, TextMessage
from wsproto.frame_protocol import FrameProtocol
from wsproto.utilities import LocalProtocolError

from chatd.transport.extensions import BoundedDeflate, SizeGuard
from chatd.transport.wire import State, Wire
from tests.helpers.raw import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    accepted_server,
    client_frame,
)


def _same(mine: State, theirs: ConnectionState) -> bool:
    """wsproto's states keep their names in chatd's ``State``."""
    return mine.name == theirs.name


# --- event for event, state for state, like wsproto's Connection ------------------


def _event(e: Any) -> tuple[Any, ...]:
    return (type(e).__name__, *sorted((k, v) for k, v in vars(e).items()))


def _taken() -> tuple[Wire, Connection]:
    """A Wire taken from wsproto's handshake, and wsproto's own Connection."""
    wire = Wire.take(accepted_server())
    reference = accepted_server().connection
    assert reference is not None
    return wire, reference


def _made() -> tuple[Wire, Connection]:
    """A Wire as the gate makes it for an upgrade it read itself: from the
    extensions, its parser made on first need."""
    wire = Wire([SizeGuard(1 << 20)])
    reference = accepted_server().connection
    assert reference is not None
    return wire, reference


BOTH = pytest.mark.parametrize("make", [_taken, _made], ids=["taken", "made"])


CASES: dict[str, list[bytes]] = {
    "text, fragmented, a ping in between": [
        client_frame(OP_TEXT, b"hel", fin=False),
        client_frame(OP_PING, b"p"),
        client_frame(OP_CONT, "lo é".encode()),
    ],
    "binary and pong": [client_frame(OP_BINARY, b"\x00\x01"), client_frame(OP_PONG, b"x")],
    "close": [client_frame(OP_CLOSE, b"\x03\xe8bye")],
    "close without a code": [client_frame(OP_CLOSE, b"")],
    "invalid close code": [client_frame(OP_CLOSE, b"\x03\xe7")],
    "bad utf-8": [client_frame(OP_TEXT, b"\xff\xfe")],
    "unmasked": [client_frame(OP_TEXT, b"hi", mask=False)],
    "continuation first": [client_frame(OP_CONT, b"x")],
    "split header": [client_frame(OP_TEXT, b"abc")[:1], client_frame(OP_TEXT, b"abc")[1:]],
}


@BOTH
def test_wire_events_and_states_are_wsprotos(make: Callable[[], tuple[Wire, Connection]]) -> None:
    for name, chunks in CASES.items():
        wire, reference = make()
        for chunk in chunks:
            wire.receive_data(chunk)
            reference.receive_data(chunk)
            got = [_event(e) for e in wire.events()]
            want = [_event(e) for e in reference.events()]
            assert got == want, name
            assert _same(wire.state, reference.state), name


@BOTH
def test_wire_sends_what_wsproto_sends(make: Callable[[], tuple[Wire, Connection]]) -> None:
    wire, reference = make()
    for event in (Ping(b"chatd"), Pong(b"x")):
        assert wire.send(event) == reference.send(event)
    assert wire.send(CloseConnection(1013, "Slow consumer")) == reference.send(
        CloseConnection(1013, "Slow consumer")
    )
    assert _same(wire.state, reference.state)
    # The peer answers the close: both are closed.
    answer = client_frame(OP_CLOSE, b"\x03\xf5")
    wire.receive_data(answer)
    reference.receive_data(answer)
    assert [_event(e) for e in wire.events()] == [_event(e) for e in reference.events()]
    assert _same(wire.state, reference.state)

    # A close received first, then answered.
    wire, reference = make()
    close = client_frame(OP_CLOSE, b"\x03\xe8")
    wire.receive_data(close)
    reference.receive_data(close)
    (got,) = wire.events()
    (want,) = reference.events()
    assert isinstance(got, CloseConnection) and isinstance(want, CloseConnection)
    assert wire.send(got.response()) == reference.send(want.response())
    assert _same(wire.state, reference.state)


def test_pings_and_pongs_are_written_as_wsproto_writes_them() -> None:
    """Every payload a control frame may have, with permessage-deflate
    agreed and without: the same bytes as wsproto's, and no parser made."""
    deflate = BoundedDeflate(1 << 20)
    deflate.accept("permessage-deflate")  # agreed, as the gate agrees it
    assert deflate.enabled()
    for extensions in ([SizeGuard(1 << 20)], [deflate, SizeGuard(1 << 20)]):
        wire = Wire(list(extensions))
        reference = FrameProtocol(False, list(extensions))
        for n in range(126):
            payload = bytes(range(n))
            assert wire.send(Ping(payload)) == bytes(reference.ping(payload))
            assert wire.send(Pong(payload)) == bytes(reference.pong(payload))
        with pytest.raises(ValueError):
            wire.send(Ping(b"x" * 126))
        assert list(wire.events()) == []
        assert isinstance(wire._proto, list)  # nothing needed a parser
        wire.receive_data(client_frame(OP_TEXT, b"hi"))
        assert [_event(e) for e in wire.events()] == [
            _event(TextMessage(data="hi", frame_finished=True, message_finished=True))
        ]


# --- the state machine -----------------------------------------------------------


def test_a_new_wire_is_open() -> None:
    wire = Wire.take(accepted_server())
    assert wire.state is State.OPEN and wire.can_close()


def test_our_close_then_theirs() -> None:
    wire = Wire.take(accepted_server())
    wire.send(CloseConnection(1000))
    assert wire.state is State.LOCAL_CLOSING and not wire.can_close()
    wire.receive_data(client_frame(OP_CLOSE, b"\x03\xe8"))
    assert [type(e) for e in wire.events()] == [CloseConnection]
    assert wire.state is State.CLOSED


def test_their_close_then_ours() -> None:
    wire = Wire.take(accepted_server())
    wire.receive_data(client_frame(OP_CLOSE, b"\x03\xe8"))
    list(wire.events())
    assert wire.state is State.REMOTE_CLOSING and wire.can_close()
    wire.send(CloseConnection(1000))
    assert wire.state is State.CLOSED and not wire.can_close()


def test_a_frame_that_cannot_be_parsed_leaves_the_close_to_us() -> None:
    """wsproto's verdict (here 1002, an unmasked frame) comes as the close to
    send; the state stays OPEN until it is sent."""
    wire = Wire.take(accepted_server())
    wire.receive_data(client_frame(OP_TEXT, b"hi", mask=False))
    (event,) = wire.events()
    assert isinstance(event, CloseConnection) and event.code == 1002
    assert wire.state is State.OPEN
    wire.send(CloseConnection(event.code))
    assert wire.state is State.LOCAL_CLOSING


@pytest.mark.parametrize("steps", [[], ["ours"], ["theirs"], ["ours", "theirs"]])
def test_gone_from_any_state(steps: list[str]) -> None:
    wire = Wire.take(accepted_server())
    for step in steps:
        if step == "ours":
            wire.send(CloseConnection(1000))
        else:
            wire.receive_data(client_frame(OP_CLOSE, b"\x03\xe8"))
            list(wire.events())
    wire.abort()
    assert wire.state is State.GONE and not wire.can_close()
    # Bytes read before the socket went are dropped: no event, no error.
    wire.receive_data(client_frame(OP_TEXT, b"late"))
    assert list(wire.events()) == []
    with pytest.raises(LocalProtocolError):
        wire.send(Ping(b"x"))


def test_only_an_open_wire_sends_pings_and_pongs() -> None:
    wire = Wire.take(accepted_server())
    wire.send(CloseConnection(1000))
    for event in (Ping(b"x"), Pong(b"x")):
        with pytest.raises(LocalProtocolError):
            wire.send(event)
