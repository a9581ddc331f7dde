"""``chatd user ...`` and ``chatd room ...`` as a real subprocess, alone and
beside a running server on the same database."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from chatd.config import load
from tests.helpers.clients import connect
from tests.helpers.servers import REPO, free_port, one_line_failure, running, write_config
from tests.helpers.store import PEOPLE


async def chatd(config_file: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m chatd GROUP ACTION --config FILE ARGS...``."""
    group, action, *rest = args
    argv = [sys.executable, "-m", "chatd", group, action, "--config", str(config_file), *rest]
    with trio.fail_after(60):
        return await trio.run_process(
            argv, cwd=REPO, check=False, capture_stdout=True, capture_stderr=True
        )


def ok(done: subprocess.CompletedProcess[bytes]) -> str:
    assert done.returncode == 0, done.stderr
    assert done.stderr == b""
    return done.stdout.decode()


async def listing(config_file: Path) -> list[str]:
    return ok(await chatd(config_file, "room", "list")).splitlines()


async def test_room_create_and_list(config_file):
    out = ok(await chatd(config_file, "room", "create", "lounge"))
    assert out == "room lounge created (public, 0 members)\n"
    out = ok(
        await chatd(
            config_file, "room", "create", "vault", "--private", "--member", "5", "--member", "1"
        )
    )
    assert out == "room vault created (private, 2 members)\n"
    assert await listing(config_file) == [
        "general  public",
        "lounge  public",
        "random  public",
        "staff  private  members: 1, 2",
        "vault  private  members: 1, 5",
    ]


async def test_creating_a_room_twice_fails_with_one_line(config_file):
    ok(await chatd(config_file, "room", "create", "lounge", "--member", "3"))
    before = await listing(config_file)
    err = one_line_failure(await chatd(config_file, "room", "create", "lounge", "--private"))
    assert "lounge" in err and "already exists" in err
    err = one_line_failure(await chatd(config_file, "room", "create", "general"))
    assert "general" in err
    assert await listing(config_file) == before  # nothing changed, not even privacy


async def test_add_member(config_file):
    ok(await chatd(config_file, "room", "create", "vault", "--private", "--member", "1"))
    out = ok(await chatd(config_file, "room", "add-member", "vault", "7", "3"))
    assert out == "room vault: added 7, 3\n"
    ok(await chatd(config_file, "room", "add-member", "vault", "3"))  # again: no change
    ok(await chatd(config_file, "room", "add-member", "staff", "9"))
    rooms = await listing(config_file)
    assert "vault  private  members: 1, 3, 7" in rooms
    assert "staff  private  members: 1, 2, 9" in rooms

    err = one_line_failure(await chatd(config_file, "room", "add-member", "nowhere", "1"))
    assert "nowhere" in err
    assert not any(line.startswith("nowhere") for line in await listing(config_file))


async def test_user_add(config_file, db_path):
    assert ok(await chatd(config_file, "user", "add", "--user-id", "42", "--username", "zed")) == (
        "user 42 (zed) added\n"
    )
    ok(await chatd(config_file, "user", "add", "--user-id", "42", "--username", "Zed II"))
    one_line_failure(await chatd(config_file, "user", "add", "--user-id", "43", "--username", ""))
    with sqlite3.connect(db_path) as db:
        assert db.execute(PEOPLE).fetchall() == [(42, "Zed II")]


@pytest.mark.parametrize(
    "args",
    [
        ("room", "create", "bad name"),
        ("room", "create", "x" * 65),
        ("room", "create", ""),
        ("room", "create", "semi;colon"),
        ("room", "add-member", "bad/name", "1"),
        ("room", "create", "fine", "--member", "abc"),
        ("room", "add-member", "general"),
        ("user", "add", "--user-id", "0", "--username", "zero"),
    ],
)
async def test_bad_arguments_exit_2(config_file, args):
    done = await chatd(config_file, *args)
    assert done.returncode == 2, done.stderr
    assert b"usage:" in done.stderr and b"Traceback" not in done.stderr
    assert done.stdout == b""
    assert await listing(config_file) == [
        "general  public",
        "random  public",
        "staff  private  members: 1, 2",
    ]


async def test_rooms_made_with_the_cli_work_at_once_in_a_running_server(config_file):
    async with running(load(config_file)) as server:
        async with connect(server, 1, "alice") as alice, connect(server, 2, "bob") as bob:
            err = await alice.request("join_room", {"room": "lounge"})
            assert err["data"]["code"] == "ROOM_NOT_FOUND"
            ok(await chatd(config_file, "room", "create", "lounge"))
            ack = await alice.request("join_room", {"room": "lounge"})
            assert ack["type"] == "join_room_ack" and ack["data"]["room"] == "lounge"
            sent = await alice.request("room_message", {"room": "lounge", "content": "first!"})
            assert sent["type"] == "room_message"

            ok(await chatd(config_file, "room", "create", "vault", "--private", "--member", "1"))
            assert (await alice.request("join_room", {"room": "vault"}))["type"] == "join_room_ack"
            err = await bob.request("join_room", {"room": "vault"})
            assert err["data"]["code"] == "PERMISSION_DENIED"
            assert err["data"]["details"] == {"room": "vault"}
            err = await bob.request("room_history", {"room": "vault"})
            assert err["data"]["code"] == "PERMISSION_DENIED"

            ok(await chatd(config_file, "room", "add-member", "vault", "2"))
            ack = await bob.request("join_room", {"room": "vault"})
            assert ack["type"] == "join_room_ack"
            assert sorted(m["user_id"] for m in ack["data"]["members"]) == [1, 2]
            assert (await alice.expect("user_connected"))["data"]["room"] == "vault"
            history = await bob.request("room_history", {"room": "lounge"})
            assert history["data"]["messages"] == [sent["data"]]

    assert "vault  private  members: 1, 2" in await listing(config_file)


