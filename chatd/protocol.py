"""The wire format: msgspec structs for every frame, decode and encode.

Pure: no I/O, no clock reads (callers pass ``now``).

Decoding is two steps. The envelope ``{"type", "data", "request_id"}`` is
decoded first with ``data`` kept raw; ``type`` then picks the struct that
``data`` is decoded into. So every error names its field (msgspec's
``$.room``), unknown fields are ignored, and nothing reaches a handler
unchecked. Every failure is a ``ChatError(INVALID_FORMAT)``.

Encoding builds a ``ServerFrame`` and turns it into JSON bytes once; the
transport frames and (maybe) compresses those bytes once per fan-out.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from chatd.config import ROOM_NAME_PATTERN
from chatd.errors import ChatError, ErrorCode, invalid_format
from chatd.moderation import MAX_DURATION

RoomName = Annotated[str, Meta(min_length=1, max_length=64, pattern=ROOM_NAME_PATTERN)]
Id = Annotated[int, Meta(ge=1, le=2**63 - 1)]
NonNegative = Annotated[int, Meta(ge=0, le=2**63 - 1)]
RequestId = Annotated[str, Meta(max_length=64)] | Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
MessageType = Literal["text", "image", "audio", "reaction"]

#: Hard caps at decode time; the config's limits (default 100) sit below them.
MAX_BATCH = 1000
HISTORY_DEFAULT_LIMIT = 50
HISTORY_MAX_LIMIT = 1000
SEARCH_DEFAULT_LIMIT = 20
SEARCH_MAX_LIMIT = 50


# --- client -> server -------------------------------------------------------


class _Data(msgspec.Struct, frozen=True, kw_only=True):
    pass


class JoinRoom(_Data, frozen=True, kw_only=True):
    room: RoomName
    since_id: NonNegative | None = None


class LeaveRoom(_Data, frozen=True, kw_only=True):
    room: RoomName


class _Content(_Data, frozen=True, kw_only=True):
    content: str = ""
    message_type: MessageType = "text"
    media_url: Annotated[str, Meta(max_length=2048)] | None = None
    media_type: Annotated[str, Meta(max_length=127)] | None = None
    duration: Annotated[float, Meta(gt=0)] | None = None
    reply_to: Id | None = None


#: Most user ids a room message may mention.
MAX_MENTIONS = 50
Mentions = Annotated[list[Id], Meta(max_length=MAX_MENTIONS)]


class RoomMessage(_Content, frozen=True, kw_only=True):
    room: RoomName
    #: Users the message mentions (unknown ids are dropped when stored).
    mentions: Mentions | None = None


class DirectMessage(_Content, frozen=True, kw_only=True):
    to_user_id: Id


class RoomHistory(_Data, frozen=True, kw_only=True):
    room: RoomName
    limit: int = HISTORY_DEFAULT_LIMIT
    offset: NonNegative = 0


class DmHistory(_Data, frozen=True, kw_only=True):
    #: 0 is the system sender: its conversation holds the user's notifications.
    with_user: NonNegative
    limit: int = HISTORY_DEFAULT_LIMIT
    offset: NonNegative = 0


class RoomMembers(_Data, frozen=True, kw_only=True):
    room: RoomName
    #: Members with an id above this one (paging: the last id of the page before).
    after_user_id: NonNegative = 0
    #: None: ``[limits] ack_members``; clamped to 1..1000.
    limit: int | None = None


class _OneChannel(_Data, frozen=True, kw_only=True):
    """A frame about a room or a conversation: exactly one of the two."""

    def __post_init__(self) -> None:
        names = _CHANNEL_FIELDS[type(self)]
        if sum(getattr(self, name) is not None for name in names) != 1:
            raise ValueError(f"Object needs exactly one of `{names[0]}` and `{names[1]}`")


class MarkRead(_OneChannel, frozen=True, kw_only=True):
    room: RoomName | None = None
    #: 0 is the system sender: its conversation holds the user's notifications.
    with_user: NonNegative | None = None
    message_id: Id
    #: No read receipt for this move.
    private: bool = False


class Unread(_Data, frozen=True, kw_only=True):
    pass


class EditMessage(_Data, frozen=True, kw_only=True):
    message_id: Id
    content: str


class DeleteMessage(_Data, frozen=True, kw_only=True):
    message_id: Id


class MessageVersions(_Data, frozen=True, kw_only=True):
    message_id: Id


class Typing(_OneChannel, frozen=True, kw_only=True):
    room: RoomName | None = None
    to_user_id: Id | None = None
    state: Literal["start", "stop"]


#: Most users one presence_query asks about.
MAX_PRESENCE_QUERY = 100


class PresenceQuery(_Data, frozen=True, kw_only=True):
    user_ids: Annotated[list[NonNegative], Meta(max_length=MAX_PRESENCE_QUERY)]


Reason = Annotated[str, Meta(max_length=500)]
#: A ban's or a mute's length: 1 s to ten years (none: until lifted).
Duration = Annotated[int, Meta(ge=1, le=MAX_DURATION)]


class Unban(_Data, frozen=True, kw_only=True):
    """Also ``unmute``: the action lifts what it names."""

    room: RoomName
    user_id: Id


class Kick(Unban, frozen=True, kw_only=True):
    reason: Reason | None = None


class Ban(Kick, frozen=True, kw_only=True):
    """Also ``mute``."""

    duration_seconds: Duration | None = None


class BlockUser(_Data, frozen=True, kw_only=True):
    """Also ``unblock_user``."""

    user_id: Id


class BlockList(_Data, frozen=True, kw_only=True):
    pass


class Search(_Data, frozen=True, kw_only=True):
    #: Words (``chatd.search.parse`` checks them).
    query: str
    #: At most one of the two: only this room, or only this conversation.
    room: RoomName | None = None
    with_user: NonNegative | None = None
    #: Clamped to 1..``SEARCH_MAX_LIMIT``.
    limit: int = SEARCH_DEFAULT_LIMIT
    #: Only messages older than this one (paging back).
    before_id: Id | None = None

    def __post_init__(self) -> None:
        if self.room is not None and self.with_user is not None:
            raise ValueError("Object needs at most one of `room` and `with_user`")


_CHANNEL_FIELDS: dict[type[Any], tuple[str, str]] = {
    MarkRead: ("room", "with_user"),
    Typing: ("room", "to_user_id"),
}


class Ping(_Data, frozen=True, kw_only=True):
    pass


class Auth(_Data, frozen=True, kw_only=True):
    token: Annotated[str, Meta(min_length=1, max_length=16384)]


class _Envelope(msgspec.Struct, frozen=True):
    type: str
    data: msgspec.Raw = msgspec.Raw(b"{}")
    request_id: RequestId | None = None


class BatchEntry(_Envelope, frozen=True):
    pass


class MessageBatch(_Data, frozen=True, kw_only=True):
    messages: Annotated[list[BatchEntry], Meta(max_length=MAX_BATCH)]


#: The frame types a client may send, and the struct each one's data must fit.
CLIENT_TYPES: dict[str, type[Any]] = {
    "join_room": JoinRoom,
    "leave_room": LeaveRoom,
    "room_message": RoomMessage,
    "direct_message": DirectMessage,
    "room_history": RoomHistory,
    "dm_history": DmHistory,
    "room_members": RoomMembers,
    "mark_read": MarkRead,
    "unread": Unread,
    "edit_message": EditMessage,
    "delete_message": DeleteMessage,
    "message_versions": MessageVersions,
    "typing": Typing,
    "presence_query": PresenceQuery,
    "ping": Ping,
    "auth": Auth,
    "message_batch": MessageBatch,
    "kick": Kick,
    "ban": Ban,
    "unban": Unban,
    "mute": Ban,
    "unmute": Unban,
    "block_user": BlockUser,
    "unblock_user": BlockUser,
    "block_list": BlockList,
    "search": Search,
}


class ClientFrame(msgspec.Struct, frozen=True):
    """One decoded client frame."""

    type: str
    data: Any
    request_id: str | int | None = None


_envelope_decoder = msgspec.json.Decoder(_Envelope)
_data_decoders = {name: msgspec.json.Decoder(kind) for name, kind in CLIENT_TYPES.items()}
_AT = re.compile(r" - at `\$\.?([^`]*)`$")
_MISSING = re.compile(r"Object missing required field `([^`]*)`")


def peek_request_id(raw: bytes | str) -> str | int | None:
    """The ``request_id`` of a frame that failed to decode, when it can be had."""
    try:
        value = msgspec.json.decode(raw, type=dict[str, Any]).get("request_id")
    except (msgspec.MsgspecError, RecursionError, UnicodeError):
        return None
    if isinstance(value, str) and len(value) <= 64:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63:
        return value
    return None


def decode_frame(raw: bytes | str, *, allowed: frozenset[str] | None = None) -> ClientFrame:
    """Decode one client text frame; raise ``ChatError(INVALID_FORMAT)``.

    ``allowed`` restricts the accepted types (a batch may not nest a batch).
    """
    envelope = _decode(_envelope_decoder, raw, "")
    return decode_entry(envelope, allowed=allowed)


def decode_entry(envelope: _Envelope, *, allowed: frozenset[str] | None = None) -> ClientFrame:
    """Decode the ``data`` of an already-decoded envelope (or batch entry)."""
    decoder = _data_decoders.get(envelope.type)
    if decoder is None or (allowed is not None and envelope.type not in allowed):
        raise ChatError(
            ErrorCode.INVALID_FORMAT,
            f"Unknown message type {envelope.type[:64]!r}",
            {"field": "type"},
        )
    data = _decode(decoder, envelope.data, "data")
    return ClientFrame(envelope.type, data, envelope.request_id)


def _decode(decoder: msgspec.json.Decoder[Any], raw: Any, prefix: str) -> Any:
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _AT.search(text)
        field = match.group(1) if match else ""
        message = text[: match.start()] if match else text
        missing = _MISSING.match(message)
        if missing:
            field = ".".join(p for p in (field, missing.group(1)) if p)
        field = ".".join(p for p in (prefix, field) if p)
        raise invalid_format(message, field or None) from None
    except msgspec.DecodeError as exc:
        raise invalid_format(f"Malformed JSON: {exc}") from None
    except RecursionError:
        raise invalid_format("JSON nested too deeply") from None
    except UnicodeError:
        raise invalid_format("Strings must be valid UTF-8") from None


def clamp_limit(limit: int, maximum: int = 100) -> int:
    """History page sizes are clamped to 1..``maximum`` (the config's)."""
    return max(1, min(maximum, HISTORY_MAX_LIMIT, limit))


# --- server -> client -------------------------------------------------------


class ServerFrame(msgspec.Struct, omit_defaults=True):
    type: str
    data: Any
    timestamp: str
    user_id: int | None = None
    request_id: str | int | None = None


class Member(msgspec.Struct):
    user_id: int
    username: str


class MessageOut(msgspec.Struct, omit_defaults=True, kw_only=True):
    """A room message as delivered live and in history."""

    id: int
    room: str
    user_id: int
    username: str
    content: str
    message_type: str
    created_at: str
    media_url: str | None = None
    media_type: str | None = None
    duration: float | None = None
    reply_to: int | None = None
    data: msgspec.Raw | None = None
    mentions: tuple[int, ...] | None = None
    edited_at: str | None = None
    deleted: bool = False


class DirectMessageOut(msgspec.Struct, omit_defaults=True, kw_only=True):
    """A direct message as delivered live and in history."""

    id: int
    from_user_id: int
    from_username: str
    to_user_id: int
    content: str
    message_type: str
    created_at: str
    media_url: str | None = None
    media_type: str | None = None
    duration: float | None = None
    reply_to: int | None = None
    data: msgspec.Raw | None = None
    edited_at: str | None = None
    deleted: bool = False


class NotificationOut(msgspec.Struct, omit_defaults=True, kw_only=True):
    """A notification from the publish API, as delivered live."""

    id: int
    content: str
    created_at: str
    room: str | None = None
    to_user_id: int | None = None
    data: msgspec.Raw | None = None


class EditedOut(msgspec.Struct, omit_defaults=True, kw_only=True):
    """``message_edited``: live, and replayed on recovery."""

    id: int
    message_id: int
    room: str | None = None
    from_user_id: int | None = None
    to_user_id: int | None = None
    content: str
    edited_at: str
    user_id: int


class DeletedOut(msgspec.Struct, omit_defaults=True, kw_only=True):
    """``message_deleted``: live, and replayed on recovery."""

    id: int
    message_id: int
    room: str | None = None
    from_user_id: int | None = None
    to_user_id: int | None = None
    deleted_by: int


class ErrorData(msgspec.Struct):
    message: str
    code: str
    details: dict[str, Any]


_encoder = msgspec.json.Encoder()


def encode(
    type_: str,
    data: Any,
    now: float,
    *,
    user_id: int | None = None,
    request_id: str | int | None = None,
) -> bytes:
    """One server frame as JSON bytes."""
    return _encoder.encode(ServerFrame(type_, data, rfc3339(now), user_id, request_id))


def batch_payload(frames: Sequence[Any], now: float) -> bytes:
    """One ``message_batch`` frame carrying already-encoded frames (objects
    with a ``payload`` of JSON bytes), in order, without decoding them."""
    messages = msgspec.Raw(b'{"messages":[' + b",".join(f.payload for f in frames) + b"]}")
    return encode("message_batch", messages, now)


def error_frame(err: ChatError, now: float, request_id: str | int | None = None) -> bytes:
    """The ``error`` frame for ``err``."""
    data = ErrorData(err.message, err.code.value, err.details)
    return encode("error", data, now, request_id=request_id)


#: The last whole second formatted, and its text up to the milliseconds.
#: A tuple, swapped in one assignment: the writer thread formats too.
_second: tuple[int, str] = (0, "1970-01-01T00:00:00.")


def rfc3339(ts: float) -> str:
    """UTC time with milliseconds and a ``Z``: ``2023-11-20T10:30:00.123Z``.

    Every message and frame carries one, so the second's text is formatted
    once per second and only the milliseconds per call. The rounding is
    ``datetime.fromtimestamp``'s (to the microsecond, half to even), then
    truncated to the millisecond, as before the cache."""
    global _second
    frac, whole = math.modf(ts)
    micros = round(frac * 1e6)
    second = int(whole)
    if micros >= 1_000_000:
        second += 1
        micros -= 1_000_000
    elif micros < 0:
        second -= 1
        micros += 1_000_000
    cached, prefix = _second
    if second != cached:
        prefix = _dt.datetime.fromtimestamp(second, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        _second = (second, prefix)
    return f"{prefix}{micros // 1000:03d}Z"
