"""``chatd migrate``: a single node's SQLite database copied into PostgreSQL,
for the move from one node to several (docs/scaling.md).

How it works
------------
The target is the PostgreSQL database of the new config; its schema is made
as a server would make it (``pgschema.migrate``), and it must hold nothing
yet (no user but the system sender, no room, no message). Then every table
is copied in batches in the order of its key, each batch one PostgreSQL
transaction (``COPY``) that also records, in ``chatd_migration``, the last
key copied: an interrupted copy goes on from there (``--resume``), and a
batch is never copied twice.

Messages and their edits and deletions (``message_events``) are copied
together, a range of ids at a time: SQLite takes both kinds of id from one
sequence, in commit order, so the merged order of the two is each
channel's log order, and each entry gets the position in its channel
(``pos``) that PostgreSQL's writer would have given it. The search index is
built by PostgreSQL's trigger as the messages arrive. At the end each
channel's row (last seq, last position) is written, and the sequences are
set past the highest id SQLite ever handed out (ids are never reused:
clients hold them as ``since_id``, backends as ``webhook-id``).

Then it checks: the rows of every table, counted on both sides, and a
checksum of each channel's messages (id, seq, author, content, deletion,
edit time), read back from PostgreSQL, must be equal. It says so, or says
what differs and exits 1.

The source is brought to this chatd's schema first (as a server would at
its start) and read in one snapshot per run; nothing should write to it
meanwhile (stop the node, or drain it: docs/scaling.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from chatd.config import Config
from chatd.errors import StorageError
from chatd.store.pgschema import stored_text
from chatd.store.schema import connect, migrate

#: Rows (or ids, for messages) copied in one transaction.
BATCH = 5000

#: The progress table in the target: one row per table copied, its last key.
_PROGRESS = """
CREATE TABLE IF NOT EXISTS chatd_migration (
    name text PRIMARY KEY,
    last text,
    done boolean NOT NULL DEFAULT false,
    at double precision NOT NULL
)
"""


def _text_with_raw(value: str | None) -> tuple[str | None, bytes | None]:
    """Content as PostgreSQL keeps it (``stored_text``: NUL is not text)."""
    if value is None:
        return None, None
    return stored_text(value)


@dataclass(frozen=True)
class Table:
    """A table copied as it is: its columns on both sides, the key that
    orders and resumes the copy, and, for columns whose type differs, how a
    value becomes PostgreSQL's (``content`` becomes two columns)."""

    name: str
    columns: tuple[str, ...]
    key: tuple[str, ...]
    where: str = ""
    convert: dict[str, Callable[[Any], Any]] = field(default_factory=dict)

    def target_columns(self) -> list[str]:
        out: list[str] = []
        for column in self.columns:
            out.append(column)
            if column == "content":
                out.append("content_raw")
        return out

    def row(self, values: Sequence[Any]) -> list[Any]:
        converters = self.convert
        out: list[Any] = []
        for column, value in zip(self.columns, values, strict=True):
            if column == "content":
                out.extend(_text_with_raw(value))
            else:
                out.append(converters[column](value) if column in converters else value)
        return out


#: Every table but the messages and their events, in an order that keeps
#: references whole (rooms before their members).
TABLES: tuple[Table, ...] = (
    Table("users", ("id", "username", "created_at", "last_seen"), ("id",), "id <> 0"),
    Table("rooms", ("name", "private", "created_at"), ("name",), "", {"private": bool}),
    Table("room_members", ("room", "user_id"), ("room", "user_id")),
    Table("room_roles", ("room", "user_id", "role"), ("room", "user_id")),
    Table("room_sanctions", ("room", "user_id", "kind", "until"), ("room", "user_id", "kind")),
    Table(
        "moderation_log",
        ("id", "room", "actor_id", "user_id", "action", "role", "until", "reason", "at"),
        ("id",),
    ),
    Table("blocks", ("user_id", "blocked_id"), ("user_id", "blocked_id")),
    Table("purged", ("channel", "id", "seq"), ("channel",)),
    Table(
        "read_markers",
        ("user_id", "channel", "last_read_id", "last_read_seq"),
        ("user_id", "channel"),
    ),
    Table("mentions", ("user_id", "channel", "seq", "message_id"), ("user_id", "channel", "seq")),
    Table(
        "message_versions",
        ("message_id", "version", "content", "edited_at"),
        ("message_id", "version"),
    ),
    Table(
        "webhook_outbox",
        ("id", "event", "body", "due", "attempts", "user_id", "batch_end"),
        ("id",),
    ),
)

