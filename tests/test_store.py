"""The SQLite store on real files: migrations, group commit, callbacks in commit
order, failure isolation, history paging and its cost, persistence.

Every test opens a real database under ``tmp_path`` with ``open_sqlite_store``.
Where a test needs several operations in one group, it holds the writer thread
inside a ``store.write`` operation (a ``threading.Event`` gate) while it queues
them, so the grouping is deterministic. Nothing sleeps.
"""

from __future__ import annotations

import itertools
import math
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from chatd.errors import ChatError, ErrorCode, StorageError
from chatd.protocol import clamp_limit
from chatd.store import (
    Change,
    NewMessage,
    RoomAccess,
    StoredMessage,
    dm_channel,
    room_channel,
    schema,
)
from chatd.store.schema import MIGRATIONS
from chatd.store.sqlite import (
    MAX_GROUP,
    SqliteStore,
    ensure_room,
    history,
    log_page,
    missed,
    open_sqlite_store,
)
from tests.helpers.store import CREATED, PEOPLE, Recorder, fill, msg, writer_held


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "data" / "chatd.db")


@contextmanager
def plain(path: str) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection, always closed (ResourceWarning is an error)."""
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        yield conn


async def trace(store: SqliteStore) -> list[str]:
    """Record every statement the writer connection runs from now on."""
    statements: list[str] = []
    await store.write(lambda conn: conn.set_trace_callback(statements.append))
    statements.clear()
    return statements


def transactions(statements: list[str]) -> list[tuple[list[str], str]]:
    """The statements split into transactions: (body, COMMIT or ROLLBACK)."""
    out: list[tuple[list[str], str]] = []
    body: list[str] | None = None
    for s in statements:
        word = s.strip().upper()
        if word.startswith("BEGIN"):
            body = []
        elif word in ("COMMIT", "ROLLBACK"):
            assert body is not None
            out.append((body, word))
            body = None
        elif body is not None:
            body.append(s)
    return out


def message_inserts(body: list[str]) -> int:
    """INSERTs of messages (a statement whose triggers run is traced again
    for them: counted once)."""
    count, last = 0, None
    for s in body:
        if s.startswith("--"):  # a statement of SQLite's own (the index's)
            continue
        count += s.startswith("INSERT INTO messages (") and s != last
        last = s
    return count


# --- migrations and pragmas ---------------------------------------------------


async def test_fresh_database_is_migrated_and_in_wal_mode(path: str) -> None:
    assert not await trio.Path(path).exists()
    async with open_sqlite_store(path):
        pass
    with plain(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"users", "rooms", "room_members", "messages"} <= tables
        indexes = {
            r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
        }
        assert "messages_by_channel" in indexes


async def test_reopening_is_a_no_op(path: str) -> None:
    async with open_sqlite_store(path) as store:
        await store.upsert_user(1, "alice")
        rec = Recorder()
        await store.append(msg(1), rec)
        await store.flush()
    with plain(path) as conn:
        schema_before = conn.execute(
            "SELECT type, name, sql FROM sqlite_master ORDER BY name"
        ).fetchall()

    async with open_sqlite_store(path) as store:
        assert await store.history(room_channel("general"), 10, 0) == (rec.stored, 1)
    with plain(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)
        assert (
            conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
            == schema_before
        )
        assert conn.execute(PEOPLE).fetchall() == [(1, "alice")]


async def test_newer_schema_is_refused(path: str) -> None:
    Path(path).parent.mkdir(parents=True)
    with plain(path) as conn:
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(RuntimeError, match=r"newer than this chatd.*upgrade chatd"):
        async with open_sqlite_store(path):
            pytest.fail("a newer database must not be opened")  # pragma: no cover
    with plain(path) as conn:
        # Untouched: still the newer version, and no table was created.
        assert conn.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS) + 1,)
        assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)


def test_a_sqlite_without_fts5_is_said_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(A module name no SQLite has stands for FTS5 missing.)"""
    index = next(i for i, m in enumerate(schema.MIGRATIONS) if "USING fts5" in m)
    script = schema.MIGRATIONS[index].replace("USING fts5", "USING fts5_missing")
    monkeypatch.setattr(schema, "MIGRATIONS", [*schema.MIGRATIONS[:index], script])
    conn = schema.connect(str(tmp_path / "chatd.db"))
    with pytest.raises(StorageError, match=r"has no FTS5, which message search needs"):
        schema.migrate(conn)
    assert conn.execute("PRAGMA user_version").fetchone() == (0,)  # nothing half done
    conn.close()


