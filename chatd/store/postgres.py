"""The PostgreSQL store: one message log that several chatd nodes share.

It has the SQLite store's shape and semantics (``sqlite.py``): writes are
queued by the Trio side and committed in groups by one writer thread
(``writer.GroupWriter``, shared with SQLite), which hands the results back
with one ``run_sync_soon``; there every callback runs in commit order inside
one corked block. A group that fails is rolled back and each of its
operations run alone, so one bad operation fails only itself. Reads run on
Trio worker threads. psycopg 3 is used through its synchronous API on
threads: its async API runs only on asyncio.

**Seqs and ids in commit order, whichever node commits.** Every channel (a
room, or one direct conversation) has a row in ``channels`` holding its last
seq. A group's transaction first locks the rows of the channels it writes to,
in sorted order (``INSERT .. ON CONFLICT DO UPDATE .. RETURNING seq``, one per
channel, so two nodes never wait for each other in a cycle), and only then
takes ids from the sequence; it numbers its messages from the seqs it read and
writes the new last seqs back before COMMIT. The row locks are held until
COMMIT, so another writer of the same channel waits, then reads the seq this
one wrote and takes later ids: within a channel seqs are dense and both seqs
and ids increase in commit order. Nothing about seqs is cached between
transactions (other nodes write too).

A group is three round trips: one pipeline with BEGIN, the channel locks,
``nextval`` for the ids and the ``reply_to`` targets (checked in the
transaction, as on SQLite: a bad one is *returned* as INVALID_FORMAT and the
rest of the group commits); the rows, with COPY; one pipeline with the new
seqs and COMMIT. An operation given to ``write`` (a function of the
connection) runs in queue order between the first and the last; the messages
queued before it are inserted first, so it sees them.

**A lost connection is never a false acknowledgement.** When the writer's
connection breaks, the operations of that group get the exception in their
callbacks, never a ``StoredMessage``, unless the break happened before COMMIT
was sent: then nothing of it was committed, and the group is tried once more
on a new connection (so a connection that died while idle, PostgreSQL having
restarted meanwhile, costs nobody an error). After a failed attempt to
connect, the next waits a backoff (50 ms doubling to 2 s) on the writer
thread: never a spin, never the Trio thread. Reads that fail that way raise
``ChatError(INTERNAL_ERROR, "Storage is unavailable; try again")``; a read
that finds its pooled connection dead is retried once on a new one (reads are
idempotent). Connections time out in a few seconds (``connect_timeout``, TCP
keepalives, ``tcp_user_timeout``; a DSN's own values win), and PostgreSQL ends
a writer's session that stays idle inside a transaction for 10 s (a frozen
node), so no node holds other nodes' channels for longer.

**Read connections** are a small list, like SQLite's readers, not
psycopg_pool: at most ``pool_size`` reads run at once anyway (a
CapacityLimiter), connections are opened when first needed and dropped when
broken, and that is all a pool would do here; psycopg_pool would add a
dependency and its own maintenance threads to every deployment.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from typing import Any

import msgspec
import psycopg
import trio
from psycopg import conninfo as pg_conninfo
from psycopg.pq import TransactionStatus

from chatd import edits
from chatd.config import RoomsConfig
from chatd.errors import (
    ChatError,
    ErrorCode,
    StorageError,
    blocked,
    invalid_format,
    message_not_found,
)
from chatd.metrics import Metrics
from chatd.protocol import rfc3339
from chatd.search import Interrupted, Page, Request, first_window, scan, start, tsquery
from chatd.store import (
    Admin,
    Change,
    Changed,
    ChannelMarkers,
    Committed,
    Entry,
    Missed,
    NewMessage,
    ReadPoint,
    RoomAccess,
    StoredEvent,
    StoredMessage,
    event_of,
    merge_log,
    room_channel,
)
from chatd.store.moderation import for_placeholder as moderation_queries
from chatd.store.outbox import for_placeholder
from chatd.store.pgschema import migrate, stored_text
from chatd.store.privacy import UserExport
from chatd.store.privacy import for_placeholder as privacy_queries
from chatd.store.retention import for_placeholder as retention_queries
from chatd.store.search import for_placeholder as search_queries
from chatd.store.search import message_id, readable
from chatd.store.sqlite import channel_of, mentions_of, mentions_text
from chatd.store.writer import Cork, GroupWriter, Pending, Queries, Reads

log = logging.getLogger("chatd.store")

#: Seconds to wait for a connection to PostgreSQL.
CONNECT_TIMEOUT = 3
#: The writer's wait before connecting again after a failed attempt: doubles
#: from the first to the second with each failure in a row.
BACKOFF = (0.05, 2.0)
#: The writer's ``idle_in_transaction_session_timeout``: a node that stops
#: in the middle of a transaction (frozen, paused) loses its session, and
#: with it the channel locks every other node would wait for.
WRITER_IDLE_TIMEOUT = "10s"
#: ``pg_advisory_xact_lock`` key serializing ``dev_user`` across nodes.
DEV_USER_LOCK = 0x636861746402
#: Session advisory lock of the node that sends the webhooks.
OUTBOX_LOCK = 0x636861746403
#: Connection parameters used unless the DSN sets them.
CONNECTION_DEFAULTS: dict[str, Any] = {
    "connect_timeout": CONNECT_TIMEOUT,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
    "application_name": "chatd",
}
#: What a lost or refused connection raises (a deadlock raises a subclass of
#: OperationalError too; ``_broken`` tells them apart).
CONNECTION_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)

Conn = psycopg.Connection[tuple[Any, ...]]
Operation = Callable[[Conn], Any]

_MESSAGE_COLUMNS = (
    "id, channel, user_id, username, to_user_id, message_type, content,"
    " media_url, media_type, duration, reply_to, created_at, data, seq, content_raw, mentions,"
    " edited_at, deleted, pos"
)
# (A channel without a row has had no event: its last position is its last seq.)
_LOCK_CHANNEL = (
    "WITH last AS (SELECT coalesce(max(seq), 0) AS seq FROM messages WHERE channel = %s)"
    " INSERT INTO channels (name, seq, pos) SELECT %s, last.seq, last.seq FROM last"
    " ON CONFLICT (name) DO UPDATE SET seq = channels.seq RETURNING seq, pos"
)
_NEXT_IDS = "SELECT nextval('messages_id_seq') FROM generate_series(1, %s)"
_REPLY_TARGETS = "SELECT id, channel FROM messages WHERE id = ANY(%s::bigint[])"
_COPY_MESSAGES = (
    "COPY messages (id, channel, seq, user_id, username, to_user_id, message_type,"
    " content, content_raw, media_url, media_type, duration, reply_to, created_at, data,"
    " mentions, pos) FROM STDIN"
)
_KNOWN_USERS = "SELECT id FROM users WHERE id = ANY(%s::bigint[]) AND id <> 0"
#: Which (recipient, sender) pairs are blocked: a recipient's blocks.
_BLOCKED = (
    "SELECT b.user_id, b.blocked_id FROM blocks b"
    " JOIN unnest(%s::bigint[], %s::bigint[]) AS p(r, s) ON b.user_id = p.r AND b.blocked_id = p.s"
)
_ADD_MENTIONS = (
    "INSERT INTO mentions (user_id, channel, seq, message_id) VALUES (%s, %s, %s, %s)"
    " ON CONFLICT DO NOTHING"
)
_FIRST_MARKERS = (
    "INSERT INTO read_markers (user_id, channel, last_read_id, last_read_seq)"
    " VALUES (%s, %s, 0, 0) ON CONFLICT DO NOTHING"
)
_SET_SEQ = "UPDATE channels SET seq = %s, pos = %s WHERE name = %s"


def conninfo(dsn: str) -> str:
    """``dsn`` with chatd's connection defaults for what it leaves unset."""
    given = pg_conninfo.conninfo_to_dict(dsn)
    return pg_conninfo.make_conninfo(
        dsn, **{k: v for k, v in CONNECTION_DEFAULTS.items() if k not in given}
    )


