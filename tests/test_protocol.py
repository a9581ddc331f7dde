"""chatd.protocol: decoding client frames, encoding server frames.

Synchronous and parametrized: every client type with valid data, every way a
frame can be malformed (always ``ChatError(INVALID_FORMAT)``, naming the field
when known), and the exact shape of what the server encodes.
"""

from __future__ import annotations

import datetime
import json
import random
from typing import Any

import msgspec
import pytest

from chatd import protocol as p
from chatd.errors import ChatError, ErrorCode

INT64_MAX = 2**63 - 1


def raw(frame: dict[str, Any]) -> bytes:
    return json.dumps(frame).encode()


def refused(data: bytes | str, **kwargs: Any) -> ChatError:
    with pytest.raises(ChatError) as info:
        p.decode_frame(data, **kwargs)
    err = info.value
    assert err.code is ErrorCode.INVALID_FORMAT
    assert err.close is None
    return err


# --- valid frames -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("type_", "data", "expected"),
    [
        ("join_room", {"room": "general"}, p.JoinRoom(room="general")),
        ("join_room", {"room": "general", "since_id": 0}, p.JoinRoom(room="general", since_id=0)),
        ("leave_room", {"room": "a.b:c@d-e_f"}, p.LeaveRoom(room="a.b:c@d-e_f")),
        (
            "room_message",
            {"room": "general", "content": "hi"},
            p.RoomMessage(room="general", content="hi"),
        ),
        (
            "room_message",
            {
                "room": "general",
                "content": "cap",
                "message_type": "image",
                "media_url": "/m/1.png",
                "media_type": "image/png",
                "reply_to": 5,
            },
            p.RoomMessage(
                room="general",
                content="cap",
                message_type="image",
                media_url="/m/1.png",
                media_type="image/png",
                reply_to=5,
            ),
        ),
        (
            "room_message",
            {"room": "r", "message_type": "audio", "media_url": "/a", "duration": 1.5},
            p.RoomMessage(room="r", message_type="audio", media_url="/a", duration=1.5),
        ),
        (
            "direct_message",
            {"to_user_id": 2, "content": "yo"},
            p.DirectMessage(to_user_id=2, content="yo"),
        ),
        (
            "direct_message",
            {"to_user_id": INT64_MAX, "content": "x", "message_type": "reaction", "reply_to": 1},
            p.DirectMessage(to_user_id=INT64_MAX, content="x", message_type="reaction", reply_to=1),
        ),
        ("room_history", {"room": "general"}, p.RoomHistory(room="general", limit=50, offset=0)),
        (
            "room_history",
            {"room": "general", "limit": 500, "offset": 3},
            p.RoomHistory(room="general", limit=500, offset=3),
        ),
        ("dm_history", {"with_user": 9}, p.DmHistory(with_user=9)),
        (
            "dm_history",
            {"with_user": 9, "limit": -1, "offset": 0},
            p.DmHistory(with_user=9, limit=-1),
        ),
        ("ping", {}, p.Ping()),
        ("auth", {"token": "a.b.c"}, p.Auth(token="a.b.c")),
    ],
)
def test_decode_valid(type_: str, data: dict[str, Any], expected: Any) -> None:
    frame = p.decode_frame(raw({"type": type_, "data": data}))
    assert frame.type == type_
    assert frame.data == expected
    assert frame.request_id is None


def test_data_defaults_to_empty_object() -> None:
    assert p.decode_frame(b'{"type":"ping"}').data == p.Ping()


def test_str_input_accepted() -> None:
    frame = p.decode_frame('{"type":"join_room","data":{"room":"caf\u00e9"}}')
    assert frame.data == p.JoinRoom(room="caf\u00e9")


def test_message_batch_entries_kept_raw() -> None:
    frame = p.decode_frame(
        raw(
            {
                "type": "message_batch",
                "data": {
                    "messages": [
                        {"type": "room_message", "data": {"room": "g", "content": "a"}},
                        {"type": "ping", "request_id": 3},
                    ]
                },
            }
        )
    )
    entries = frame.data.messages
    assert [e.type for e in entries] == ["room_message", "ping"]
    assert [e.request_id for e in entries] == [None, 3]
    first = p.decode_entry(entries[0])
    assert first.data == p.RoomMessage(room="g", content="a")
    assert p.decode_entry(entries[1]).request_id == 3


def test_message_batch_too_long() -> None:
    entries = [{"type": "ping"}] * (p.MAX_BATCH + 1)
    err = refused(raw({"type": "message_batch", "data": {"messages": entries}}))
    assert err.details == {"field": "data.messages"}
    ok = p.decode_frame(raw({"type": "message_batch", "data": {"messages": entries[:-1]}}))
    assert len(ok.data.messages) == p.MAX_BATCH