# --- append: callbacks, order, ids ------------------------------------------


async def test_appends_from_many_tasks_call_back_on_trio_thread_in_commit_order(path: str) -> None:
    rec = Recorder()
    sent: dict[tuple[int, int], NewMessage] = {}
    tasks, per_task = 5, 120

    async with open_sqlite_store(path) as store:

        async def sender(user: int) -> None:
            for i in range(per_task):
                m = msg(i, room=f"room{user % 2}", user=user)
                sent[(user, i)] = m
                await store.append(m, rec)
                if i % 7 == 0:
                    await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            for user in range(1, tasks + 1):
                nursery.start_soon(sender, user)
        await store.flush()

        assert len(rec.results) == tasks * per_task
        assert all(isinstance(r, StoredMessage) for r in rec.results)
        assert rec.threads == {threading.get_ident()}
        assert all(rec.in_trio)
        ids = [r.id for r in rec.stored]
        # Commit order is id order: strictly increasing, no duplicates.
        assert all(a < b for a, b in itertools.pairwise(ids))
        # Each callback got the very message it was given.
        given = {id(m) for m in sent.values()}
        assert {id(r.message) for r in rec.stored} == given
        # Per sender, the order of append is the order of commit.
        for user in range(1, tasks + 1):
            mine = [r.message for r in rec.stored if r.message.user_id == user]
            assert mine == [sent[(user, i)] for i in range(per_task)]

    with plain(path) as conn:
        rows = conn.execute(
            "SELECT id, channel, user_id, username, content, message_type, created_at"
            " FROM messages ORDER BY id"
        ).fetchall()
    assert [r[0] for r in rows] == ids
    for row, stored in zip(rows, rec.stored, strict=True):
        m = stored.message
        assert row[1:] == (
            room_channel(m.room or ""),
            m.user_id,
            m.username,
            m.content,
            m.message_type,
            m.created_at,
        )


async def test_append_does_not_wait_while_the_queue_has_room(path: str) -> None:
    rec = Recorder()
    async with open_sqlite_store(path) as store:
        with trio.CancelScope() as scope:
            scope.cancel()
            # Any checkpoint here would raise Cancelled.
            for i in range(100):
                await store.append(msg(i), rec)
        assert not scope.cancelled_caught
        await store.flush()
    assert len(rec.stored) == 100


async def test_group_commit_groups_and_all_commit(path: str) -> None:
    n = 2000
    rec = Recorder()
    async with open_sqlite_store(path) as store:
        statements = await trace(store)
        async with writer_held(store):
            for i in range(n):
                await store.append(msg(i), rec)
            # Callbacks run only after a commit, and the writer is held.
            assert rec.results == []
        await store.flush()
        assert len(rec.stored) == n
        ids = [r.id for r in rec.stored]
        assert all(a < b for a, b in itertools.pairwise(ids))
        assert [r.message.content for r in rec.stored] == [f"message {i}" for i in range(n)]

        groups = [(body, end) for body, end in transactions(statements) if message_inserts(body)]
        assert all(end == "COMMIT" for _, end in groups)
        assert sum(message_inserts(body) for body, _ in groups) == n
        # Held while 2000 were queued, the writer commits them in full groups.
        assert len(groups) == math.ceil(n / MAX_GROUP)
        assert len(groups) <= n // 100  # grouped: not one commit per message
        assert max(message_inserts(body) for body, _ in groups) == MAX_GROUP

    with plain(path) as conn:
        assert conn.execute("SELECT count(*), min(id), max(id) FROM messages").fetchone() == (
            n,
            ids[0],
            ids[-1],
        )