def describe(dsn: str) -> str:
    """Where ``dsn`` points, for messages: host, port and database, never
    the password."""
    try:
        info = pg_conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        return "(unparsable dsn)"
    return f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"


def unavailable() -> ChatError:
    """What a client is told when PostgreSQL cannot be reached."""
    return ChatError(ErrorCode.INTERNAL_ERROR, "Storage is unavailable; try again")


def _broken(conn: Conn) -> bool:
    return conn.closed or conn.broken


class _Lost(Exception):
    """The writer's connection is gone (or cannot be made): ``error`` is what
    the group's callbacks get."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class PostgresStore(Reads, GroupWriter):
    """The shared store. Use ``open_postgres_store`` to run one."""

    thread_name = "chatd-postgres-writer"
    queries: Queries = sys.modules[__name__]  # this module's functions

    def __init__(
        self,
        dsn: str,
        pool_size: int = 4,
        metrics: Metrics | None = None,
        cork: Cork | None = None,
    ) -> None:
        super().__init__(metrics, cork)
        self.dsn = dsn
        self._conninfo = conninfo(dsn)
        self._readers: list[Conn] = []
        self._read_limiter = trio.CapacityLimiter(pool_size)
        self._closed = False
        #: Users known to be stored with this name: connects skip the write.
        self._users: dict[int, str] = {}
        self._access = {}
        self._reading_access = {}
        self._marker_batches = {}
        self._marker_reads = {}
        # Owned by the writer thread:
        self._conn: Conn | None = None
        self._failures = 0
        self._retry_at = 0.0
        self._commit_sent = False
        #: The session holding OUTBOX_LOCK (this node sends the webhooks).
        self._leader: Conn | None = None

    # --- lifecycle ----------------------------------------------------------

    def _open(self) -> None:
        try:
            conn = self._connect_writer()
        except psycopg.Error as exc:
            detail = " ".join(str(exc).split())
            raise StorageError(f"database {describe(self._conninfo)}: {detail}") from None
        try:
            migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _connect_writer(self) -> Conn:
        conn: Conn = psycopg.connect(self._conninfo, autocommit=True)
        try:
            conn.execute(
                "SELECT set_config('idle_in_transaction_session_timeout', %s, false)",
                (WRITER_IDLE_TIMEOUT,),
            )
        except BaseException:
            conn.close()
            raise
        return conn

    async def _start(self) -> None:
        await trio.to_thread.run_sync(self._open)
        self._start_writer()

    async def _stop(self) -> None:
        """Commit everything queued, then stop the writer and close."""
        await self._stop_writer()
        with trio.CancelScope(shield=True):
            self._closed = True
            readers, self._readers = self._readers, []
            if self._leader is not None:
                readers.append(self._leader)
                self._leader = None
            await trio.to_thread.run_sync(_close_all, readers)

    # --- the writer thread --------------------------------------------------

    def _close_writer(self) -> None:
        self._drop_connection()

    def _commit_group(self, group: list[Pending]) -> list[Any]:
        """The group in one transaction; when that fails, each op alone. With
        the connection gone, every op not committed gets the error."""
        try:
            return self._attempt(group)
        except _Lost as lost:
            log.warning("store: %d writes failed: %s", len(group), lost.error)
            return [lost.error] * len(group)
        except Exception as exc:
            if len(group) == 1:
                log.warning("store: write failed: %s", exc)
                return [exc]
        results: list[Any] = []
        for done, pending in enumerate(group):
            try:
                results.extend(self._attempt([pending]))
            except _Lost as lost:
                log.warning("store: %d writes failed: %s", len(group) - done, lost.error)
                results.extend([lost.error] * (len(group) - done))
                break
            except Exception as exc:
                log.warning("store: write failed: %s", exc)
                results.append(exc)
        return results

    def _attempt(self, items: list[Pending]) -> list[Any]:
        """Run ``items`` in one transaction. A lost connection raises _Lost
        (after one more try on a new connection if nothing can have been
        committed); any other failure rolls back and raises."""
        retried = False
        while True:
            try:
                conn, new = self._connection()
            except psycopg.Error as exc:
                raise _Lost(exc) from exc
            self._commit_sent = False
            try:
                return self._transaction(conn, items)
            except Exception as exc:
                if not _broken(conn):
                    self._rollback(conn)
                    raise
                self._drop_connection()
                if self._commit_sent or new or retried:
                    raise _Lost(exc) from exc
                log.info("store: connection lost before COMMIT (%s); reconnecting", exc)
                retried = True

    def _connection(self) -> tuple[Conn, bool]:
        """The writer's connection, and whether it is new. Connecting again
        waits out the backoff of the failures before it."""
        if self._conn is not None:
            return self._conn, False
        delay = self._retry_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        try:
            conn = self._connect_writer()
        except psycopg.Error:
            low, high = BACKOFF
            self._failures += 1
            self._retry_at = time.monotonic() + min(high, low * 2 ** (self._failures - 1))
            raise
        if self._failures:
            log.warning("store: connected to %s again", describe(self.dsn))
        self._failures = 0
        self._conn = conn
        return conn, True

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _rollback(self, conn: Conn) -> None:
        try:
            if conn.info.transaction_status != TransactionStatus.IDLE:
                conn.execute("ROLLBACK")
        except psycopg.Error:  # the connection went meanwhile: start afresh
            self._drop_connection()

    def _transaction(self, conn: Conn, items: list[Pending]) -> list[Any]:
        """One transaction: lock the channels, take ids, number and insert
        the messages, run the other operations in order, commit."""
        messages = [p.message for p in items if p.message is not None]
        changes = sum(p.change is not None for p in items)
        channels = sorted(
            {channel_of(m) for m in messages} | {p.channel for p in items if p.change is not None}
        )
        wanted = sorted({m.reply_to for m in messages if m.reply_to is not None})
        named = sorted({uid for m in messages for uid in m.mentions or ()})
        # (recipient, sender) of the group's direct messages: which are blocked
        pairs = sorted(
            {(m.to_user_id, m.user_id) for m in messages if m.room is None and m.user_id}
        )
        cur = conn.cursor()
        with conn.pipeline():
            conn.execute("BEGIN")
            if channels:
                cur.executemany(_LOCK_CHANNEL, [(c, c) for c in channels], returning=True)
            wanted_ids = len(messages) + changes
            taken = conn.execute(_NEXT_IDS, (wanted_ids,)) if wanted_ids else None
            found = conn.execute(_REPLY_TARGETS, (wanted,)) if wanted else None
            users = conn.execute(_KNOWN_USERS, (named,)) if named else None
            blocking = (
                conn.execute(_BLOCKED, ([r for r, _ in pairs], [s for _, s in pairs]))
                if pairs
                else None
            )
        seqs: dict[str, int] = {}
        positions: dict[str, int] = {}
        for channel in channels:
            row = cur.fetchone()
            assert row is not None
            seqs[channel], positions[channel] = int(row[0]), int(row[1])
            cur.nextset()
        read = dict(positions)
        ids = iter(sorted(int(r[0]) for r in taken)) if taken is not None else iter(())
        targets: dict[int, str] = dict(found.fetchall()) if found is not None else {}
        known = {int(r[0]) for r in users} if users is not None else set()
        refused = {(int(r), int(s)) for r, s in blocking} if blocking is not None else set()

        results: list[Any] = []
        rows: list[tuple[Any, ...]] = []
        # Mentions and the first markers of new conversations: written once
        # the group's messages are in.
        extra: list[tuple[str, tuple[Any, ...]]] = []
        for pending in items:
            message = pending.message
            if message is None:
                if rows:  # the op sees every message queued before it
                    _copy_in(cur, rows)
                    rows = []
                if pending.change is not None:
                    results.append(
                        change_message(conn, pending.change, pending.channel, next(ids), positions)
                    )
                    continue
                assert pending.op is not None
                results.append(pending.op(conn))
                continue
            channel = channel_of(message)
            if message.reply_to is not None and targets.get(message.reply_to) != channel:
                results.append(
                    invalid_format(
                        "reply_to must name a message of the same room or conversation",
                        "data.reply_to",
                    )
                )
                continue
            if message.room is None and (message.to_user_id, message.user_id) in refused:
                results.append(blocked(message.to_user_id))
                continue
            id_ = next(ids)
            seq = seqs[channel] = seqs[channel] + 1
            pos = positions[channel] = positions[channel] + 1
            targets[id_] = channel
            if message.mentions:
                kept = tuple(u for u in dict.fromkeys(message.mentions) if u in known)
                message = msgspec.structs.replace(message, mentions=kept or None)
                extra.extend((_ADD_MENTIONS, (u, channel, seq, id_)) for u in kept)
            if seq == 1 and message.room is None:  # a conversation begins
                parties = (message.user_id, message.to_user_id)
                extra.extend((_FIRST_MARKERS, (u, channel)) for u in parties if u)
            rows.append(_message_row(id_, channel, seq, message, pos))
            results.append(StoredMessage(id_, message, seq, pos))
        changed = [
            (seqs[channel], pos, channel)
            for channel, pos in positions.items()
            if pos != read[channel]
        ]
        if rows:
            _copy_in(cur, rows)
        outbox = self.outbox
        hooks = outbox(results, time.time()) if outbox is not None else []
        with conn.pipeline():
            for statement, params in extra:
                conn.execute(statement, params)
            if changed:
                cur.executemany(_SET_SEQ, changed)
            if hooks:  # (a user's message.unread already pending stays)
                cur.executemany(
                    "INSERT INTO webhook_outbox (event, body, due, user_id)"
                    " VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    hooks,
                )
            self._commit_sent = True
            conn.execute("COMMIT")
        return results

    # --- writing ------------------------------------------------------------

    async def write(self, op: Operation) -> Any:
        """Run ``op`` in the next group commit and return its result (or
        raise its exception, psycopg's own when the connection is lost)."""
        return await super().write(op)

    async def _change(self, op: Operation) -> Any:
        """``write``, with a lost connection reported as ``unavailable()``."""
        try:
            return await self.write(op)
        except CONNECTION_ERRORS as exc:
            raise unavailable() from exc

    async def append(self, message: NewMessage, on_done: Committed) -> int:
        return await self._enqueue(Pending(None, message, on_done))

    async def change(self, change: Change, on_done: Changed) -> int:
        """The message's channel is read first: the writer locks it with
        the group's other channels, in order, before taking the event's id
        and position (``change_message`` checks it is still the same)."""
        row = await self.read(
            lambda c: c.execute(
                "SELECT channel FROM messages WHERE id = %s", (change.message_id,)
            ).fetchone()
        )
        if row is None:
            on_done(message_not_found(change.message_id))
            return 0
        return await self._enqueue(Pending(None, None, on_done, change, str(row[0])))

    async def flush(self) -> None:
        """Return once everything queued before this call is committed."""
        await self._change(lambda conn: None)

    async def outbox_leader(self) -> bool:
        """Whether this node sends the webhooks: it holds ``OUTBOX_LOCK``
        in a session of its own (checked alive each call). When the node
        dies, its session ends, and the next node to ask takes the lock."""
        return bool(await trio.to_thread.run_sync(self._hold_outbox))

    def _hold_outbox(self) -> bool:
        conn = self._leader
        if conn is not None:
            try:
                conn.execute("SELECT 1")
                return True
            except psycopg.Error:
                conn.close()
                self._leader = None
        if self._closed:
            return False
        try:
            conn = psycopg.connect(self._conninfo, autocommit=True)
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (OUTBOX_LOCK,)).fetchone()
        except psycopg.Error:
            return False
        if row is not None and row[0]:
            self._leader = conn
            return True
        conn.close()
        return False

    async def direct_events_since(
        self, user_ids: Sequence[int], at: str, cap: int
    ) -> list[StoredEvent]:
        ids = list(user_ids)
        result: list[StoredEvent] = await self.read(lambda c: direct_events_since(c, ids, at, cap))
        return result

    async def last_pos(self, channel: str) -> tuple[int, int]:
        result: tuple[int, int] = await self.read(lambda c: last_pos(c, channel))
        return result

    async def log_range(
        self, channel: str, after_pos: int, upto_pos: int, floor_seq: int, floor_pos: int
    ) -> list[Entry]:
        result: list[Entry] = await self.read(
            lambda c: log_range(c, channel, after_pos, upto_pos, floor_seq, floor_pos)
        )
        return result

    async def upsert_user(self, user_id: int, username: str) -> None:
        if self._users.get(user_id) == username:
            return
        await self._change(lambda conn: upsert_user(conn, user_id, username))
        self._users[user_id] = username

    async def save_read_state(
        self, markers: Sequence[tuple[int, str, int, int]], seen: Sequence[tuple[int, str]]
    ) -> None:
        await self._change(lambda conn: save_read_state(conn, markers, seen))

    async def declare_rooms(self, rooms: RoomsConfig) -> None:
        await self._change(lambda conn: declare_rooms(conn, rooms))
        self.forget_access()

    async def dev_user(self, username: str) -> int:
        user_id: int = await self._change(lambda conn: dev_user(conn, username))
        return user_id

    # --- reading ------------------------------------------------------------

    async def read(self, fn: Callable[[Conn], Any]) -> Any:
        """Run ``fn`` on a pooled connection in a worker thread. A lost
        connection raises ``unavailable()``."""
        async with self._read_limiter:
            conn = self._readers.pop() if self._readers else None
            keep: list[Conn] = []
            try:
                return await trio.to_thread.run_sync(self._read_on_thread, fn, conn, keep)
            finally:
                for kept in keep:
                    if self._closed:
                        kept.close()
                    else:
                        self._readers.append(kept)

    def _read_on_thread(
        self, fn: Callable[[Conn], Any], conn: Conn | None, keep: list[Conn]
    ) -> Any:
        pooled = conn is not None
        while True:
            try:
                if conn is None:
                    conn = psycopg.connect(self._conninfo, autocommit=True)
                result = fn(conn)
            except Exception as exc:
                lost = isinstance(exc, CONNECTION_ERRORS)
                if conn is not None and _reusable(conn):
                    keep.append(conn)
                elif conn is not None:
                    conn.close()
                    if pooled and lost:
                        log.info("store: read connection lost (%s); reconnecting", exc)
                        conn, pooled = None, False
                        continue
                if lost:
                    raise unavailable() from exc
                raise
            keep.append(conn)
            return result


