"""``chatd migrate``: a SQLite database written by the real store, copied
into a real PostgreSQL, then read back through the PostgreSQL store: the
same history, recovery, search and ids, new ids past the old ones;
an interrupted copy resumed; every refusal in one line; the check catching
a difference.
"""

from __future__ import annotations

import io
import os
import sqlite3
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from chatd import migrate
from chatd.config import Config, RoomsConfig, from_dict
from chatd.moderation import Moderation
from chatd.search import Request, parse
from chatd.store import NewMessage, StoredMessage, dm_channel, room_channel
from chatd.store.postgres import open_postgres_store
from chatd.store.sqlite import open_sqlite_store
from tests.helpers.store import CREATED, changed, stored

pytestmark = pytest.mark.usefixtures("postgres")

ROOT = Path(__file__).resolve().parent.parent


def pg_config(dsn: str) -> Config:
    return from_dict(
        {"auth": {"jwt_secret": "x" * 32}, "storage": {"backend": "postgres", "dsn": dsn}},
        source="new.toml",
    )


def text(content: str, room: str | None = "general", user: int = 1, **kw: Any) -> NewMessage:
    kw.setdefault("message_type", "text")
    return NewMessage(
        user_id=user, username=f"user{user}", content=content, created_at=CREATED, room=room, **kw
    )


ROOMS = RoomsConfig(
    public=("general", "random"), private={"staff": (1, 2)}, owners={"general": (9,)}
)


async def fill(path: str, messages: int = 40) -> dict[str, Any]:
    """A database as a node leaves it: rooms public and private, messages
    in rooms and conversations (one with a NUL, one with mentions, a
    notification), edits and deletions among them, a ban and a role, a
    block, read markers, a purged horizon, a pending webhook."""
    async with open_sqlite_store(path) as store:
        await store.declare_rooms(ROOMS)
        for uid in (1, 2, 3, 9):
            await store.upsert_user(uid, f"user{uid}")
        ids: list[int] = []
        for i in range(messages):
            room = ("general", "random", "staff", None)[i % 4]
            kw: dict[str, Any] = {"to_user_id": 2} if room is None else {}
            result = await stored(store, text(f"message {i} café", room=room, **kw))
            assert isinstance(result, StoredMessage)
            ids.append(result.id)
            if i % 7 == 3:
                await changed(store, result.id, f"message {i} modifié")
            if i % 11 == 5:
                await changed(store, result.id, None)
        for extra in (
            text("nul\x00inside"),
            text("hello @user3", mentions=(3,)),
            text("", room=None, user=0, to_user_id=1, message_type="notification",
                 data=b'{"k": [1, 2]}'),
        ):  # fmt: skip
            result = await stored(store, extra)
            assert isinstance(result, StoredMessage)
            ids.append(result.id)
        await changed(store, ids[1], "the last id handed out is this edit's")
        await store.moderate(
            Moderation(action="ban", room="general", actor_id=9, user_id=3, at=1.0, reason="r")
        )
        await store.block(1, 3, True)
        await store.save_read_state([(1, room_channel("general"), ids[4], 2)], [])
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO purged (channel, id, seq) VALUES ('r:random', 0, 0)")
    conn.execute(
        "INSERT INTO webhook_outbox (event, body, due) VALUES ('message.created', x'7b7d', 0)"
    )
    conn.commit()
    conn.close()
    return {"ids": ids}


def entry(e: Any) -> tuple[Any, ...]:
    if isinstance(e, StoredMessage):
        m = e.message
        return ("message", e.id, e.seq, m.user_id, m.content, m.edited_at, m.data, m.mentions)
    return ("event", e.id, e.kind, e.message_id, e.user_id, e.at)


async def channels_of(store: Any) -> dict[str, Any]:
    """What clients read: each channel's history, its recovery from the
    start (messages, edits and deletions in order), and user 1's unread
    counts and blocks."""
    out: dict[str, Any] = {}
    for channel in (
        room_channel("general"), room_channel("random"), room_channel("staff"),
        dm_channel(1, 2), dm_channel(0, 1),
    ):  # fmt: skip
        history, total = await store.history(channel, 1000, 0)
        missed = await store.missed(channel, 0, 1000)
        replay, more = await store.replay(channel, missed.after_seq, missed.after_id, 1000)
        out[channel] = ([entry(m) for m in history], total, [entry(e) for e in replay], more)
    out["unread"] = sorted(await store.unread(1))
    out["blocks"] = await store.blocks(1)
    return out


