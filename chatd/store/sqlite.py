"""The SQLite store: one writer thread with group commit, pooled readers.

Writes (messages, users, rooms) are operations: plain functions of a
``sqlite3.Connection``, committed in groups by the writer thread that
``writer.GroupWriter`` runs (callbacks back on Trio in commit order). Here a
group runs in one transaction and commits once.

If an operation raises, or the commit itself fails, the group is rolled back
and every operation of it is run again alone, in its own transaction, so one
bad operation fails only itself. Nothing is acknowledged that is not on disk.

Reads run on Trio worker threads, each borrowing one of a few read-only
connections (WAL lets them read while the writer writes). One read does
not: a join's read marker (``marker_now``), two probes of primary keys
(about 6 µs), runs at once on a read-only connection of the event loop's
own, which never waits for a lock (``busy_timeout`` 0: when SQLite is busy
the join takes the batched read on a thread instead). A join then never
waits for the store: 10,000 joins arriving at once otherwise all wait in
the same pass of the scheduler, and what they hold meanwhile is left as
fragmented memory (docs/benchmarks.md, the big room).

WAL checkpoints are not the writer's: its connection has
``wal_autocheckpoint = 0``, and a ``checkpoint.Checkpointer`` (a connection
and a thread of its own) runs them, asked by a timer task of the store every
``checkpoint_interval`` while commits happen and once after they stop. The
writer runs each group inside a ``WriterGate``, which the checkpointer
holds for the short RESTART and TRUNCATE checkpoints that bound the WAL
(``checkpoint.py`` says when and why).

New messages are indexed for search by the writer thread between groups,
a batch at a time (``INDEX_DELAY`` after the first of them, ``index_tail``;
the hook is ``GroupWriter._tend``), not each in its own group's
transaction: a transaction that writes FTS5 costs a new index segment,
about 50 µs, as much as the message. A search indexes what waits first.

aiosqlite is not used: it cannot run under Trio (docs/architecture.md).
"""

from __future__ import annotations

import logging
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import trio

from chatd import edits
from chatd.config import RoomsConfig
from chatd.errors import ChatError, blocked, invalid_format
from chatd.metrics import Metrics
from chatd.protocol import rfc3339
from chatd.search import Interrupted, Page, Request, first_window, fts5_match, scan, start
from chatd.store import (
    Change,
    Changed,
    ChannelMarkers,
    Committed,
    Entry,
    Missed,
    NewMessage,
    Outbox,
    ReadPoint,
    RoomAccess,
    StoredEvent,
    StoredMessage,
    dm_channel,
    event_of,
    merge_log,
    room_channel,
)
from chatd.store.checkpoint import (
    CHECKPOINT_INTERVAL,
    WAL_MAX_BYTES,
    Checkpoint,
    Checkpointer,
    WriterGate,
)
from chatd.store.moderation import for_placeholder as moderation_queries
from chatd.store.outbox import for_placeholder
from chatd.store.privacy import UserExport
from chatd.store.privacy import for_placeholder as privacy_queries
from chatd.store.retention import for_placeholder as retention_queries
from chatd.store.schema import connect, migrate
from chatd.store.search import for_placeholder as search_queries
from chatd.store.search import message_id, readable
from chatd.store.writer import MAX_GROUP as MAX_GROUP
from chatd.store.writer import Cork, GroupWriter, Pending, Queries, Reads

log = logging.getLogger("chatd.store")

READERS = 4
#: Seconds a stored message waits to be indexed for search, at most (unless
#: the writer is behind): the batch of new messages the writer indexes at
#: once (``index_tail``). A search indexes what is waiting first.
INDEX_DELAY = 0.5
#: Most ids indexed in one transaction of their own (a few milliseconds).
INDEX_BATCH = 1000

Operation = Callable[[sqlite3.Connection], Any]
_MESSAGE_COLUMNS = (
    "id, channel, user_id, username, to_user_id, message_type, content,"
    " media_url, media_type, duration, reply_to, created_at, data, seq, mentions,"
    " edited_at, deleted"
)