@asynccontextmanager
async def open_postgres_store(
    dsn: str,
    pool_size: int = 4,
    metrics: Metrics | None = None,
    cork: Cork | None = None,
) -> AsyncIterator[PostgresStore]:
    """Run a store for the duration of the block (connecting and migrating
    first); on exit, commit what is queued and close."""
    store = PostgresStore(dsn, pool_size, metrics, cork)
    await store._start()
    try:
        yield store
    finally:
        await store._stop()


def _copy_in(cur: psycopg.Cursor[tuple[Any, ...]], rows: list[tuple[Any, ...]]) -> None:
    """Insert message rows with COPY: for 500 rows, a third of the time of a
    pipelined ``executemany`` and a tenth of its CPU on this thread (which
    shares the GIL with the Trio thread)."""
    with cur.copy(_COPY_MESSAGES) as copy:
        for row in rows:
            copy.write_row(row)


def _reusable(conn: Conn) -> bool:
    return not _broken(conn) and conn.info.transaction_status == TransactionStatus.IDLE


def _close_all(conns: list[Conn]) -> None:
    for conn in conns:
        conn.close()


# --- operations: plain functions of a connection, shared with the CLI ---------


def _message_row(id_: int, channel: str, seq: int, m: NewMessage, pos: int) -> tuple[Any, ...]:
    content, raw = stored_text(m.content)
    return (
        id_,
        channel,
        seq,
        m.user_id,
        m.username,
        m.to_user_id,
        m.message_type,
        content,
        raw,
        m.media_url,
        m.media_type,
        m.duration,
        m.reply_to,
        m.created_at,
        m.data.decode() if m.data is not None else None,
        mentions_text(m.mentions),
        pos,
    )


