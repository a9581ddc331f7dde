"""WAL checkpoints of the SQLite store, off the commit path, on real files:
the writer never checkpoints; a round copies the WAL into the database;
past ``wal_max_bytes`` the writer starts the WAL over, and an idle round
truncates it; a reader in the way makes a checkpoint give up, not wait;
nothing committed is lost while checkpoints run beside the writer; the timer
runs rounds while commits happen and stops after; a store closed in the
middle of a round closes cleanly.

Rounds are asked for with ``SqliteStore.checkpoint()`` (the timer's long
interval keeps it out of the way); the timer's test moves Trio's
``mock_clock`` by hand. Nothing sleeps; no test asserts a time.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from chatd.metrics import Metrics
from chatd.store import room_channel
from chatd.store.checkpoint import FRAME_HEADER, Checkpoint
from chatd.store.sqlite import SqliteStore, open_sqlite_store
from tests.helpers.store import Recorder, fill, msg, sqlite_rows, stored

pytestmark = pytest.mark.usefixtures("collect_garbage")

#: Long enough that the timer never runs a round in a test that asks for them.
NEVER = 3600.0
#: A bound of a few hundred frames (4 KiB pages), reached in a few hundred commits.
SMALL_WAL = 256 << 10


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "data" / "chatd.db")


def wal_size(path: str) -> int:
    try:
        return os.path.getsize(path + "-wal")
    except FileNotFoundError:
        return 0


@contextmanager
def plain(path: str) -> Iterator[sqlite3.Connection]:
    """A plain connection of its own, always closed."""
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        yield conn


async def commits(store: SqliteStore, n: int, room: str = "general", first: int = 0) -> None:
    """``n`` messages, each in a commit of its own (three WAL frames or so each)."""
    for i in range(first, first + n):
        result = await stored(store, msg(i, room=room))
        assert not isinstance(result, Exception), result


def modes(done: list[Checkpoint]) -> list[tuple[str, str]]:
    return [(c.mode, c.result) for c in done]


def database_alone(path: str, copy: Path) -> list[tuple[Any, ...]]:
    """The rooms' message counts in the database file alone, without its WAL
    (what the checkpoints have copied into it)."""
    shutil.copyfile(path, copy)
    return sqlite_rows(copy, "SELECT channel, count(*) FROM messages GROUP BY channel")


# --- the writer's connection ---------------------------------------------------


async def test_the_writer_never_checkpoints(path: str) -> None:
    async with open_sqlite_store(path, checkpoint_interval=NEVER) as store:
        autocheckpoint = await store.write(
            lambda conn: conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
        )
        assert autocheckpoint == 0
        # Far past SQLite's 1,000-page automatic checkpoint: with it, the WAL
        # would have been copied and started over; here every frame is still
        # in it, none copied, until a round runs.
        await commits(store, 500)
        (passive,) = await store.checkpoint()
        assert passive.mode == "PASSIVE"
        assert passive.frames > 1000
        assert passive.result == "done"


# --- a round -----------------------------------------------------------------------


async def test_a_round_copies_the_wal_into_the_database(path: str, tmp_path: Path) -> None:
    async with open_sqlite_store(path, checkpoint_interval=NEVER) as store:
        await store.checkpoint()  # the schema, into the database file
        await fill(store, "general", 50)
        await fill(store, "random", 30)
        # Committed, but only in the WAL: the database file alone has none.
        assert database_alone(path, tmp_path / "before.db") == []
        (passive,) = await store.checkpoint()
        assert passive.mode == "PASSIVE"
        assert passive.result == "done"
        assert passive.frames > 0
        assert passive.copied == passive.frames
        assert passive.left == 0
        assert passive.wal_bytes == wal_size(path) > 0
        # The database file alone now has every row, and so does a reader.
        expected = [("r:general", 50), ("r:random", 30)]
        assert database_alone(path, tmp_path / "after.db") == expected
        assert sqlite_rows(path, "SELECT channel, count(*) FROM messages GROUP BY channel") == (
            expected
        )
        # The store's own readers too.
        assert (await store.history(room_channel("general"), 5, 0))[1] == 50


async def test_past_the_bound_the_writer_starts_the_wal_over(path: str) -> None:
    async with open_sqlite_store(path, checkpoint_interval=NEVER, wal_max_bytes=SMALL_WAL) as store:
        await commits(store, 200)  # about 600 frames: past the bound
        done = await store.checkpoint()
        assert modes(done) == [("PASSIVE", "done"), ("RESTART", "done")]
        frames = done[0].frames
        assert frames * 4096 > SMALL_WAL
        size = wal_size(path)
        # The writer's next commits go to the beginning of the WAL: the file
        # does not grow, and the next round finds only the new frames.
        await commits(store, 20, first=200)
        assert wal_size(path) == size
        passive = (await store.checkpoint())[0]
        assert passive.mode == "PASSIVE"
        assert 0 < passive.frames < frames / 4
        # Writes go on past the bound again and again: the file stays at what
        # the largest round's commits take (the bound is checked once a
        # round; rounds differ a little: the search index merges its
        # segments now and then).
        largest = frames
        for k in range(5):
            await commits(store, 200, first=1000 + 200 * k)
            done = await store.checkpoint()
            assert [c.mode for c in done] == ["PASSIVE", "RESTART"]
            largest = max(largest, done[0].frames)
            assert wal_size(path) <= 32 + largest * (FRAME_HEADER + 4096)  # (32: its header)
        assert (await store.history(room_channel("general"), 1, 0))[1] == 1220


async def test_an_idle_round_truncates_the_wal(path: str) -> None:
    async with open_sqlite_store(path, checkpoint_interval=NEVER) as store:
        await commits(store, 100)
        # Commits since the last round: the writer is busy, no TRUNCATE.
        assert modes(await store.checkpoint()) == [("PASSIVE", "done")]
        assert wal_size(path) > 0
        # Nothing committed since: the writer is idle, and the file is cut.
        done = await store.checkpoint()
        assert modes(done) == [("PASSIVE", "done"), ("TRUNCATE", "done")]
        assert done[1].wal_bytes == 0
        assert wal_size(path) == 0
        # Still idle, and nothing left to truncate: nothing more happens.
        assert modes(await store.checkpoint()) == [("PASSIVE", "done")]
        # The store writes on, from an empty WAL.
        await commits(store, 5, first=100)
        assert (await store.history(room_channel("general"), 1, 0))[1] == 105
        assert wal_size(path) > 0


async def test_a_reader_in_the_way_makes_a_checkpoint_give_up_not_wait(path: str) -> None:
    async with open_sqlite_store(path, checkpoint_interval=NEVER, wal_max_bytes=SMALL_WAL) as store:
        await commits(store, 10)
        with plain(path) as reader:
            # A read transaction (as ``chatd backup`` holds for its whole copy)
            # keeps its snapshot: nothing committed after it can be copied,
            # and the WAL cannot start over.
            reader.execute("BEGIN")
            assert reader.execute("SELECT count(*) FROM messages").fetchone() == (10,)
            await commits(store, 200, first=10)
            done = await store.checkpoint()
            assert modes(done) == [("PASSIVE", "done"), ("RESTART", "busy")]
            assert done[0].left > 0
            # The writer was not held waiting for the reader: it commits.
            await commits(store, 5, first=210)
            reader.execute("COMMIT")
        done = await store.checkpoint()
        assert modes(done) == [("PASSIVE", "done"), ("RESTART", "done")]
        assert done[0].left == 0


async def test_nothing_committed_is_lost_while_checkpoints_run(path: str) -> None:
    """Writers in several rooms commit without a pause while rounds run one
    after the other (with a bound of one byte, every round that finds frames
    holds the writer between groups for a RESTART, or a TRUNCATE when no
    commit came since the round before); then every message is there, each
    room's seqs dense and in commit order, and the database sound."""
    rooms, per_task, tasks = ["general", "random", "r3"], 150, 3
    recorders = [Recorder() for _ in range(tasks)]
    seen: list[str] = []
    async with open_sqlite_store(path, checkpoint_interval=NEVER, wal_max_bytes=1) as store:
        writing = True

        async def write(k: int) -> None:
            for i in range(per_task):
                await store.append(msg(i, room=rooms[k], user=k + 1), recorders[k])
                if i % 10 == 0:
                    await store.flush()

        async def checkpoint() -> None:
            while writing:
                seen.extend(c.mode for c in await store.checkpoint())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(checkpoint)
            async with trio.open_nursery() as writers:
                for k in range(tasks):
                    writers.start_soon(write, k)
            writing = False
        await store.flush()
        assert {"RESTART", "TRUNCATE"} & set(seen)
        for k in range(tasks):
            assert [r.seq for r in recorders[k].stored] == list(range(1, per_task + 1))
    # Reopened: all of it, in order, and the file sound.
    async with open_sqlite_store(path, checkpoint_interval=NEVER) as store:
        for k in range(tasks):
            page, total = await store.history(room_channel(rooms[k]), 1000, 0)
            assert total == per_task
            assert [m.id for m in page] == [r.id for r in recorders[k].stored]
    assert sqlite_rows(path, "PRAGMA integrity_check") == [("ok",)]