class SqliteStore(Reads, GroupWriter):
    """The embedded store. Use ``open_sqlite_store`` to run one."""

    thread_name = "chatd-sqlite-writer"
    queries: Queries = sys.modules[__name__]  # this module's functions

    def __init__(
        self,
        path: str,
        synchronous: str = "normal",
        metrics: Metrics | None = None,
        cork: Cork | None = None,
        checkpoint_interval: float = CHECKPOINT_INTERVAL,
        wal_max_bytes: int = WAL_MAX_BYTES,
    ) -> None:
        super().__init__(metrics, cork)
        self.path = path
        self._synchronous = synchronous
        self._readers: list[sqlite3.Connection] = []
        #: The event loop's own (``marker_now``).
        self._loop_reader: sqlite3.Connection | None = None
        self._read_limiter = trio.CapacityLimiter(READERS)
        self._writer_conn: sqlite3.Connection | None = None
        self.checkpoint_interval = checkpoint_interval
        #: The writer runs each group inside it; the checkpointer holds it.
        self._gate = WriterGate()
        #: Groups committed (by the writer thread; the checkpointer reads it).
        self._groups = 0
        #: Set on the Trio thread when a group commits: the timer's cue.
        self._wrote = trio.Event()
        self._round_done = trio.Event()
        self._last_round: list[Checkpoint] = []
        self._checkpointer = Checkpointer(
            path, synchronous, self._gate, lambda: self._groups, wal_max_bytes, metrics
        )
        #: Users known to be stored with this name: connects skip the write.
        self._users: dict[int, str] = {}
        self._access = {}
        self._reading_access = {}
        self._marker_batches = {}
        self._marker_reads = {}
        #: Each channel's last seq; owned by the writer thread.
        self._seqs: dict[str, int] = {}
        #: When the oldest message not yet indexed for search was committed
        #: (None: every one is); written by the writer thread.
        self._unindexed_since: float | None = None

    # --- lifecycle ----------------------------------------------------------

    def _open(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = connect(self.path, synchronous=self._synchronous)
        try:
            # Checkpoints are the checkpointer's, never inside a commit.
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            migrate(conn)
            if not index_tail(conn, 0):
                self._unindexed_since = time.monotonic()
        except BaseException:
            conn.close()
            raise
        self._writer_conn = conn
        try:
            for _ in range(READERS):
                self._readers.append(connect(self.path, readonly=True))
            self._loop_reader = connect(self.path, readonly=True)
            self._loop_reader.execute("PRAGMA busy_timeout = 0")
            self._checkpointer.open()
        except BaseException:
            for reader in self._readers:
                reader.close()
            if self._loop_reader is not None:
                self._loop_reader.close()
            conn.close()
            raise

    async def _start(self) -> None:
        await trio.to_thread.run_sync(self._open)
        self._start_writer()
        self._checkpointer.start()

    async def _stop(self) -> None:
        """Commit everything queued, then stop the writer and close; the
        checkpointer closes last (SQLite checkpoints at the last close)."""
        await self._stop_writer()
        for conn in self._readers:
            conn.close()
        if self._loop_reader is not None:
            self._loop_reader.close()
            self._loop_reader = None
        await self._checkpointer.stop()

    # --- checkpoints --------------------------------------------------------

    async def checkpoint(self) -> list[Checkpoint]:
        """Run a checkpoint round now (on the checkpointer's thread); what it
        did: a PASSIVE checkpoint, and a RESTART or TRUNCATE if one was due."""
        done = await self._checkpointer.round()
        self._last_round = done
        self._round_done.set()
        self._round_done = trio.Event()
        return done

    async def next_round(self) -> list[Checkpoint]:
        """Wait for the next checkpoint round to end (the timer's or any
        other); what it did."""
        await self._round_done.wait()
        return self._last_round

    async def _checkpoint_timer(self) -> None:
        """A round every ``checkpoint_interval`` while commits happen, and one
        more after an interval without any (the idle round, which truncates
        the WAL). No commit, no timer: an idle store costs nothing."""
        interval = self.checkpoint_interval
        while True:
            await self._wrote.wait()
            idle = False
            while not idle:
                self._wrote = trio.Event()
                await trio.sleep(interval)
                await self.checkpoint()
                idle = not self._wrote.is_set() and self._checkpointer.idle

    def _finish(self, group: list[Pending], results: list[Any]) -> None:
        self._wrote.set()
        super()._finish(group, results)

    # --- the writer thread --------------------------------------------------

    def _commit_group(self, group: list[Pending]) -> list[Any]:
        conn = self._writer_conn
        assert conn is not None
        with self._gate.group():
            results = _apply(conn, group, self._seqs.clear, self.outbox)
        self._groups += 1
        if self._unindexed_since is None and any(isinstance(r, StoredMessage) for r in results):
            self._unindexed_since = time.monotonic()
        return results

    def _tend(self) -> float | None:
        """Index the new messages for search once the oldest has waited
        ``INDEX_DELAY``, ``INDEX_BATCH`` ids a transaction, between
        groups."""
        since = self._unindexed_since
        if since is None:
            return None
        due = since + INDEX_DELAY - time.monotonic()
        if due > 0:
            return due
        if self._index(INDEX_BATCH):
            self._unindexed_since = None
            return None
        return 0.0

    def _index(self, limit: int | None) -> bool:
        """``index_tail`` in a transaction of its own; whether every
        message is indexed (on failure, logged: not yet)."""
        conn = self._writer_conn
        assert conn is not None
        try:
            with self._gate.group():
                conn.execute("BEGIN IMMEDIATE")
                done = index_tail(conn, limit)
                conn.execute("COMMIT")
        except sqlite3.Error:
            _rollback(conn)
            log.exception("search: indexing new messages failed")
            return False
        self._groups += 1
        return done

    def _close_writer(self) -> None:
        if self._writer_conn is not None:
            if self._unindexed_since is not None:
                self._index(None)
            self._writer_conn.close()

    # --- writing ------------------------------------------------------------

    async def append(self, message: NewMessage, on_done: Committed) -> int:
        seqs = self._seqs
        insert = lambda conn: insert_message(conn, message, seqs)  # noqa: E731
        return await self._enqueue(Pending(insert, None, on_done))

    async def change(self, change: Change, on_done: Changed) -> int:
        apply = lambda conn: change_message(conn, change)  # noqa: E731
        return await self._enqueue(Pending(apply, None, on_done))

    def marker_now(self, channel: str, user_id: int) -> ChannelMarkers | None:
        conn = self._loop_reader
        if conn is None:
            return None
        try:
            return marker(conn, channel, user_id)
        except sqlite3.OperationalError:  # busy: the batched read waits for it
            return None

    async def flush(self) -> None:
        """Return once everything queued before this call is committed."""
        await self.write(lambda conn: None)

    async def search(self, request: Request) -> Page[StoredMessage]:
        """Index what is waiting first: a search finds every message
        acknowledged before it."""
        if self._unindexed_since is not None:
            await self.write(lambda conn: index_tail(conn, None))
        return await super().search(request)

    async def outbox_leader(self) -> bool:
        """The one node sends the webhooks."""
        return True

    async def upsert_user(self, user_id: int, username: str) -> None:
        if self._users.get(user_id) == username:
            return
        await self.write(lambda conn: upsert_user(conn, user_id, username))
        self._users[user_id] = username

    # --- reading ------------------------------------------------------------

    async def read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``fn`` on a pooled read connection in a worker thread."""
        async with self._read_limiter:
            conn = self._readers.pop()
            try:
                return await trio.to_thread.run_sync(fn, conn)
            finally:
                self._readers.append(conn)

    async def save_read_state(
        self, markers: Sequence[tuple[int, str, int, int]], seen: Sequence[tuple[int, str]]
    ) -> None:
        await self.write(lambda conn: save_read_state(conn, markers, seen))

    async def declare_rooms(self, rooms: RoomsConfig) -> None:
        await self.write(lambda conn: declare_rooms(conn, rooms))
        self.forget_access()

    async def dev_user(self, username: str) -> int:
        user_id: int = await self.write(lambda conn: dev_user(conn, username))
        return user_id


@asynccontextmanager
async def open_sqlite_store(
    path: str,
    synchronous: str = "normal",
    metrics: Metrics | None = None,
    cork: Cork | None = None,
    checkpoint_interval: float = CHECKPOINT_INTERVAL,
    wal_max_bytes: int = WAL_MAX_BYTES,
) -> AsyncIterator[SqliteStore]:
    """Run a store, and its checkpoints' timer, for the duration of the
    block; on exit, commit what is queued and close."""
    store = SqliteStore(path, synchronous, metrics, cork, checkpoint_interval, wal_max_bytes)
    await store._start()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store._checkpoint_timer)
            try:
                yield store
            finally:
                nursery.cancel_scope.cancel()
    finally:
        await store._stop()


def _apply(
    conn: sqlite3.Connection,
    group: list[Pending],
    on_rollback: Callable[[], None],
    outbox: Outbox | None = None,
) -> list[Any]:
    """Run a group in one transaction; on failure, each op alone. With
    ``outbox``, the webhook delivery the group causes is stored in its
    transaction."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        results = [_run(pending, conn) for pending in group]
        _to_outbox(conn, outbox, results)
        conn.execute("COMMIT")
        return results
    except Exception as exc:
        _rollback(conn)
        on_rollback()
        if len(group) == 1:
            log.warning("store: write failed: %s", exc)
            return [exc]
    results = []
    for pending in group:
        try:
            conn.execute("BEGIN IMMEDIATE")
            result = _run(pending, conn)
            _to_outbox(conn, outbox, [result])
            conn.execute("COMMIT")
        except Exception as exc:
            _rollback(conn)
            on_rollback()
            log.warning("store: write failed: %s", exc)
            result = exc
        results.append(result)
    return results


def _to_outbox(conn: sqlite3.Connection, outbox: Outbox | None, results: Sequence[Any]) -> None:
    rows = outbox(results, time.time()) if outbox is not None else None
    if rows:
        # (a user's message.unread already pending stays: its window runs)
        conn.executemany(
            "INSERT OR IGNORE INTO webhook_outbox (event, body, due, user_id) VALUES (?, ?, ?, ?)",
            rows,
        )


def _run(pending: Pending, conn: sqlite3.Connection) -> Any:
    assert pending.op is not None  # messages come as operations here
    return pending.op(conn)


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:  # pragma: no cover - nothing more to undo
            pass


# --- operations: plain functions of a connection, shared with the CLI ---------


def insert_message(
    conn: sqlite3.Connection, message: NewMessage, seqs: dict[str, int]
) -> StoredMessage | ChatError:
    """Store one message. ``seqs`` caches each channel's last ``seq`` (the
    writer clears it on rollback). A ``reply_to`` outside its room or
    conversation, and a direct message to a user who blocks its sender, are
    returned as errors (not raised: the rest of the group commits)."""
    channel = channel_of(message)
    if (
        message.reply_to is not None
        and not conn.execute(
            "SELECT 1 FROM messages WHERE id = ? AND channel = ?", (message.reply_to, channel)
        ).fetchone()
    ):
        return invalid_format(
            "reply_to must name a message of the same room or conversation", "data.reply_to"
        )
    if (
        message.room is None
        and message.user_id
        and conn.execute(
            "SELECT 1 FROM blocks WHERE user_id = ? AND blocked_id = ?",
            (message.to_user_id, message.user_id),
        ).fetchone()
    ):
        return blocked(message.to_user_id)
    seq = seqs.get(channel)
    if seq is None:
        seq = last_seq(conn, channel)
    seq += 1
    if message.mentions:
        message = _known_mentions(conn, message)
    cursor = conn.execute(
        "INSERT INTO messages (channel, seq, user_id, username, to_user_id, message_type,"
        " content, media_url, media_type, duration, reply_to, created_at, data, mentions)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            channel,
            seq,
            message.user_id,
            message.username,
            message.to_user_id,
            message.message_type,
            message.content,
            message.media_url,
            message.media_type,
            message.duration,
            message.reply_to,
            message.created_at,
            message.data.decode() if message.data is not None else None,
            mentions_text(message.mentions),
        ),
    )
    seqs[channel] = seq
    message_id = cursor.lastrowid
    assert message_id is not None
    if message.mentions:
        conn.executemany(
            "INSERT OR IGNORE INTO mentions (user_id, channel, seq, message_id)"
            " VALUES (?, ?, ?, ?)",
            [(uid, channel, seq, message_id) for uid in message.mentions],
        )
    if seq == 1 and message.room is None:
        # A conversation begins: its parties' markers start before it.
        conn.executemany(
            "INSERT OR IGNORE INTO read_markers (user_id, channel, last_read_id, last_read_seq)"
            " VALUES (?, ?, 0, 0)",
            [(uid, channel) for uid in (message.user_id, message.to_user_id) if uid],
        )
    return StoredMessage(message_id, message, seq)


