"""The PostgreSQL store where it differs from SQLite: several nodes writing
one database at once, migrations racing, PostgreSQL becoming unreachable.

Every test gets a fresh database of a real PostgreSQL (the ``pg_dsn``
fixture; skipped, saying why, when none can start). Two ``PostgresStore``
instances on one database are two nodes: separate writer threads and
connections, as two processes would have. Unreachability is a ``tcp_proxy``
(``tests/helpers/proxies.py``) between the store and the server that the test
cuts and restores. Where a test must know that a writer is waiting for a
lock, it asks PostgreSQL (``pg_stat_activity``); nothing sleeps for a fixed
time.
"""

from __future__ import annotations

import itertools
import random
import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import trio
from msgspec.structs import replace
from psycopg import conninfo

from chatd.errors import ChatError, ErrorCode, StorageError
from chatd.metrics import Metrics
from chatd.store import Change, NewMessage, StoredMessage, dm_channel, room_channel
from chatd.store import postgres as pg
from chatd.store.pgschema import MIGRATIONS, migrate
from chatd.store.postgres import PostgresStore, open_postgres_store
from tests.helpers.proxies import tcp_proxy
from tests.helpers.store import Recorder, fill, group_sizes, msg, stored, writer_held

GENERAL = room_channel("general")


def rows(dsn: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql, args).fetchall()


async def until(check: Callable[[], bool]) -> None:
    """Wait (in short steps, at most 20 s) until ``check()`` holds on a thread."""
    with trio.fail_after(20):
        while not await trio.to_thread.run_sync(check):  # noqa: ASYNC110 - PostgreSQL's state
            await trio.sleep(0.005)


def lock_waiters(dsn: str) -> int:
    """Sessions of chatd waiting for a lock in this database."""
    dbname = conninfo.conninfo_to_dict(dsn)["dbname"]
    ((count,),) = rows(
        dsn,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
        " AND application_name = 'chatd' AND wait_event_type = 'Lock'",
        dbname,
    )
    return int(count)


# --- several nodes ------------------------------------------------------------


async def test_two_nodes_appending_at_once_keep_seqs_dense_and_ids_in_commit_order(
    pg_dsn: str,
) -> None:
    rooms = ["general", "random", "staff"]
    metrics = {"a": Metrics(), "b": Metrics()}
    seen: dict[str, Recorder] = {"a": Recorder(), "b": Recorder()}
    async with (
        open_postgres_store(pg_dsn, metrics=metrics["a"]) as a,
        open_postgres_store(pg_dsn, metrics=metrics["b"]) as b,
    ):
        nodes = {"a": a, "b": b}

        async def sender(node: str, user: int) -> None:
            rng = random.Random(user)
            for i in range(150):
                if rng.random() < 0.2:
                    m = msg(i, room=None, user=user, to_user_id=rng.choice([7, 8]))
                else:
                    m = msg(i, room=rng.choice(rooms), user=user)
                if rng.random() < 0.3:  # wait for this one, as a client would
                    done = trio.Event()
                    await nodes[node].append(m, lambda r, d=done: (seen[node](r), d.set()))
                    await done.wait()
                else:
                    await nodes[node].append(m, seen[node])

        async with trio.open_nursery() as nursery:
            for user in range(1, 9):
                nursery.start_soon(sender, "ab"[user % 2], user)
        await a.flush()
        await b.flush()

    everything = seen["a"].stored + seen["b"].stored
    assert len(everything) == len(seen["a"].results) + len(seen["b"].results) == 8 * 150
    for node in "ab":  # many groups each, not one big one
        assert group_sizes(metrics[node])[0] >= 20

    # In the database: every channel's seqs are exactly 1..n, and ids grow
    # with seq.
    by_channel: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for channel, seq, id_ in rows(pg_dsn, "SELECT channel, seq, id FROM messages ORDER BY id"):
        by_channel[channel].append((seq, id_))
    assert sum(map(len, by_channel.values())) == len(everything)
    for channel, entries in by_channel.items():
        assert [seq for seq, _ in entries] == list(range(1, len(entries) + 1)), channel
    # What the callbacks said is what is stored.
    stored_rows = {
        id_: (channel, seq, content)
        for id_, channel, seq, content in rows(
            pg_dsn, "SELECT id, channel, seq, content FROM messages"
        )
    }
    for r in everything:
        channel = pg.channel_of(r.message)
        assert stored_rows[r.id] == (channel, r.seq, r.message.content)

    # Commit order: each node's callbacks saw each channel's ids and seqs grow.
    for node in "ab":
        per_channel: dict[str, list[StoredMessage]] = defaultdict(list)
        for r in seen[node].stored:
            per_channel[pg.channel_of(r.message)].append(r)
        for channel, mine in per_channel.items():
            assert all(x.id < y.id for x, y in itertools.pairwise(mine)), channel
            assert all(x.seq < y.seq for x, y in itertools.pairwise(mine)), channel

    # The two nodes really interleaved within channels.
    node_of = {r.id: node for node in "ab" for r in seen[node].stored}
    switches = sum(
        node_of[x] != node_of[y]
        for entries in by_channel.values()
        for (_, x), (_, y) in itertools.pairwise(entries)
    )
    assert switches >= 10


