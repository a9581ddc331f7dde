"""The rules of a message's content, for every way a message comes in.

A ``room_message`` or ``direct_message`` from a session (its decoded
``data``) and a notification from the publish API (the ``NewMessage`` about
to be stored) are both checked here, by ``validate``: one set of rules, one
set of error messages.

* Every kind: ``content`` at most ``max_content_length`` characters
  (``MESSAGE_TOO_LONG`` with ``details.max_length``).
* ``media_url``, ``media_type`` and ``duration`` are checked wherever they
  appear, on every kind: a text message cannot smuggle a ``javascript:``
  URL any more than an image can.
* ``text``: some non-blank content. ``image``: a ``media_url`` and a
  ``media_type`` of ``image/*``. ``audio``: a ``media_url`` and a
  ``duration`` of 0 to ``max_audio_seconds``. ``reaction``: ``reply_to``
  and 1 to 32 characters. ``notification``: the length rule alone.

Pure: no I/O.
"""

from __future__ import annotations

import re
from typing import Protocol

from chatd.config import LimitsConfig
from chatd.errors import ChatError, ErrorCode, invalid_format

MAX_REACTION_LENGTH = 32
_MEDIA_TYPE = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,62}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,62}\Z"
)


class Content(Protocol):
    """A message's fields that the rules look at."""

    @property
    def content(self) -> str: ...
    @property
    def message_type(self) -> str: ...
    @property
    def media_url(self) -> str | None: ...
    @property
    def media_type(self) -> str | None: ...
    @property
    def duration(self) -> float | None: ...
    @property
    def reply_to(self) -> int | None: ...


def validate(message: Content, limits: LimitsConfig) -> None:
    """Raise ``ChatError`` when ``message`` breaks a rule of its kind."""
    kind = message.message_type
    content = message.content
    max_length = limits.max_content_length
    if len(content) > max_length:
        raise ChatError(
            ErrorCode.MESSAGE_TOO_LONG,
            f"Content is longer than {max_length} characters",
            {"max_length": max_length},
        )
    if message.media_url is not None:
        check_media_url(message.media_url)
    elif kind in ("image", "audio"):
        raise invalid_format(f"An {kind} message needs media_url", "data.media_url")
    media_type = message.media_type
    if media_type is not None:
        family = media_type.partition("/")[0].lower()
        if not _MEDIA_TYPE.match(media_type) or (kind in ("image", "audio") and family != kind):
            raise invalid_format(
                "media_type must be a MIME type (image/* for images)", "data.media_type"
            )
    elif kind == "image":
        raise invalid_format("An image message needs media_type image/*", "data.media_type")
    duration = message.duration
    max_duration = limits.max_audio_seconds
    if (duration is None and kind == "audio") or (duration is not None and duration > max_duration):
        raise invalid_format(
            f"An audio message needs a duration of 0 to {max_duration:g} seconds",
            "data.duration",
        )
    if kind == "text":
        if not content.strip():
            raise invalid_format("A text message needs content", "data.content")
    elif kind == "reaction":
        if message.reply_to is None:
            raise invalid_format("A reaction needs reply_to", "data.reply_to")
        if not content or len(content) > MAX_REACTION_LENGTH:
            raise invalid_format(
                f"A reaction is 1 to {MAX_REACTION_LENGTH} characters", "data.content"
            )


def check_media_url(url: str) -> None:
    """A path starting with one ``/``, or an http(s) URL with a host."""
    if url.startswith("/") and not url.startswith("//"):
        ok = True
    else:
        scheme, sep, rest = url.lower().partition("://")
        ok = bool(sep) and scheme in ("http", "https") and bool(rest) and rest[0] not in "/?#"
    if not ok or any(ch.isspace() or ord(ch) < 32 for ch in url):
        raise invalid_format("media_url must be a /path or an http(s) URL", "data.media_url")
