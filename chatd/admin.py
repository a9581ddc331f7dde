"""``chatd user ...``, ``chatd room ...`` and ``chatd backup``: administration
on the database.

The user and room commands open the configured database directly (the
SQLite file, or PostgreSQL when ``[storage] backend = "postgres"``, through
``chatd.store.postgres.open_admin``), migrating it if it is new and declaring
the config's rooms as the server does, and change it in one short
transaction, so they work while the server runs: the server reads rooms,
memberships and roles from the database again at most 5 seconds later
(what it caches of a room's access) and finds users it has not seen on
their first direct message. ``chatd room set-role`` gives a room's roles
(owner, moderator, member: chatd/moderation.py), logged with the moderators'
actions, which ``chatd room audit`` lists.

``chatd backup`` copies the database with SQLite's online backup API from one
snapshot (WAL: the server keeps writing meanwhile) into a temporary file
beside the target, checks the copy with ``PRAGMA integrity_check``, and only
then renames it into place. It never changes the database it copies. On
PostgreSQL it refuses: that is ``pg_dump``'s job.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec

import chatd.store.sqlite
from chatd.config import ROOM_NAME_PATTERN, Config
from chatd.hub import live_shape
from chatd.moderation import ROLES
from chatd.protocol import rfc3339
from chatd.store import Admin
from chatd.store.schema import connect, migrate
from chatd.store.sqlite import backup, check_copy, declare_rooms


def add_commands(
    commands: Any, config_arg: Callable[[argparse.ArgumentParser], None], user_id: Any
) -> None:
    """Register ``user``, ``room`` and ``backup`` with the CLI's subparsers."""
    user = commands.add_parser("user", help="add, export and erase users")
    user_commands = user.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = user_commands.add_parser("add", help="add (or rename) a user")
    config_arg(add)
    add.add_argument("--user-id", type=user_id, required=True)
    add.add_argument("--username", required=True)
    add.set_defaults(func=_user_add)
    export = user_commands.add_parser("export", help="write a user's data to one JSON file")
    config_arg(export)
    export.add_argument("--user-id", type=user_id, required=True)
    export.add_argument("--to", required=True, metavar="FILE", help="a file that does not exist")
    export.set_defaults(func=_user_export)
    erase = user_commands.add_parser(
        "erase", help="erase a user: their messages become tombstones, their data goes"
    )
    config_arg(erase)
    erase.add_argument("--user-id", type=user_id, required=True)
    erase.set_defaults(func=_user_erase)

    room = commands.add_parser("room", help="create rooms and manage members")
    room_commands = room.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = room_commands.add_parser("create", help="create a room")
    config_arg(create)
    create.add_argument("name", type=_room_name)
    create.add_argument("--private", action="store_true", help="only members may join")
    create.add_argument(
        "--member", type=user_id, action="append", default=[], metavar="ID", help="repeatable"
    )
    create.set_defaults(func=_room_create)
    members = room_commands.add_parser("add-member", help="add members to a room")
    config_arg(members)
    members.add_argument("name", type=_room_name)
    members.add_argument("user_ids", type=user_id, nargs="+", metavar="ID")
    members.set_defaults(func=_room_add_member)
    listing = room_commands.add_parser("list", help="list rooms and their members")
    config_arg(listing)
    listing.set_defaults(func=_room_list)
    role = room_commands.add_parser(
        "set-role", help="make a user a room's owner, moderator or plain member"
    )
    config_arg(role)
    role.add_argument("name", type=_room_name)
    role.add_argument("user_id", type=user_id, metavar="USER_ID")
    role.add_argument("role", choices=ROLES)
    role.set_defaults(func=_room_set_role)
    audit = room_commands.add_parser("audit", help="list a room's moderation actions")
    config_arg(audit)
    audit.add_argument("name", type=_room_name)
    audit.add_argument(
        "--limit", type=_positive, default=100, help="the newest N actions (default 100)"
    )
    audit.set_defaults(func=_room_audit)

    copy = commands.add_parser(
        "backup", help="copy the database to a file, also while the server runs"
    )
    config_arg(copy)
    copy.add_argument("--to", required=True, metavar="FILE", help="the backup file to write")
    copy.add_argument("--force", action="store_true", help="replace FILE if it exists")
    copy.set_defaults(func=_backup)