def _known_mentions(conn: sqlite3.Connection, message: NewMessage) -> NewMessage:
    """``message`` with its mentions of unknown users dropped (in order,
    each once)."""
    wanted = list(dict.fromkeys(message.mentions or ()))
    marks = ",".join("?" * len(wanted))
    known = {uid for (uid,) in conn.execute(f"SELECT id FROM users WHERE id IN ({marks})", wanted)}
    kept = tuple(uid for uid in wanted if uid in known and uid != 0)
    return msgspec.structs.replace(message, mentions=kept or None)


def mentions_text(mentions: tuple[int, ...] | None) -> str | None:
    """A message's mentions as stored: ids joined by commas."""
    return ",".join(map(str, mentions)) if mentions else None


def mentions_of(text: str | None) -> tuple[int, ...] | None:
    return tuple(int(uid) for uid in text.split(",")) if text else None


def change_message(conn: sqlite3.Connection, change: Change) -> StoredEvent | ChatError:
    """Edit or delete a message (``Store.change``): checked by
    ``edits.check`` against the row as it is in this transaction; the
    content it replaces kept in ``message_versions``; the event stored with
    the next id of the messages' sequence. A refusal is returned, not
    raised (the rest of the group commits)."""
    row = conn.execute(
        "SELECT channel, user_id, to_user_id, message_type, content, created_at, deleted,"
        " edited_at, seq, mentions FROM messages WHERE id = ?",
        (change.message_id,),
    ).fetchone()
    target = None
    if row is not None:
        channel, author, to_user, kind, content, created_at, deleted, edited_at, seq, named = row
        target = edits.target(
            channel, author, to_user, kind, created_at, deleted, change.user_id,
            partial(room_access, conn),
        )  # fmt: skip
    refused = edits.check(change, target)
    if refused is not None:
        return refused
    (version,) = conn.execute(
        "SELECT count(*) FROM message_versions WHERE message_id = ?", (change.message_id,)
    ).fetchone()
    conn.execute(
        "INSERT INTO message_versions (message_id, version, content, edited_at)"
        " VALUES (?, ?, ?, ?)",
        (change.message_id, version + 1, content, edited_at),
    )
    if change.content is not None:
        conn.execute(
            "UPDATE messages SET content = ?, edited_at = ? WHERE id = ?",
            (change.content, change.at, change.message_id),
        )
        kind_ = "edited"
    else:
        conn.execute(
            "UPDATE messages SET content = '', media_url = NULL, media_type = NULL,"
            " duration = NULL, data = NULL, mentions = NULL, deleted = 1 WHERE id = ?",
            (change.message_id,),
        )
        # Its mentions no longer count as unread.
        mentioned = mentions_of(named) or ()
        conn.executemany(
            "DELETE FROM mentions WHERE user_id = ? AND channel = ? AND seq = ?",
            [(uid, channel, seq) for uid in mentioned],
        )
        kind_ = "deleted"
    conn.execute("UPDATE sqlite_sequence SET seq = seq + 1 WHERE name = 'messages'")
    (event_id,) = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
    conn.execute(
        "INSERT INTO message_events (id, channel, message_id, kind, user_id, content, at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (event_id, channel, change.message_id, kind_, change.user_id, change.content, change.at),
    )
    return event_of(
        event_id, channel, change.message_id, kind_, change.user_id, change.at,
        change.content, author, to_user,
    )  # fmt: skip