async def test_closing_commits_everything_still_queued(path: str) -> None:
    n = 2000
    rec = Recorder()
    async with trio.open_nursery() as nursery:
        async with open_sqlite_store(path) as store:
            entered = threading.Event()
            gate = threading.Event()
            released: list[Any] = []

            def block(conn: sqlite3.Connection) -> None:
                entered.set()
                gate.wait()

            async def hold() -> None:
                released.append(await store.write(block))

            nursery.start_soon(hold)
            await trio.to_thread.run_sync(entered.wait)
            for i in range(n):
                await store.append(msg(i), rec)
            assert rec.results == []

            async def release_once_closing() -> None:
                # Runs only once every task waits: the store is then closing.
                await trio.testing.wait_all_tasks_blocked()
                gate.set()

            nursery.start_soon(release_once_closing)
        # Leaving the block returned only after the queue was drained.
        assert len(rec.stored) == n
        assert released == [None]
    with plain(path) as conn:
        assert conn.execute("SELECT count(*) FROM messages").fetchone() == (n,)
        assert [r[0] for r in conn.execute("SELECT id FROM messages ORDER BY id")] == [
            r.id for r in rec.stored
        ]


async def test_flush_returns_after_earlier_appends_commit(path: str) -> None:
    rec = Recorder()
    async with open_sqlite_store(path) as store:
        async with writer_held(store) as gate:
            for i in range(50):
                await store.append(msg(i), rec)
            gate.set()
            await store.flush()
            assert len(rec.stored) == 50
            # Committed, so visible to the readers.
            messages, total = await store.history(room_channel("general"), 100, 0)
            assert total == 50
            assert [m.id for m in messages] == [r.id for r in rec.stored]


# --- failures ----------------------------------------------------------------