MESSAGES = Table(
    "messages",
    (
        "id", "channel", "seq", "user_id", "username", "to_user_id", "message_type", "content",
        "media_url", "media_type", "duration", "reply_to", "created_at", "data", "mentions",
        "edited_at", "deleted",
    ),
    ("id",),
    "",
    {"deleted": bool},
)  # fmt: skip
EVENTS = Table(
    "message_events",
    ("id", "channel", "message_id", "kind", "user_id", "content", "at"),
    ("id",),
)
#: The progress row of the messages and their events (copied together).
LOG = "messages+events"
#: The progress row written last, with the channels' rows and the sequences.
FINISHED = "finished"
#: Sequences set past SQLite's highest id: (PostgreSQL's, SQLite's tables).
SEQUENCES = (
    ("messages_id_seq", ("messages", "message_events")),
    ("webhook_outbox_id_seq", ("webhook_outbox",)),
    ("moderation_log_id_seq", ("moderation_log",)),
)


class MigrationError(Exception):
    """A refusal or a failed check, said in one line."""


# --- progress on stderr ---------------------------------------------------------


class Progress:
    """One line per table; in a terminal, a bar redrawn in place."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self._drawn = 0.0

    def say(self, line: str) -> None:
        if self.tty:
            self.out.write("\r\x1b[K")
        self.out.write(line + "\n")
        self.out.flush()

    def step(self, what: str, done: int, total: int, started: float) -> None:
        now = time.monotonic()
        if not self.tty or (now - self._drawn < 0.1 and done < total):
            return
        self._drawn = now
        share = done / total if total else 1.0
        bar = "#" * int(share * 30)
        rate = done / max(now - started, 1e-9)
        self.out.write(
            f"\r\x1b[K{what} [{bar:<30}] {share:4.0%} {done:,}/{total:,} ({rate:,.0f}/s)"
        )
        self.out.flush()


# --- the copy ---------------------------------------------------------------------


def _keyset(table: Table, last: list[Any] | None, limit: int) -> tuple[str, list[Any]]:
    """SQLite's next batch of ``table`` after the key ``last``."""
    conditions = [table.where] if table.where else []
    params: list[Any] = []
    if last is not None:
        conditions.append(f"({', '.join(table.key)}) > ({', '.join('?' * len(last))})")
        params.extend(last)
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    sql = (
        f"SELECT {', '.join(table.columns)} FROM {table.name}{where}"
        f" ORDER BY {', '.join(table.key)} LIMIT {int(limit)}"
    )
    return sql, params


def _count(db: Any, table: Table) -> int:
    """The rows of ``table`` copied (on either side: the query is the same)."""
    where = f" WHERE {table.where}" if table.where else ""
    (n,) = db.execute(f"SELECT count(*) FROM {table.name}{where}").fetchone()
    return int(n)