# --- request_id -------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_id", ["", "abc", "x" * 64, "\U0001f600", 0, -1, 42, INT64_MAX, -(2**63)]
)
def test_request_id_echoed(request_id: str | int) -> None:
    frame = p.decode_frame(raw({"type": "ping", "request_id": request_id}))
    assert frame.request_id == request_id
    assert type(frame.request_id) is type(request_id)


@pytest.mark.parametrize("request_id", ["x" * 65, 2**63, -(2**63) - 1, True, 1.5, [], {}])
def test_request_id_refused(request_id: Any) -> None:
    err = refused(raw({"type": "ping", "request_id": request_id}))
    assert err.details == {"field": "request_id"}


def test_request_id_too_long_message() -> None:
    err = refused(raw({"type": "ping", "request_id": "x" * 65}))
    assert err.message == "Expected `str` of length <= 64"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'{"type":"nope","request_id":"r1"}', "r1"),
        (b'{"request_id":7,"type":3}', 7),
        (b'{"request_id":-9223372036854775808}', -(2**63)),
        (b'{"request_id":"' + b"x" * 64 + b'"}', "x" * 64),
        (b'{"request_id":"' + b"x" * 65 + b'"}', None),
        (b'{"request_id":9223372036854775808}', None),
        (b'{"request_id":true}', None),
        (b'{"request_id":1.0}', None),
        (b'{"request_id":null}', None),
        (b'{"type":"ping"}', None),
        (b"[1,2]", None),
        (b"not json", None),
        (b'{"request_id":"r","x":' + b"[" * 5000 + b"]" * 5000 + b"}", None),
    ],
)
def test_peek_request_id(data: bytes, expected: str | int | None) -> None:
    assert p.peek_request_id(data) == expected


# --- refusals ----------------------------------------------------------------------


@pytest.mark.parametrize("type_", ["nope", "error", "join_room_ack", "Ping", ""])
def test_unknown_type(type_: str) -> None:
    err = refused(raw({"type": type_, "data": {}}))
    assert err.details == {"field": "type"}
    assert err.message == f"Unknown message type {type_!r}"


def test_unknown_type_message_is_bounded() -> None:
    err = refused(raw({"type": "x" * 10_000}))
    assert len(err.message) < 100


@pytest.mark.parametrize(
    ("frame", "field"),
    [
        ({"data": {}}, "type"),
        ({"type": 5}, "type"),
        ({"type": "ping", "data": None}, "data"),
        ({"type": "ping", "data": []}, "data"),
        ({"type": "join_room", "data": {}}, "data.room"),
        ({"type": "join_room", "data": {"room": 1}}, "data.room"),
        ({"type": "join_room", "data": {"room": ""}}, "data.room"),
        ({"type": "join_room", "data": {"room": "a b"}}, "data.room"),
        ({"type": "join_room", "data": {"room": "r" * 65}}, "data.room"),
        ({"type": "join_room", "data": {"room": "g", "since_id": -1}}, "data.since_id"),
        ({"type": "leave_room", "data": {"room": None}}, "data.room"),
        ({"type": "room_message", "data": {"content": "hi"}}, "data.room"),
        ({"type": "room_message", "data": {"room": "g", "content": 1}}, "data.content"),
        (
            {"type": "room_message", "data": {"room": "g", "message_type": "video"}},
            "data.message_type",
        ),
        ({"type": "room_message", "data": {"room": "g", "duration": 0}}, "data.duration"),
        (
            {"type": "room_message", "data": {"room": "g", "media_url": "u" * 2049}},
            "data.media_url",
        ),
        ({"type": "room_message", "data": {"room": "g", "reply_to": 0}}, "data.reply_to"),
        ({"type": "direct_message", "data": {"content": "x"}}, "data.to_user_id"),
        ({"type": "direct_message", "data": {"to_user_id": "2"}}, "data.to_user_id"),
        ({"type": "direct_message", "data": {"to_user_id": 0}}, "data.to_user_id"),
        ({"type": "direct_message", "data": {"to_user_id": 2**63}}, "data.to_user_id"),
        ({"type": "direct_message", "data": {"to_user_id": True}}, "data.to_user_id"),
        ({"type": "room_history", "data": {"room": "g", "offset": -1}}, "data.offset"),
        ({"type": "room_history", "data": {"room": "g", "offset": 2**63}}, "data.offset"),
        ({"type": "room_history", "data": {"room": "g", "limit": "5"}}, "data.limit"),
        ({"type": "dm_history", "data": {"with_user": 2**63}}, "data.with_user"),
        ({"type": "dm_history", "data": {"with_user": -5}}, "data.with_user"),
        ({"type": "dm_history", "data": {"with_user": 1, "offset": -1}}, "data.offset"),
        ({"type": "auth", "data": {}}, "data.token"),
        ({"type": "auth", "data": {"token": ""}}, "data.token"),
        ({"type": "message_batch", "data": {}}, "data.messages"),
        ({"type": "message_batch", "data": {"messages": [{"data": {}}]}}, "data.messages[0].type"),
    ],
)
def test_bad_field_named(frame: dict[str, Any], field: str) -> None:
    err = refused(raw(frame))
    assert err.details == {"field": field}