def change_message(
    conn: Conn, change: Change, channel: str, event_id: int, positions: dict[str, int]
) -> StoredEvent | ChatError:
    """Edit or delete a message, as ``sqlite.change_message``, inside the
    group's transaction (its channel locked): the event takes ``event_id``
    and the channel's next position. A refusal is returned, not raised."""
    row = conn.execute(
        "SELECT channel, user_id, to_user_id, message_type, content, content_raw, created_at,"
        " deleted, edited_at, seq, mentions FROM messages WHERE id = %s",
        (change.message_id,),
    ).fetchone()
    target = None
    if row is not None and row[0] == channel:
        author, to_user, kind, content, raw, created_at, deleted, edited_at, seq, named = row[1:]
        target = edits.target(
            channel, author, to_user, kind, created_at, deleted, change.user_id,
            partial(room_access, conn),
        )  # fmt: skip
    refused = edits.check(change, target)
    if refused is not None:
        return refused
    pos = positions[channel] = positions[channel] + 1
    cur = conn.cursor()
    with conn.pipeline():
        conn.execute(
            "INSERT INTO message_versions (message_id, version, content, content_raw, edited_at)"
            " SELECT %s, count(*) + 1, %s, %s, %s FROM message_versions WHERE message_id = %s",
            (change.message_id, content, raw, edited_at, change.message_id),
        )
        if change.content is not None:
            new, new_raw = stored_text(change.content)
            conn.execute(
                "UPDATE messages SET content = %s, content_raw = %s, edited_at = %s WHERE id = %s",
                (new, new_raw, change.at, change.message_id),
            )
            kind_ = "edited"
        else:
            new, new_raw = None, None
            conn.execute(
                "UPDATE messages SET content = '', content_raw = NULL, media_url = NULL,"
                " media_type = NULL, duration = NULL, data = NULL, mentions = NULL,"
                " deleted = true WHERE id = %s",
                (change.message_id,),
            )
            mentioned = mentions_of(named) or ()
            if mentioned:
                cur.executemany(
                    "DELETE FROM mentions WHERE user_id = %s AND channel = %s AND seq = %s",
                    [(uid, channel, seq) for uid in mentioned],
                )
            kind_ = "deleted"
        conn.execute(
            "INSERT INTO message_events"
            " (id, channel, pos, message_id, kind, user_id, content, content_raw, at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (event_id, channel, pos, change.message_id, kind_, change.user_id, new, new_raw,
             change.at),
        )  # fmt: skip
    return event_of(
        event_id, channel, change.message_id, kind_, change.user_id, change.at,
        change.content, author, to_user, pos,
    )  # fmt: skip