# --- the timer ---------------------------------------------------------------------


async def test_the_timer_runs_rounds_while_commits_happen_then_stops(
    path: str, mock_clock: trio.testing.MockClock
) -> None:
    """On a clock that moves only when the test says: a round one interval
    after a commit, another after an interval without any (which truncates),
    then none until the next commit."""
    metrics = Metrics()

    def passives() -> float:
        labels = {"mode": "PASSIVE", "result": "done"}
        return metrics.registry.get_sample_value("chatd_sqlite_checkpoints_total", labels) or 0.0

    async with open_sqlite_store(path, metrics=metrics, checkpoint_interval=30.0) as store:
        await commits(store, 20)
        await trio.testing.wait_all_tasks_blocked()  # the timer is asleep
        mock_clock.jump(29)
        await trio.testing.wait_all_tasks_blocked()
        assert passives() == 0
        mock_clock.jump(1)
        done = await store.next_round()
        assert modes(done) == [("PASSIVE", "done")]
        assert done[0].left == 0
        # The next interval has no commit: the round after it truncates.
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(30)
        done = await store.next_round()
        assert modes(done) == [("PASSIVE", "done"), ("TRUNCATE", "done")]
        assert wal_size(path) == 0
        # Then no timer at all while nothing is committed: ten intervals pass,
        # and a round asked for now is the only one since.
        for _ in range(10):
            mock_clock.jump(30)
            await trio.testing.wait_all_tasks_blocked()
        await store.checkpoint()
        assert passives() == 3
        # A commit starts it again.
        await commits(store, 1, first=20)
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(30)
        assert [c.mode for c in await store.next_round()] == ["PASSIVE"]


