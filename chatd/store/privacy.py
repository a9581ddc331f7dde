"""A user's data: its export and its erasure, for either store: the same
SQL, written with the store's parameter placeholder (as ``outbox.py``);
``raw`` names PostgreSQL's ``content_raw`` columns (pgschema.py), cleared
with the content.

``erase_user`` runs in one transaction (``chatd user erase``, which works
while the server runs): every message the user sent becomes a tombstone (as
a deletion makes it: content, media, data and mentions cleared) under the
name ``deleted user N``, the content of their edits and their messages'
earlier versions go, and so do their name, last-seen time, read markers,
mentions, room roles, bans and mutes, blocks (theirs and others' of them)
and a pending ``message.unread`` for them. What others wrote stays. The
moderation audit log keeps the ids of who acted on whom.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, NamedTuple

from chatd.store import StoredMessage


class UserExport(NamedTuple):
    """What ``chatd user export`` writes (``admin.py`` shapes it)."""

    user_id: int
    username: str
    created_at: str
    last_seen: str | None
    #: Messages the user sent, and the direct messages and notifications
    #: sent to them, in id order.
    messages: list[StoredMessage]
    #: (channel, last_read_id, last_read_seq)
    markers: list[tuple[str, int, int]]
    #: (room, role)
    roles: list[tuple[str, str]]
    #: (room, "ban" | "mute", until: Unix seconds or None)
    sanctions: list[tuple[str, str, float | None]]
    #: Private rooms the user is a member of.
    memberships: list[str]
    blocks: list[int]


def erased_name(user_id: int) -> str:
    return f"deleted user {user_id}"


def for_placeholder(P: str, raw: bool = False) -> SimpleNamespace:
    """The export and erasure functions with ``P`` as the placeholder."""
    clear_raw = ", content_raw = NULL" if raw else ""

    def _user(conn: Any, user_id: int) -> tuple[str, str, str | None] | None:
        row = conn.execute(
            f"SELECT username, created_at, last_seen FROM users WHERE id = {P}", (user_id,)
        ).fetchone()
        return None if row is None else (str(row[0]), str(row[1]), row[2])

    def export_user(
        conn: Any,
        user_id: int,
        columns: str,
        to_message: Callable[[Any], StoredMessage],
    ) -> UserExport | None:
        """The user's data (``columns`` and ``to_message``: the store's
        message row); None when there is no such user."""
        user = _user(conn, user_id)
        if user is None:
            return None
        messages = [
            to_message(r)
            for r in conn.execute(
                f"SELECT {columns} FROM messages WHERE user_id = {P} OR to_user_id = {P}"
                " ORDER BY id",
                (user_id, user_id),
            )
        ]
        markers = [
            (str(c), int(i), int(s))
            for c, i, s in conn.execute(
                "SELECT channel, last_read_id, last_read_seq FROM read_markers"
                f" WHERE user_id = {P} ORDER BY channel",
                (user_id,),
            )
        ]
        roles = [
            (str(r), str(role))
            for r, role in conn.execute(
                f"SELECT room, role FROM room_roles WHERE user_id = {P} ORDER BY room", (user_id,)
            )
        ]
        sanctions = [
            (str(r), str(k), None if u is None else float(u))
            for r, k, u in conn.execute(
                "SELECT room, kind, until FROM room_sanctions"
                f" WHERE user_id = {P} ORDER BY room, kind",
                (user_id,),
            )
        ]
        memberships = [
            str(r[0])
            for r in conn.execute(
                f"SELECT room FROM room_members WHERE user_id = {P} ORDER BY room", (user_id,)
            )
        ]
        blocks = [
            int(r[0])
            for r in conn.execute(
                f"SELECT blocked_id FROM blocks WHERE user_id = {P} ORDER BY blocked_id",
                (user_id,),
            )
        ]
        name, created_at, last_seen = user
        return UserExport(
            user_id, name, created_at, last_seen, messages, markers, roles, sanctions,
            memberships, blocks,
        )  # fmt: skip

    def erase_user(conn: Any, user_id: int) -> int | None:
        """Erase the user (above); how many of their messages became
        tombstones, None when there is no such user."""
        if _user(conn, user_id) is None:
            return None
        name = erased_name(user_id)
        theirs = f"SELECT id FROM messages WHERE user_id = {P}"
        conn.execute(f"DELETE FROM message_versions WHERE message_id IN ({theirs})", (user_id,))
        conn.execute(f"DELETE FROM mentions WHERE message_id IN ({theirs})", (user_id,))
        erased = conn.execute(
            "UPDATE messages SET content = '', media_url = NULL, media_type = NULL,"
            f" duration = NULL, data = NULL, mentions = NULL, deleted = {P},"
            f" username = {P}{clear_raw} WHERE user_id = {P}",
            (True, name, user_id),
        ).rowcount
        conn.execute(
            f"UPDATE message_events SET content = NULL{clear_raw} WHERE user_id = {P}",
            (user_id,),
        )
        conn.execute(
            f"UPDATE users SET username = {P}, last_seen = NULL WHERE id = {P}", (name, user_id)
        )
        for table in ("read_markers", "mentions", "room_roles", "room_sanctions"):
            conn.execute(f"DELETE FROM {table} WHERE user_id = {P}", (user_id,))
        conn.execute(
            f"DELETE FROM blocks WHERE user_id = {P} OR blocked_id = {P}", (user_id, user_id)
        )
        conn.execute(
            f"DELETE FROM webhook_outbox WHERE event = 'message.unread' AND user_id = {P}",
            (user_id,),
        )
        return int(erased)

    return SimpleNamespace(export_user=export_user, erase_user=erase_user)