def upsert_user(conn: Conn, user_id: int, username: str, now: float | None = None) -> None:
    conn.execute(
        "INSERT INTO users (id, username, created_at) VALUES (%s, %s, %s)"
        " ON CONFLICT (id) DO UPDATE SET username = excluded.username"
        " WHERE users.username <> excluded.username",
        (user_id, username, _now(now)),
    )


def ensure_room(
    conn: Conn, name: str, private: bool, members: tuple[int, ...] = (), now: float | None = None
) -> None:
    """Create the room if missing (or set its privacy) and add members."""
    conn.execute(
        "INSERT INTO rooms (name, private, created_at) VALUES (%s, %s, %s)"
        " ON CONFLICT (name) DO UPDATE SET private = excluded.private"
        " WHERE rooms.private <> excluded.private",
        (name, private, _now(now)),
    )
    _add(conn, name, members)


def _add(conn: Conn, room: str, members: tuple[int, ...]) -> None:
    """Add members; a new member's marker starts at the room's newest
    message."""
    if members:
        conn.execute(
            "WITH added AS (INSERT INTO room_members (room, user_id)"
            "  SELECT %(r)s, unnest(%(m)s::bigint[]) ON CONFLICT DO NOTHING RETURNING user_id),"
            " top AS (SELECT coalesce(max(id), 0) AS id, coalesce(max(seq), 0) AS seq"
            "  FROM (SELECT id, seq FROM messages WHERE channel = %(c)s"
            "   ORDER BY seq DESC LIMIT 1) t)"
            " INSERT INTO read_markers (user_id, channel, last_read_id, last_read_seq)"
            " SELECT added.user_id, %(c)s, top.id, top.seq FROM added, top"
            " ON CONFLICT DO NOTHING",
            {"r": room, "m": sorted(set(members)), "c": room_channel(room)},
        )


def declare_rooms(conn: Conn, rooms: RoomsConfig) -> None:
    """Make sure every room of the config exists. Members are added, never
    removed. In name order, so nodes starting at once lock rows alike."""
    wanted: dict[str, tuple[bool, tuple[int, ...]]] = {name: (False, ()) for name in rooms.public}
    wanted.update({name: (True, members) for name, members in rooms.private.items()})
    for name in sorted(wanted):
        private, members = wanted[name]
        ensure_room(conn, name, private, members)
    for name in sorted({*rooms.owners, *rooms.moderators}):
        declare_roles(conn, name, rooms.roles(name), time.time())


def create_room(conn: Conn, name: str, private: bool, members: tuple[int, ...] = ()) -> bool:
    """Create a new room; False (and no change) when it exists already."""
    created = conn.execute(
        "INSERT INTO rooms (name, private, created_at) VALUES (%s, %s, %s)"
        " ON CONFLICT (name) DO NOTHING RETURNING name",
        (name, private, _now(None)),
    ).fetchone()
    if created is None:
        return False
    _add(conn, name, members)
    return True


def add_members(conn: Conn, room: str, members: tuple[int, ...]) -> bool:
    """Add members to an existing room; False when there is no such room."""
    if conn.execute("SELECT 1 FROM rooms WHERE name = %s FOR SHARE", (room,)).fetchone() is None:
        return False
    _add(conn, room, members)
    return True


def list_rooms(conn: Conn) -> list[tuple[str, bool, list[int]]]:
    """Every room: name, private, member ids."""
    members: dict[str, list[int]] = {}
    for room, user_id in conn.execute("SELECT room, user_id FROM room_members ORDER BY user_id"):
        members.setdefault(room, []).append(user_id)
    return [
        (name, bool(private), members.get(name, []))
        for name, private in conn.execute("SELECT name, private FROM rooms ORDER BY name")
    ]


def dev_user(conn: Conn, username: str) -> int:
    """The id of the (first) user with this name, or a new user's id (the
    smallest free one above every id in use, else the first gap). Nodes take
    turns (an advisory lock), so two never hand out the same new id."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (DEV_USER_LOCK,))
    row = conn.execute(
        "SELECT id FROM users WHERE username = %s AND id > 0 ORDER BY id LIMIT 1", (username,)
    ).fetchone()
    if row is not None:
        return int(row[0])
    top = conn.execute("SELECT coalesce(max(id), 0) FROM users").fetchone()
    assert top is not None
    if top[0] < 2**63 - 1:
        user_id = int(top[0]) + 1
    else:
        gap = conn.execute(
            "SELECT id FROM (SELECT id, lead(id) OVER (ORDER BY id) AS next FROM users"
            " WHERE id >= 0) ids WHERE next - id > 1 ORDER BY id LIMIT 1"
        ).fetchone()
        assert gap is not None
        user_id = int(gap[0]) + 1
    upsert_user(conn, user_id, username)
    return user_id


def room_access(conn: Conn, room: str, user_id: int) -> RoomAccess | None:
    row = conn.execute(
        "SELECT private, NOT private"
        " OR EXISTS (SELECT 1 FROM room_members WHERE room = %s AND user_id = %s)"
        " FROM rooms WHERE name = %s",
        (room, user_id, room),
    ).fetchone()
    if row is None:
        return None
    return RoomAccess(room, bool(row[0]), bool(row[1]), room_rules(conn, room))


def last_seq(conn: Conn, channel: str) -> int:
    """The channel's newest seq (0: none), from the index."""
    row = conn.execute(
        "SELECT seq FROM messages WHERE channel = %s ORDER BY seq DESC LIMIT 1", (channel,)
    ).fetchone()
    return 0 if row is None else int(row[0])


