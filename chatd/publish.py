"""The publish API's services: a notification from the application's
backend, and a deletion (moderation from the backend).

``POST /api/publish`` (``routes.py``) decodes the request; ``publish``
checks it (exactly one of ``room`` and ``user_id``, the content rules of
``content.validate``, the size of ``data``, that the room or user exists),
takes one unit of the system sender's rate limit (per node alone, across
the cluster with Redis), and posts it as a ``notification`` from the system
sender (user 0): committed, delivered, and in history like any message.

``DELETE /api/messages/{id}``: ``delete`` takes a unit of the same limit and
deletes any message as the system sender (``chatd.edits``), delivered as a
``message_deleted`` with ``deleted_by: 0``.

``PUT /api/rooms/{room}/roles/{user_id}``: ``set_role`` takes a unit too,
gives the role (logged in the room's audit as the system's), and has every
node forget what it cached of the room's access.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio

from chatd.auth import Identity
from chatd.content import validate
from chatd.errors import ChatError, ErrorCode, invalid_format
from chatd.moderation import Role
from chatd.protocol import rfc3339
from chatd.session import Context
from chatd.store import Change, NewMessage, StoredEvent, StoredMessage

#: The sender of notifications from the publish API (a user row of its own).
SYSTEM_USER = Identity(0, "system", None)


async def publish(
    ctx: Context[Any],
    content: str,
    room: str | None,
    user_id: int | None,
    data: dict[str, Any] | None,
) -> StoredMessage:
    """Commit a notification from the system sender, then deliver it to
    the room or to every connection of the user. Raises ``ChatError``."""
    if (room is None) == (user_id is None):
        raise invalid_format("Give exactly one of room and user_id", "room")
    raw = msgspec.json.encode(data) if data is not None else None
    message = NewMessage(
        user_id=SYSTEM_USER.user_id,
        username=SYSTEM_USER.username,
        content=content,
        message_type="notification",
        created_at=rfc3339(ctx.wall()),
        room=room,
        to_user_id=user_id,
        data=raw,
    )
    validate(message, ctx.config.limits)
    most = ctx.config.api.max_data_bytes
    if raw is not None and len(raw) > most:
        raise invalid_format(f"data is larger than {most} bytes", "data")
    store = ctx.store
    if room is not None:
        if await store.room_access(room, SYSTEM_USER.user_id) is None:
            raise ChatError(ErrorCode.ROOM_NOT_FOUND, "Room not found", {"room": room})
    elif user_id is not None and not await store.user_exists(user_id):
        raise ChatError(ErrorCode.USER_NOT_FOUND, "User not found", {"user_id": user_id})
    ctx.messages.admit()
    await _api_limit(ctx)
    stored: StoredMessage = await _settled(lambda outcome: ctx.messages.publish(message, outcome))
    return stored


async def delete(ctx: Context[Any], message_id: int) -> StoredEvent:
    """Delete a message as the system sender; its ``message_deleted`` goes
    wherever the message went. Raises ``ChatError``."""
    ctx.messages.admit()
    await _api_limit(ctx)
    change = Change(message_id, SYSTEM_USER.user_id, rfc3339(ctx.wall()))
    event: StoredEvent = await _settled(
        lambda outcome: ctx.messages.change(change, None, done=outcome)
    )
    return event


async def set_role(ctx: Context[Any], room: str, user_id: int, role: Role) -> None:
    """A backend names a room's owner or moderator (or makes one a member
    again). Raises ``ChatError`` (no such room)."""
    await _api_limit(ctx)
    if not await ctx.store.set_role(room, user_id, role, SYSTEM_USER.user_id, ctx.wall()):
        raise ChatError(ErrorCode.ROOM_NOT_FOUND, "Room not found", {"room": room})
    ctx.bus.moderated(room, user_id, None)


async def _settled(queue: Callable[[Callable[[Any], None]], Awaitable[object]]) -> Any:
    """Queue a write with ``queue(outcome)`` and wait for its outcome (once
    queued it is committed or refused either way: see it through); raise
    the ``ChatError`` that refused it."""
    done = trio.Event()
    box: list[Any] = []

    def outcome(result: Any) -> None:
        box.append(result)
        done.set()

    await queue(outcome)
    with trio.CancelScope(shield=True):
        await done.wait()
    if isinstance(box[0], ChatError):
        raise box[0]
    return box[0]


async def _api_limit(ctx: Context[Any]) -> None:
    """One unit of the system sender's rate limit (``[api]``)."""
    wait = await ctx.api_limits.take(SYSTEM_USER.user_id)
    if wait > 0:
        ctx.metrics.rate_limited.inc()
        raise ChatError(ErrorCode.RATE_LIMITED, "Too many API requests", {"retry_after": int(wait)})
