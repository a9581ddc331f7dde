"""``chatd backup``: a real subprocess copying the database of a real server
that keeps committing messages meanwhile; and the copy's one snapshot."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import trio

from chatd.config import Config, load
from chatd.store.schema import connect as db_connect
from chatd.store.schema import migrate
from chatd.store.sqlite import backup
from tests.helpers.clients import connect
from tests.helpers.servers import REPO, one_line_failure, running
from tests.helpers.store import sqlite_rows

BULK = 20_000  # messages stored before the server starts: the copy takes several steps


async def chatd_backup(config_file: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    argv = [sys.executable, "-m", "chatd", "backup", "--config", str(config_file), *args]
    with trio.fail_after(60):
        return await trio.run_process(
            argv, cwd=REPO, check=False, capture_stdout=True, capture_stderr=True
        )


def seed(db_path: Path, count: int = BULK) -> None:
    """Store ``count`` messages in the room ``random`` before any server runs."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    conn = db_connect(str(db_path))
    try:
        migrate(conn)
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO messages (channel, seq, user_id, username, message_type, content,"
            " created_at) VALUES ('r:random', ?, 3, 'carol', 'text', ?, '2025-01-01T00:00:00Z')",
            [(seq, f"bulk {seq} " + "x" * 200) for seq in range(1, count + 1)],
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


def content(path: Path) -> bytes:
    return path.read_bytes()


def write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def leftovers(directory: Path) -> list[str]:
    return [name for name in names(directory) if name.endswith(".tmp")]


async def test_backup_while_the_server_commits(
    tmp_path: Path, db_path: Path, config_file: Path, make_config: Callable[..., Config]
) -> None:
    seed(db_path)
    target = tmp_path / "backups" / "chatd-copy.db"
    target.parent.mkdir()
    config = make_config(limits={"messages_per_minute": 100_000, "messages_per_hour": 100_000})
    async with running(config) as server, connect(server, 1, "alice") as alice:
        await alice.join("general")
        before = []
        for i in range(20):
            sent = await alice.request("room_message", {"room": "general", "content": f"m{i}"})
            assert sent["type"] == "room_message", sent
            before.append(sent["data"]["id"])

        # The backup runs in a subprocess while this task keeps committing.
        done: list[subprocess.CompletedProcess[bytes]] = []
        during: list[int] = []
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                done.append(await chatd_backup(config_file, "--to", str(target)))

            nursery.start_soon(run)
            with trio.fail_after(60):
                while not done:
                    sent = await alice.request(
                        "room_message", {"room": "general", "content": f"during {len(during)}"}
                    )
                    assert sent["type"] == "room_message", sent
                    if not done:
                        during.append(sent["data"]["id"])
        assert during, "no message was committed while the backup ran"

        # And after: the server still commits and delivers.
        after = await alice.request("room_message", {"room": "general", "content": "after"})
        assert after["type"] == "room_message" and after["data"]["id"] > during[-1]
        history = await alice.request("room_history", {"room": "general", "limit": 1})
        assert history["data"]["messages"][0]["content"] == "after"

    (result,) = done
    assert result.returncode == 0 and result.stderr == b"", result.stderr
    line = result.stdout.decode()
    match = re.fullmatch(r"backup (.+): (\d+) bytes, (\d+) messages\n", line)
    assert match, line
    assert match[1] == str(target)
    assert int(match[2]) == len(content(target))
    assert leftovers(target.parent) == []
    assert names(target.parent) == [target.name]  # no -wal, -shm, temp file

    assert sqlite_rows(target, "PRAGMA integrity_check") == [("ok",)]
    assert sqlite_rows(target, "PRAGMA journal_mode") == [("delete",)]  # one self-contained file
    (count,) = sqlite_rows(target, "SELECT count(*) FROM messages")[0]
    assert int(match[3]) == count
    general = "SELECT id FROM messages WHERE channel = 'r:general' ORDER BY id"
    copied = [r[0] for r in sqlite_rows(target, general)]
    # One consistent snapshot: every message acknowledged before the backup,
    # then a prefix of those committed during it, and nothing after it.
    assert copied[: len(before)] == before
    assert copied == (before + during)[: len(copied)]
    assert sqlite_rows(
        target, "SELECT count(*), max(seq) FROM messages WHERE channel = 'r:random'"
    ) == [(BULK, BULK)]
    assert count == BULK + len(copied)
    live = sqlite_rows(
        db_path, f"SELECT id, content FROM messages WHERE id IN ({','.join(map(str, copied))})"
    )
    assert sqlite_rows(
        target, "SELECT id, content FROM messages WHERE channel = 'r:general' ORDER BY id"
    ) == sorted(live)
    # The copy is a chatd database: the server starts on it.
    async with running(make_config(storage={"sqlite_path": str(target)})) as server:
        async with connect(server, 1, "alice") as alice:
            await alice.join("general")
            history = await alice.request("room_history", {"room": "general", "limit": 100})
            assert [m["id"] for m in history["data"]["messages"]] == copied[-100:]


async def test_an_existing_file_is_replaced_only_with_force(
    tmp_path: Path, config_file: Path
) -> None:
    async with running(load(config_file)) as server, connect(server, 1, "alice") as alice:
        await alice.join("general")
        sent = await alice.request("room_message", {"room": "general", "content": "keep me"})
        target = tmp_path / "copy.db"
        write(target, b"yesterday's backup")

        err = one_line_failure(await chatd_backup(config_file, "--to", str(target)))
        assert str(target) in err and "--force" in err
        assert content(target) == b"yesterday's backup"
        assert leftovers(tmp_path) == []

        done = await chatd_backup(config_file, "--to", str(target), "--force")
        assert done.returncode == 0 and done.stderr == b"", done.stderr
        assert done.stdout.decode().endswith(" bytes, 1 messages\n")
        assert leftovers(tmp_path) == []
        assert sqlite_rows(target, "PRAGMA integrity_check") == [("ok",)]
        assert sqlite_rows(target, "SELECT id, content FROM messages") == [
            (sent["data"]["id"], "keep me")
        ]


async def test_clear_one_line_failures(tmp_path: Path, db_path: Path, config_file: Path) -> None:
    err = one_line_failure(await chatd_backup(config_file, "--to", str(tmp_path / "copy.db")))
    assert f"no database at {db_path}" in err
    assert db_path.name not in names(db_path.parent)  # a backup never creates the database

    seed(db_path, 10)
    missing = tmp_path / "no" / "such" / "dir"
    err = one_line_failure(await chatd_backup(config_file, "--to", str(missing / "copy.db")))
    assert err == f"chatd: cannot write {missing / 'copy.db'}: no directory {missing}\n"
    assert names(missing) == []

    err = one_line_failure(await chatd_backup(config_file, "--to", str(tmp_path)))
    assert "is a directory" in err

    before = content(db_path)
    err = one_line_failure(await chatd_backup(config_file, "--to", str(db_path), "--force"))
    assert "live database" in err
    assert content(db_path) == before

    done = await chatd_backup(config_file)
    assert done.returncode == 2 and b"--to" in done.stderr


def test_the_copy_is_one_snapshot_even_when_writes_land_between_steps(db_path: Path) -> None:
    """A page per step, and a commit by another connection after every step:
    the copy is the database as it was when the backup began, and it never
    restarts (one step per page)."""
    seed(db_path, 2000)
    source = db_connect(str(db_path), readonly=True)
    writer = db_connect(str(db_path))
    copy = sqlite3.connect(db_path.with_name("copy.db"), isolation_level=None)
    (pages,) = source.execute("PRAGMA page_count").fetchone()
    steps: list[tuple[int, int]] = []

    def on_step(remaining: int, total: int) -> None:
        steps.append((remaining, total))
        writer.execute(
            "INSERT INTO messages (channel, seq, user_id, username, message_type, content,"
            " created_at) VALUES ('r:general', ?, 1, 'alice', 'text', 'late', 'now')",
            (len(steps),),
        )

    try:
        backup(source, copy, pages=1, on_step=on_step)
        assert len(steps) == pages > 20
        assert steps[-1] == (0, pages)
        assert copy.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert copy.execute("SELECT count(*) FROM messages").fetchone() == (2000,)
        assert writer.execute("SELECT count(*) FROM messages").fetchone() == (2000 + pages,)
    finally:
        copy.close()
        writer.close()
        source.close()