def channel_of(message: NewMessage) -> str:
    if message.room is not None:
        return room_channel(message.room)
    assert message.to_user_id is not None
    return dm_channel(message.user_id, message.to_user_id)


def last_seq(conn: sqlite3.Connection, channel: str) -> int:
    """The number of messages in ``channel`` (one probe of the index)."""
    (seq,) = conn.execute(
        "SELECT coalesce(max(seq), 0) FROM messages WHERE channel = ?", (channel,)
    ).fetchone()
    return int(seq)


def upsert_user(
    conn: sqlite3.Connection, user_id: int, username: str, now: float | None = None
) -> None:
    conn.execute(
        "INSERT INTO users (id, username, created_at) VALUES (?, ?, ?)"
        " ON CONFLICT (id) DO UPDATE SET username = excluded.username"
        " WHERE username != excluded.username",
        (user_id, username, _now(now)),
    )


def ensure_room(
    conn: sqlite3.Connection,
    name: str,
    private: bool,
    members: tuple[int, ...] = (),
    now: float | None = None,
) -> None:
    """Create the room if missing (or set its privacy) and add members."""
    conn.execute(
        "INSERT INTO rooms (name, private, created_at) VALUES (?, ?, ?)"
        " ON CONFLICT (name) DO UPDATE SET private = excluded.private",
        (name, int(private), _now(now)),
    )
    _add(conn, name, members)


def _add(conn: sqlite3.Connection, room: str, members: tuple[int, ...]) -> None:
    """Add members; a new member's marker starts at the room's newest
    message."""
    channel = room_channel(room)
    top = conn.execute(
        "SELECT id, seq FROM messages WHERE channel = ? ORDER BY seq DESC LIMIT 1", (channel,)
    ).fetchone() or (0, 0)
    for member in members:
        added = conn.execute(
            "INSERT OR IGNORE INTO room_members (room, user_id) VALUES (?, ?)", (room, member)
        ).rowcount
        if added:
            conn.execute(
                "INSERT OR IGNORE INTO read_markers"
                " (user_id, channel, last_read_id, last_read_seq) VALUES (?, ?, ?, ?)",
                (member, channel, *top),
            )


