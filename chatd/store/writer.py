"""Group commit, and the reads: what the SQLite and PostgreSQL stores share.

Writes (messages, and operations: plain functions of a connection) go on a
thread-safe queue. One writer thread takes whatever is waiting (up to
``MAX_GROUP``) and hands it to the store's ``_commit_group``, which commits it
in one transaction and returns one result per item (a value, or the
exception that kept that item from being committed). The results go back to
Trio with one ``run_sync_soon`` call; there each item's callback runs in
commit order, inside one ``cork.corked()`` block (the server passes its
``Fanout``: each connection's frames of the group leave in one write),
before any waiting task wakes. So delivery order is commit order, and
nothing is acknowledged before its commit.

Every queued item gets a *ticket*, its place in the queue (1, 2, ...);
``committed(ticket)`` says whether it has been committed (or failed), so a
session can read its own writes by waiting only when one is still queued.

``MAX_PENDING`` items may wait; past that, ``append`` and ``write`` wait for
room (memory stays bounded under overload).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any, Protocol

import trio

from chatd.errors import ChatError
from chatd.metrics import Metrics
from chatd.moderation import Moderated, Moderation, Role
from chatd.search import Page, Request
from chatd.store import (
    SATURATED,
    Change,
    ChannelMarkers,
    Entry,
    Missed,
    NewMessage,
    Outbox,
    Purged,
    ReadPoint,
    RoomAccess,
    StoredEvent,
    StoredMessage,
)

log = logging.getLogger("chatd.store")

#: Most items committed in one transaction.
MAX_GROUP = 512
#: Items queued before ``append``/``write`` wait: bounds memory under overload
#: (messages are refused before that: ``store.SATURATED``).
MAX_PENDING = 10_000
assert SATURATED < MAX_PENDING
#: Seconds an answer of ``room_access`` that lets a user in is reused: in a
#: reconnect storm thousands of joins of one room read it once, not each on
#: a worker thread. A room made private, or its members changed, by the CLI
#: takes effect within this; the server's own declarations (start, reload)
#: at once.
ACCESS_TTL = 5.0
#: Most (room, user) answers remembered.
ACCESS_CACHE_MAX = 100_000


class Pending:
    """One queued item: an operation, a message or a change (an edit or a
    deletion, with the channel of its message: PostgreSQL's writer locks
    it), and its callback."""

    __slots__ = ("callback", "change", "channel", "message", "op")

    def __init__(
        self,
        op: Callable[[Any], Any] | None,
        message: NewMessage | None,
        callback: Callable[[Any], None],
        change: Change | None = None,
        channel: str = "",
    ) -> None:
        self.op = op
        self.message = message
        self.callback = callback
        self.change = change
        self.channel = channel


class Cork(Protocol):
    """What a commit group's callbacks run inside (the node's fan-out)."""

    def corked(self) -> AbstractContextManager[None]: ...


class GroupWriter:
    """The queue, the writer thread and the callbacks of a store."""

    #: The writer thread's name.
    thread_name = "chatd-writer"
    #: Webhooks on: the deliveries a group's results cause (made on the
    #: writer thread, stored in the group's transaction), and what to call,
    #: on the Trio thread, once a group of messages or events is committed.
    outbox: Outbox | None = None
    outbox_wake: Callable[[], None] | None = None
    #: The store module's functions (set by each store).
    queries: Queries

    def __init__(self, metrics: Metrics | None, cork: Cork | None = None) -> None:
        self._metrics = metrics
        self._around: Callable[[], AbstractContextManager[None]] = (
            cork.corked if cork is not None else nullcontext
        )
        #: Tickets handed out, and tickets whose item is done (committed or
        #: failed): items finish in queue order.
        self._queued = 0
        self._done = 0
        self._queue: queue.SimpleQueue[Pending | None] = queue.SimpleQueue()
        self._space = trio.Semaphore(MAX_PENDING)
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stopped = trio.Event()

    # --- what a store provides (on the writer thread) -------------------------

    def _commit_group(self, group: list[Pending]) -> list[Any]:
        """Commit ``group``; one result per item, in order."""
        raise NotImplementedError

    def _close_writer(self) -> None:
        """The writer thread is done: close its connection."""
        raise NotImplementedError

    def _tend(self) -> float | None:
        """Deferred work of the store's own (SQLite's search index), done
        between groups: called after each group and when the wait it asked
        for is over; returns the seconds until it wants to run again (0:
        as soon as the queue is empty or the next group is committed;
        None: not until the next group)."""
        return None

    # --- lifecycle ------------------------------------------------------------

    def _start_writer(self) -> None:
        """Start the writer thread (from the Trio thread)."""
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(target=self._run_writer, name=self.thread_name, daemon=True)
        self._thread.start()

    async def _stop_writer(self) -> None:
        """Commit everything queued, then stop the writer thread."""
        self._queue.put(None)
        with trio.CancelScope(shield=True):
            await self._stopped.wait()
            thread = self._thread
            if thread is not None:
                await trio.to_thread.run_sync(thread.join)

    def _run_writer(self) -> None:
        assert self._token is not None
        running = True
        wait = self._tend()
        while running:
            try:
                first = self._queue.get(timeout=wait)
            except queue.Empty:
                wait = self._tend()
                continue
            group: list[Pending] = []
            if first is None:
                running = False
            else:
                group.append(first)
            while running and len(group) < MAX_GROUP:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    running = False
                else:
                    group.append(item)
            if group:
                started = time.perf_counter()
                results = self._commit_group(group)
                if self._metrics is not None:
                    self._metrics.commit_latency.observe(time.perf_counter() - started)
                    self._metrics.group_size.observe(len(group))
                try:
                    self._token.run_sync_soon(self._finish, group, results)
                except trio.RunFinishedError:  # pragma: no cover - Trio gone first
                    log.error("store: %d results lost: Trio run finished", len(group))
                wait = self._tend()
        self._close_writer()
        try:
            self._token.run_sync_soon(self._stopped.set)
        except trio.RunFinishedError:  # pragma: no cover
            pass

    def _finish(self, group: list[Pending], results: list[Any]) -> None:
        """On the Trio thread: callbacks in commit order, all inside one
        corked block."""
        self._done += len(group)
        wake = self.outbox_wake
        if wake is not None and any(isinstance(r, StoredMessage | StoredEvent) for r in results):
            wake()
        with self._around():
            for pending, result in zip(group, results, strict=True):
                self._space.release()
                try:
                    pending.callback(result)
                except Exception:  # a callback bug must not stop later ones
                    log.exception("store: callback failed")

    # --- moderation -------------------------------------------------------------

    def forget_access(self) -> None:
        raise NotImplementedError  # (``Reads``')

    async def moderate(self, action: Moderation) -> Moderated:
        q = self.queries
        try:
            result: Moderated = await self.write(lambda c: q.moderate(c, action))
        finally:
            self.forget_access()
        return result

    async def set_role(self, room: str, user_id: int, role: Role, actor_id: int, at: float) -> bool:
        q = self.queries
        found: bool = await self.write(lambda c: q.set_role(c, room, user_id, role, actor_id, at))
        self.forget_access()
        return found

    async def block(self, user_id: int, other: int, on: bool) -> list[int]:
        q = self.queries
        found: list[int] = await self.write(lambda c: q.block(c, user_id, other, on))
        return found

    async def purge(
        self,
        cursor: int,
        cutoff: Callable[[str], str | None],
        newest: str,
        limit: int,
        kept: set[str],
    ) -> Purged:
        q = self.queries

        def timed(conn: Any) -> Purged:
            started = time.perf_counter()
            b = q.purge(conn, cursor, cutoff, newest, limit, kept)
            took = time.perf_counter() - started
            return Purged(b.rooms, b.direct, b.cursor, b.finished, b.first_kept, took)

        done: Purged = await self.write(timed)
        return done

    async def backfill(self, limit: int) -> int:
        q = self.queries
        left: int = await self.write(lambda c: q.backfill(c, limit))
        return left

    # --- the webhook outbox's writes --------------------------------------------

    async def outbox_done(self, first: int, last: int, event: str) -> None:
        """Delivered, or given up: gone from the outbox."""
        q = self.queries
        await self.write(lambda c: q.outbox_done(c, first, last, event))

    async def outbox_retry(self, first: int, due: float, attempts: int) -> None:
        q = self.queries
        await self.write(lambda c: q.outbox_retry(c, first, due, attempts))

    async def outbox_batch(self, first: int, last: int) -> None:
        q = self.queries
        await self.write(lambda c: q.outbox_batch(c, first, last))

    async def outbox_body(self, delivery_id: int, body: bytes) -> None:
        q = self.queries
        await self.write(lambda c: q.outbox_body(c, delivery_id, body))

    # --- queueing -------------------------------------------------------------

    async def _enqueue(self, pending: Pending) -> int:
        """Queue ``pending`` (waiting for room); return its ticket."""
        try:
            self._space.acquire_nowait()
        except trio.WouldBlock:
            await self._space.acquire()
        self._queued += 1
        self._queue.put(pending)
        return self._queued

    def committed(self, ticket: int) -> bool:
        """Whether the item with this ticket (0: none) is done."""
        return ticket <= self._done

    @property
    def backlog(self) -> int:
        """Items queued and not yet done (at most ``MAX_PENDING``: past it,
        ``append`` and ``write`` wait)."""
        return self._queued - self._done

    async def write(self, op: Callable[[Any], Any]) -> Any:
        """Run ``op`` (a function of the writer's connection) in the next
        group commit and return its result, or raise its exception."""
        done = trio.Event()
        box: list[Any] = []

        def callback(result: Any) -> None:
            box.append(result)
            done.set()

        await self._enqueue(Pending(op, None, callback))
        with trio.CancelScope(shield=True):  # the write happens either way
            await done.wait()
        if isinstance(box[0], Exception):
            raise box[0]
        return box[0]


class Queries(Protocol):
    """The read functions of a store's module, each of a connection."""

    def room_access(self, conn: Any, room: str, user_id: int) -> RoomAccess | None: ...
    def last_seq(self, conn: Any, channel: str) -> int: ...
    def user_exists(self, conn: Any, user_id: int) -> bool: ...
    def history(
        self, conn: Any, channel: str, limit: int, offset: int
    ) -> tuple[list[StoredMessage], int]: ...
    def missed(self, conn: Any, channel: str, since_id: int, cap: int) -> Missed: ...
    def after(self, conn: Any, channel: str, after_seq: int, cap: int) -> list[StoredMessage]: ...
    def log_page(
        self, conn: Any, channel: str, after_seq: int, after_id: int, cap: int
    ) -> tuple[list[Entry], bool]: ...
    def versions(
        self, conn: Any, message_id: int, user_id: int
    ) -> list[tuple[str, str | None]]: ...
    def search(self, conn: Any, request: Request) -> Page[StoredMessage]: ...
    def backfill(self, conn: Any, limit: int) -> int: ...
    def direct_since(
        self, conn: Any, user_ids: Sequence[int], created_at: str, cap: int
    ) -> list[StoredMessage]: ...
    def markers(self, conn: Any, channel: str, user_ids: Sequence[int]) -> ChannelMarkers: ...
    def unread(self, conn: Any, user_id: int) -> list[tuple[str, ReadPoint]]: ...
    def read_point(
        self, conn: Any, user_id: int, channel: str, message_id: int, floor: tuple[int, int]
    ) -> ReadPoint | None: ...
    def last_seen(self, conn: Any, user_ids: Sequence[int]) -> dict[int, str]: ...
    def outbox_head(
        self, conn: Any, limit: int
    ) -> list[tuple[int, bytes, float, int, int | None]]: ...
    def outbox_pending(self, conn: Any) -> int: ...
    def outbox_batch(self, conn: Any, first: int, last: int) -> None: ...
    def outbox_unread(
        self, conn: Any, now: float, limit: int
    ) -> tuple[list[tuple[int, int, bytes, int]], float | None]: ...
    def outbox_body(self, conn: Any, delivery_id: int, body: bytes) -> None: ...
    def username(self, conn: Any, user_id: int) -> str: ...
    def outbox_done(self, conn: Any, first: int, last: int, event: str) -> None: ...
    def outbox_retry(self, conn: Any, first: int, due: float, attempts: int) -> None: ...
    def moderate(self, conn: Any, action: Moderation) -> Moderated | ChatError: ...
    def block(self, conn: Any, user_id: int, other: int, on: bool) -> list[int] | ChatError: ...
    def blocks_of(self, conn: Any, user_id: int) -> list[int]: ...
    def all_blocks(self, conn: Any) -> list[tuple[int, int]]: ...
    def purge(
        self,
        conn: Any,
        cursor: int,
        cutoff: Callable[[str], str | None],
        newest: str,
        limit: int,
        kept: set[str],
    ) -> Any: ...
    def set_role(
        self, conn: Any, room: str, user_id: int, role: Role, actor_id: int, at: float
    ) -> bool: ...


class _Batch:
    """Users whose markers in one channel are read together."""

    __slots__ = ("done", "result", "users")

    def __init__(self, first: int) -> None:
        self.users = [first]
        self.done = trio.Event()
        self.result: ChannelMarkers | None = None


class Reads:
    """The ``Store`` reads, on a store's ``read`` (a worker thread with a
    pooled connection) and its module's query functions (``queries``)."""

    queries: Queries
    #: channel -> the users waiting for the next read of its markers
    _marker_batches: dict[str, _Batch]
    #: channel -> set when the read of its markers under way is done
    _marker_reads: dict[str, trio.Event]
    #: Users known to be stored (with this name): connects skip the write.
    _users: dict[int, str]
    #: (room, user id, or 0 for anyone in a public room) -> (until, access)
    _access: dict[tuple[str, int], tuple[float, RoomAccess]]
    #: room -> set once the read of its access under way is done
    _reading_access: dict[str, trio.Event]

    async def read(self, fn: Callable[[Any], Any]) -> Any:
        raise NotImplementedError

    async def room_access(self, room: str, user_id: int) -> RoomAccess | None:
        hit = self._cached_access(room, user_id)
        if hit is not None:
            return hit
        reading = self._reading_access.get(room)
        if reading is not None:
            # A read of this room is under way: a public room's answer is
            # everyone's. (10,000 joins at once into one room made 3,240
            # reads before the first answer was cached, each join waiting
            # in a queue of them; now one.) A private room's is per user.
            await reading.wait()
            hit = self._cached_access(room, user_id)
            if hit is not None:
                return hit
        else:
            reading = self._reading_access[room] = trio.Event()
        q = self.queries
        try:
            result: RoomAccess | None = await self.read(lambda c: q.room_access(c, room, user_id))
        finally:
            if self._reading_access.get(room) is reading:
                del self._reading_access[room]
                reading.set()
        if result is not None and result.allowed:
            cache = self._access
            if len(cache) >= ACCESS_CACHE_MAX:
                cache.clear()
            key = (room, user_id if result.private else 0)
            cache[key] = (trio.current_time() + ACCESS_TTL, result)
        return result

    def _cached_access(self, room: str, user_id: int) -> RoomAccess | None:
        cache = self._access
        now = trio.current_time()
        for key in ((room, 0), (room, user_id)):
            hit = cache.get(key)
            if hit is not None and hit[0] > now:
                return hit[1]
        return None

    def forget_access(self) -> None:
        """Read every room's access afresh (rooms were declared)."""
        self._access.clear()

    async def blocks(self, user_id: int) -> list[int]:
        q = self.queries
        found: list[int] = await self.read(lambda c: q.blocks_of(c, user_id))
        return found

    async def all_blocks(self) -> list[tuple[int, int]]:
        q = self.queries
        found: list[tuple[int, int]] = await self.read(q.all_blocks)
        return found

    async def last_seq(self, channel: str) -> int:
        q = self.queries
        seq: int = await self.read(lambda c: q.last_seq(c, channel))
        return seq

    async def user_exists(self, user_id: int) -> bool:
        if user_id in self._users:
            return True
        q = self.queries
        found: bool = await self.read(lambda c: q.user_exists(c, user_id))
        return found

    async def history(
        self, channel: str, limit: int, offset: int
    ) -> tuple[list[StoredMessage], int]:
        q = self.queries
        result: tuple[list[StoredMessage], int] = await self.read(
            lambda c: q.history(c, channel, limit, offset)
        )
        return result

    async def missed(self, channel: str, since_id: int, cap: int, page: int = 0) -> Missed:
        q = self.queries

        def read(conn: Any) -> Missed:
            where = q.missed(conn, channel, since_id, cap)
            if page and where.newest_id > since_id:
                first, more = q.log_page(conn, channel, where.after_seq, where.after_id, page)
                return where._replace(entries=tuple(first), more=more)
            return where

        result: Missed = await self.read(read)
        return result

    async def replay(
        self, channel: str, after_seq: int, after_id: int, page: int
    ) -> tuple[list[Entry], bool]:
        q = self.queries
        result: tuple[list[Entry], bool] = await self.read(
            lambda c: q.log_page(c, channel, after_seq, after_id, page)
        )
        return result

    async def versions(self, message_id: int, user_id: int) -> list[tuple[str, str | None]]:
        q = self.queries
        result: list[tuple[str, str | None]] = await self.read(
            lambda c: q.versions(c, message_id, user_id)
        )
        return result

    async def after(self, channel: str, after_seq: int, cap: int) -> list[StoredMessage]:
        q = self.queries
        result: list[StoredMessage] = await self.read(lambda c: q.after(c, channel, after_seq, cap))
        return result

    async def search(self, request: Request) -> Page[StoredMessage]:
        q = self.queries
        result: Page[StoredMessage] = await self.read(lambda c: q.search(c, request))
        return result

    async def direct_since(
        self, user_ids: Sequence[int], created_at: str, cap: int
    ) -> list[StoredMessage]:
        q, ids = self.queries, list(user_ids)
        result: list[StoredMessage] = await self.read(
            lambda c: q.direct_since(c, ids, created_at, cap)
        )
        return result

    def marker_now(self, channel: str, user_id: int) -> ChannelMarkers | None:
        return None  # (SQLite's store overrides it)

    async def marker(self, channel: str, user_id: int) -> ChannelMarkers:
        # (10,000 joins of one room in a reconnect storm read their markers
        # in a few queries, not one each on a worker thread.)
        while True:
            batch = self._marker_batches.get(channel)
            if batch is not None:
                batch.users.append(user_id)
                await batch.done.wait()
                if batch.result is not None:
                    return batch.result
                continue  # its read failed or was cancelled: read again
            batch = self._marker_batches[channel] = _Batch(user_id)
            try:
                reading = self._marker_reads.get(channel)
                if reading is not None:
                    await reading.wait()
            except BaseException:
                del self._marker_batches[channel]
                batch.done.set()  # (its users read again)
                raise
            del self._marker_batches[channel]
            done = self._marker_reads[channel] = trio.Event()
            try:
                batch.result = await self.read(
                    partial(self.queries.markers, channel=channel, user_ids=batch.users)
                )
            finally:
                del self._marker_reads[channel]
                done.set()
                batch.done.set()
            return batch.result

    # --- the webhook outbox (chatd/webhook_sender.py) ---------------------------

    async def outbox_head(self, limit: int) -> list[tuple[int, bytes, float, int, int | None]]:
        """The oldest stored ``message.created`` rows, in id order."""
        q = self.queries
        rows: list[tuple[int, bytes, float, int, int | None]] = await self.read(
            lambda c: q.outbox_head(c, limit)
        )
        return rows

    async def outbox_pending(self) -> int:
        q = self.queries
        count: int = await self.read(q.outbox_pending)
        return count

    async def outbox_unread(
        self, now: float, limit: int
    ) -> tuple[list[tuple[int, int, bytes, int]], float | None]:
        q = self.queries
        result: tuple[list[tuple[int, int, bytes, int]], float | None] = await self.read(
            lambda c: q.outbox_unread(c, now, limit)
        )
        return result

    async def username(self, user_id: int) -> str:
        q = self.queries
        name: str = await self.read(lambda c: q.username(c, user_id))
        return name

    async def unread(self, user_id: int) -> list[tuple[str, ReadPoint]]:
        q = self.queries
        result: list[tuple[str, ReadPoint]] = await self.read(lambda c: q.unread(c, user_id))
        return result

    async def read_point(
        self, user_id: int, channel: str, message_id: int, floor: tuple[int, int]
    ) -> ReadPoint | None:
        q = self.queries
        result: ReadPoint | None = await self.read(
            lambda c: q.read_point(c, user_id, channel, message_id, floor)
        )
        return result

    async def last_seen(self, user_ids: Sequence[int]) -> dict[int, str]:
        q, ids = self.queries, list(user_ids)
        result: dict[int, str] = await self.read(lambda c: q.last_seen(c, ids))
        return result
