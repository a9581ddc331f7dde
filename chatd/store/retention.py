"""The retention purge's writes, for either store: the same SQL, written
with the store's parameter placeholder (as ``outbox.py``).

``purge`` is one writer operation. It reads the next ``limit`` messages in
id order after a cursor (the oldest first, whatever their channel), and
deletes those older than their channel's cutoff, with their edits and
deletions, earlier versions and mentions, moving each channel's horizon
(its last message purged) to the newest of them, in the same transaction.
In id order because that is the order rows lie in the table: a batch
empties a few pages where a channel's oldest messages, interleaved with
every other channel's, would dirty a page each (measured: a purge one
channel at a time filled a 256 MiB WAL in 20 s, and the checkpoint that
followed stalled chat for 300 ms). A channel's purge stops at its first
message kept (``kept``: never a later one, even one a little older), so
what a channel keeps is always a run of its newest messages, which history
and recovery count on (``chatd.retention``).
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, NamedTuple


class Batch(NamedTuple):
    """What one ``purge`` did."""

    #: Messages deleted from rooms, and from conversations.
    rooms: int
    direct: int
    #: The last id read: the next batch's cursor.
    cursor: int
    #: Whether the pass is over (a message newer than every cutoff, or the
    #: end of the table).
    finished: bool
    #: The first message kept that a later pass may purge (None: none).
    first_kept: int | None


def for_placeholder(P: str) -> SimpleNamespace:
    """The retention query functions with ``P`` as the parameter placeholder."""

    def horizon(conn: Any, channel: str) -> tuple[int, int]:
        """The channel's last purged message: (id, seq); (0, 0) when none."""
        row = conn.execute(f"SELECT id, seq FROM purged WHERE channel = {P}", (channel,)).fetchone()
        return (0, 0) if row is None else (int(row[0]), int(row[1]))

    def purge(
        conn: Any,
        cursor: int,
        cutoff: Callable[[str], str | None],
        newest: str,
        limit: int,
        kept: set[str],
    ) -> Batch:
        """Purge among the ``limit`` messages after id ``cursor`` those created
        before ``cutoff(channel)`` (None: kept for ever); ``newest`` is the
        latest cutoff of all, ``kept`` the channels with a message kept so
        far in this pass (added to)."""
        rows = conn.execute(
            "SELECT id, channel, seq, created_at, mentions FROM messages"
            f" WHERE id > {P} ORDER BY id LIMIT {P}",
            (cursor, limit),
        ).fetchall()
        finished = len(rows) < limit
        victims: list[tuple[int, str, int, str | None]] = []
        first_kept = None
        for message_id, channel, seq, created_at, mentions in rows:
            if created_at >= newest:
                finished = True
                break
            cursor = int(message_id)
            until = cutoff(channel)
            if until is not None and created_at < until and channel not in kept:
                victims.append((cursor, channel, int(seq), mentions))
                continue
            kept.add(channel)
            if until is not None and first_kept is None:
                first_kept = cursor
        if victims:
            ids = [(v[0],) for v in victims]
            cur = conn.cursor()  # (psycopg's connection has no executemany)
            cur.executemany(f"DELETE FROM message_events WHERE message_id = {P}", ids)
            cur.executemany(f"DELETE FROM message_versions WHERE message_id = {P}", ids)
            cur.executemany(
                f"DELETE FROM mentions WHERE user_id = {P} AND channel = {P} AND seq = {P}",
                [
                    (int(u), ch, seq)
                    for _, ch, seq, named in victims
                    if named
                    for u in named.split(",")
                ],
            )
            cur.executemany(f"DELETE FROM messages WHERE id = {P}", ids)
            horizons: dict[str, tuple[int, int]] = {}
            for message_id, channel, seq, _ in victims:
                horizons[channel] = (message_id, seq)  # (id order: the last is the newest)
            cur.executemany(
                f"INSERT INTO purged (channel, id, seq) VALUES ({P}, {P}, {P})"
                " ON CONFLICT (channel) DO UPDATE SET"  # (never back: nodes may purge at once)
                " id = CASE WHEN excluded.id > purged.id THEN excluded.id ELSE purged.id END,"
                " seq = CASE WHEN excluded.seq > purged.seq THEN excluded.seq ELSE purged.seq END",
                [(channel, i, s) for channel, (i, s) in sorted(horizons.items())],
            )
        rooms = sum(v[1].startswith("r:") for v in victims)
        return Batch(rooms, len(victims) - rooms, cursor, finished, first_kept)

    return SimpleNamespace(horizon=horizon, purge=purge)