def declare_rooms(conn: sqlite3.Connection, rooms: RoomsConfig) -> None:
    """Make sure every room of the config exists. Members are added, never
    removed, so changes made with the CLI survive a restart; the config's
    roles are set (logged when they change)."""
    for name in rooms.public:
        ensure_room(conn, name, private=False)
    for name, members in rooms.private.items():
        ensure_room(conn, name, private=True, members=members)
    for name in sorted({*rooms.owners, *rooms.moderators}):
        declare_roles(conn, name, rooms.roles(name), time.time())


def create_room(
    conn: sqlite3.Connection, name: str, private: bool, members: tuple[int, ...] = ()
) -> bool:
    """Create a new room; False (and no change) when it exists already."""
    if conn.execute("SELECT 1 FROM rooms WHERE name = ?", (name,)).fetchone():
        return False
    ensure_room(conn, name, private, members)
    return True


def add_members(conn: sqlite3.Connection, room: str, members: tuple[int, ...]) -> bool:
    """Add members to an existing room; False when there is no such room."""
    if not conn.execute("SELECT 1 FROM rooms WHERE name = ?", (room,)).fetchone():
        return False
    _add(conn, room, members)
    return True


def list_rooms(conn: sqlite3.Connection) -> list[tuple[str, bool, list[int]]]:
    """Every room: name, private, member ids."""
    members: dict[str, list[int]] = {}
    for room, user_id in conn.execute("SELECT room, user_id FROM room_members ORDER BY user_id"):
        members.setdefault(room, []).append(user_id)
    return [
        (name, bool(private), members.get(name, []))
        for name, private in conn.execute("SELECT name, private FROM rooms ORDER BY name")
    ]


def room_access(conn: sqlite3.Connection, room: str, user_id: int) -> RoomAccess | None:
    row = conn.execute(
        "SELECT private, NOT private"
        " OR EXISTS (SELECT 1 FROM room_members WHERE room = ? AND user_id = ?)"
        " FROM rooms WHERE name = ?",
        (room, user_id, room),
    ).fetchone()
    if row is None:
        return None
    return RoomAccess(room, bool(row[0]), bool(row[1]), room_rules(conn, room))


def history(
    conn: sqlite3.Connection, channel: str, limit: int, offset: int
) -> tuple[list[StoredMessage], int]:
    """Page ``offset`` back from the newest, oldest first, and the total
    kept (the messages after the channel's retention horizon)."""
    conn.execute("BEGIN")  # one snapshot for the total and the page
    try:
        last = last_seq(conn, channel)
        _, floor = horizon(conn, channel)
        high = last - offset
        if high <= floor:
            return [], last - floor
        low = max(floor + 1, high - limit + 1)
        rows = conn.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE channel = ? AND seq BETWEEN ? AND ?"
            " ORDER BY seq",
            (channel, low, high),
        ).fetchall()
    finally:
        conn.execute("COMMIT")
    return [_row_to_message(r) for r in rows], last - floor


def missed(conn: sqlite3.Connection, channel: str, since_id: int, cap: int) -> Missed:
    """Where the messages of ``channel`` with an id above ``since_id`` start,
    at most the newest ``cap`` of them (``Store.missed``).

    Walks the channel's index back from the newest message (ids and seqs
    only, which the index holds) and stops at ``since_id`` or after ``cap``
    rows, so it costs what is missed, and reads no message; then one probe
    of the events' index for the newest event (one snapshot for both)."""
    newest = 0
    count = 0
    where = Missed(0, since_id, True, 0)
    conn.execute("BEGIN")
    try:
        cursor = conn.execute(
            "SELECT id, seq FROM messages WHERE channel = ? ORDER BY seq DESC", (channel,)
        )
        for message_id, seq in cursor:
            newest = newest or message_id
            if message_id <= since_id:
                where = Missed(seq, since_id, True, newest)
                break
            if count == cap:
                where = Missed(seq, message_id, False, newest)
                break
            count += 1
        else:
            # every message kept is missed: whole unless some were purged
            purged, _ = horizon(conn, channel)
            where = Missed(0, since_id, purged <= since_id, newest)
        cursor.close()
        (event,) = conn.execute(
            "SELECT coalesce(max(id), 0) FROM message_events WHERE channel = ?", (channel,)
        ).fetchone()
    finally:
        conn.execute("COMMIT")
    return where._replace(newest_id=max(where.newest_id, event))


def log_page(
    conn: sqlite3.Connection, channel: str, after_seq: int, after_id: int, cap: int
) -> tuple[list[Entry], bool]:
    """A page of a channel's messages after ``after_seq`` and events after
    ``after_id``, in id order (``merge_log``), from one snapshot: an entry
    committed between two reads could otherwise be skipped."""
    conn.execute("BEGIN")
    try:
        return merge_log(
            after(conn, channel, after_seq, cap), events(conn, channel, after_id, cap), cap
        )
    finally:
        conn.execute("COMMIT")


def events(conn: sqlite3.Connection, channel: str, after_id: int, cap: int) -> list[StoredEvent]:
    """The channel's edits and deletions with an id above ``after_id``,
    oldest first, at most ``cap`` (one index range)."""
    rows = conn.execute(
        "SELECT e.id, e.message_id, e.kind, e.user_id, e.at, e.content, m.user_id, m.to_user_id"
        # (the channel's range of its index, whatever the statistics say: a
        # range of all channels' newest events would grow with the others)
        " FROM message_events e INDEXED BY message_events_by_channel"
        " JOIN messages m ON m.id = e.message_id"
        " WHERE e.channel = ? AND e.id > ? ORDER BY e.id LIMIT ?",
        (channel, after_id, cap),
    ).fetchall()
    return [event_of(r[0], channel, *r[1:]) for r in rows]