# --- the same commands on PostgreSQL ---------------------------------------------


def pg_config(tmp_path: Path, dsn: str) -> Path:
    """``write_config``'s file, storing in PostgreSQL at ``dsn``."""
    path = write_config(tmp_path, tmp_path / "unused.db")
    text = path.read_text().replace(
        "[storage]\n", f'[storage]\nbackend = "postgres"\ndsn = "{dsn}"\n'
    )
    path.write_text(text)
    return path


def run_cli(
    capsys: pytest.CaptureFixture[str], config_file: Path, *args: str
) -> tuple[int, str, str]:
    """``chatd GROUP ACTION --config FILE ARGS...`` in this process."""
    from chatd.cli import main

    group, action, *rest = args
    code = main([group, action, "--config", str(config_file), *rest])
    out, err = capsys.readouterr()
    return code, out, err


async def test_user_and_room_commands_on_postgres(tmp_path, pg_dsn, capsys):
    import psycopg

    from chatd.store import RoomAccess
    from chatd.store.postgres import open_postgres_store

    config_file = pg_config(tmp_path, pg_dsn)

    def cli(*args: str) -> tuple[int, str, str]:
        return run_cli(capsys, config_file, *args)

    assert cli("room", "create", "lounge") == (0, "room lounge created (public, 0 members)\n", "")
    assert cli("room", "create", "vault", "--private", "--member", "5", "--member", "1") == (
        0,
        "room vault created (private, 2 members)\n",
        "",
    )
    code, out, err = cli("room", "create", "lounge", "--private")
    assert (code, out) == (1, "") and err.count("\n") == 1
    assert "lounge" in err and "already exists" in err
    assert cli("room", "add-member", "vault", "7", "3") == (0, "room vault: added 7, 3\n", "")
    code, out, err = cli("room", "add-member", "nowhere", "1")
    assert (code, out) == (1, "") and "nowhere" in err and err.count("\n") == 1
    assert cli("user", "add", "--user-id", "42", "--username", "zed") == (
        0,
        "user 42 (zed) added\n",
        "",
    )
    assert cli("user", "add", "--user-id", "42", "--username", "Zed II")[0] == 0
    assert cli("room", "create", "Zoo")[0] == 0
    # The same listing as on SQLite (byte order: upper case first).
    assert cli("room", "list") == (
        0,
        "Zoo  public\n"
        "general  public\n"
        "lounge  public\n"
        "random  public\n"
        "staff  private  members: 1, 2\n"
        "vault  private  members: 1, 3, 5, 7\n",
        "",
    )
    with psycopg.connect(pg_dsn) as db:
        assert db.execute(PEOPLE).fetchall() == [(42, "Zed II")]
    # A server on the same database sees it all.
    async with open_postgres_store(pg_dsn) as store:
        assert await store.room_access("vault", 3) == RoomAccess("vault", True, True)
        assert await store.room_access("vault", 2) == RoomAccess("vault", True, False)
        assert await store.user_exists(42)


async def test_backup_on_postgres_points_to_pg_dump(tmp_path, pg_dsn):
    config_file = pg_config(tmp_path, pg_dsn)
    argv = [sys.executable, "-m", "chatd", "backup", "--config", str(config_file)]
    with trio.fail_after(60):
        done = await trio.run_process(
            [*argv, "--to", str(tmp_path / "copy.db")],
            cwd=REPO,
            check=False,
            capture_stdout=True,
            capture_stderr=True,
        )
    err = one_line_failure(done, code=2)
    assert "pg_dump" in err
    assert not (tmp_path / "copy.db").exists()


async def test_an_unreachable_postgres_is_one_line(tmp_path):
    dsn = f"host=127.0.0.1 port={free_port()} user=nobody password=hunter2 dbname=chat"
    config_file = pg_config(tmp_path, dsn)
    err = one_line_failure(await chatd(config_file, "room", "list"))
    assert err.startswith("chatd: database 127.0.0.1:")
    assert "/chat: " in err and "hunter2" not in err


async def test_roles_audit_export_and_erase_on_postgres(tmp_path, pg_dsn, capsys):
    """The moderation and privacy commands on PostgreSQL, as on SQLite."""
    import json

    config_file = pg_config(tmp_path, pg_dsn)

    def cli(*args: str) -> tuple[int, str, str]:
        return run_cli(capsys, config_file, *args)

    assert cli("user", "add", "--user-id", "42", "--username", "zed")[0] == 0
    assert cli("room", "set-role", "general", "42", "moderator") == (
        0,
        "room general: user 42 is moderator\n",
        "",
    )
    code, out, _ = cli("room", "audit", "general")
    assert code == 0 and out.rstrip().endswith("set_role moderator  user 42  by config/CLI/API")
    target = tmp_path / "zed.json"
    assert cli("user", "export", "--user-id", "42", "--to", str(target)) == (
        0,
        f"user 42 exported to {target} (0 messages)\n",
        "",
    )
    assert json.loads(target.read_text())["roles"] == [{"room": "general", "role": "moderator"}]
    assert cli("user", "erase", "--user-id", "42") == (
        0,
        "user 42 erased: 0 messages are tombstones now\n",
        "",
    )
    again = tmp_path / "zed-after.json"
    assert cli("user", "export", "--user-id", "42", "--to", str(again))[0] == 0
    erased = json.loads(again.read_text())
    assert erased["user"]["username"] == "deleted user 42" and erased["roles"] == []
    code, out, err = cli("user", "erase", "--user-id", "404")
    assert (code, out) == (1, "") and err.count("\n") == 1 and "no user 404" in err
