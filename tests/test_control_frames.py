"""Control frames the connection parses itself (``Wire.control``): a whole
close, ping or pong (FIN, no RSV bit, masked, at most 125 bytes) becomes the
event wsproto's parser would make of it, with the same state transition, or
None where wsproto refuses it (then wsproto is given the frame).

Checked against wsproto's parser for the close codes around its ranges, for
reasons valid and not, and for random payloads (hypothesis); and in both
states where frames are parsed (OPEN, LOCAL_CLOSING). The connection's
reader taking this path (a ping answered, a close answered, a bad close
refused with 1002) is in ``tests/test_frame_errors.py`` over a socket.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wsproto.events import CloseConnection, Ping, Pong

from chatd.transport.wire import OPEN, Wire
from tests.helpers.raw import OP_CLOSE, OP_PING, OP_PONG, accepted_server, client_frame


def _event(e: Any) -> tuple[Any, ...]:
    return (type(e).__name__, *sorted((k, (type(v), v)) for k, v in vars(e).items()))


def _wsproto(opcode: int, payload: bytes, closing: bool) -> tuple[list[Any], Any]:
    """wsproto's events and the state after, for one frame."""
    wire = Wire.take(accepted_server())
    if closing:
        wire.send(CloseConnection(1000))
    wire.receive_data(client_frame(opcode, payload))
    return [_event(e) for e in wire.events()], wire.state


def _mine(opcode: int, payload: bytes, closing: bool) -> tuple[Any, Any]:
    wire = Wire.take(accepted_server())
    if closing:
        wire.send(CloseConnection(1000))
    assert wire.parsing
    event = wire.control(opcode, payload)
    return (None if event is None else _event(event)), wire.state


def _check(opcode: int, payload: bytes, closing: bool = False) -> None:
    events, state = _wsproto(opcode, payload, closing)
    event, my_state = _mine(opcode, payload, closing)
    if event is None:
        # wsproto refuses it: a protocol error (1002) or bad data (1007) for
        # us to send, the state unchanged
        assert len(events) == 1 and events[0][0] == "CloseConnection"
        code = dict(events[0][1:])["code"][1]
        assert code in (1002, 1007)
        assert my_state is state and (state is OPEN or closing)
    else:
        assert events == [event]
        assert my_state is state


def test_close_codes() -> None:
    """Every code from 990 to 5010 (wsproto's ranges and their edges), and
    every 61st of the others."""
    for code in [*range(990, 5011), *range(0, 990, 61), *range(5011, 65536, 61), 65535]:
        _check(OP_CLOSE, code.to_bytes(2, "big"))


@pytest.mark.parametrize("closing", [False, True], ids=["open", "local-closing"])
@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x03",
        b"\x03\xe8",
        b"\x03\xe8bye",
        "\x03\xe8é".encode(),
        b"\x03\xe8\xff",
        b"\x0f\xa1x",
    ],
    ids=["empty", "one-byte", "1000", "1000-reason", "1000-utf8", "1000-bad-utf8", "4001"],
)
def test_close_frames(payload: bytes, closing: bool) -> None:
    _check(OP_CLOSE, payload, closing)


@given(
    opcode=st.sampled_from([OP_CLOSE, OP_PING, OP_PONG]),
    payload=st.binary(max_size=125),
    closing=st.booleans(),
)
def test_random_control_frames(opcode: int, payload: bytes, closing: bool) -> None:
    _check(opcode, payload, closing)


@given(code=st.integers(1000, 4999), reason=st.text(max_size=40))
def test_closes_with_reasons(code: int, reason: str) -> None:
    payload = code.to_bytes(2, "big") + reason.encode()
    if len(payload) <= 125:
        _check(OP_CLOSE, payload)


def test_a_ping_is_answered_with_wsprotos_pong() -> None:
    wire = Wire.take(accepted_server())
    ping = wire.control(OP_PING, b"abc")
    assert isinstance(ping, Ping)
    assert wire.send(ping.response()) == Wire.take(accepted_server()).send(Pong(b"abc"))