async def test_a_second_node_waits_for_the_channel_and_commits_after(pg_dsn: str) -> None:
    async with open_postgres_store(pg_dsn) as a, open_postgres_store(pg_dsn) as b:
        first = await fill(a, "general", 3)
        entered, gate = threading.Event(), threading.Event()

        def hold(conn: Any) -> None:  # runs inside a's transaction
            entered.set()
            gate.wait()

        order: list[str] = []
        results: dict[str, StoredMessage | Exception] = {}

        def record(node: str) -> Callable[[StoredMessage | Exception], None]:
            def callback(result: StoredMessage | Exception) -> None:
                order.append(node)
                results[node] = result

            return callback

        async with trio.open_nursery() as nursery:
            try:
                # a's next group: a message to general, then the hold: a has
                # locked general's row and taken its id, and does not commit.
                async with writer_held(a):
                    await a.append(msg(10), record("a"))
                    nursery.start_soon(a.write, hold)
                    await trio.testing.wait_all_tasks_blocked()
                await trio.to_thread.run_sync(entered.wait)
                await b.append(msg(20), record("b"))
                await until(lambda: lock_waiters(pg_dsn) == 1)  # b waits for general's row
                assert results == {}
            finally:
                gate.set()
        await b.flush()

    # (Which node's callback runs first is not ordered: two nodes are two
    # processes. What is: b committed after a, so its seq and id are later.)
    assert sorted(order) == ["a", "b"]
    got_a, got_b = results["a"], results["b"]
    assert isinstance(got_a, StoredMessage) and isinstance(got_b, StoredMessage)
    assert (got_a.seq, got_b.seq) == (4, 5)
    assert max(first) < got_a.id < got_b.id


async def test_ids_are_taken_only_once_every_channel_is_locked(pg_dsn: str) -> None:
    """b's group writes rooms a and x. It waits for a's row (node a holds it)
    while node c commits to x; b's message in x then comes after c's, and so
    must its id, although b's group began first."""
    async with (
        open_postgres_store(pg_dsn) as a,
        open_postgres_store(pg_dsn) as b,
        open_postgres_store(pg_dsn) as c,
    ):
        entered, gate = threading.Event(), threading.Event()

        def hold(conn: Any) -> None:
            entered.set()
            gate.wait()

        got: dict[str, StoredMessage | Exception] = {}

        def record(name: str) -> Callable[[StoredMessage | Exception], None]:
            return lambda result: got.__setitem__(name, result)

        async with trio.open_nursery() as nursery:
            try:
                async with writer_held(a):
                    await a.append(msg(0, room="a"), record("a"))
                    nursery.start_soon(a.write, hold)
                    await trio.testing.wait_all_tasks_blocked()
                await trio.to_thread.run_sync(entered.wait)  # a holds r:a
                async with writer_held(b):
                    await b.append(msg(1, room="x"), record("b:x"))
                    await b.append(msg(2, room="a"), record("b:a"))
                await until(lambda: lock_waiters(pg_dsn) == 1)  # b waits for r:a
                got["c:x"] = await stored(c, msg(3, room="x"))
                assert set(got) == {"c:x"}
            finally:
                gate.set()
        await b.flush()

    c_x, b_x, b_a, a_a = (got[k] for k in ("c:x", "b:x", "b:a", "a"))
    assert isinstance(c_x, StoredMessage) and isinstance(b_x, StoredMessage)
    assert isinstance(b_a, StoredMessage) and isinstance(a_a, StoredMessage)
    assert (c_x.seq, b_x.seq) == (1, 2) and (a_a.seq, b_a.seq) == (1, 2)
    assert c_x.id < b_x.id and a_a.id < b_a.id


