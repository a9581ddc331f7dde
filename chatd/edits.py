"""Who may edit or delete a message, and when: the rules, apart from storage.

An edit or a deletion (``store.Change``) is checked by the store inside the
writer's transaction, against the message as stored there (``Target``), so
a check and the change it allows cannot be split by another write:

* a message that does not exist, is deleted, or that the requester cannot
  see (a private room it is not a member of, someone else's conversation) is
  ``MESSAGE_NOT_FOUND``, the same answer for each: an edit never reveals
  that a message exists;
* only its author edits a message; its author, the publish API's system
  sender (user 0) and the moderators and owners of its room delete one,
  and read its earlier versions: else ``PERMISSION_DENIED``;
* a reaction cannot be edited (``INVALID_FORMAT``), a text message cannot be
  edited to blank content (``INVALID_FORMAT``, as a new one), and past
  ``[limits] edit_window_seconds`` after it was sent nothing is edited
  (``PERMISSION_DENIED`` with ``details.edit_window_seconds``). The length
  rule and the message rate limit are the session's, before it asks.

Pure: no I/O.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import NamedTuple

from chatd.errors import ChatError, ErrorCode, invalid_format, message_not_found
from chatd.moderation import may_moderate
from chatd.store import Change, RoomAccess

#: The system sender: the publish API's messages and deletions.
SYSTEM = 0


class Target(NamedTuple):
    """The message an edit or deletion names, as stored."""

    channel: str
    #: Its author, and its recipient (direct messages; else None).
    user_id: int
    to_user_id: int | None
    message_type: str
    created_at: str
    deleted: bool
    #: Whether the requester may see it (a member of its private room).
    visible: bool
    #: Whether the requester moderates its room.
    moderator: bool = False


def target(
    channel: str,
    author: int,
    to_user: int | None,
    kind: str,
    created_at: str,
    deleted: bool,
    user_id: int,
    access: Callable[[str, int], RoomAccess | None],
) -> Target:
    """A stored message as ``user_id`` may see it: ``access`` (the store's
    ``room_access`` on its connection) says whether a room is private to
    others. A room unknown is not private; the system sender sees all."""
    visible = True
    moderator = False
    if channel.startswith("r:") and user_id != SYSTEM:
        found = access(channel[2:], user_id)
        visible = found is None or found.allowed
        moderator = found is not None and may_moderate(found.rules.role(user_id))
    return Target(channel, author, to_user, kind, created_at, bool(deleted), visible, moderator)


def seen(user_id: int, message_id: int, target: Target | None) -> ChatError | None:
    """``MESSAGE_NOT_FOUND`` unless the message exists, is not deleted, and
    ``user_id`` may see it (the system sender sees every message)."""
    if target is None or target.deleted or not target.visible:
        return message_not_found(message_id)
    if (
        user_id != SYSTEM
        and target.to_user_id is not None
        and user_id not in (target.user_id, target.to_user_id)
    ):
        return message_not_found(message_id)
    return None


def check(change: Change, target: Target | None) -> ChatError | None:
    """The error that refuses ``change`` to ``target`` (None: allowed)."""
    who = change.user_id
    unseen = seen(who, change.message_id, target)
    if unseen is not None or target is None:
        return unseen
    if change.content is None:  # a deletion
        if who not in (target.user_id, SYSTEM) and not target.moderator:
            return ChatError(
                ErrorCode.PERMISSION_DENIED,
                "Only its author or the room's moderators can delete a message",
                {"message_id": change.message_id},
            )
        return None
    if who != target.user_id:
        return ChatError(
            ErrorCode.PERMISSION_DENIED,
            "Only its author can edit a message",
            {"message_id": change.message_id},
        )
    if target.message_type in ("reaction", "notification"):
        return invalid_format(f"A {target.message_type} cannot be edited", "data.message_id")
    if target.message_type == "text" and not change.content.strip():
        return invalid_format("A text message needs content", "data.content")
    if change.window > 0 and _age(target.created_at, change.at) > change.window:
        return ChatError(
            ErrorCode.PERMISSION_DENIED,
            "Too late to edit this message",
            {"message_id": change.message_id, "edit_window_seconds": change.window},
        )
    return None


def may_read_versions(user_id: int, message_id: int, target: Target | None) -> ChatError | None:
    """The author and its room's moderators read a message's earlier
    versions; anyone else who can see it gets ``PERMISSION_DENIED``."""
    unseen = seen(user_id, message_id, target)
    if unseen is not None or target is None:
        return unseen
    if target.user_id != user_id and not target.moderator:
        return ChatError(
            ErrorCode.PERMISSION_DENIED,
            "Only its author or the room's moderators can read a message's versions",
            {"message_id": message_id},
        )
    return None


def _age(created_at: str, now: str) -> float:
    """Seconds from one RFC 3339 time (chatd's, ending in Z) to another."""
    return (_parse(now) - _parse(created_at)).total_seconds()


def _parse(when: str) -> dt.datetime:
    return dt.datetime.fromisoformat(when.replace("Z", "+00:00"))
