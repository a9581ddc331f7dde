"""Every failure chatd reports to a client, in one family.

A handler raises ``ChatError(code, message, details)``; exactly one place (the
session's dispatcher) turns it into the protocol's ``error`` frame. Close codes
are an ``IntEnum`` in the style of wsproto's ``CloseReason``.
"""

from __future__ import annotations

import enum
from typing import Any


class ErrorCode(enum.StrEnum):
    """The ``data.code`` of an ``error`` frame."""

    #: Missing, malformed, wrongly signed or expired token (then close 4001).
    AUTH_FAILED = "AUTH_FAILED"
    #: The room named does not exist.
    ROOM_NOT_FOUND = "ROOM_NOT_FOUND"
    #: The user named does not exist.
    USER_NOT_FOUND = "USER_NOT_FOUND"
    #: Private room without membership, or a room not joined.
    PERMISSION_DENIED = "PERMISSION_DENIED"
    #: Over a rate limit; ``details.retry_after`` says when to try again.
    RATE_LIMITED = "RATE_LIMITED"
    #: Content over ``max_content_length``; ``details.max_length``.
    MESSAGE_TOO_LONG = "MESSAGE_TOO_LONG"
    #: Not JSON, a missing or ill-typed field, an unknown type.
    INVALID_FORMAT = "INVALID_FORMAT"
    #: The message named does not exist, is not in the room or conversation
    #: named, or is not visible to this user; ``details.message_id``.
    MESSAGE_NOT_FOUND = "MESSAGE_NOT_FOUND"
    #: The server could not do what was asked (storage failure); nothing was
    #: acknowledged. An addition to the protocol document's table.
    INTERNAL_ERROR = "INTERNAL_ERROR"


class CloseCode(enum.IntEnum):
    """WebSocket close codes chatd sends."""

    #: Normal closure.
    NORMAL = 1000
    #: The server is shutting down.
    GOING_AWAY = 1001
    #: Protocol error on the WebSocket layer.
    PROTOCOL_ERROR = 1002
    #: A text frame that is not valid UTF-8.
    INVALID_PAYLOAD = 1007
    #: Policy violation: too many invalid frames in a short time.
    POLICY_VIOLATION = 1008
    #: A message larger than ``max_frame_bytes``.
    MESSAGE_TOO_BIG = 1009
    #: An unexpected server error.
    INTERNAL_ERROR = 1011
    #: Slow consumer, or the server is full.
    TRY_AGAIN_LATER = 1013
    #: Authentication failed or the token expired.
    AUTH_FAILED = 4001


class ChatError(Exception):
    """A failure to report to the client as one ``error`` frame."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        details: dict[str, Any] | None = None,
        *,
        close: CloseCode | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}
        #: When set, the connection is closed with this code after the frame.
        self.close = close

    def __repr__(self) -> str:
        return f"ChatError({self.code.value}, {self.message!r}, {self.details!r})"


def auth_failed(message: str) -> ChatError:
    """The one way a token problem is reported: ``AUTH_FAILED`` then 4001."""
    return ChatError(ErrorCode.AUTH_FAILED, message, close=CloseCode.AUTH_FAILED)


def invalid_format(message: str, field: str | None = None) -> ChatError:
    """``INVALID_FORMAT``, naming the field when it is known."""
    return ChatError(ErrorCode.INVALID_FORMAT, message, {"field": field} if field else {})


def message_not_found(message_id: int) -> ChatError:
    """``MESSAGE_NOT_FOUND``: no such message, or none this user may see
    (the same answer: it never reveals that a message exists)."""
    return ChatError(
        ErrorCode.MESSAGE_NOT_FOUND, "No such message here", {"message_id": message_id}
    )


def blocked(user_id: int | None) -> ChatError:
    """A direct message to a user who blocks its sender."""
    return ChatError(
        ErrorCode.PERMISSION_DENIED,
        "This user does not accept your direct messages",
        {"user_id": user_id},
    )


class ConfigError(Exception):
    """A configuration problem, reported as one line naming file and key."""


class StorageError(Exception):
    """The database refused or failed a command of the CLI, as one line."""