async def test_a_failing_operation_fails_only_itself(path: str) -> None:
    rec = Recorder()
    async with open_sqlite_store(path) as store:
        await store.upsert_user(7, "seven")
        statements = await trace(store)
        errors: list[BaseException] = []

        def duplicate(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO users (id, username, created_at) VALUES (8, 'eight', 'x')")
            conn.execute("INSERT INTO users (id, username, created_at) VALUES (7, 'again', 'x')")

        async def bad() -> None:
            try:
                await store.write(duplicate)
            except sqlite3.IntegrityError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            async with writer_held(store):
                for i in range(10):
                    await store.append(msg(i), rec)
                nursery.start_soon(bad)
                await trio.testing.wait_all_tasks_blocked()  # bad() has queued its op
                for i in range(10, 20):
                    await store.append(msg(i), rec)

        assert len(errors) == 1
        assert "UNIQUE" in str(errors[0])
        assert len(rec.stored) == 20
        assert [r.message.content for r in rec.stored] == [f"message {i}" for i in range(20)]

        # They really were in one group: tried together until the bad op
        # raised, rolled back, then each run alone in order.
        txs = transactions(statements)
        start = next(i for i, t in enumerate(txs) if message_inserts(t[0]))
        first, alone = txs[start], txs[start + 1 :]
        assert first[1] == "ROLLBACK"
        assert message_inserts(first[0]) == 10
        assert "'again'" in first[0][-1]
        assert [(message_inserts(body), end) for body, end in alone] == (
            [(1, "COMMIT")] * 10 + [(0, "ROLLBACK")] + [(1, "COMMIT")] * 10
        )

        messages, total = await store.history(room_channel("general"), 100, 0)
        assert total == 20
        assert [m.id for m in messages] == [r.id for r in rec.stored]

    with plain(path) as conn:
        # The failing op is undone entirely, its first insert included.
        assert conn.execute(PEOPLE).fetchall() == [(7, "seven")]
        assert conn.execute("SELECT count(*) FROM messages").fetchone() == (20,)


async def test_a_failing_commit_fails_only_its_operation(path: str) -> None:
    """A constraint checked only at COMMIT (a deferred foreign key)."""
    rec = Recorder()
    async with open_sqlite_store(path) as store:

        def orphan(conn: sqlite3.Connection) -> None:
            conn.execute("PRAGMA defer_foreign_keys = ON")
            conn.execute("INSERT INTO room_members (room, user_id) VALUES ('nowhere', 1)")

        async with writer_held(store) as gate:
            for i in range(5):
                await store.append(msg(i), rec)
            gate.set()
            with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
                await store.write(orphan)
        await store.append(msg(5), rec)
        await store.flush()
        assert len(rec.stored) == 6
    with plain(path) as conn:
        assert conn.execute("SELECT count(*) FROM room_members").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM messages").fetchone() == (6,)


async def test_reply_to_must_name_a_message_of_the_same_room(path: str) -> None:
    rec = Recorder()
    async with open_sqlite_store(path) as store:
        await store.append(msg(0, room="general"), rec)
        await store.append(msg(1, room="random"), rec)
        await store.flush()
        general_id, random_id = (r.id for r in rec.stored)

        cross = msg(2, room="general", reply_to=random_id)
        missing = msg(3, room="general", reply_to=random_id + 1000)
        same = msg(4, room="general", reply_to=general_id)
        reaction = NewMessage(
            user_id=2,
            username="bob",
            content="+1",
            message_type="reaction",
            created_at=CREATED,
            room="general",
            reply_to=general_id,
        )
        for m in (cross, missing, same, reaction):
            await store.append(m, rec)
        await store.flush()

        results = rec.results[2:]
        for err in results[:2]:
            assert isinstance(err, ChatError)
            assert err.code is ErrorCode.INVALID_FORMAT
            assert err.details == {"field": "data.reply_to"}
        ok_same, ok_reaction = results[2:]
        assert isinstance(ok_same, StoredMessage) and ok_same.message is same
        assert isinstance(ok_reaction, StoredMessage) and ok_reaction.message is reaction

        messages, total = await store.history(room_channel("general"), 100, 0)
        # The rejected ones are not stored and do not count.
        assert total == 3
        assert [m.id for m in messages] == [general_id, ok_same.id, ok_reaction.id]
        assert [m.message.reply_to for m in messages] == [None, general_id, general_id]
        assert [m.message.message_type for m in messages] == ["text", "text", "reaction"]
    with plain(path) as conn:
        assert conn.execute("SELECT count(*) FROM messages").fetchone() == (4,)


async def test_reply_to_in_a_direct_conversation(path: str) -> None:
    rec = Recorder()
    async with open_sqlite_store(path) as store:
        await store.append(msg(0, room=None, user=3, to_user_id=5), rec)
        await store.append(msg(1, room="general", user=3), rec)
        await store.flush()
        dm_id, room_id = (r.id for r in rec.stored)
        await store.append(msg(2, room=None, user=5, to_user_id=3, reply_to=dm_id), rec)
        await store.append(msg(3, room=None, user=5, to_user_id=3, reply_to=room_id), rec)
        await store.append(msg(4, room=None, user=5, to_user_id=4, reply_to=dm_id), rec)
        await store.flush()
        reply, from_room, other_dm = rec.results[2:]
        assert isinstance(reply, StoredMessage)
        for err in (from_room, other_dm):
            assert isinstance(err, ChatError) and err.details == {"field": "data.reply_to"}


# --- history ---------------------------------------------------------------


async def test_history_of_an_empty_room(path: str) -> None:
    async with open_sqlite_store(path) as store:
        assert await store.history(room_channel("general"), 50, 0) == ([], 0)
        assert await store.history(room_channel("general"), 50, 10) == ([], 0)
        await fill(store, "random", 3)
        assert await store.history(room_channel("general"), 50, 0) == ([], 0)


async def test_history_pages_count_back_from_the_newest(path: str) -> None:
    async with open_sqlite_store(path) as store:
        ids = await fill(store, "general", 10)

        async def page(offset: int, limit: int = 3) -> tuple[list[int], int]:
            messages, total = await store.history(room_channel("general"), limit, offset)
            assert all(m.message.room == "general" for m in messages)
            return [m.id for m in messages], total

        assert await page(0) == (ids[7:10], 10)
        assert await page(3) == (ids[4:7], 10)
        assert await page(6) == (ids[1:4], 10)
        assert await page(8) == (ids[0:2], 10)
        assert await page(9) == (ids[0:1], 10)
        assert await page(10) == ([], 10)
        assert await page(1000) == ([], 10)
        assert await page(0, limit=100) == (ids, 10)
        assert await page(0, limit=1) == (ids[9:], 10)

        messages, _ = await store.history(room_channel("general"), 3, 0)
        assert [m.message.content for m in messages] == ["message 7", "message 8", "message 9"]


async def test_history_exact_multiple_of_the_limit(path: str) -> None:
    async with open_sqlite_store(path) as store:
        ids = await fill(store, "general", 9)
        seen: list[int] = []
        for offset in (0, 3, 6):
            messages, total = await store.history(room_channel("general"), 3, offset)
            assert total == 9
            assert len(messages) == 3
            has_more = offset + len(messages) < total
            assert has_more == (offset < 6)
            seen = [m.id for m in messages] + seen
        assert seen == ids
        assert await store.history(room_channel("general"), 3, 9) == ([], 9)


async def test_history_limit_is_clamped_by_the_caller(path: str) -> None:
    assert [clamp_limit(x) for x in (-5, 0, 1, 50, 100, 101, 10_000)] == [
        1,
        1,
        1,
        50,
        100,
        100,
        100,
    ]
    async with open_sqlite_store(path) as store:
        ids = await fill(store, "general", 120)
        messages, total = await store.history(room_channel("general"), clamp_limit(500), 0)
        assert (len(messages), total) == (100, 120)
        assert [m.id for m in messages] == ids[20:]
        messages, _ = await store.history(room_channel("general"), clamp_limit(0), 0)
        assert [m.id for m in messages] == ids[-1:]


async def test_rooms_are_independent(path: str) -> None:
    async with open_sqlite_store(path) as store:
        rec = Recorder()
        for i in range(12):
            await store.append(msg(i, room="general" if i % 3 else "random"), rec)
        await store.flush()
        general = [r.id for r in rec.stored if r.message.room == "general"]
        random = [r.id for r in rec.stored if r.message.room == "random"]
        messages, total = await store.history(room_channel("general"), 100, 0)
        assert ([m.id for m in messages], total) == (general, 8)
        messages, total = await store.history(room_channel("random"), 100, 0)
        assert ([m.id for m in messages], total) == (random, 4)
        messages, total = await store.history(room_channel("random"), 2, 2)
        assert ([m.id for m in messages], total) == (random[:2], 4)
        # A room whose name is a prefix of another is its own room too.
        assert await store.history(room_channel("gen"), 100, 0) == ([], 0)


async def test_dm_channels_are_symmetric(path: str) -> None:
    assert dm_channel(3, 5) == dm_channel(5, 3)
    assert dm_channel(3, 5) != dm_channel(3, 4)
    assert dm_channel(3, 5) != room_channel("3:5")
    async with open_sqlite_store(path) as store:
        rec = Recorder()
        await store.append(msg(0, room=None, user=3, to_user_id=5), rec)
        await store.append(msg(1, room=None, user=5, to_user_id=3), rec)
        await store.append(msg(2, room=None, user=3, to_user_id=4), rec)
        await store.append(msg(3, room=None, user=10, to_user_id=2), rec)
        await store.flush()
        ids = [r.id for r in rec.stored]
        for channel in (dm_channel(3, 5), dm_channel(5, 3)):
            page = partial(history, channel=channel, limit=10, offset=0)
            messages, total = await store.read(page)
            assert ([m.id for m in messages], total) == (ids[:2], 2)
            assert [
                (m.message.user_id, m.message.to_user_id, m.message.room) for m in messages
            ] == [(3, 5, None), (5, 3, None)]
        messages, total = await store.read(lambda c: history(c, dm_channel(4, 3), 10, 0))
        assert ([m.id for m in messages], total) == (ids[2:3], 1)
        # 10 and 2 sort as numbers, not strings.
        assert dm_channel(10, 2) == "d:2:10"
        messages, total = await store.read(lambda c: history(c, dm_channel(2, 10), 10, 0))
        assert ([m.id for m in messages], total) == (ids[3:], 1)


PAGE_SQL = (
    "SELECT id, channel, user_id, username, to_user_id, message_type, content,"
    " media_url, media_type, duration, reply_to, created_at"
    " FROM messages WHERE channel = ? AND seq BETWEEN ? AND ? ORDER BY seq"
)


def plan(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...] = ()) -> str:
    return " | ".join(r[-1] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params))