# --- closing ---------------------------------------------------------------------


async def test_a_store_closed_during_a_round_closes_cleanly(path: str) -> None:
    """A round waits to hold the writer (for its RESTART) while the writer is
    in a group that will not end until the store has begun to close; the
    close waits for both, then the last connection's close removes the
    WAL. Every message queued is committed."""
    entered, release = threading.Event(), threading.Event()

    def block(conn: sqlite3.Connection) -> str:
        entered.set()
        release.wait()
        return "released"

    rec = Recorder()
    rounds: list[list[Checkpoint]] = []
    async with trio.open_nursery() as nursery:
        async with open_sqlite_store(
            path, checkpoint_interval=NEVER, wal_max_bytes=SMALL_WAL
        ) as store:
            await commits(store, 200)  # past the bound: the round wants a RESTART
            nursery.start_soon(store.write, block)
            await trio.to_thread.run_sync(entered.wait)

            async def round_() -> None:
                rounds.append(await store.checkpoint())

            nursery.start_soon(round_)
            await trio.to_thread.run_sync(store._gate.wanted.wait)
            # Queued behind the held group; committed before the close ends.
            for i in range(5):
                await store.append(msg(1000 + i, room="random"), rec)

            async def release_once_closing() -> None:
                await trio.testing.wait_all_tasks_blocked()
                release.set()

            nursery.start_soon(release_once_closing)
    assert len(rec.stored) == 5
    assert modes(rounds[0]) == [("PASSIVE", "done"), ("RESTART", "done")]
    assert wal_size(path) == 0  # checkpointed and removed at the last close
    assert sqlite_rows(path, "SELECT count(*) FROM messages") == [(205,)]
    assert sqlite_rows(path, "PRAGMA integrity_check") == [("ok",)]
    assert not [t for t in threading.enumerate() if t.name.startswith("chatd-sqlite")]


# --- metrics -----------------------------------------------------------------------


async def test_checkpoints_are_counted(path: str) -> None:
    metrics = Metrics()
    get = metrics.registry.get_sample_value
    async with open_sqlite_store(
        path, metrics=metrics, checkpoint_interval=NEVER, wal_max_bytes=SMALL_WAL
    ) as store:
        await commits(store, 200)
        await store.checkpoint()  # PASSIVE, RESTART
        await store.checkpoint()  # idle: PASSIVE, TRUNCATE
        for mode in ("PASSIVE", "RESTART", "TRUNCATE"):
            count = 2 if mode == "PASSIVE" else 1
            assert get("chatd_sqlite_checkpoints_total", {"mode": mode, "result": "done"}) == (
                count
            )
            assert get("chatd_sqlite_checkpoint_seconds_count", {"mode": mode}) == count
        assert get("chatd_sqlite_wal_bytes") == 0
        assert get("chatd_sqlite_wal_frames") == 0
        assert get("chatd_sqlite_wal_frames_left") == 0
        await commits(store, 3, first=200)
        (passive,) = await store.checkpoint()
        assert get("chatd_sqlite_wal_bytes") == passive.wal_bytes > 0
        assert get("chatd_sqlite_wal_frames") == passive.frames > 0
