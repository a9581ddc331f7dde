"""Search's SQL for either store: what a user may read, and the index's
backlog (written with the store's parameter placeholder, as ``outbox.py``).

Each store keeps its own index (``schema.py``: SQLite's FTS5 table;
``pgschema.py``: PostgreSQL's ``tsvector`` column), written in the
transaction of every edit, deletion, purge and erasure by triggers, and of
every insert on PostgreSQL; SQLite's writer indexes new messages a batch
at a time (``sqlite.index_tail``, ``search_backlog.above``). A
database that had messages before the index came is indexed afterwards,
newest first, a batch at a time (``backfill``): ``search_backlog.below``
says where that has got to (every message with an id at or above it is
indexed, below ``above`` on SQLite).

A search's scope is one channel the caller has checked already, or every
room the user may read now and their own conversations (``readable``).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from chatd.store import StoredMessage


def readable(user: str, now: str) -> str:
    """A filter of ``messages m``: the messages the user (placeholder
    ``user``) may read at ``now`` (a placeholder): in a room they may read
    (a public one, or a private one they belong to, unless it bans them),
    or in their own conversations. The rooms are a subquery on the room's
    name (not on ``m.channel``, whose index would tempt a planner into one
    range of it per room)."""
    return (
        "(m.to_user_id IS NULL AND substr(m.channel, 3) IN (SELECT r.name FROM rooms r"
        " WHERE (NOT r.private OR EXISTS (SELECT 1 FROM room_members w"
        f" WHERE w.room = r.name AND w.user_id = {user}))"
        " AND NOT EXISTS (SELECT 1 FROM room_sanctions s WHERE s.room = r.name"
        f" AND s.user_id = {user} AND s.kind = 'ban' AND (s.until IS NULL OR s.until > {now})))"
        f" OR m.to_user_id = {user} OR (m.user_id = {user} AND m.to_user_id IS NOT NULL))"
    )


def message_id(message: StoredMessage) -> int:
    """A match's place in a scan (``chatd.search.scan``)."""
    return message.id


def for_placeholder(P: str) -> SimpleNamespace:
    """The search functions with ``P`` as the parameter placeholder."""

    def backlog(conn: Any) -> int:
        """Messages with an id below this are not indexed yet (1: none)."""
        row = conn.execute(
            "SELECT coalesce(max(id), 0) + 1 FROM messages"
            " WHERE id < (SELECT below FROM search_backlog)"
        ).fetchone()
        return int(row[0])

    def backfill(conn: Any, limit: int, index: str) -> int:
        """Index the backlog's newest ``limit`` ids with the store's
        ``index`` statement (its ids from ``P`` to ``P``, excluded), in the
        caller's transaction; the newest message still to index (0:
        none). The backlog's row is written first: nodes sharing a store
        take turns."""
        conn.execute("UPDATE search_backlog SET below = below")
        below = backlog(conn)
        if below <= 1:
            return 0
        low = max(1, below - limit)
        conn.execute(index, (low, below))
        conn.execute(f"UPDATE search_backlog SET below = {P}", (low,))
        return backlog(conn) - 1

    return SimpleNamespace(backfill=backfill)