async def test_history_page_is_an_index_range(path: str) -> None:
    async with open_sqlite_store(path) as store:
        await fill(store, "general", 300)
        await fill(store, "random", 300)
    with plain(path) as conn:
        conn.execute("ANALYZE")
        text = plan(conn, PAGE_SQL, ("r:general", 1, 50))
        assert "USING INDEX messages_by_channel" in text or "USING COVERING INDEX" in text, text
        assert "SCAN" not in text and "TEMP B-TREE" not in text, text

        # The queries history() really runs, at the newest page and far back.
        for offset in (0, 250):
            statements: list[str] = []
            conn.set_trace_callback(statements.append)
            messages, total = history(conn, "r:general", 50, offset)
            conn.set_trace_callback(None)
            assert (len(messages), total) == (50, 300)
            assert statements[0] == "BEGIN" and statements[-1] == "COMMIT"  # one snapshot
            statements = statements[1:-1]
            assert len(statements) == 3  # the channel's end, its retention horizon, the page
            for sql in statements:
                text = plan(conn, sql)
                assert "SCAN" not in text and "TEMP B-TREE" not in text, (sql, text)
            assert "purged USING PRIMARY KEY" in plan(conn, statements[1])
            assert "messages_by_channel" in plan(conn, statements[2])


async def test_edits_and_deletions_keep_every_read_an_index_range(path: str) -> None:
    """History with edited and deleted messages in it runs the same three
    statements; a replay's reads of messages and events, and the events'
    newest id, are index SEARCHes, never a SCAN."""
    async with open_sqlite_store(path) as store:
        ids = await fill(store, "general", 300)
        await fill(store, "random", 300)
        rec = Recorder()
        for i, message_id in enumerate(ids[::10]):
            change = Change(message_id, 1, "2024-05-01T13:00:00.000Z", None if i % 2 else "new")
            await store.change(change, rec)  # type: ignore[arg-type]
        await store.flush()
        assert len(rec.results) == 30 and not any(isinstance(r, Exception) for r in rec.results)
    with plain(path) as conn:
        conn.execute("ANALYZE")
        for read in (
            lambda: history(conn, "r:general", 50, 100),
            lambda: missed(conn, "r:general", ids[100], 1000),
            lambda: log_page(conn, "r:general", 100, ids[100], 100),
        ):
            statements: list[str] = []
            conn.set_trace_callback(statements.append)
            read()
            conn.set_trace_callback(None)
            selects = [sql for sql in statements if sql.lstrip().upper().startswith("SELECT")]
            assert selects
            for sql in selects:
                text = plan(conn, sql)
                assert "SCAN" not in text and "TEMP B-TREE" not in text, (sql, text)
                assert any(
                    index in text
                    for index in (
                        "messages_by_channel",
                        "message_events_by_channel",
                        "purged USING PRIMARY KEY",  # (the retention horizon: one row)
                    )
                ), text
        page, total = history(conn, "r:general", 50, 250)
        assert total == 300 and [m.id for m in page] == ids[:50]
        assert page[0].message.edited_at is not None and page[10].message.deleted