def _room_name(text: str) -> str:
    if len(text) > 64 or not re.match(ROOM_NAME_PATTERN, text):
        raise argparse.ArgumentTypeError("a room name is 1 to 64 letters, digits or ._:@-")
    return text


@contextmanager
def _database(config: Config) -> Iterator[Admin]:
    if config.storage.backend == "postgres":
        from chatd.store.postgres import open_admin  # psycopg only when configured

        with open_admin(config.storage.dsn, config.rooms) as admin:
            yield admin
        return
    path = config.storage.sqlite_path
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = connect(path, synchronous=config.storage.synchronous)
    try:
        migrate(conn)
        conn.execute("BEGIN IMMEDIATE")
        try:
            declare_rooms(conn, config.rooms)
            yield Admin(conn, chatd.store.sqlite)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    finally:
        conn.close()


def _user_add(config: Config, ns: argparse.Namespace) -> int:
    if not 1 <= len(ns.username) <= 64 or not ns.username.isprintable():
        return _fail("--username must be 1 to 64 printable characters")
    with _database(config) as db:
        db.upsert_user(ns.user_id, ns.username)
    print(f"user {ns.user_id} ({ns.username}) added")
    return 0


def _user_export(config: Config, ns: argparse.Namespace) -> int:
    target = Path(ns.to)
    if target.exists():
        return _fail(f"{ns.to} exists: give a new file")
    with _database(config) as db:
        found = db.export_user(ns.user_id)
    if found is None:
        return _fail(f"no user {ns.user_id}")
    data = {
        "exported_at": rfc3339(time.time()),
        "user": {
            "user_id": found.user_id,
            "username": found.username,
            "created_at": found.created_at,
            "last_seen": found.last_seen,
        },
        "messages": [
            {"type": kind, "data": shape}
            for kind, shape, _ in (live_shape(m) for m in found.messages)
        ],
        "read_markers": [
            {"channel": c, "last_read_id": i, "last_read_seq": q} for c, i, q in found.markers
        ],
        "roles": [{"room": room, "role": role} for room, role in found.roles],
        "bans_and_mutes": [
            {"room": room, "kind": kind, "until": None if until is None else rfc3339(until)}
            for room, kind, until in found.sanctions
        ],
        "private_rooms": found.memberships,
        "blocks": found.blocks,
    }
    try:
        with open(target, "xb") as out:  # (never over an existing file)
            out.write(msgspec.json.format(msgspec.json.encode(data)))
    except FileExistsError:
        return _fail(f"{ns.to} exists: give a new file")
    except OSError as exc:
        return _fail(f"cannot write {ns.to}: {exc.strerror}")
    print(f"user {ns.user_id} exported to {ns.to} ({len(found.messages)} messages)")
    return 0


def _user_erase(config: Config, ns: argparse.Namespace) -> int:
    with _database(config) as db:
        erased = db.erase_user(ns.user_id)
    if erased is None:
        return _fail(f"no user {ns.user_id}")
    print(f"user {ns.user_id} erased: {erased} messages are tombstones now")
    return 0


def _room_create(config: Config, ns: argparse.Namespace) -> int:
    with _database(config) as db:
        created = db.create_room(ns.name, ns.private, tuple(ns.member))
    if not created:
        return _fail(f"room {ns.name!r} already exists (use: chatd room add-member)")
    kind = "private" if ns.private else "public"
    print(f"room {ns.name} created ({kind}, {len(set(ns.member))} members)")
    return 0


def _room_add_member(config: Config, ns: argparse.Namespace) -> int:
    with _database(config) as db:
        found = db.add_members(ns.name, tuple(ns.user_ids))
    if not found:
        return _fail(f"no room named {ns.name!r} (use: chatd room create)")
    print(f"room {ns.name}: added {', '.join(map(str, ns.user_ids))}")
    return 0


