"""Property-based tests of the decoder (hypothesis): whatever bytes or JSON a
client sends, ``protocol.decode_frame`` either returns a frame whose every
field obeys the protocol's rules, or raises ``ChatError(INVALID_FORMAT)``,
and nothing else (no ``msgspec`` error, no ``RecursionError``, no
``UnicodeError``, no ``KeyError``).

The rules a returned frame must obey are written here independently of
``protocol.py`` (``assert_validated``), so a constraint dropped from a struct
(a room name's pattern, an id's range, a request id's length) is caught by a
generated frame that the weakened decoder lets through. The strategies that
generate frames, and the patterns and bounds they share with these rules, are
in ``tests/helpers/fuzzing.py``.

The fixed edge cases (deep nesting at 5000 and 100 000 levels, lone
surrogates, invalid UTF-8, trailing newlines) are in ``tests/test_protocol.py``;
the session over a real socket is ``tests/test_session_properties.py``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import msgspec
import pytest

pytest.importorskip("hypothesis", reason="hypothesis is not installed (requirements-test.txt)")

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatd import protocol as p
from chatd.errors import ChatError, ErrorCode
from tests.helpers.fuzzing import (
    INT64_MAX,
    INT64_MIN,
    MESSAGE_TYPES,
    ROOM,
    SHAPES,
    batches,
    json_values,
    mutated_frames,
)

TYPES = sorted(p.CLIENT_TYPES)
#: What a batch may carry: everything but another batch (as the session asks).
BATCHABLE = frozenset(p.CLIENT_TYPES) - {"message_batch"}

#: CHATD_LONG=1 runs fifty times as many examples (minutes instead of seconds).
LONG = os.environ.get("CHATD_LONG") == "1"
PROPERTY = settings(
    max_examples=5000 if LONG else 100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- the rules a decoded frame must obey ------------------------------------------


def _text(value: Any, *, max_length: int | None = None, min_length: int = 0) -> None:
    assert isinstance(value, str), value
    value.encode("utf-8")  # no lone surrogate ever reaches a handler
    assert len(value) >= min_length, value
    if max_length is not None:
        assert len(value) <= max_length, value


def _int(value: Any, low: int, high: int) -> None:
    assert type(value) is int, value
    assert low <= value <= high, value


def _room(value: Any) -> None:
    _text(value, min_length=1, max_length=64)
    assert ROOM.fullmatch(value), value


def _request_id(value: Any) -> None:
    if value is None:
        return
    if isinstance(value, str):
        _text(value, max_length=64)
    else:
        _int(value, INT64_MIN, INT64_MAX)


def _content(data: Any) -> None:
    _text(data.content)
    assert data.message_type in MESSAGE_TYPES, data.message_type
    if data.media_url is not None:
        _text(data.media_url, max_length=2048)
    if data.media_type is not None:
        _text(data.media_type, max_length=127)
    if data.duration is not None:
        assert type(data.duration) is float and data.duration > 0, data.duration
        assert math.isfinite(data.duration) or data.duration == math.inf
    if data.reply_to is not None:
        _int(data.reply_to, 1, INT64_MAX)


def assert_validated(frame: p.ClientFrame, allowed: frozenset[str] | None = None) -> None:
    """Every field of a decoded frame is of its type and within its range."""
    assert frame.type in p.CLIENT_TYPES, frame.type
    if allowed is not None:
        assert frame.type in allowed
    assert type(frame.data) is p.CLIENT_TYPES[frame.type], frame
    _request_id(frame.request_id)
    data = frame.data
    if frame.type in ("join_room", "leave_room", "room_history"):
        _room(data.room)
    if frame.type == "join_room" and data.since_id is not None:
        _int(data.since_id, 0, INT64_MAX)
    if frame.type == "room_message":
        _room(data.room)
        _content(data)
    if frame.type == "direct_message":
        _int(data.to_user_id, 1, INT64_MAX)
        _content(data)
    if frame.type in ("room_history", "dm_history"):
        assert type(data.limit) is int, data.limit
        _int(data.offset, 0, INT64_MAX)
        assert 1 <= p.clamp_limit(data.limit) <= 100
    if frame.type == "dm_history":
        _int(data.with_user, 0, INT64_MAX)
    if frame.type == "auth":
        _text(data.token, min_length=1, max_length=16384)
    if frame.type == "message_batch":
        assert isinstance(data.messages, list) and len(data.messages) <= p.MAX_BATCH
        for entry in data.messages:
            _text(entry.type)
            _request_id(entry.request_id)
            assert isinstance(entry.data, msgspec.Raw)
            # An entry is decoded like a frame of its own, with no batch inside.
            check(lambda e=entry: p.decode_entry(e, allowed=BATCHABLE), BATCHABLE)


def check(decode: Any, allowed: frozenset[str] | None = None) -> p.ClientFrame | None:
    """Run ``decode``: a validated frame, or ``INVALID_FORMAT`` and nothing else."""
    try:
        frame = decode()
    except ChatError as err:
        assert err.code is ErrorCode.INVALID_FORMAT, err
        assert err.close is None
        assert isinstance(err.message, str) and len(err.message) < 4096
        assert isinstance(err.details, dict)
        json.dumps(err.details)  # it goes into an error frame as it is
        return None
    assert_validated(frame, allowed)
    return frame


def decode(raw: bytes | str) -> p.ClientFrame | None:
    frame = check(lambda: p.decode_frame(raw))
    peeked = p.peek_request_id(raw)  # the error path's helper never raises either
    _request_id(peeked)
    return frame


def dumps(value: Any) -> str:
    """JSON text; NaN and Infinity come out as the bare words (not JSON)."""
    return json.dumps(value, ensure_ascii=False)


# --- properties -----------------------------------------------------------------------


@PROPERTY
@given(st.binary(max_size=300))
def test_arbitrary_bytes(raw: bytes) -> None:
    decode(raw)


@PROPERTY
@given(st.text(max_size=300))
def test_arbitrary_text(raw: str) -> None:
    decode(raw)


@PROPERTY
@given(json_values)
def test_arbitrary_json(value: Any) -> None:
    text = dumps(value)
    decode(text)
    decode(text.encode("utf-8"))


@PROPERTY
@given(mutated_frames())
def test_every_frame_type_with_mutated_fields(frame: dict[str, Any]) -> None:
    decoded = decode(dumps(frame))
    if decoded is not None:
        # What came out is what went in, field by field: nothing invented,
        # and the client's user_id/timestamp are dropped.
        data = frame.get("data", {})
        for name in SHAPES.get(decoded.type, ()):
            if name in data:
                assert getattr(decoded.data, name) == data[name]
        assert not hasattr(decoded.data, "user_id")


@PROPERTY
@given(batches())
def test_batches_with_mutated_entries(frame: dict[str, Any]) -> None:
    decoded = decode(dumps(frame))
    if decoded is not None:
        assert decoded.type == "message_batch"
        assert len(decoded.data.messages) == len(frame["data"]["messages"])


@PROPERTY
@given(
    st.integers(min_value=1, max_value=20_000),
    st.sampled_from(["[", '{"a":', '{"type":"ping","data":{"x":']),
    st.sampled_from(
        [
            '{"type":"ping","data":%s}',
            '{"type":"ping","x":%s}',
            '{"type":"room_message","data":{"room":"general","content":%s}}',
            '{"type":"message_batch","data":{"messages":[{"type":"ping","data":%s}]}}',
            "%s",
        ]
    ),
)
def test_deep_nesting(depth: int, opener: str, template: str) -> None:
    closer = {"[": "]", '{"a":': "}"}.get(opener, "}}")
    nested = opener * depth + "0" + closer * depth
    decode(template % nested)
    decode((template % nested)[: depth + 10])  # cut short


@PROPERTY
@given(
    st.sampled_from(["since_id", "to_user_id", "with_user", "reply_to", "limit", "offset"]),
    st.sampled_from(
        ["1e400", "-1e400", "1" * 400, "-" + "9" * 400, "1.5", "1e2", "-0", "0.0", "1E19"]
    )
    | st.integers(min_value=-(2**1000), max_value=2**1000).map(str),
)
def test_huge_and_odd_numbers(field: str, number: str) -> None:
    type_ = next(t for t, fields in SHAPES.items() if field in fields)
    base = {
        "join_room": '"room":"general"',
        "room_message": '"room":"general","content":"x"',
        "direct_message": '"content":"x","to_user_id":2',
        "room_history": '"room":"general"',
        "dm_history": '"with_user":2',
    }[type_]
    decode(f'{{"type":"{type_}","data":{{{base},"{field}":{number}}},"request_id":{number}}}')


@PROPERTY
@given(
    st.sampled_from(sorted(SHAPES)),
    st.sampled_from(["\\ud800", "\\udfff", "a\\ud83d", "\\ude00b", "\\u0000", "\\ud83d\\ude00"]),
    st.sampled_from(["type", "room", "content", "token", "request_id", "media_url", "key"]),
)
def test_escaped_surrogates_and_nul(type_: str, escape: str, where: str) -> None:
    """A lone surrogate never comes out as a str (it cannot be stored or
    sent as UTF-8); NUL and a proper pair are ordinary characters."""
    data = {name: "x" for name in SHAPES[type_]}
    frame = {"type": type_, "data": data}
    text = dumps(frame)
    needle = '"x"' if where not in ("type", "request_id") else f'"{type_}"'
    if where == "request_id":
        text = text[:-1] + ',"request_id":"x"}'
        needle = '"request_id":"x"'
        text = text.replace(needle, f'"request_id":"{escape}"')
    else:
        text = text.replace(needle, f'"{escape}"', 1)
    decode(text)


@PROPERTY
@given(st.lists(st.sampled_from(TYPES), max_size=5), st.data())
def test_allowed_is_respected(allowed_types: list[str], data: st.DataObject) -> None:
    allowed = frozenset(allowed_types)
    frame = data.draw(mutated_frames())
    check(lambda: p.decode_frame(dumps(frame), allowed=allowed), allowed)