async def test_history_cost_does_not_grow_with_the_offset(path: str) -> None:
    n = 5000
    async with open_sqlite_store(path) as store:
        await fill(store, "general", n)
    with plain(path) as conn:

        def steps(offset: int) -> int:
            count = [0]

            def tick() -> int:
                count[0] += 1
                return 0

            conn.set_progress_handler(tick, 10)
            try:
                messages, total = history(conn, "r:general", 20, offset)
            finally:
                conn.set_progress_handler(None, 0)
            assert (len(messages), total) == (20, n)
            return count[0]

        newest, oldest = steps(0), steps(n - 20)
        # An OFFSET scan would cost ~n rows more for the oldest page.
        assert oldest <= newest * 1.5 + 5, (newest, oldest)


# --- users and rooms ---------------------------------------------------------


def users(conn: sqlite3.Connection) -> list[tuple[int, str]]:
    return conn.execute(PEOPLE).fetchall()


async def test_upsert_user_stores_and_updates_the_name(path: str) -> None:
    async with open_sqlite_store(path) as store:
        await store.upsert_user(1, "alice")
        await store.upsert_user(2, "bob")
        await store.upsert_user(1, "alice")
        rows = await store.read(users)
        assert rows == [(1, "alice"), (2, "bob")]
        await store.upsert_user(1, "alicia")
        rows = await store.read(users)
        assert rows == [(1, "alicia"), (2, "bob")]
    with plain(path) as conn:
        assert conn.execute(PEOPLE).fetchall() == [
            (1, "alicia"),
            (2, "bob"),
        ]
    async with open_sqlite_store(path) as store:
        await store.upsert_user(2, "robert")
        rows = await store.read(users)
        assert rows == [(1, "alicia"), (2, "robert")]