def versions(
    conn: sqlite3.Connection, message_id: int, user_id: int
) -> list[tuple[str, str | None]]:
    """Every content a message has had, oldest first (content, edited_at:
    None for the first), for its author; raises ``ChatError``."""
    conn.execute("BEGIN")
    try:
        row = conn.execute(
            "SELECT channel, user_id, to_user_id, message_type, created_at, deleted,"
            " content, edited_at FROM messages WHERE id = ?",
            (message_id,),
        ).fetchone()
        target = None
        if row is not None:
            channel, author, to_user, kind, created_at, deleted = row[:6]
            target = edits.target(
                channel, author, to_user, kind, created_at, deleted, user_id,
                partial(room_access, conn),
            )  # fmt: skip
        refused = edits.may_read_versions(user_id, message_id, target)
        if refused is not None:
            raise refused
        earlier = conn.execute(
            "SELECT content, edited_at FROM message_versions WHERE message_id = ? ORDER BY version",
            (message_id,),
        ).fetchall()
    finally:
        conn.execute("COMMIT")
    return [*earlier, (row[6], row[7])]


def after(conn: sqlite3.Connection, channel: str, after_seq: int, cap: int) -> list[StoredMessage]:
    """The channel's messages with a seq above ``after_seq``, oldest first,
    the oldest ``cap`` of them (one index range)."""
    rows = conn.execute(
        f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE channel = ? AND seq > ?"
        " ORDER BY seq LIMIT ?",
        (channel, after_seq, cap),
    ).fetchall()
    return [_row_to_message(r) for r in rows]


def direct_since(
    conn: sqlite3.Connection, user_ids: Sequence[int], created_at: str, cap: int
) -> list[StoredMessage]:
    """Direct messages to or from any of ``user_ids`` created at or after
    ``created_at``, oldest first, at most ``cap``."""
    if not user_ids:
        return []
    marks = ",".join("?" * len(user_ids))
    rows = conn.execute(
        f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE channel LIKE 'd:%'"
        f" AND created_at >= ? AND (user_id IN ({marks}) OR to_user_id IN ({marks}))"
        " ORDER BY id LIMIT ?",
        (created_at, *user_ids, *user_ids, cap),
    ).fetchall()
    return [_row_to_message(r) for r in rows]


# --- search -------------------------------------------------------------------

#: The message columns, of ``messages m`` (the search table has a ``content``).
_M_COLUMNS = ", ".join("m." + name.strip() for name in _MESSAGE_COLUMNS.split(","))
#: Virtual machine steps between two looks at the clock during a search.
_SEARCH_STEPS = 1000


def search(
    conn: sqlite3.Connection, request: Request, clock: Callable[[], float] = time.monotonic
) -> Page[StoredMessage]:
    """``Store.search``: the FTS5 index read window by window
    (``chatd.search.scan``), in one snapshot; a window still running when
    the budget is over is interrupted (SQLite's progress handler), except
    the first."""
    user_id, words, channel, before_id, limit, budget, now = request
    deadline = clock() + budget

    def spent() -> bool:
        return clock() > deadline

    match = fts5_match(words)
    params: dict[str, str | float]
    if channel is not None:
        scope, params = "m.channel = :channel", {"channel": channel}
    else:
        scope, params = readable(":user", ":now"), {"user": user_id, "now": now}
    sql = (
        f"SELECT {_M_COLUMNS} FROM messages_search s JOIN messages m ON m.id = s.rowid"
        " WHERE messages_search MATCH :match AND s.rowid >= :low AND s.rowid < :high"
        f" AND NOT m.deleted AND {scope} ORDER BY s.rowid DESC LIMIT :n"
    )

    def fetch(low: int, high: int, n: int, interruptible: bool) -> list[StoredMessage]:
        if interruptible:
            conn.set_progress_handler(spent, _SEARCH_STEPS)
        try:
            bounds = {"match": match, "low": low, "high": high, "n": n}
            rows = conn.execute(sql, {**params, **bounds}).fetchall()
        except sqlite3.OperationalError as exc:
            if interruptible and spent():
                raise Interrupted from exc
            raise
        return [_row_to_message(r) for r in rows]

    conn.execute("BEGIN")
    try:
        (newest,) = conn.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()
        top = start(newest, before_id)
        return scan(fetch, message_id, top, limit, spent, first_window(words))
    finally:
        conn.set_progress_handler(None, 0)
        conn.execute("COMMIT")


def user_exists(conn: sqlite3.Connection, user_id: int) -> bool:
    return conn.execute("SELECT 1 FROM users WHERE id = ?", (user_id,)).fetchone() is not None


# --- read state -------------------------------------------------------------

#: A channel's newest message (id, seq): one probe of messages_by_channel.
_TOP = "SELECT id, seq FROM messages WHERE channel = ? ORDER BY seq DESC LIMIT 1"
#: A user's mentions in a channel after a seq: a range of the mentions index.
_MENTIONS_AFTER = "SELECT count(*) FROM mentions WHERE user_id = ? AND channel = ? AND seq > ?"
#: Most ids in one IN list.
_IN_CHUNK = 500


#: One user's marker, unread mentions and the channel's newest message, in
#: one statement (one snapshot): three probes of primary keys and indexes.
_MARKER = (
    "SELECT t.id, t.seq, r.last_read_id, r.last_read_seq,"
    " (SELECT count(*) FROM mentions m WHERE m.user_id = r.user_id"
    "  AND m.channel = r.channel AND m.seq > r.last_read_seq)"
    " FROM (SELECT 1)"
    " LEFT JOIN (SELECT id, seq FROM messages WHERE channel = ?1 ORDER BY seq DESC LIMIT 1) t"
    " LEFT JOIN read_markers r ON r.channel = ?1 AND r.user_id = ?2"
)