class Copier:
    """One run of the copy: the source's snapshot, the target's connection,
    the progress rows."""

    def __init__(
        self, src: sqlite3.Connection, dst: Any, progress: Progress, batch: int = BATCH
    ) -> None:
        self.src = src
        self.dst = dst
        self.progress = progress
        self.batch = batch
        #: Fault injection for the tests: called after each committed batch.
        self.after_batch: Callable[[str], None] = lambda name: None

    # progress rows

    def _state(self, name: str) -> tuple[list[Any] | None, bool]:
        row = self.dst.execute(
            "SELECT last, done FROM chatd_migration WHERE name = %s", (name,)
        ).fetchone()
        if row is None:
            return None, False
        return (json.loads(row[0]) if row[0] is not None else None), bool(row[1])

    def _record(self, name: str, last: list[Any] | None, done: bool) -> None:
        self.dst.execute(
            "INSERT INTO chatd_migration (name, last, done, at) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (name) DO UPDATE SET last = excluded.last, done = excluded.done,"
            " at = excluded.at",
            (name, json.dumps(last) if last is not None else None, done, time.time()),
        )

    def _copy_rows(self, table: Table, rows: list[list[Any]], extra: Sequence[str] = ()) -> None:
        columns = ", ".join([*table.target_columns(), *extra])
        with self.dst.cursor().copy(f"COPY {table.name} ({columns}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)

    # the tables

    def table(self, table: Table) -> int:
        """Copy one table (what is left of it); the rows copied."""
        last, done = self._state(table.name)
        total = _count(self.src, table)
        if done:
            self.progress.say(f"{table.name}: done before ({total:,} rows)")
            return 0
        started, copied = time.monotonic(), 0
        key_at = [table.columns.index(k) for k in table.key]
        while True:
            sql, params = _keyset(table, last, self.batch)
            rows = self.src.execute(sql, params).fetchall()
            with self.dst.transaction():
                if rows:
                    self._copy_rows(table, [table.row(r) for r in rows])
                    last = [rows[-1][i] for i in key_at]
                finished = len(rows) < self.batch
                self._record(table.name, last, finished)
            copied += len(rows)
            self.after_batch(table.name)
            self.progress.step(table.name, min(copied, total), total, started)
            if finished:
                break
        self.progress.say(f"{table.name}: {total:,} rows")
        return copied

    def log(self) -> int:
        """Copy the messages and their events together, in id order, each
        entry numbered in its channel; the messages copied."""
        last, done = self._state(LOG)
        total = _count(self.src, MESSAGES)
        if done:
            self.progress.say(f"messages: done before ({total:,} messages)")
            return 0
        positions = self._positions()
        (top,) = self.src.execute(
            "SELECT max(coalesce((SELECT max(id) FROM messages), 0),"
            " coalesce((SELECT max(id) FROM message_events), 0))"
        ).fetchone()
        low = int(last[0]) if last is not None else 0
        started, copied = time.monotonic(), 0
        before = self.dst.execute("SELECT count(*) FROM messages").fetchone()[0]
        while low < top:
            high = low + self.batch
            messages = self.src.execute(
                f"SELECT {', '.join(MESSAGES.columns)} FROM messages"
                " WHERE id > ? AND id <= ? ORDER BY id",
                (low, high),
            ).fetchall()
            events = self.src.execute(
                f"SELECT {', '.join(EVENTS.columns)} FROM message_events"
                " WHERE id > ? AND id <= ? ORDER BY id",
                (low, high),
            ).fetchall()
            message_rows, event_rows = _numbered(messages, events, positions)
            with self.dst.transaction():
                if message_rows:
                    self._copy_rows(MESSAGES, message_rows, ("pos",))
                if event_rows:
                    self._copy_rows(EVENTS, event_rows, ("pos",))
                self._record(LOG, [high], False)
            low = high
            copied += len(messages)
            self.after_batch(LOG)
            self.progress.step("messages", before + copied, total, started)
        with self.dst.transaction():
            self._record(LOG, [low], True)
        self.progress.say(f"messages: {total:,}, with their edits and deletions")
        return copied

    def _positions(self) -> dict[str, int]:
        """Each channel's last position: what the target has of it (a
        resumed copy), else the seq of its last purged message (the entries
        before it are gone; the count goes on from there)."""
        positions = {
            str(channel): int(seq)
            for channel, seq in self.src.execute("SELECT channel, seq FROM purged")
        }
        for channel, pos in self.dst.execute(
            "SELECT channel, max(pos) FROM (SELECT channel, pos FROM messages"
            " UNION ALL SELECT channel, pos FROM message_events) e GROUP BY channel"
        ):
            positions[str(channel)] = int(pos)
        return positions

    def finish(self) -> None:
        """Each channel's row, and the sequences past SQLite's ids; then the
        migration is finished (``FINISHED``'s row, in the same transaction)."""
        self.after_batch(FINISHED)  # (the tests' fault injection: just before)
        with self.dst.transaction():
            self.dst.execute(
                "INSERT INTO channels (name, seq, pos)"
                " SELECT channel, max(seq), max(pos) FROM ("
                "  SELECT channel, seq, pos FROM messages"
                "  UNION ALL SELECT channel, 0, pos FROM message_events"
                "  UNION ALL SELECT channel, seq, seq FROM purged) e GROUP BY channel"
                " ON CONFLICT (name) DO UPDATE SET seq = excluded.seq, pos = excluded.pos"
            )
            for sequence, tables in SEQUENCES:
                highest = _highest(self.src, tables)
                if highest > 0:
                    self.dst.execute("SELECT setval(%s, %s, true)", (sequence, highest))
            self._record(FINISHED, None, True)


def _numbered(
    messages: list[Any], events: list[Any], positions: dict[str, int]
) -> tuple[list[list[Any]], list[list[Any]]]:
    """The rows of one id range, each with its position in its channel:
    messages and events merged by id (their commit order)."""
    merged = sorted(
        [(m[0], 0, m) for m in messages] + [(e[0], 1, e) for e in events], key=lambda t: t[0]
    )
    message_rows: list[list[Any]] = []
    event_rows: list[list[Any]] = []
    for _, kind, row in merged:
        channel = row[1]
        pos = positions[channel] = positions.get(channel, 0) + 1
        if kind == 0:
            message_rows.append([*MESSAGES.row(row), pos])
        else:
            event_rows.append([*EVENTS.row(row), pos])
    return message_rows, event_rows


def _highest(src: sqlite3.Connection, tables: Sequence[str]) -> int:
    """The highest id SQLite handed out for ``tables`` (``sqlite_sequence``
    remembers ids whose rows are gone)."""
    highest = 0
    for name in tables:
        (top,) = src.execute(f"SELECT coalesce(max(id), 0) FROM {name}").fetchone()
        highest = max(highest, int(top))
        row = src.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (name,)).fetchone()
        if row is not None:
            highest = max(highest, int(row[0]))
    return highest