async def test_a_database_moves_whole_and_new_ids_come_after_it(
    tmp_path: Path, pg_dsn: str
) -> None:
    path = str(tmp_path / "chatd.db")
    world = await fill(path)
    async with open_sqlite_store(path) as lite:
        before = await channels_of(lite)
        found_before = await lite.search(Request(1, parse("cafe"), None, None, 50, 60.0, 0.0))
    conn = sqlite3.connect(path)
    (top,) = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
    conn.close()
    assert top > max(world["ids"])  # (the last id handed out was an edit's)
    out = io.StringIO()
    assert migrate.run(pg_config(pg_dsn), path, resume=False, out=out) == 0, out.getvalue()
    assert "all equal" in out.getvalue()
    import psycopg

    with psycopg.connect(pg_dsn) as conn:
        # each channel's messages and events numbered 1, 2, ... in id order
        # (after a purged horizon: from its seq), as PostgreSQL's writer does
        rows = conn.execute(
            "SELECT channel, id, pos FROM messages UNION ALL"
            " SELECT channel, id, pos FROM message_events ORDER BY channel, id"
        ).fetchall()
        last = dict(conn.execute("SELECT name, pos FROM channels").fetchall())
    positions: dict[str, list[int]] = {}
    for channel, _, pos in rows:
        positions.setdefault(channel, []).append(pos)
    assert positions and all(p == list(range(1, len(p) + 1)) for p in positions.values())
    assert last == {c: len(p) for c, p in positions.items()}
    async with open_postgres_store(pg_dsn) as pg:
        assert await channels_of(pg) == before
        found = await pg.search(Request(1, parse("cafe"), None, None, 50, 60.0, 0.0))
        assert [m.id for m in found.found] == [m.id for m in found_before.found]
        assert found.found  # (the corpus has some)
        # a new message: an id past every old one, the next seq of its room
        new = await stored(pg, text("après"))
        assert isinstance(new, StoredMessage)
        assert new.id == top + 1
        general = before[room_channel("general")][0]
        assert new.seq == max(e[2] for e in general) + 1
        edit = await pg.versions(world["ids"][0], 1)
        await changed(pg, world["ids"][0], "edited after the move")
        assert len(await pg.versions(world["ids"][0], 1)) == len(edit) + 1
        assert before["blocks"] == [3] and before["unread"]  # (the copy had them to carry)


async def test_an_interrupted_copy_goes_on_with_resume(tmp_path: Path, pg_dsn: str) -> None:
    path = str(tmp_path / "chatd.db")
    await fill(path)
    config = pg_config(pg_dsn)
    batches: list[str] = []

    def crash(name: str) -> None:
        batches.append(name)
        if name == migrate.LOG and batches.count(name) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        migrate.run(config, path, resume=False, out=io.StringIO(), batch=4, after_batch=crash)
    with pytest.raises(migrate.MigrationError, match="interrupted migration; --resume"):
        migrate.run(config, path, resume=False, out=io.StringIO())
    out = io.StringIO()
    assert migrate.run(config, path, resume=True, out=out, batch=4) == 0, out.getvalue()
    assert "done before" in out.getvalue() and "all equal" in out.getvalue()
    async with open_sqlite_store(path) as lite:
        before = await channels_of(lite)
    async with open_postgres_store(pg_dsn) as pg:
        assert await channels_of(pg) == before
    with pytest.raises(migrate.MigrationError, match="has finished already"):
        migrate.run(config, path, resume=True, out=io.StringIO())