def marker(conn: sqlite3.Connection, channel: str, user_id: int) -> ChannelMarkers:
    """``markers`` of one user, in one statement (``SqliteStore.marker_now``)."""
    last_id, last, read_id, read_seq, mentioned = conn.execute(
        _MARKER, (channel, user_id)
    ).fetchone()
    found = {} if read_id is None else {user_id: (read_id, read_seq, mentioned)}
    return ChannelMarkers(last_id or 0, last or 0, found)


def markers(conn: sqlite3.Connection, channel: str, user_ids: Sequence[int]) -> ChannelMarkers:
    """The markers of ``user_ids`` in ``channel``, with their unread
    mentions, and the channel's newest message (one snapshot)."""
    found: dict[int, tuple[int, int, int]] = {}
    conn.execute("BEGIN")
    try:
        last_id, last = conn.execute(_TOP, (channel,)).fetchone() or (0, 0)
        ids = list(user_ids)
        for start in range(0, len(ids), _IN_CHUNK):
            chunk = ids[start : start + _IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            for uid, read_id, read_seq, mentioned in conn.execute(
                "SELECT r.user_id, r.last_read_id, r.last_read_seq,"
                " (SELECT count(*) FROM mentions m WHERE m.user_id = r.user_id"
                "  AND m.channel = r.channel AND m.seq > r.last_read_seq)"
                f" FROM read_markers r WHERE r.channel = ? AND r.user_id IN ({marks})",
                (channel, *chunk),
            ):
                found[uid] = (read_id, read_seq, mentioned)
    finally:
        conn.execute("COMMIT")
    return ChannelMarkers(last_id, last, found)


def unread(conn: sqlite3.Connection, user_id: int) -> list[tuple[str, ReadPoint]]:
    """Every channel where the user has a marker, with its counts: per
    channel, a probe of its newest message and a range of the user's
    mentions after the marker (one statement)."""
    rows = conn.execute(
        "SELECT r.channel, r.last_read_id, r.last_read_seq,"
        " coalesce(t.id, 0), coalesce(t.seq, 0),"
        " (SELECT count(*) FROM mentions m WHERE m.user_id = r.user_id"
        "  AND m.channel = r.channel AND m.seq > r.last_read_seq)"
        " FROM read_markers r LEFT JOIN messages t ON t.channel = r.channel"
        "  AND t.seq = (SELECT max(seq) FROM messages WHERE channel = r.channel)"
        " WHERE r.user_id = ?",
        (user_id,),
    ).fetchall()
    return [(row[0], ReadPoint(*row[1:])) for row in rows]


def read_point(
    conn: sqlite3.Connection, user_id: int, channel: str, message_id: int, floor: tuple[int, int]
) -> ReadPoint | None:
    """``Store.read_point``: the marker at the furthest of its stored place,
    ``floor`` and ``message_id`` (None when that is not in ``channel``)."""
    conn.execute("BEGIN")
    try:
        target = conn.execute(
            "SELECT id, seq FROM messages WHERE id = ? AND channel = ?", (message_id, channel)
        ).fetchone()
        if target is None:
            return None
        stored = conn.execute(
            "SELECT last_read_id, last_read_seq FROM read_markers"
            " WHERE user_id = ? AND channel = ?",
            (user_id, channel),
        ).fetchone()
        read_id, read_seq = max(target, floor, stored or (0, 0), key=lambda p: p[1])
        last_id, last = conn.execute(_TOP, (channel,)).fetchone()
        (mentioned,) = conn.execute(_MENTIONS_AFTER, (user_id, channel, read_seq)).fetchone()
    finally:
        conn.execute("COMMIT")
    return ReadPoint(read_id, read_seq, last_id, last, mentioned)


def last_seen(conn: sqlite3.Connection, user_ids: Sequence[int]) -> dict[int, str]:
    ids = list(user_ids)
    if not ids:
        return {}
    marks = ",".join("?" * len(ids))
    return dict(
        conn.execute(
            f"SELECT id, last_seen FROM users WHERE id IN ({marks}) AND last_seen IS NOT NULL",
            ids,
        ).fetchall()
    )


def save_read_state(
    conn: sqlite3.Connection,
    markers: Sequence[tuple[int, str, int, int]],
    seen: Sequence[tuple[int, str]],
) -> None:
    """Markers forward (never back), last-seen times (``Store.save_read_state``)."""
    conn.executemany(
        "INSERT INTO read_markers (user_id, channel, last_read_id, last_read_seq)"
        " VALUES (?, ?, ?, ?) ON CONFLICT (user_id, channel) DO UPDATE SET"
        " last_read_id = excluded.last_read_id, last_read_seq = excluded.last_read_seq"
        " WHERE excluded.last_read_seq > read_markers.last_read_seq",
        markers,
    )
    conn.executemany(
        "UPDATE users SET last_seen = ? WHERE id = ?", [(when, uid) for uid, when in seen]
    )


def _row_to_message(row: tuple[Any, ...]) -> StoredMessage:
    (
        id_,
        channel,
        user_id,
        username,
        to_user_id,
        message_type,
        content,
        media_url,
        media_type,
        duration,
        reply_to,
        created_at,
        data,
        seq,
        mentions,
        edited_at,
        deleted,
    ) = row
    room = channel[2:] if channel.startswith("r:") else None
    return StoredMessage(
        id_,
        NewMessage(
            user_id=user_id,
            username=username,
            content=content,
            message_type=message_type,
            created_at=created_at,
            room=room,
            to_user_id=to_user_id,
            media_url=media_url,
            media_type=media_type,
            duration=duration,
            reply_to=reply_to,
            data=data.encode() if data is not None else None,
            mentions=mentions_of(mentions),
            edited_at=edited_at,
            deleted=bool(deleted),
        ),
        seq,
    )


def dev_user(conn: sqlite3.Connection, username: str) -> int:
    """The id of the (first) user with this name, or a new user's id."""
    row = conn.execute(
        "SELECT id FROM users WHERE username = ? AND id > 0 ORDER BY id LIMIT 1", (username,)
    ).fetchone()
    if row is not None:
        return int(row[0])
    (user_id,) = conn.execute(
        # the smallest free id above every id in use, or any gap when the
        # largest possible id is taken
        "SELECT CASE WHEN max(id) < 9223372036854775807 THEN max(id) + 1 ELSE"
        " (SELECT u.id + 1 FROM users u WHERE u.id >= 0 AND u.id + 1 NOT IN (SELECT id FROM users)"
        " ORDER BY u.id LIMIT 1) END FROM users"
    ).fetchone()
    upsert_user(conn, user_id, username)
    return int(user_id)


def _now(now: float | None) -> str:
    return rfc3339(time.time() if now is None else now)


# --- online backup, shared with ``chatd backup`` --------------------------------

#: Pages copied per step of an online backup (4 MiB with 4 KiB pages).
BACKUP_PAGES = 1024


def backup(
    source: sqlite3.Connection,
    target: sqlite3.Connection,
    pages: int = BACKUP_PAGES,
    on_step: Callable[[int, int], object] | None = None,
) -> None:
    """Copy the database of ``source`` into ``target`` with SQLite's online
    backup API, ``pages`` pages per step, and leave the copy in rollback
    journal mode (one self-contained file, no ``-wal``/``-shm`` beside it).

    The whole copy is one snapshot: a read transaction on ``source`` is held
    across every step. In WAL mode a reader never blocks the writer, so a
    running server keeps committing meanwhile; and because the snapshot does
    not move, a commit between two steps does not restart the copy (without
    the held transaction SQLite starts over after every write by another
    connection, and a busy server could keep a large backup from ever
    finishing). ``on_step(remaining, total)`` runs after each step: it is
    Python code between steps, so Ctrl-C stops a long copy there.
    """

    def progress(status: int, remaining: int, total: int) -> None:
        del status
        if on_step is not None:
            on_step(remaining, total)

    source.execute("BEGIN")
    try:
        source.execute("SELECT count(*) FROM sqlite_schema").fetchone()  # the snapshot
        source.backup(target, pages=pages, progress=progress)
    finally:
        source.execute("COMMIT")
    target.execute("PRAGMA journal_mode = DELETE")


def check_copy(conn: sqlite3.Connection) -> tuple[str, int]:
    """``PRAGMA integrity_check`` of a database ("ok" when sound, else its
    first problem) and its number of messages."""
    (result,) = conn.execute("PRAGMA integrity_check(1)").fetchone()
    if result != "ok":
        return str(result), 0
    (count,) = conn.execute("SELECT count(*) FROM messages").fetchone()
    return "ok", int(count)


# --- the SQL both stores share, with this store's placeholder ----------------
# (moderation.py, retention.py, privacy.py, outbox.py)

_moderation = moderation_queries("?")
room_rules = _moderation.room_rules
moderate = _moderation.moderate
set_role = _moderation.set_role
declare_roles = _moderation.declare_roles
audit = _moderation.audit
block = _moderation.block
blocks_of = _moderation.blocks_of
all_blocks = _moderation.all_blocks
_retention = retention_queries("?")
horizon = _retention.horizon
purge = _retention.purge
#: Indexing the ids in [low, high) (the backlog's or the new messages'):
#: FTS5 told of each row.
_INDEX = (
    "INSERT INTO messages_search (rowid, content)"
    " SELECT id, content FROM messages WHERE id >= ? AND id < ?"
)
_search = search_queries("?")


def backfill(conn: sqlite3.Connection, limit: int) -> int:
    result: int = _search.backfill(conn, limit, _INDEX)
    return result


def index_tail(conn: sqlite3.Connection, limit: int | None) -> bool:
    """Index the oldest ``limit`` ids (None: all) of the messages stored
    since the last time, in the caller's transaction (``above`` moves up
    past them); whether every message is indexed now."""
    above, top = conn.execute(
        "SELECT above, (SELECT coalesce(max(id), 0) + 1 FROM messages) FROM search_backlog"
    ).fetchone()
    if above >= top or limit == 0:
        return bool(above >= top)
    high = top if limit is None else min(top, above + limit)
    conn.execute(_INDEX, (above, high))
    conn.execute("UPDATE search_backlog SET above = ?", (high,))
    return bool(high >= top)


_privacy = privacy_queries("?")
erase_user = _privacy.erase_user


def export_user(conn: Any, user_id: int) -> UserExport | None:
    return _privacy.export_user(conn, user_id, _MESSAGE_COLUMNS, _row_to_message)  # type: ignore[no-any-return]


_outbox = for_placeholder("?")
outbox_head = _outbox.outbox_head
outbox_pending = _outbox.outbox_pending
outbox_done = _outbox.outbox_done
outbox_retry = _outbox.outbox_retry
outbox_batch = _outbox.outbox_batch
outbox_unread = _outbox.outbox_unread
outbox_body = _outbox.outbox_body
username = _outbox.username