# --- the check ----------------------------------------------------------------------


def _channel_sums(rows: Iterator[Sequence[Any]]) -> dict[str, str]:
    """A checksum of each channel's messages, from rows of (channel, id,
    seq, user_id, content, deleted, edited_at) in channel and id order."""
    sums: dict[str, str] = {}
    channel: str | None = None
    digest = hashlib.sha256()
    for row in rows:
        if row[0] != channel:
            if channel is not None:
                sums[channel] = digest.hexdigest()
            channel, digest = row[0], hashlib.sha256()
        digest.update(json.dumps([*row[1:5], bool(row[5]), row[6]]).encode())
    if channel is not None:
        sums[channel] = digest.hexdigest()
    return sums


def verify(src: sqlite3.Connection, dst: Any) -> list[str]:
    """What differs between the two (nothing: an empty list)."""
    problems: list[str] = []
    for table in (*TABLES, MESSAGES, EVENTS):
        source, target = _count(src, table), _count(dst, table)
        if source != target:
            problems.append(f"{table.name}: {source:,} rows in SQLite, {target:,} in PostgreSQL")
    columns = "channel, id, seq, user_id, content, deleted, edited_at"
    mine = _channel_sums(src.execute(f"SELECT {columns} FROM messages ORDER BY channel, id"))
    with dst.transaction(), dst.cursor(name="chatd_migration_check") as cursor:
        cursor.itersize = BATCH
        cursor.execute(f"SELECT {columns}, content_raw FROM messages ORDER BY channel, id")
        # (content with a NUL is kept as bytes too: stored_text)
        rows = ((*r[:4], r[4] if r[7] is None else bytes(r[7]).decode(), *r[5:7]) for r in cursor)
        theirs = _channel_sums(rows)
    differ = sorted(c for c in mine.keys() | theirs.keys() if mine.get(c) != theirs.get(c))
    if differ:
        shown = ", ".join(differ[:5]) + (" ..." if len(differ) > 5 else "")
        problems.append(f"messages differ in {len(differ):,} channels: {shown}")
    return problems


