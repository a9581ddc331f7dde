"""The retention purge's reads and writes, for either store: the same SQL,
written with the store's parameter placeholder (as ``outbox.py``).

``purge`` is one writer operation: the channel's oldest messages older than
the cutoff, at most ``limit`` of them, deleted with their edits and
deletions, earlier versions and mentions, and the channel's horizon (its
last message purged) moved to the newest of them, in the same transaction.
The oldest first, by seq: what a channel keeps is its newest messages, so
its seqs stay a contiguous run after the horizon, which history and
recovery count on (``chatd.retention``).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from chatd.store import room_channel


def for_placeholder(P: str) -> SimpleNamespace:
    """The retention query functions with ``P`` as the parameter placeholder."""

    def horizon(conn: Any, channel: str) -> tuple[int, int]:
        """The channel's last purged message: (id, seq); (0, 0) when none."""
        row = conn.execute(f"SELECT id, seq FROM purged WHERE channel = {P}", (channel,)).fetchone()
        return (0, 0) if row is None else (int(row[0]), int(row[1]))

    def retention_channels(conn: Any) -> list[str]:
        """Every room's channel and every conversation's (a conversation's
        first message gives both parties a marker there)."""
        rooms = [room_channel(str(r[0])) for r in conn.execute("SELECT name FROM rooms")]
        direct = [
            str(r[0])
            for r in conn.execute(
                "SELECT DISTINCT channel FROM read_markers WHERE channel LIKE 'd:%'"
            )
        ]
        return sorted(rooms) + sorted(direct)

    def purge(conn: Any, channel: str, cutoff: str, limit: int) -> tuple[int, bool]:
        """Delete the channel's oldest messages created before ``cutoff``, at
        most ``limit``; how many, and whether there may be more."""
        rows = conn.execute(
            "SELECT id, seq, created_at, mentions FROM messages WHERE channel = "
            f"{P} ORDER BY seq LIMIT {P}",
            (channel, limit),
        ).fetchall()
        victims = []
        for message_id, seq, created_at, mentions in rows:
            if created_at >= cutoff:
                break
            victims.append((int(message_id), int(seq), mentions))
        if not victims:
            return 0, False
        ids = [(v[0],) for v in victims]
        cur = conn.cursor()  # (psycopg's connection has no executemany)
        cur.executemany(f"DELETE FROM message_events WHERE message_id = {P}", ids)
        cur.executemany(f"DELETE FROM message_versions WHERE message_id = {P}", ids)
        cur.executemany(
            f"DELETE FROM mentions WHERE user_id = {P} AND channel = {P} AND seq = {P}",
            [
                (int(uid), channel, seq)
                for _, seq, named in victims
                if named
                for uid in named.split(",")
            ],
        )
        cur.executemany(f"DELETE FROM messages WHERE id = {P}", ids)
        last_id, last_seq, _ = victims[-1]
        conn.execute(
            f"INSERT INTO purged (channel, id, seq) VALUES ({P}, {P}, {P})"
            " ON CONFLICT (channel) DO UPDATE SET"  # (never back: nodes may purge at once)
            " id = CASE WHEN excluded.id > purged.id THEN excluded.id ELSE purged.id END,"
            " seq = CASE WHEN excluded.seq > purged.seq THEN excluded.seq ELSE purged.seq END",
            (channel, last_id, last_seq),
        )
        return len(victims), len(victims) == limit

    return SimpleNamespace(horizon=horizon, retention_channels=retention_channels, purge=purge)