def user_exists(conn: Conn, user_id: int) -> bool:
    return conn.execute("SELECT 1 FROM users WHERE id = %s", (user_id,)).fetchone() is not None


# --- read state (sqlite.py says what each returns) ----------------------------

#: A channel's newest message (id, seq), from its row in ``channels``.
_TOP = (
    "SELECT m.id, m.seq FROM channels c JOIN messages m ON m.channel = c.name AND m.seq = c.seq"
    " WHERE c.name = %s"
)
_UNREAD_MENTIONS = (
    "(SELECT count(*) FROM mentions m WHERE m.user_id = r.user_id"
    " AND m.channel = r.channel AND m.seq > r.last_read_seq)"
)


def markers(conn: Conn, channel: str, user_ids: Sequence[int]) -> ChannelMarkers:
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        last_id, last = conn.execute(_TOP, (channel,)).fetchone() or (0, 0)
        rows = conn.execute(
            f"SELECT r.user_id, r.last_read_id, r.last_read_seq, {_UNREAD_MENTIONS}"
            " FROM read_markers r WHERE r.channel = %s AND r.user_id = ANY(%s::bigint[])",
            (channel, list(user_ids)),
        ).fetchall()
    found = {int(uid): (int(i), int(s), int(n)) for uid, i, s, n in rows}
    return ChannelMarkers(int(last_id), int(last), found)


def unread(conn: Conn, user_id: int) -> list[tuple[str, ReadPoint]]:
    rows = conn.execute(
        "SELECT r.channel, r.last_read_id, r.last_read_seq, coalesce(t.id, 0),"
        f" coalesce(c.seq, 0), {_UNREAD_MENTIONS}"
        " FROM read_markers r LEFT JOIN channels c ON c.name = r.channel"
        " LEFT JOIN messages t ON t.channel = c.name AND t.seq = c.seq"
        " WHERE r.user_id = %s",
        (user_id,),
    ).fetchall()
    return [(row[0], ReadPoint(*(int(v) for v in row[1:]))) for row in rows]


def read_point(
    conn: Conn, user_id: int, channel: str, message_id: int, floor: tuple[int, int]
) -> ReadPoint | None:
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        target = conn.execute(
            "SELECT id, seq FROM messages WHERE id = %s AND channel = %s", (message_id, channel)
        ).fetchone()
        if target is None:
            return None
        stored = conn.execute(
            "SELECT last_read_id, last_read_seq FROM read_markers"
            " WHERE user_id = %s AND channel = %s",
            (user_id, channel),
        ).fetchone()
        read_id, read_seq = max(target, floor, stored or (0, 0), key=lambda p: p[1])
        last_id, last = conn.execute(_TOP, (channel,)).fetchone() or (0, 0)
        row = conn.execute(
            "SELECT count(*) FROM mentions WHERE user_id = %s AND channel = %s AND seq > %s",
            (user_id, channel, read_seq),
        ).fetchone()
    assert row is not None
    return ReadPoint(int(read_id), int(read_seq), int(last_id), int(last), int(row[0]))


def last_seen(conn: Conn, user_ids: Sequence[int]) -> dict[int, str]:
    rows = conn.execute(
        "SELECT id, last_seen FROM users WHERE id = ANY(%s::bigint[]) AND last_seen IS NOT NULL",
        (list(user_ids),),
    ).fetchall()
    return {int(uid): str(when) for uid, when in rows}


def save_read_state(
    conn: Conn, markers: Sequence[tuple[int, str, int, int]], seen: Sequence[tuple[int, str]]
) -> None:
    """Markers forward (never back; in key order, so that two nodes' writes
    lock rows alike), last-seen times."""
    cur = conn.cursor()
    if markers:
        cur.executemany(
            "INSERT INTO read_markers (user_id, channel, last_read_id, last_read_seq)"
            " VALUES (%s, %s, %s, %s) ON CONFLICT (user_id, channel) DO UPDATE SET"
            " last_read_id = excluded.last_read_id, last_read_seq = excluded.last_read_seq"
            " WHERE excluded.last_read_seq > read_markers.last_read_seq",
            sorted(markers),
        )
    if seen:
        cur.executemany(
            "UPDATE users SET last_seen = %s WHERE id = %s",
            sorted((when, uid) for uid, when in seen),
        )


def history(conn: Conn, channel: str, limit: int, offset: int) -> tuple[list[StoredMessage], int]:
    """Page ``offset`` back from the newest, oldest first, and the total kept
    (after the channel's retention horizon): one statement (one snapshot),
    the page one range of ``messages_by_channel``."""
    rows = conn.execute(
        f"SELECT t.total - t.floor, {_qualified('m')} FROM"
        " (SELECT coalesce(max(seq), 0) AS total,"
        "  coalesce((SELECT seq FROM purged WHERE channel = %(c)s), 0) AS floor"
        "  FROM messages WHERE channel = %(c)s) t"
        " LEFT JOIN messages m ON m.channel = %(c)s"
        " AND m.seq > t.total - %(o)s - %(l)s AND m.seq <= t.total - %(o)s"
        " ORDER BY m.seq",
        {"c": channel, "o": offset, "l": limit},
    ).fetchall()
    total = int(rows[0][0])
    return [_row_to_message(r[1:]) for r in rows if r[1] is not None], total