def test_missing_field_message() -> None:
    err = refused(raw({"type": "join_room", "data": {}}))
    assert err.message == "Object missing required field `room`"


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "ping", "data": {"extra": 1}, "timestamp": "x", "user_id": 99, "future": [1]},
        {"type": "join_room", "data": {"room": "g", "new_field": {"a": 1}}},
    ],
)
def test_unknown_fields_ignored(frame: dict[str, Any]) -> None:
    decoded = p.decode_frame(raw(frame))
    assert decoded.type == frame["type"]


def test_client_user_id_not_trusted() -> None:
    frame = p.decode_frame(raw({"type": "ping", "user_id": 99}))
    assert not hasattr(frame, "user_id")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"\xff\xfe\x00",
        b"{",
        b'{"type":"ping"} trailing',
        b"[]",
        b'"ping"',
        b"null",
        b"42",
    ],
)
def test_not_a_json_object(data: bytes) -> None:
    refused(data)


@pytest.mark.parametrize(
    "data",
    [
        b'{"type":"join_room","data":{"room":"\\ud800"}}',
        b'{"type":"ping","request_id":"\\udc00"}',
        b'{"type":"room_message","data":{"room":"g","content":"a\\ud800b"}}',
    ],
)
def test_lone_surrogate_refused(data: bytes) -> None:
    refused(data)


@pytest.mark.parametrize(
    "data",
    [
        b'{"type":"ping","request_id":"\xff"}',
        b'{"type":"join_room","data":{"room":"\xed\xa0\x80"}}',
    ],
)
def test_invalid_utf8_in_string_refused(data: bytes) -> None:
    refused(data)


def test_peek_request_id_invalid_utf8() -> None:
    assert p.peek_request_id(b'{"request_id":"\xff"}') is None


@pytest.mark.parametrize(
    "template",
    [
        b'{"type":"ping","data":%s}',
        b'{"type":"ping","data":{"x":%s}}',
        b'{"type":"ping","extra":%s}',
        b'{"type":"message_batch","data":{"messages":[{"type":"ping","data":%s}]}}',
    ],
)
@pytest.mark.parametrize("depth", [5000, 100_000])
def test_deeply_nested_json_refused(template: bytes, depth: int) -> None:
    nested = b"[" * depth + b"]" * depth
    refused(template % nested)


def test_room_name_with_trailing_newline_refused() -> None:
    err = refused(b'{"type":"join_room","data":{"room":"general\\n"}}')
    assert err.details == {"field": "data.room"}


# --- allowed= -----------------------------------------------------------------------


def test_allowed_restricts_types() -> None:
    allowed = frozenset({"ping", "room_message"})
    assert p.decode_frame(b'{"type":"ping"}', allowed=allowed).type == "ping"
    err = refused(raw({"type": "message_batch", "data": {"messages": []}}), allowed=allowed)
    assert err.details == {"field": "type"}
    assert err.message == "Unknown message type 'message_batch'"


def test_allowed_applies_to_batch_entries() -> None:
    frame = p.decode_frame(
        raw({"type": "message_batch", "data": {"messages": [{"type": "message_batch"}]}})
    )
    entry = frame.data.messages[0]
    with pytest.raises(ChatError) as info:
        p.decode_entry(entry, allowed=frozenset({"ping"}))
    assert info.value.code is ErrorCode.INVALID_FORMAT
    assert info.value.details == {"field": "type"}


def test_allowed_cannot_add_unknown_types() -> None:
    refused(b'{"type":"bogus"}', allowed=frozenset({"bogus"}))


# --- clamp_limit ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "expected"),
    [(-(2**70), 1), (-5, 1), (0, 1), (1, 1), (50, 50), (100, 100), (101, 100), (10**9, 100)],
)
def test_clamp_limit(limit: int, expected: int) -> None:
    assert p.clamp_limit(limit) == expected