async def test_interrupted_after_the_last_batch_resume_still_finishes(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Every row copied, then stopped before the channels' rows and the
    sequences: a resume writes them (and only then is it finished)."""
    path = str(tmp_path / "chatd.db")
    world = await fill(path, messages=8)
    config = pg_config(pg_dsn)

    def crash(name: str) -> None:
        if name == migrate.FINISHED:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        migrate.run(config, path, resume=False, out=io.StringIO(), after_batch=crash)
    out = io.StringIO()
    assert migrate.run(config, path, resume=True, out=out) == 0, out.getvalue()
    async with open_postgres_store(pg_dsn) as pg:
        new = await stored(pg, text("after"))
        assert isinstance(new, StoredMessage) and new.id > max(world["ids"])


async def test_refusals_are_one_line_each(tmp_path: Path, pg_dsn: str) -> None:
    path = str(tmp_path / "chatd.db")
    await fill(path, messages=4)
    config = pg_config(pg_dsn)
    with pytest.raises(migrate.MigrationError, match="no such SQLite database"):
        migrate.run(config, str(tmp_path / "missing.db"), resume=False)
    with pytest.raises(migrate.MigrationError, match=r'backend: "postgres" is the target'):
        migrate.run(from_dict({"auth": {"jwt_secret": "x" * 32}}), path, resume=False)
    with pytest.raises(migrate.MigrationError, match="no migration to resume"):
        migrate.run(config, path, resume=True)
    # a database a node has used already
    async with open_postgres_store(pg_dsn) as pg:
        await pg.declare_rooms(ROOMS)
    with pytest.raises(migrate.MigrationError, match=r"not empty \(0 messages, 0 users, 3 rooms\)"):
        migrate.run(config, path, resume=False)


async def test_the_check_names_what_differs(tmp_path: Path, pg_dsn: str) -> None:
    import psycopg

    path = str(tmp_path / "chatd.db")
    await fill(path, messages=8)
    assert migrate.run(pg_config(pg_dsn), path, resume=False, out=io.StringIO()) == 0
    src = sqlite3.connect(path)
    try:
        with psycopg.connect(pg_dsn, autocommit=True) as dst:
            assert migrate.verify(src, dst) == []
            dst.execute("UPDATE messages SET content = 'changed' WHERE id = 2")
            dst.execute("DELETE FROM blocks")
            problems = migrate.verify(src, dst)
    finally:
        src.close()
    channel = (
        sqlite3.connect(path).execute("SELECT channel FROM messages WHERE id = 2").fetchone()[0]
    )
    assert problems == [
        "blocks: 1 rows in SQLite, 0 in PostgreSQL",
        f"messages differ in 1 channels: {channel}",
    ]


async def test_the_command_line(tmp_path: Path, pg_dsn: str) -> None:
    path = str(tmp_path / "chatd.db")
    await fill(path, messages=6)
    toml = tmp_path / "new.toml"
    toml.write_text(
        f'[auth]\njwt_secret = "{"x" * 32}"\n[storage]\nbackend = "postgres"\ndsn = "{pg_dsn}"\n'
    )
    command = [sys.executable, "-m", "chatd", "migrate", "--config", str(toml), "--from-sqlite"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = partial(trio.run_process, capture_stderr=True, check=False, env=env, cwd=ROOT)
    done = await run([*command, path])
    stderr = done.stderr.decode()
    assert done.returncode == 0, stderr
    assert "messages: 9, with their edits and deletions" in stderr
    assert "all equal (9 messages)" in stderr
    again = await run([*command, path])
    stderr = again.stderr.decode()
    assert again.returncode == 1
    assert stderr.count("\n") == 1 and "has finished already" in stderr
    assert "Traceback" not in stderr


# --- the move, end to end: one node drained, migrated, two nodes ------------------------


async def test_clients_recover_across_the_move_without_a_gap_or_a_repeat(
    make_config: Callable[..., Config], pg_dsn: str, redis: Any, redis_prefix: str
) -> None:
    """docs/scaling.md's move as a user lives it: a single SQLite node with
    clients on it is drained (SIGTERM's path: 1001), its database migrated,
    two nodes started on PostgreSQL and Redis; a client that was away
    recovers with ``since_id`` exactly what it missed before and after the
    move, one that was connected through it misses nothing, history keeps
    every id, and new ids follow the old ones."""
    from tests.helpers.clients import closed_with
    from tests.helpers.cluster import connect_to, running_cluster
    from tests.helpers.servers import running
    from tests.test_cluster import ask, join, room_messages, said

    config = make_config()
    async with running(config) as single:
        async with connect_to(single, 2, "bob") as bob, connect_to(single, 3, "carol") as carol:
            await join(bob)
            await join(carol)
            async with connect_to(single, 1, "alice") as alice:
                await join(alice)
                seen = [await said(bob, f"before {i}") for i in range(3)]
                assert await room_messages(alice, 3) == seen
            away = [await said(bob, f"while alice is away {i}") for i in range(2)]
            assert await room_messages(carol, 5) == seen + away
            single.stop()  # the drain
            await closed_with(bob, 1001, skip=True)
            await closed_with(carol, 1001)
    out = io.StringIO()
    assert migrate.run(pg_config(pg_dsn), config.storage.sqlite_path, False, out) == 0, (
        out.getvalue()
    )
    async with running_cluster(make_config, pg_dsn, redis.url, redis_prefix, 2) as cluster:
        async with (
            connect_to(cluster[0], 2, "bob") as bob,
            connect_to(cluster[1], 3, "carol") as carol,
        ):
            ack = await join(carol, since_id=away[-1]["id"])
            assert ack["recovered"] is True
            await join(bob, since_id=away[-1]["id"])
            after = [await said(bob, f"after the move {i}") for i in range(2)]
            assert after[0]["id"] > away[-1]["id"]
            assert await room_messages(carol, 2) == after
            async with connect_to(cluster[1], 1, "alice") as alice:
                ack = await join(alice, since_id=seen[-1]["id"])
                assert ack["recovered"] is True
                assert await room_messages(alice, 4) == away + after
                await nothing_but_presence(alice)
                history = await ask(alice, "room_history", {"room": "general", "limit": 50}, "h")
                assert [m["id"] for m in history["data"]["messages"]] == [
                    m["id"] for m in seen + away + after
                ]
            # carol, connected through the move, got nothing twice
            await nothing_but_presence(carol)


async def nothing_but_presence(client: Any) -> None:
    """Nothing is waiting but presence (which crosses nodes in its own
    time): a ping's pong comes after presence frames only."""
    frame = await client.request("ping", {}, request_id="end")
    while frame["type"] != "pong":
        assert frame["type"] in ("user_connected", "user_disconnected"), frame
        frame = await client.recv()


def test_progress_is_a_bar_in_a_terminal_and_lines_elsewhere() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    plain, terminal = io.StringIO(), Terminal()
    for out in (plain, terminal):
        progress = migrate.Progress(out)
        progress.step("messages", 500, 1000, 0.0)
        progress.say("messages: 1,000")
    assert plain.getvalue() == "messages: 1,000\n"
    bar = terminal.getvalue()
    assert bar.startswith("\r\x1b[Kmessages [" + "#" * 15 + " " * 15 + "]  50% 500/1,000")
    assert bar.endswith("\r\x1b[Kmessages: 1,000\n")