# --- the command --------------------------------------------------------------------


def run(
    config: Config,
    source: str,
    resume: bool,
    out: TextIO = sys.stderr,
    batch: int = BATCH,
    after_batch: Callable[[str], None] | None = None,
) -> int:
    """Copy ``source`` into the config's PostgreSQL, then check; exit status."""
    import psycopg

    from chatd.store.pgschema import migrate as migrate_pg
    from chatd.store.postgres import conninfo, describe

    if config.storage.backend != "postgres":
        raise MigrationError(
            f'{config.source}: [storage] backend: "postgres" is the target of a migration'
        )
    if not Path(source).is_file():
        raise MigrationError(f"{source}: no such SQLite database")
    progress = Progress(out)
    src = connect(source)
    try:
        version = migrate(src)  # as a server would at its start
        src.execute("BEGIN")  # one snapshot for the whole run
        where = describe(config.storage.dsn)
        try:
            with psycopg.connect(conninfo(config.storage.dsn), autocommit=True) as dst:
                try:
                    migrate_pg(dst)
                except RuntimeError as exc:
                    raise MigrationError(f"database {where}: {exc}") from exc
                _check_target(dst, where, resume)
                progress.say(f"migrating {source} (schema {version}) into {where}")
                copier = Copier(src, dst, progress, batch)
                if after_batch is not None:
                    copier.after_batch = after_batch
                started = time.monotonic()
                for table in TABLES:
                    copier.table(table)
                copier.log()
                copier.finish()
                took = time.monotonic() - started
                progress.say(f"copied in {took:.1f} s; checking")
                started = time.monotonic()
                problems = verify(src, dst)
                checked = time.monotonic() - started
                messages = _count(src, MESSAGES)
        except psycopg.Error as exc:
            raise StorageError(f"database {where}: {' '.join(str(exc).split())}") from exc
    finally:
        src.close()
    if problems:
        for problem in problems:
            progress.say(f"check failed: {problem}")
        return 1
    progress.say(
        f"checked in {checked:.1f} s: every table's rows counted and each channel's"
        f" messages compared, all equal ({messages:,} messages)"
    )
    return 0


def _check_target(dst: Any, where: str, resume: bool) -> None:
    """An empty database, or (``resume``) one this command was filling."""
    started = dst.execute("SELECT to_regclass('chatd_migration') IS NOT NULL").fetchone()[0]
    if started:
        finished = dst.execute(
            "SELECT count(*) > 0 FROM chatd_migration WHERE name = %s", (FINISHED,)
        ).fetchone()[0]
        if finished:
            raise MigrationError(f"database {where}: a migration into it has finished already")
        if not resume:
            raise MigrationError(
                f"database {where}: holds an interrupted migration; --resume goes on with it"
            )
        return
    if resume:
        raise MigrationError(f"database {where}: no migration to resume there")
    (messages,) = dst.execute("SELECT count(*) FROM messages").fetchone()
    (users,) = dst.execute("SELECT count(*) FROM users WHERE id <> 0").fetchone()
    (rooms,) = dst.execute("SELECT count(*) FROM rooms").fetchone()
    if messages or users or rooms:
        raise MigrationError(
            f"database {where}: not empty ({messages:,} messages, {users:,} users,"
            f" {rooms:,} rooms); migrate into a new database, before any node has used it"
        )
    dst.execute(_PROGRESS)


def add_command(commands: Any, config_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register ``migrate`` with the CLI's subparsers."""
    parser = commands.add_parser(
        "migrate", help="copy a SQLite database into the config's PostgreSQL (one node to several)"
    )
    config_arg(parser)
    parser.add_argument(
        "--from-sqlite", required=True, metavar="FILE", help="the single node's chatd.db"
    )
    parser.add_argument("--resume", action="store_true", help="go on with an interrupted migration")
    parser.set_defaults(func=_command)


def _command(config: Config, ns: argparse.Namespace) -> int:
    try:
        return run(config, ns.from_sqlite, ns.resume)
    except MigrationError as exc:
        print(f"chatd: {exc}", file=sys.stderr)
        return 1