def missed(conn: Conn, channel: str, since_id: int, cap: int) -> Missed:
    """Where the messages of ``channel`` with an id above ``since_id`` start,
    at most the newest ``cap`` of them, and its newest event (``Store.missed``).

    Index lookups in one snapshot: the channel's newest message, then the
    first seq after ``since_id`` among the newest ``cap + 1`` up to it (ids
    increase with seq within a channel, and seqs are dense), then the
    newest event. An entry committed after has an id above those read: the
    replay reads it."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        top = conn.execute(
            "SELECT id, seq FROM messages WHERE channel = %(c)s ORDER BY seq DESC LIMIT 1",
            {"c": channel},
        ).fetchone()
        event = conn.execute(
            "SELECT coalesce(max(id), 0) FROM message_events WHERE channel = %s", (channel,)
        ).fetchone()
        purged, _ = horizon(conn, channel)
        first = None
        if top is not None:
            newest_seq = int(top[1])
            first = conn.execute(
                "SELECT id, seq FROM messages WHERE channel = %(c)s AND id > %(s)s"
                " AND seq > %(low)s AND seq <= %(high)s ORDER BY seq LIMIT 1",
                {"c": channel, "s": since_id, "low": newest_seq - cap - 1, "high": newest_seq},
            ).fetchone()
            start = None
            if first is not None and newest_seq - int(first[1]) + 1 > cap:
                start = conn.execute(
                    "SELECT id FROM messages WHERE channel = %s AND seq = %s",
                    (channel, newest_seq - cap),
                ).fetchone()
    newest = max(int(top[0]) if top is not None else 0, int(event[0]) if event else 0)
    whole = purged <= since_id  # (nothing after since_id purged)
    if top is None:
        return Missed(0, since_id, whole, newest)
    if first is None:
        return Missed(newest_seq, since_id, True, newest)
    if start is not None:
        return Missed(newest_seq - cap, int(start[0]), False, newest)
    return Missed(int(first[1]) - 1, since_id, whole, newest)


def after(conn: Conn, channel: str, after_seq: int, cap: int) -> list[StoredMessage]:
    """The channel's messages with a seq above ``after_seq``, oldest first,
    the oldest ``cap`` of them (one index range)."""
    rows = conn.execute(
        f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE channel = %s AND seq > %s"
        " ORDER BY seq LIMIT %s",
        (channel, after_seq, cap),
    ).fetchall()
    return [_row_to_message(r) for r in rows]


_EVENT_COLUMNS = (
    "e.id, e.channel, e.pos, e.message_id, e.kind, e.user_id, e.at, e.content, e.content_raw,"
    " m.user_id, m.to_user_id"
)
_EVENTS = f"SELECT {_EVENT_COLUMNS} FROM message_events e JOIN messages m ON m.id = e.message_id"


def events(conn: Conn, channel: str, after_id: int, cap: int) -> list[StoredEvent]:
    """The channel's edits and deletions with an id above ``after_id``,
    oldest first, at most ``cap`` (one index range)."""
    rows = conn.execute(
        f"{_EVENTS} WHERE e.channel = %s AND e.id > %s ORDER BY e.id LIMIT %s",
        (channel, after_id, cap),
    ).fetchall()
    return [_row_to_event(r) for r in rows]


def direct_events_since(
    conn: Conn, user_ids: Sequence[int], at: str, cap: int
) -> list[StoredEvent]:
    """Edits and deletions of direct messages to or from any of
    ``user_ids`` made at or after ``at``, oldest first, at most ``cap`` (a
    range of ``message_events_by_at``)."""
    if not user_ids:
        return []
    ids = list(user_ids)
    rows = conn.execute(
        f"{_EVENTS} WHERE e.at >= %s AND e.channel LIKE 'd:%%'"
        " AND (m.user_id = ANY(%s::bigint[]) OR m.to_user_id = ANY(%s::bigint[]))"
        " ORDER BY e.at, e.id LIMIT %s",  # (by time: the index's order, never all of it)
        (at, ids, ids, cap),
    ).fetchall()
    return sorted((_row_to_event(r) for r in rows), key=lambda e: e.id)


def log_page(
    conn: Conn, channel: str, after_seq: int, after_id: int, cap: int
) -> tuple[list[Entry], bool]:
    """As ``sqlite.log_page``: both reads in one snapshot."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        messages = after(conn, channel, after_seq, cap)
        found = events(conn, channel, after_id, cap)
    return merge_log(messages, found, cap)


def last_pos(conn: Conn, channel: str) -> tuple[int, int]:
    """The channel's last position and last seq (0, 0: none), from its row
    (a channel without one has had no event: its position is its seq)."""
    row = conn.execute("SELECT pos, seq FROM channels WHERE name = %s", (channel,)).fetchone()
    if row is not None:
        return int(row[0]), int(row[1])
    seq = last_seq(conn, channel)
    return seq, seq


def log_range(
    conn: Conn, channel: str, after_pos: int, upto_pos: int, floor_seq: int, floor_pos: int
) -> list[Entry]:
    """The channel's entries with a position in ``(after_pos, upto_pos]``, in
    order, in one snapshot. ``floor_pos`` is a position at or before
    ``after_pos`` and ``floor_seq`` the seq of the last message at or before
    it: the messages wanted are among the next ``upto_pos - floor_pos`` by
    seq (one index range)."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        messages = [
            m
            for m in after(conn, channel, floor_seq, upto_pos - floor_pos)
            if after_pos < m.pos <= upto_pos
        ]
        rows = conn.execute(
            f"{_EVENTS} WHERE e.channel = %s AND e.pos > %s AND e.pos <= %s ORDER BY e.pos",
            (channel, after_pos, upto_pos),
        ).fetchall()
    entries: list[Entry] = [*messages, *(_row_to_event(r) for r in rows)]
    entries.sort(key=lambda e: e.pos)
    return entries


def versions(conn: Conn, message_id: int, user_id: int) -> list[tuple[str, str | None]]:
    """As ``sqlite.versions``."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        row = conn.execute(
            "SELECT channel, user_id, to_user_id, message_type, created_at, deleted,"
            " content, content_raw, edited_at FROM messages WHERE id = %s",
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
        assert row is not None
        earlier = conn.execute(
            "SELECT content, content_raw, edited_at FROM message_versions WHERE message_id = %s"
            " ORDER BY version",
            (message_id,),
        ).fetchall()
    return [(_stored_text(c, raw), at) for c, raw, at in [*earlier, row[6:9]]]


def _stored_text(content: str, raw: bytes | None) -> str:
    return bytes(raw).decode() if raw is not None else content


