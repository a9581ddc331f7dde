"""The webhook outbox's reads and writes, for either store: the same SQL,
written with the store's parameter placeholder (``?`` for SQLite, ``%s``
for psycopg). ``for_placeholder`` makes the functions each store module
exposes to ``writer.Reads`` and ``writer.GroupWriter``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any


def for_placeholder(P: str) -> SimpleNamespace:
    """The outbox's query functions with ``P`` as the parameter placeholder."""

    def outbox_head(conn: Any, limit: int) -> list[tuple[int, bytes, float, int, int | None]]:
        rows = conn.execute(
            "SELECT id, body, due, attempts, batch_end FROM webhook_outbox"
            f" WHERE event = 'message.created' ORDER BY id LIMIT {P}",
            (limit,),
        ).fetchall()
        return [
            (int(i), bytes(b), float(d), int(a), None if n is None else int(n))
            for i, b, d, a, n in rows
        ]

    def outbox_pending(conn: Any) -> int:
        (count,) = conn.execute("SELECT count(*) FROM webhook_outbox").fetchone()
        return int(count)

    def outbox_done(conn: Any, first: int, last: int, event: str) -> None:
        """The ``event`` rows from ``first`` to ``last`` (one range of ids)."""
        conn.execute(
            f"DELETE FROM webhook_outbox WHERE id >= {P} AND id <= {P} AND event = {P}",
            (first, last, event),
        )

    def outbox_retry(conn: Any, first: int, due: float, attempts: int) -> None:
        """A delivery's time and attempts live on its first row."""
        conn.execute(
            f"UPDATE webhook_outbox SET due = {P}, attempts = {P} WHERE id = {P}",
            (due, attempts, first),
        )

    def outbox_batch(conn: Any, first: int, last: int) -> None:
        """The rows from ``first`` to ``last`` go together from now on."""
        conn.execute(f"UPDATE webhook_outbox SET batch_end = {P} WHERE id = {P}", (last, first))

    def outbox_unread(
        conn: Any, now: float, limit: int
    ) -> tuple[list[tuple[int, int, bytes, int]], float | None]:
        rows = conn.execute(
            "SELECT id, user_id, body, attempts FROM webhook_outbox"
            f" WHERE event = 'message.unread' AND due <= {P} ORDER BY due LIMIT {P}",
            (now, limit),
        ).fetchall()
        (later,) = conn.execute(
            f"SELECT min(due) FROM webhook_outbox WHERE event = 'message.unread' AND due > {P}",
            (now,),
        ).fetchone()
        found = [(int(i), int(u), bytes(b), int(a)) for i, u, b, a in rows]
        return found, None if later is None else float(later)

    def outbox_body(conn: Any, delivery_id: int, body: bytes) -> None:
        conn.execute(f"UPDATE webhook_outbox SET body = {P} WHERE id = {P}", (body, delivery_id))

    def username(conn: Any, user_id: int) -> str:
        row = conn.execute(f"SELECT username FROM users WHERE id = {P}", (user_id,)).fetchone()
        return "" if row is None else str(row[0])

    return SimpleNamespace(
        outbox_head=outbox_head,
        outbox_pending=outbox_pending,
        outbox_done=outbox_done,
        outbox_retry=outbox_retry,
        outbox_batch=outbox_batch,
        outbox_unread=outbox_unread,
        outbox_body=outbox_body,
        username=username,
    )