def _room_list(config: Config, ns: argparse.Namespace) -> int:
    del ns
    with _database(config) as db:
        rooms = db.list_rooms()
    for name, private, members in rooms:
        who = f"  members: {', '.join(map(str, members))}" if private or members else ""
        print(f"{name}  {'private' if private else 'public'}{who}")
    return 0


def _room_set_role(config: Config, ns: argparse.Namespace) -> int:
    with _database(config) as db:
        found = db.set_role(ns.name, ns.user_id, ns.role, time.time())
    if not found:
        return _fail(f"no room named {ns.name!r} (use: chatd room create)")
    print(f"room {ns.name}: user {ns.user_id} is {ns.role}")
    return 0


def _room_audit(config: Config, ns: argparse.Namespace) -> int:
    with _database(config) as db:
        entries = db.audit(ns.name, ns.limit)
    for e in entries:
        by = "config/CLI/API" if e.actor_id == 0 else f"user {e.actor_id}"
        what = f"{e.action} {e.role}" if e.role else e.action
        line = f"{rfc3339(e.at)}  {what}  user {e.user_id}  by {by}"
        if e.until is not None:
            line += f"  until {rfc3339(e.until)}"
        if e.reason:
            line += f"  reason: {e.reason!r}"
        print(line)
    return 0


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError("expected a whole number >= 1")
    return int(text)


def _backup(config: Config, ns: argparse.Namespace) -> int:
    if config.storage.backend == "postgres":
        print(
            "chatd: backup copies a SQLite database; for PostgreSQL use pg_dump"
            " (e.g. pg_dump --format=custom --file=chatd.dump DBNAME)",
            file=sys.stderr,
        )
        return 2
    source = Path(config.storage.sqlite_path)
    target = Path(ns.to)
    if not source.is_file():
        return _fail(f"no database at {source} (nothing to back up)")
    if target.is_dir():
        return _fail(f"{target} is a directory: --to names the backup file")
    if not target.parent.is_dir():
        return _fail(f"cannot write {target}: no directory {target.parent}")
    live = {source.resolve().with_name(source.name + end) for end in ("", "-wal", "-shm")}
    if target.resolve() in live:
        return _fail(f"{target} is the live database, not a backup")
    if target.exists() and not ns.force:
        return _fail(f"{target} exists (use --force to replace it)")
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        return _fail(f"cannot write in {target.parent}: {exc.strerror}")
    os.close(fd)  # SQLite opens it by name; mkstemp made it private (0600)
    temp = Path(name)
    try:
        result, messages = _copy(config, temp)
        if result != "ok":
            return _fail(f"the copy of {source} failed its integrity check: {result}")
        if not _publish(temp, target, ns.force):
            return _fail(f"{target} exists (use --force to replace it)")
    except OSError as exc:
        return _fail(f"cannot write {target}: {exc.strerror or exc}")
    finally:
        temp.unlink(missing_ok=True)
    print(f"backup {target}: {target.stat().st_size} bytes, {messages} messages")
    return 0


def _copy(config: Config, temp: Path) -> tuple[str, int]:
    """Back up the configured database into ``temp``; check the copy."""
    source = connect(config.storage.sqlite_path, readonly=True)
    try:
        copy = sqlite3.connect(temp, isolation_level=None)
        try:
            backup(source, copy)
        finally:
            copy.close()
    finally:
        source.close()
    check = sqlite3.connect(temp, isolation_level=None)  # journal mode DELETE: no -wal
    try:
        return check_copy(check)
    finally:
        check.close()


def _publish(temp: Path, target: Path, force: bool) -> bool:
    """Move the finished copy to ``target``; False if ``target`` appeared
    meanwhile and ``force`` is off. The directory is synced after."""
    if force:
        os.replace(temp, target)
    else:
        try:
            os.link(temp, target)  # never replaces an existing file
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links
            if target.exists():
                return False
            os.replace(temp, target)
    with contextlib.suppress(OSError):
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return True


def _fail(message: str) -> int:
    print(f"chatd: {message}", file=sys.stderr)
    return 1
