"""Driving a store (SQLite or PostgreSQL) directly, below the server:
messages to append (``msg``), a commit callback that records what it got
(``Recorder``), the writer thread held so that a group is queued
deterministically (``writer_held``), rooms filled (``fill``), one message
appended and awaited (``stored``) or edited or deleted (``changed``), the
group-size histogram (``group_sizes``), either store opened
(``open_store``: the ``backend`` and ``store`` fixtures), and rows read
straight from a SQLite file (``sqlite_rows``).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from chatd.store import Change, NewMessage, StoredMessage
from chatd.store.postgres import PostgresStore, open_postgres_store
from chatd.store.sqlite import SqliteStore, open_sqlite_store

if TYPE_CHECKING:
    from chatd.metrics import Metrics

#: Either store: what the contract tests and ``writer_held`` accept.
AnyStore = SqliteStore | PostgresStore

#: Which store, and where: ("sqlite", a file) or ("postgres", a DSN)
#: (the ``backend`` fixture).
Backend = tuple[str, str]


@asynccontextmanager
async def open_store(backend: Backend, **kwargs: Any) -> AsyncIterator[AnyStore]:
    kind, where = backend
    if kind == "postgres":
        async with open_postgres_store(where, **kwargs) as pg:
            yield pg
    else:
        async with open_sqlite_store(where, **kwargs) as lite:
            yield lite


#: The ``created_at`` of every message ``msg`` makes.
CREATED = "2024-05-01T12:00:00Z"

#: Users, without the system sender (user 0, made by migration 2).
PEOPLE = "SELECT id, username FROM users WHERE id > 0 ORDER BY id"


def msg(i: int, room: str | None = "general", user: int = 1, **kw: Any) -> NewMessage:
    """Text message number ``i`` from ``user`` to ``room`` (``room`` None and
    ``to_user_id``: a direct message)."""
    return NewMessage(
        user_id=user,
        username=f"user{user}",
        content=f"message {i}",
        message_type="text",
        created_at=CREATED,
        room=room,
        **kw,
    )


class Recorder:
    """A ``Committed`` callback that records what it got, and on which thread."""

    def __init__(self) -> None:
        self.results: list[StoredMessage | Exception] = []
        self.threads: set[int] = set()
        self.in_trio: list[bool] = []

    def __call__(self, result: StoredMessage | Exception) -> None:
        self.threads.add(threading.get_ident())
        try:
            trio.lowlevel.current_trio_token()
            self.in_trio.append(True)
        except RuntimeError:
            self.in_trio.append(False)
        self.results.append(result)

    @property
    def stored(self) -> list[StoredMessage]:
        return [r for r in self.results if isinstance(r, StoredMessage)]


@asynccontextmanager
async def writer_held(store: AnyStore) -> AsyncIterator[threading.Event]:
    """Hold the writer thread inside one operation until the block ends (or
    the yielded gate is set): everything queued meanwhile waits behind it."""
    entered = threading.Event()
    gate = threading.Event()

    def block(conn: Any) -> str:
        entered.set()
        gate.wait()
        return "released"

    async with trio.open_nursery() as nursery:
        box: list[Any] = []

        async def run() -> None:
            box.append(await store.write(block))

        nursery.start_soon(run)
        await trio.to_thread.run_sync(entered.wait)
        try:
            yield gate
        finally:
            gate.set()
    assert box == ["released"]


async def fill(store: AnyStore, room: str, n: int, user: int = 1) -> list[int]:
    """Append ``n`` messages to ``room`` and flush; their ids, in order."""
    rec = Recorder()
    for i in range(n):
        await store.append(msg(i, room=room, user=user), rec)
    await store.flush()
    assert len(rec.stored) == n
    return [r.id for r in rec.stored]


async def stored(store: AnyStore, message: NewMessage) -> StoredMessage | Exception:
    """Append one message and wait for its callback."""
    done = trio.Event()
    box: list[StoredMessage | Exception] = []

    def callback(result: StoredMessage | Exception) -> None:
        box.append(result)
        done.set()

    await store.append(message, callback)
    await done.wait()
    return box[0]


async def changed(store: AnyStore, message_id: int, content: str | None, user: int = 1) -> None:
    """Edit (``content``) or delete (None) one message as ``user`` and wait
    for its commit, which must succeed."""
    done = trio.Event()
    box: list[Any] = []

    def callback(result: Any) -> None:
        box.append(result)
        done.set()

    await store.change(Change(message_id, user, CREATED, content), callback)
    await done.wait()
    assert not isinstance(box[0], Exception), box[0]


def group_sizes(metrics: Metrics) -> tuple[float, float, float]:
    """Groups committed, operations in them, and groups of at most 4."""
    get = metrics.registry.get_sample_value
    return (
        get("chatd_store_group_size_count") or 0.0,
        get("chatd_store_group_size_sum") or 0.0,
        get("chatd_store_group_size_bucket", {"le": "4.0"}) or 0.0,
    )


def sqlite_rows(path: Path | str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """``sql``'s rows, read from the SQLite file ``path`` on a connection of
    their own (always closed: a ResourceWarning is an error)."""
    with closing(sqlite3.connect(path)) as db:
        return db.execute(sql, args).fetchall()
