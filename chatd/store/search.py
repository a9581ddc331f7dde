"""Search's SQL for either store: what a user may read, and the index's
backlog (written with the store's parameter placeholder, as ``outbox.py``).

Each store keeps its own index (``schema.py``: SQLite's FTS5 table;
``pgschema.py``: PostgreSQL's ``tsvector`` column), written in the
transaction of every insert, edit, deletion, purge and erasure (SQLite's
by ``insert_message`` and by triggers, PostgreSQL's by a trigger). A
database that had messages before the index came is indexed afterwards,
newest first, a batch at a time (``backfill``): ``search_backlog.below``
says where that has got to (every message with an id at or above it is
indexed; new messages always are).

A search's scope is one channel the caller has checked already, or every
room the user may read now (``readable_rooms``: public rooms, private rooms
they belong to, minus rooms that ban them) and their own conversations
(the messages they sent or were sent directly).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any


def for_placeholder(P: str) -> SimpleNamespace:
    """The search functions with ``P`` as the parameter placeholder."""

    def readable_rooms(conn: Any, user_id: int, now: float) -> list[str]:
        """Every room ``user_id`` may read now: public rooms and the private
        ones they belong to, without those that ban them."""
        rows = conn.execute(
            "SELECT r.name FROM rooms r WHERE (NOT r.private OR EXISTS"
            f" (SELECT 1 FROM room_members w WHERE w.room = r.name AND w.user_id = {P}))"
            " AND NOT EXISTS (SELECT 1 FROM room_sanctions s WHERE s.room = r.name"
            f" AND s.user_id = {P} AND s.kind = 'ban' AND (s.until IS NULL OR s.until > {P}))",
            (user_id, user_id, now),
        ).fetchall()
        return [name for (name,) in rows]

    def backlog(conn: Any) -> int:
        """Messages with an id below this are not indexed yet (1: none)."""
        row = conn.execute(
            "SELECT coalesce(max(id), 0) + 1 FROM messages"
            " WHERE id < (SELECT below FROM search_backlog)"
        ).fetchone()
        return int(row[0])

    return SimpleNamespace(readable_rooms=readable_rooms, backlog=backlog)