async def test_dev_user_on_two_nodes_never_hands_out_one_id_twice(pg_dsn: str) -> None:
    async with open_postgres_store(pg_dsn) as a, open_postgres_store(pg_dsn) as b:
        got: dict[str, set[int]] = defaultdict(set)

        async def ask(store: PostgresStore, name: str) -> None:
            got[name].add(await store.dev_user(name))

        async with trio.open_nursery() as nursery:
            for i in range(20):
                for store in (a, b):
                    nursery.start_soon(ask, store, f"dev{i}")
    assert all(len(found) == 1 for found in got.values())
    handed_out = [found.pop() for found in got.values()]
    assert sorted(handed_out) == list(range(1, 21))


# --- migrations -----------------------------------------------------------------


async def test_nodes_starting_at_once_migrate_once(pg_dsn: str) -> None:
    barrier = threading.Barrier(4)
    versions: list[int] = []

    def start() -> None:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            barrier.wait()
            versions.append(migrate(conn))

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(trio.to_thread.run_sync, start)
    assert versions == [len(MIGRATIONS)] * 4
    assert rows(pg_dsn, "SELECT version FROM schema_version") == [(len(MIGRATIONS),)]
    assert rows(pg_dsn, "SELECT id, username FROM users") == [(0, "system")]

    async with open_postgres_store(pg_dsn) as a, open_postgres_store(pg_dsn) as b:
        await fill(a, "general", 2)
        await fill(b, "general", 2)
    assert rows(pg_dsn, "SELECT version FROM schema_version") == [(len(MIGRATIONS),)]
    assert rows(pg_dsn, "SELECT seq FROM messages ORDER BY id") == [(1,), (2,), (3,), (4,)]


