"""``chatd user ...`` and ``chatd room ...``: administration on the database.

These commands open the configured SQLite file directly (migrating it if it
is new, and declaring the config's rooms as the server does) and change it in
one short transaction, so they work while the server runs: the server reads
rooms and memberships from the database on every ``join_room`` and finds
users it has not seen on their first direct message.
"""

from __future__ import annotations

import argparse
import re
import sqlite3
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from chatd.config import ROOM_NAME_PATTERN, Config
from chatd.store.schema import connect, migrate
from chatd.store.sqlite import add_members, create_room, declare_rooms, list_rooms, upsert_user

Command = Callable[[Config, argparse.Namespace], int]


def add_commands(
    commands: Any, config_arg: Callable[[argparse.ArgumentParser], None], user_id: Any
) -> None:
    """Register ``user`` and ``room`` with the CLI's subparsers."""
    user = commands.add_parser("user", help="add users to the database")
    user_commands = user.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = user_commands.add_parser("add", help="add (or rename) a user")
    config_arg(add)
    add.add_argument("--user-id", type=user_id, required=True)
    add.add_argument("--username", required=True)
    add.set_defaults(func=_user_add)

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


def _room_name(text: str) -> str:
    if len(text) > 64 or not re.match(ROOM_NAME_PATTERN, text):
        raise argparse.ArgumentTypeError("a room name is 1 to 64 letters, digits or ._:@-")
    return text


@contextmanager
def _database(config: Config) -> Iterator[sqlite3.Connection]:
    path = config.storage.sqlite_path
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = connect(path, synchronous=config.storage.synchronous)
    try:
        migrate(conn)
        conn.execute("BEGIN IMMEDIATE")
        try:
            declare_rooms(conn, config.rooms)
            yield conn
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
        upsert_user(db, ns.user_id, ns.username)
    print(f"user {ns.user_id} ({ns.username}) added")
    return 0


def _room_create(config: Config, ns: argparse.Namespace) -> int:
    with _database(config) as db:
        created = create_room(db, ns.name, ns.private, tuple(ns.member))
    if not created:
        return _fail(f"room {ns.name!r} already exists (use: chatd room add-member)")
    kind = "private" if ns.private else "public"
    print(f"room {ns.name} created ({kind}, {len(set(ns.member))} members)")
    return 0


def _room_add_member(config: Config, ns: argparse.Namespace) -> int:
    with _database(config) as db:
        found = add_members(db, ns.name, tuple(ns.user_ids))
    if not found:
        return _fail(f"no room named {ns.name!r} (use: chatd room create)")
    print(f"room {ns.name}: added {', '.join(map(str, ns.user_ids))}")
    return 0


def _room_list(config: Config, ns: argparse.Namespace) -> int:
    del ns
    with _database(config) as db:
        rooms = list_rooms(db)
    for name, private, members in rooms:
        who = f"  members: {', '.join(map(str, members))}" if private or members else ""
        print(f"{name}  {'private' if private else 'public'}{who}")
    return 0


def _fail(message: str) -> int:
    print(f"chatd: {message}", file=sys.stderr)
    return 1
