"""Hypothesis strategies for client frames, shared by the decoder's property
tests (``tests/test_properties.py``) and the session's over a real socket
(``tests/test_session_properties.py``): any JSON value (``json_values``),
frames of every type with each field plausible, ill-typed or absent
(``mutated_frames``), and batches of them (``batches``).

``ROOM``, ``MESSAGE_TYPES`` and the 64-bit bounds are the protocol's rules as
the tests state them, independently of ``chatd/protocol.py``.
"""

from __future__ import annotations

import re
from typing import Any

from hypothesis import strategies as st

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: What a room name may be: 1 to 64 letters, digits or ``_ . : @ -``.
ROOM = re.compile(r"[\w.:@-]{1,64}")
MESSAGE_TYPES = ("text", "image", "audio", "reaction")

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**300), max_value=2**300)
    | st.sampled_from([INT64_MIN - 1, INT64_MIN, -1, 0, 1, INT64_MAX, INT64_MAX + 1, 2**64])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=80)
    | st.sampled_from(["general", "random", "staff", "", " ", "general\n", "a b", "x" * 65])
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=10,
)

#: Plausible values of each field, to reach past the first check.
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "room": st.sampled_from(["general", "a.b:c@d-e_f", "x" * 64, "général"])
    | st.from_regex(ROOM, fullmatch=True),
    "since_id": st.integers(min_value=-2, max_value=2**64),
    "content": st.text(max_size=50),
    "message_type": st.sampled_from([*MESSAGE_TYPES, "notification", "TEXT"]),
    "media_url": st.sampled_from(["/m/1.png", "https://x.example/a", "javascript:alert(1)"]),
    "media_type": st.sampled_from(["image/png", "audio/ogg", "text/html", "x" * 200]),
    "duration": st.floats(allow_nan=True, allow_infinity=True),
    "reply_to": st.integers(min_value=-2, max_value=2**64),
    "to_user_id": st.integers(min_value=-2, max_value=2**64),
    "with_user": st.integers(min_value=-2, max_value=2**64),
    "limit": st.integers(min_value=-(2**70), max_value=2**70),
    "offset": st.integers(min_value=-2, max_value=2**64),
    "token": st.text(max_size=40),
}
#: The fields each frame type's data has.
SHAPES: dict[str, tuple[str, ...]] = {
    "join_room": ("room", "since_id"),
    "leave_room": ("room",),
    "room_message": (
        "room",
        "content",
        "message_type",
        "media_url",
        "media_type",
        "duration",
        "reply_to",
    ),
    "direct_message": (
        "to_user_id",
        "content",
        "message_type",
        "media_url",
        "media_type",
        "duration",
        "reply_to",
    ),
    "room_history": ("room", "limit", "offset"),
    "dm_history": ("with_user", "limit", "offset"),
    "ping": (),
    "auth": ("token",),
}
request_ids = (
    st.none()
    | st.text(max_size=70)
    | st.sampled_from(["r" * 64, "é" * 64, "r" * 65, "r" * 1000])
    | st.integers(min_value=INT64_MIN - 5, max_value=INT64_MAX + 5)
    | json_values
)


@st.composite
def mutated_data(draw: st.DrawFn, type_: str) -> dict[str, Any]:
    """The data of ``type_``: each field plausible, ill-typed or absent, and
    maybe an unknown one."""
    data: dict[str, Any] = {}
    for name in SHAPES[type_]:
        choice = draw(st.integers(0, 5))
        if choice == 0:
            continue
        data[name] = draw(json_values) if choice == 1 else draw(FIELDS[name])
    if draw(st.booleans()):
        data[draw(st.text(max_size=10))] = draw(json_values)
    return data


@st.composite
def mutated_frames(draw: st.DrawFn, types: tuple[str, ...] = tuple(SHAPES)) -> dict[str, Any]:
    """A frame of a known type with mutated fields (or an unknown type)."""
    type_ = draw(st.sampled_from(types))
    frame: dict[str, Any] = {
        "type": type_ if draw(st.integers(0, 9)) else draw(st.text(max_size=20) | json_values)
    }
    if draw(st.integers(0, 9)):
        frame["data"] = draw(mutated_data(type_)) if draw(st.integers(0, 5)) else draw(json_values)
    if draw(st.booleans()):
        frame["request_id"] = draw(request_ids)
    for name in ("user_id", "timestamp"):  # never trusted
        if draw(st.integers(0, 3)) == 0:
            frame[name] = draw(json_values)
    return frame


@st.composite
def batches(draw: st.DrawFn) -> dict[str, Any]:
    entries = draw(st.lists(mutated_frames(), max_size=6))
    if draw(st.integers(0, 4)) == 0:
        entries.append({"type": "message_batch", "data": {"messages": []}})
    frame: dict[str, Any] = {"type": "message_batch", "data": {"messages": entries}}
    if draw(st.booleans()):
        frame["request_id"] = draw(request_ids)
    return frame