# --- encoding -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ts", "text"),
    [
        (0, "1970-01-01T00:00:00.000Z"),
        (0.999, "1970-01-01T00:00:00.999Z"),
        (1_700_476_200.123, "2023-11-20T10:30:00.123Z"),
        (951_782_400, "2000-02-29T00:00:00.000Z"),
    ],
)
def test_rfc3339(ts: float, text: str) -> None:
    assert p.rfc3339(ts) == text


def test_encode_omits_none_fields() -> None:
    frame = json.loads(p.encode("pong", {"timestamp": "t"}, 0))
    assert frame == {
        "type": "pong",
        "data": {"timestamp": "t"},
        "timestamp": "1970-01-01T00:00:00.000Z",
    }


@pytest.mark.parametrize(
    ("user_id", "request_id"), [(5, None), (None, "r"), (None, 0), (7, -3), (1, "")]
)
def test_encode_includes_given_fields(user_id: int | None, request_id: str | int | None) -> None:
    frame = json.loads(p.encode("x", None, 12.5, user_id=user_id, request_id=request_id))
    assert frame["type"] == "x"
    assert frame["data"] is None
    assert frame["timestamp"] == "1970-01-01T00:00:12.500Z"
    assert ("user_id" in frame) == (user_id is not None)
    assert ("request_id" in frame) == (request_id is not None)
    if user_id is not None:
        assert frame["user_id"] == user_id
    if request_id is not None:
        assert frame["request_id"] == request_id


@pytest.mark.parametrize("now", [0.0, 1.0005, 1_700_000_000.0, 4_102_444_800.987])
def test_encode_timestamp_format(now: float) -> None:
    stamp = json.loads(p.encode("ping", {}, now))["timestamp"]
    assert stamp.endswith("Z")
    assert len(stamp) == len("2023-11-20T10:30:00.123Z")
    assert stamp[19] == "." and stamp[20:23].isdigit()


def test_encode_message_out_omits_empty_media() -> None:
    out = p.MessageOut(
        id=1,
        room="g",
        user_id=2,
        username="u",
        content="c",
        message_type="text",
        created_at="t",
    )
    data = json.loads(p.encode("room_message", out, 0, user_id=2))["data"]
    assert data == {
        "id": 1,
        "room": "g",
        "user_id": 2,
        "username": "u",
        "content": "c",
        "message_type": "text",
        "created_at": "t",
    }


@pytest.mark.parametrize(
    ("err", "details"),
    [
        (ChatError(ErrorCode.ROOM_NOT_FOUND, "Room not found", {"room": "x"}), {"room": "x"}),
        (ChatError(ErrorCode.RATE_LIMITED, "Slow down", {"retry_after": 3}), {"retry_after": 3}),
        (ChatError(ErrorCode.INTERNAL_ERROR, "Oops"), {}),
    ],
)
@pytest.mark.parametrize("request_id", [None, "abc", 9])
def test_error_frame(err: ChatError, details: dict[str, Any], request_id: str | int | None) -> None:
    frame = json.loads(p.error_frame(err, 0, request_id))
    expected: dict[str, Any] = {
        "type": "error",
        "data": {"message": err.message, "code": err.code.value, "details": details},
        "timestamp": "1970-01-01T00:00:00.000Z",
    }
    if request_id is not None:
        expected["request_id"] = request_id
    assert frame == expected


def test_error_frame_from_decode_failure() -> None:
    err = refused(b'{"type":"join_room","data":{}}')
    data = msgspec.json.decode(p.error_frame(err, 0, "q"))
    assert data["data"]["code"] == "INVALID_FORMAT"
    assert data["data"]["details"] == {"field": "data.room"}
    assert data["request_id"] == "q"


def _rfc3339_uncached(ts: float) -> str:
    moment = datetime.datetime.fromtimestamp(ts, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def test_rfc3339_cached_second_matches_datetime() -> None:
    """The per-second cache gives datetime's text exactly: around second and
    millisecond boundaries, half-microsecond ties, back and forth in time."""
    rng = random.Random(3339)
    stamps = [1_700_000_000 + rng.random() * 5 for _ in range(5000)]
    stamps += [rng.uniform(0, 4_000_000_000) for _ in range(5000)]
    for base in (0, 1, 59, 1_700_476_199, 4_102_444_799):
        for delta in (0.0, 0.0005, 0.0009995, 0.9994995, 0.9995, 0.9999994, 0.9999995, 0.9999999):
            stamps += [base + delta, base - delta if base else base + delta]
        stamps += [base + k / 1e6 + 5e-7 for k in range(0, 3000, 7)]
    for ts in stamps + stamps[::-1]:
        assert p.rfc3339(ts) == _rfc3339_uncached(ts), ts