def _row_to_event(row: Sequence[Any]) -> StoredEvent:
    id_, channel, pos, message_id, kind, user_id, at, content, raw, author, to_user = row
    text = _stored_text(content, raw) if content is not None else None
    return event_of(id_, channel, message_id, kind, user_id, at, text, author, to_user, pos)


def direct_since(
    conn: Conn, user_ids: Sequence[int], created_at: str, cap: int
) -> list[StoredMessage]:
    """Direct messages to or from any of ``user_ids`` created at or after
    ``created_at``, oldest first, at most ``cap`` (the partial indexes
    ``messages_direct_from``/``_to``)."""
    if not user_ids:
        return []
    ids = list(user_ids)
    rows = conn.execute(
        f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE channel LIKE 'd:%%'"
        " AND created_at >= %s AND (user_id = ANY(%s::bigint[]) OR to_user_id = ANY(%s::bigint[]))"
        " ORDER BY id LIMIT %s",
        (created_at, ids, ids, cap),
    ).fetchall()
    return [_row_to_message(r) for r in rows]


# --- search -------------------------------------------------------------------


def search(
    conn: Conn, request: Request, clock: Callable[[], float] = time.monotonic
) -> Page[StoredMessage]:
    """``Store.search``: the GIN index of ``search`` read window by window
    (``chatd.search.scan``), in one snapshot; a window still running when
    the budget is over is cancelled (``statement_timeout``), except the
    first."""
    user_id, words, channel, before_id, limit, budget, now = request
    deadline = clock() + budget
    query = tsquery(words)
    params: dict[str, Any] = {"q": query, "c": channel, "u": user_id, "now": now}
    if channel is not None:
        scope = "m.channel = %(c)s"
    else:
        scope = readable("%(u)s", "%(now)s")
    sql = (
        f"SELECT {_qualified('m')} FROM messages m"
        " WHERE m.search @@ to_tsquery('chatd_search', %(q)s)"
        f" AND m.id >= %(low)s AND m.id < %(high)s AND NOT m.deleted AND {scope}"
        " ORDER BY m.id DESC LIMIT %(n)s"
    )

    def spent() -> bool:
        return clock() > deadline

    def fetch(low: int, high: int, n: int, interruptible: bool) -> list[StoredMessage]:
        if interruptible:
            left = int((deadline - clock()) * 1000)
            conn.execute(f"SET LOCAL statement_timeout = {max(1, left)}")
        try:
            with conn.transaction():  # a savepoint: a cancelled window undoes only itself
                # Never prepared: a generic plan knows neither the words nor
                # the window, and scans the window's ids row by row (a
                # statement prepared after 5 runs took 250 ms where each
                # planned anew takes 1).
                bounds = {"low": low, "high": high, "n": n}
                rows = conn.execute(sql, {**params, **bounds}, prepare=False).fetchall()
        except psycopg.errors.QueryCanceled as exc:
            raise Interrupted from exc
        return [_row_to_message(r) for r in rows]

    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        row = conn.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()
        top = start(int(row[0]) if row is not None else 0, before_id)
        # One window for one channel: PostgreSQL intersects the words'
        # postings with the channel's index, where a window would read the
        # postings again each time (a GIN index cannot seek to an id).
        first = top if channel is not None else first_window(words)
        return scan(fetch, message_id, top, limit, spent, first)


def backfill(conn: Conn, limit: int) -> int:
    result: int = _search.backfill(conn, limit, _INDEX)
    return result


def _qualified(alias: str) -> str:
    return ", ".join(f"{alias}.{column.strip()}" for column in _MESSAGE_COLUMNS.split(","))


def _row_to_message(row: Sequence[Any]) -> StoredMessage:
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
        raw,
        mentions,
        edited_at,
        deleted,
        pos,
    ) = row
    return StoredMessage(
        id_,
        NewMessage(
            user_id=user_id,
            username=username,
            content=_stored_text(content, raw),
            message_type=message_type,
            created_at=created_at,
            room=channel[2:] if channel.startswith("r:") else None,
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
        seq if pos is None else pos,
    )


def _now(now: float | None) -> str:
    return rfc3339(time.time() if now is None else now)


# --- ``chatd user ...`` and ``chatd room ...`` on PostgreSQL ------------------


@contextmanager
def open_admin(dsn: str, rooms: RoomsConfig) -> Iterator[Admin]:
    """Connect, migrate, declare the config's rooms (as a server does) and
    run the block in one transaction. Failures of PostgreSQL come out as one
    line: ``StorageError``."""
    try:
        with psycopg.connect(conninfo(dsn), autocommit=True) as conn:
            try:
                migrate(conn)
            except RuntimeError as exc:  # a newer schema
                raise StorageError(f"database {describe(dsn)}: {exc}") from exc
            with conn.transaction():
                declare_rooms(conn, rooms)
                yield Admin(conn, sys.modules[__name__])
    except psycopg.Error as exc:
        raise StorageError(f"database {describe(dsn)}: {' '.join(str(exc).split())}") from exc


# --- the SQL both stores share, with this store's placeholder ----------------
# (moderation.py, retention.py, privacy.py, outbox.py)

_moderation = moderation_queries("%s")
room_rules = _moderation.room_rules
moderate = _moderation.moderate
set_role = _moderation.set_role
declare_roles = _moderation.declare_roles
audit = _moderation.audit
block = _moderation.block
blocks_of = _moderation.blocks_of
all_blocks = _moderation.all_blocks
#: Indexing the backlog's ids in [low, high): each row's content written
#: again, which the trigger turns into its words.
_INDEX = "UPDATE messages SET content = content WHERE id >= %s AND id < %s"
_search = search_queries("%s")
_retention = retention_queries("%s")
horizon = _retention.horizon
purge = _retention.purge
_privacy = privacy_queries("%s", raw=True)
erase_user = _privacy.erase_user


def export_user(conn: Any, user_id: int) -> UserExport | None:
    return _privacy.export_user(conn, user_id, _MESSAGE_COLUMNS, _row_to_message)  # type: ignore[no-any-return]


_outbox = for_placeholder("%s")
outbox_head = _outbox.outbox_head
outbox_pending = _outbox.outbox_pending
outbox_done = _outbox.outbox_done
outbox_retry = _outbox.outbox_retry
outbox_batch = _outbox.outbox_batch
outbox_unread = _outbox.outbox_unread
outbox_body = _outbox.outbox_body
username = _outbox.username