async def test_a_newer_schema_is_refused(pg_dsn: str) -> None:
    newer = len(MIGRATIONS) + 1
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_version (version integer NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (%s)", (newer,))
    with pytest.raises(RuntimeError, match=r"newer than this chatd.*upgrade chatd"):
        async with open_postgres_store(pg_dsn):
            pytest.fail("a newer database must not be opened")  # pragma: no cover
    assert rows(pg_dsn, "SELECT version FROM schema_version") == [(newer,)]
    tables = rows(pg_dsn, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    assert tables == [("schema_version",)]


# --- failures -----------------------------------------------------------------


async def test_a_failing_statement_fails_only_its_operation_and_seqs_stay_dense(
    pg_dsn: str,
) -> None:
    rec = Recorder()
    async with open_postgres_store(pg_dsn) as store:
        await store.upsert_user(7, "seven")

        def duplicate(conn: Any) -> None:
            conn.execute("INSERT INTO users (id, username, created_at) VALUES (8, 'eight', 'x')")
            conn.execute("INSERT INTO users (id, username, created_at) VALUES (7, 'again', 'x')")

        errors: list[Exception] = []

        async def bad() -> None:
            try:
                await store.write(duplicate)
            except psycopg.errors.UniqueViolation as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery, writer_held(store):
            for i in range(10):
                await store.append(msg(i, room=("general", "random")[i % 2]), rec)
            nursery.start_soon(bad)
            await trio.testing.wait_all_tasks_blocked()
            for i in range(10, 20):
                await store.append(msg(i, room=("general", "random")[i % 2]), rec)
        await store.flush()
    assert len(errors) == 1
    assert len(rec.stored) == 20
    # The group was rolled back, its channel counters too: no seq was lost.
    assert [r.seq for r in rec.stored] == [n // 2 + 1 for n in range(20)]
    assert rows(pg_dsn, "SELECT name, seq FROM channels ORDER BY name") == [
        ("r:general", 10),
        ("r:random", 10),
    ]
    assert rows(pg_dsn, "SELECT id, username FROM users WHERE id > 0") == [(7, "seven")]


async def test_unreachable_postgres_is_never_acknowledged_and_recovers(
    postgres: Any, pg_dsn: str
) -> None:
    async with tcp_proxy(postgres.host, postgres.port) as proxy:
        dsn = conninfo.make_conninfo(pg_dsn, port=proxy.port)
        async with open_postgres_store(dsn) as store:
            before = await stored(store, msg(0))
            assert isinstance(before, StoredMessage)
            assert await store.history(GENERAL, 10, 0) == ([before], 1)

            proxy.cut()
            failed = [await stored(store, msg(i)) for i in (1, 2)]
            assert all(isinstance(r, psycopg.OperationalError) for r in failed), failed
            for read in (
                store.history(GENERAL, 10, 0),
                store.missed(GENERAL, 0, 10),
                store.room_access("general", 1),
                store.user_exists(99),
            ):
                with pytest.raises(ChatError) as caught:
                    await read
                assert caught.value.code is ErrorCode.INTERNAL_ERROR
                assert caught.value.message == "Storage is unavailable; try again"
            for change in (store.flush(), store.upsert_user(5, "eve"), store.dev_user("x")):
                with pytest.raises(ChatError) as caught:
                    await change
                assert caught.value.code is ErrorCode.INTERNAL_ERROR

            proxy.restore()  # the same store, not reopened
            after = await stored(store, msg(3))
            assert isinstance(after, StoredMessage)
            messages, total = await store.history(GENERAL, 10, 0)
            assert (messages, total) == ([before, after], 2)
            assert after.seq == 2 and after.id > before.id
            await store.upsert_user(5, "eve")
            assert await store.user_exists(5)
    assert rows(pg_dsn, "SELECT content, seq FROM messages ORDER BY id") == [
        ("message 0", 1),
        ("message 3", 2),
    ]


async def test_a_connection_lost_while_idle_costs_no_error(postgres: Any, pg_dsn: str) -> None:
    """PostgreSQL restarted between two writes: the dead connection is found
    before anything was sent to commit, so the write goes through a new one."""
    async with tcp_proxy(postgres.host, postgres.port) as proxy:
        dsn = conninfo.make_conninfo(pg_dsn, port=proxy.port)
        async with open_postgres_store(dsn) as store:
            first = await stored(store, msg(0))
            assert (await store.history(GENERAL, 10, 0))[1] == 1
            accepted = proxy.accepted
            proxy.cut()
            proxy.restore()
            second = await stored(store, msg(1))
            assert isinstance(first, StoredMessage) and isinstance(second, StoredMessage)
            assert await store.history(GENERAL, 10, 0) == ([first, second], 2)
            assert proxy.accepted == accepted + 2  # a new writer and a new reader


async def test_unreachable_at_start_fails_fast_in_one_line(postgres: Any, pg_dsn: str) -> None:
    async with tcp_proxy(postgres.host, postgres.port) as proxy:
        proxy.cut()
        dsn = conninfo.make_conninfo(pg_dsn, port=proxy.port)
        with pytest.raises(StorageError) as caught:
            async with open_postgres_store(dsn):
                pytest.fail("no store without a database")  # pragma: no cover
    assert str(caught.value).startswith(f"database 127.0.0.1:{proxy.port}/")
    assert "\n" not in str(caught.value)


# --- the queries' plans ---------------------------------------------------------


class Recording:
    """A connection that remembers the statements run through it."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.statements: list[tuple[str, Any]] = []

    def execute(self, sql: str, params: Any = None) -> Any:
        if sql.lstrip().upper().startswith(("SELECT", "WITH")):
            self.statements.append((sql, params))
        return self.conn.execute(sql, params)

    def transaction(self) -> Any:
        return self.conn.transaction()


async def test_reads_use_the_indexes(pg_dsn: str) -> None:
    async with open_postgres_store(pg_dsn) as store:
        rec = Recorder()
        for i in range(3000):  # rooms, and conversations among 50 users, over time
            at = {"created_at": f"2024-01-01T{i // 3600:02d}:{i // 60 % 60:02d}:{i % 60:02d}Z"}
            await store.append(replace(msg(i, room=f"room{i % 3}", user=i % 50), **at), rec)
            dm = msg(i, room=None, user=i % 50, to_user_id=(i * 7) % 50)
            await store.append(replace(dm, **at), rec)
        await store.flush()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("ANALYZE")
        conn.execute("SET enable_seqscan = off")  # a seq scan then means: no index fits
        by_channel: list[Callable[[Any], object]] = [
            lambda c: pg.history(c, "r:room1", 20, 100),
            lambda c: pg.missed(c, "r:room1", 5, 50),
            lambda c: pg.after(c, "r:room1", 30, 50),
            lambda c: pg.last_seq(c, "r:room1"),
            lambda c: pg.events(c, "r:room1", 5, 50),
            lambda c: pg.log_page(c, "r:room1", 30, 5, 50),
            lambda c: pg.log_range(c, "r:room1", 30, 60, 20, 25),
        ]

        def plans(queries: list[Callable[[Any], object]]) -> list[str]:
            recording = Recording(conn)
            for query in queries:
                query(recording)
            found = []
            for sql, params in recording.statements:
                plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + sql, params))
                assert "Seq Scan" not in plan, plan
                found.append(plan)
            return found

        channel_plans = plans(by_channel)
        assert len(channel_plans) >= 5  # missed reads the newest message first, then where to start
        # every read of a channel is a range of one of its indexes: its
        # messages by seq, its edits and deletions by id or by position
        events = ("message_events_by_channel", "message_events_by_pos")
        assert all(
            "messages_by_channel" in plan
            or any(name in plan for name in events)
            or "purged_pkey" in plan  # (the retention horizon: one row)
            for plan in channel_plans
        ), channel_plans
        for name in events:
            assert any(name in plan for plan in channel_plans), name
        (direct,) = plans([lambda c: pg.direct_since(c, [3, 4], "2024-01-01T00:45:00Z", 50)])
        assert "messages_direct_from" in direct and "messages_direct_to" in direct
        (events,) = plans([lambda c: pg.direct_events_since(c, [3, 4], "2024-01-01T00:45:00Z", 50)])
        assert "message_events_by_at" in events
        (access,) = plans([lambda c: pg.room_access(c, "room1", 3)])
        assert "messages" not in access  # the room and its members alone


async def test_the_writer_session_cannot_hold_channels_for_long(pg_dsn: str) -> None:
    async with open_postgres_store(pg_dsn) as store:
        shown = await store.write(
            lambda c: c.execute("SHOW idle_in_transaction_session_timeout").fetchone()
        )
    assert shown == (pg.WRITER_IDLE_TIMEOUT,)


def test_psycopg_is_not_imported_by_the_sqlite_side() -> None:
    import subprocess
    import sys

    code = (
        "import sys, chatd.cli, chatd.server, chatd.admin, chatd.store.sqlite;"
        " print('psycopg' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    assert done.stdout == b"False\n"


def test_conninfo_adds_timeouts_the_dsn_leaves_unset() -> None:
    info = conninfo.conninfo_to_dict(pg.conninfo("host=db dbname=chat connect_timeout=9"))
    assert info["connect_timeout"] == "9"  # the DSN's own value wins
    assert info["keepalives"] == "1" and info["application_name"] == "chatd"
    assert "tcp_user_timeout" in info
    url = pg.conninfo("postgresql://u:secret@db:6543/chat")
    assert conninfo.conninfo_to_dict(url)["connect_timeout"] == str(pg.CONNECT_TIMEOUT)
    assert pg.describe("postgresql://u:secret@db:6543/chat") == "db:6543/chat"


def test_nul_in_content_is_kept_readable_and_exact() -> None:
    m = NewMessage(1, "a", "x\x00y", "text", "t", room="r")
    row = pg._message_row(1, "r:r", 1, m, 1)
    assert row[7:9] == ("x\ufffdy", b"x\x00y")
    assert pg._message_row(1, "r:r", 1, msg(0), 1)[8] is None
    assert dm_channel(2, 1) == "d:1:2"


# --- positions -------------------------------------------------------------------


async def test_positions_count_messages_and_events_densely(pg_dsn: str) -> None:
    """Positions (what several nodes' sequencers follow) number a channel's
    messages and events together, densely; seqs count the messages alone."""
    async with open_postgres_store(pg_dsn) as store:
        await _positions(store)


async def _positions(store: PostgresStore) -> None:
    rec = Recorder()
    for i in range(3):
        await store.append(msg(i), rec)
    await store.flush()
    first = rec.stored
    event = await _change(store, first[0].id, 1, "edited")
    rec = Recorder()
    await store.append(msg(9), rec)
    await store.flush()
    assert [m.pos for m in first] == [1, 2, 3] and event.pos == 4 and rec.stored[0].pos == 5
    assert rec.stored[0].seq == 4  # seqs count messages alone
    assert await store.last_pos("r:general") == (5, 4)
    entries = await store.log_range("r:general", 2, 5, 0, 0)
    assert [(type(e).__name__, e.pos) for e in entries] == [
        ("StoredMessage", 3),
        ("StoredEvent", 4),
        ("StoredMessage", 5),
    ]
    assert await store.log_range("r:general", 3, 4, 3, 3) == [entries[1]]


async def _change(store: PostgresStore, message_id: int, user: int, content: str | None) -> Any:
    rec = Recorder()
    await store.change(Change(message_id, user, "2024-05-01T12:30:00.000Z", content), rec)  # type: ignore[arg-type]
    await store.flush()
    (result,) = rec.results
    return result