async def test_room_access(path: str) -> None:
    async with open_sqlite_store(path) as store:
        assert await store.room_access("general", 1) is None
        await store.write(lambda c: ensure_room(c, "general", False))
        await store.write(lambda c: ensure_room(c, "staff", True, (1, 2)))
        assert await store.room_access("general", 1) == RoomAccess("general", False, True)
        assert await store.room_access("staff", 1) == RoomAccess("staff", True, True)
        assert await store.room_access("staff", 2) == RoomAccess("staff", True, True)
        assert await store.room_access("staff", 3) == RoomAccess("staff", True, False)
        assert await store.room_access("nowhere", 1) is None
        # Adding a member, then making the room public: existing rows kept.
        await store.write(lambda c: ensure_room(c, "staff", True, (3,)))
        assert await store.room_access("staff", 3) == RoomAccess("staff", True, True)
        await store.write(lambda c: ensure_room(c, "staff", False))
        assert await store.room_access("staff", 4) == RoomAccess("staff", False, True)
        assert await store.room_access("staff", 1) == RoomAccess("staff", False, True)
        # Membership of one room says nothing of another.
        await store.write(lambda c: ensure_room(c, "secret", True, (9,)))
        assert await store.room_access("secret", 1) == RoomAccess("secret", True, False)


# --- persistence -----------------------------------------------------------


async def test_history_and_ids_survive_a_restart(path: str) -> None:
    async with open_sqlite_store(path) as store:
        first = await fill(store, "general", 7)
        before = await store.history(room_channel("general"), 5, 0)

    async with open_sqlite_store(path) as store:
        assert await store.history(room_channel("general"), 5, 0) == before
        messages, total = await store.history(room_channel("general"), 100, 0)
        assert ([m.id for m in messages], total) == (first, 7)
        more = await fill(store, "general", 3)
        assert min(more) > max(first)
        messages, total = await store.history(room_channel("general"), 100, 0)
        assert ([m.id for m in messages], total) == (first + more, 10)

    newest = max(more)
    with plain(path) as conn:
        conn.execute("DELETE FROM messages WHERE id = ?", (newest,))
        assert conn.execute("SELECT max(id) FROM messages").fetchone() == (newest - 1,)

    async with open_sqlite_store(path) as store:
        again = await fill(store, "random", 1)
        # AUTOINCREMENT: the deleted id is never handed out again.
        assert again[0] > newest
