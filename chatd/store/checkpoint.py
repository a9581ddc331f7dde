"""WAL checkpoints of the SQLite store, on a connection and a thread of their
own, never on the commit path.

Why: SQLite's automatic checkpoint runs inside the commit that takes the WAL
past 1,000 pages, on the writer's thread, so that commit and every message
queued behind it wait for the copy and its fsyncs (at 500 messages/s, one
message in a thousand waited 5-6 ms: docs/architecture.md). So the writer's
connection has ``wal_autocheckpoint = 0``, and checkpoints are the
``Checkpointer``'s.

**A round** runs on the checkpointer's thread when the store asks for one
(``SqliteStore.checkpoint``: its timer every ``checkpoint_interval_seconds``
while commits happen, and once more after they stop; a test, at once):

1. A PASSIVE checkpoint. It copies into the database every WAL frame that no
   reader still needs, then fsyncs the database. It takes no lock the writer
   waits for, so it never holds up a commit: the writer keeps appending
   meanwhile (measured: commit times the same with it as with no checkpoint
   at all). When it has copied everything, the writer's next transaction
   starts the WAL over from its beginning (SQLite does that by itself) and
   the file stops growing.
2. Under a steady load that moment may never come: every PASSIVE ends with
   frames committed while it ran, and the WAL grows (about 6.5 MB/s at 500
   messages/s, each message committed alone: three 4 KiB pages a commit).
   When the WAL holds more than ``wal_max_bytes`` of frames, a RESTART
   follows, with the writer held between two groups (``WriterGate``): it
   copies the few frames committed since the PASSIVE and makes the writer's
   next transaction start the WAL over, so the file stops growing at about
   the bound. The writer waits for its two fdatasyncs (WAL, then database):
   1-2.5 ms on this machine's disk when quiet, 8-10 ms when other writes
   share it. Only messages that arrive meanwhile wait, so the share of
   messages that wait is that time times the WAL's growth over the bound:
   with the default 256 MiB, at 500 messages/s, one RESTART in about 40 s,
   a few messages in 20,000 (64 MiB made it 1 in 1,000 to 10,000: the
   p99.9).
3. When nothing was committed since the previous round (the writer is idle)
   and the -wal file is not empty, a TRUNCATE, again with the writer held:
   it also cuts the file to zero bytes, giving the disk space back.
   Truncating a large file takes milliseconds (about 16 ms for 64 MiB
   here), so it waits for a quiet moment.

**Why hold the writer ourselves.** RESTART and TRUNCATE take SQLite's write
lock, and a writer that finds it taken sleeps in SQLite's busy handler (1,
2, 5, 10 ms ...), longer than the checkpoint lasts. Kept between groups by
an in-process lock instead, the writer waits exactly as long as the
checkpoint, and the checkpoint never waits for a transaction. The
checkpointer's connection has ``busy_timeout = 0``: a reader in the way (a
``chatd backup`` holds one snapshot for the whole copy) makes it give up at
once, ``busy``, instead of holding the writer; the next round tries again.
While a reader holds an old snapshot no checkpoint can copy past it and the
WAL grows: that is SQLite's rule.

**Closing.** The store stops its timer, its writer (which commits what is
queued), its readers, then the checkpointer, which finishes the round it is
in and closes its connection last: SQLite checkpoints and deletes the WAL
when the last connection closes.

Each checkpoint is counted in the metrics (its mode, result and time) with
the WAL's size and the frames it left (``chatd_sqlite_*``,
docs/operations.md).
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import trio

from chatd.metrics import Metrics
from chatd.store.schema import connect

log = logging.getLogger("chatd.store")

#: Bytes of a WAL frame's header (before the page).
FRAME_HEADER = 24
#: Defaults of ``[storage] checkpoint_interval_seconds`` and ``wal_max_bytes``.
CHECKPOINT_INTERVAL = 1.0
WAL_MAX_BYTES = 256 << 20


class Checkpoint(NamedTuple):
    """What one checkpoint did."""

    #: "PASSIVE", "RESTART" or "TRUNCATE".
    mode: str
    #: "done"; "busy": it could not do all it was asked (a reader, or another
    #: process's checkpoint or write, in the way); "error".
    result: str
    #: Frames in the WAL (SQLite's "log"; 0 after a TRUNCATE, -1 on error).
    frames: int
    #: Of them, frames copied into the database (-1 on error).
    copied: int
    #: Size of the -wal file after it.
    wal_bytes: int
    seconds: float

    @property
    def left(self) -> int:
        """Frames not yet in the database (a crash now replays them at open)."""
        return max(0, self.frames - self.copied)


class WriterGate:
    """Lets the checkpointer keep the writer between two commit groups.

    The writer runs each group inside ``group()``; ``hold()`` waits for the
    group in progress, if any, to end, and keeps the next from starting until
    its block ends. A writer that finds someone waiting lets it go first, so a
    busy writer cannot starve the checkpointer (a plain lock is not fair).
    The writer's cost is one event check and one uncontended lock a group.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: Clear while someone holds the gate or waits for it (the writer
        #: waits for it); ``wanted`` is its inverse, for others to wait on.
        self._free = threading.Event()
        self._free.set()
        self.wanted = threading.Event()

    @contextmanager
    def group(self) -> Iterator[None]:
        """The writer's side: around one group."""
        if not self._free.is_set():
            self._free.wait()
        with self._lock:
            yield

    @contextmanager
    def hold(self) -> Iterator[None]:
        """The holder's side: the writer is between groups for the block."""
        self._free.clear()
        self.wanted.set()
        try:
            with self._lock:
                yield
        finally:
            self.wanted.clear()
            self._free.set()


class Checkpointer:
    """The checkpointer's connection and thread. ``open`` (on a worker
    thread, once the database exists), ``start``, ``round`` any number of
    times, ``stop``."""

    thread_name = "chatd-sqlite-checkpointer"

    def __init__(
        self,
        path: str,
        synchronous: str,
        gate: WriterGate,
        commits: Callable[[], int],
        wal_max_bytes: int = WAL_MAX_BYTES,
        metrics: Metrics | None = None,
    ) -> None:
        self.path = path
        self.wal_max_bytes = wal_max_bytes
        self._synchronous = synchronous
        self._gate = gate
        #: Groups the writer has committed so far (read on this thread).
        self._commits = commits
        self._commits_seen = 0
        #: Whether the last round found nothing committed since the one before.
        self.idle = False
        self._metrics = metrics
        self._conn: sqlite3.Connection | None = None
        self._frame_bytes = 4096 + FRAME_HEADER
        self._requests: queue.SimpleQueue[Callable[[list[Checkpoint]], None] | None] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None

    # --- lifecycle ------------------------------------------------------------

    def open(self) -> None:
        """Open the connection (blocking: call it on a worker thread)."""
        conn = connect(self.path, synchronous=self._synchronous)
        # Never wait for a lock: a checkpoint that would wait gives up (busy)
        # and the next round tries again.
        conn.execute("PRAGMA busy_timeout = 0")
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
        self._frame_bytes = int(page_size) + FRAME_HEADER
        self._conn = conn

    def start(self) -> None:
        """Start the thread (from the Trio thread)."""
        self._token = trio.lowlevel.current_trio_token()
        self._commits_seen = self._commits()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Let the round in progress, and any asked for, finish; close."""
        thread = self._thread
        if thread is None:
            if self._conn is not None:
                self._conn.close()
            return
        self._requests.put(None)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(thread.join)

    async def round(self) -> list[Checkpoint]:
        """Run a round on the checkpointer's thread; what it did."""
        done = trio.Event()
        box: list[list[Checkpoint]] = []

        def reply(result: list[Checkpoint]) -> None:
            box.append(result)
            done.set()

        self._requests.put(reply)
        await done.wait()
        return box[0]

    # --- the thread -----------------------------------------------------------

    def _run(self) -> None:
        assert self._conn is not None and self._token is not None
        try:
            while (reply := self._requests.get()) is not None:
                result = self._round()
                try:
                    self._token.run_sync_soon(reply, result)
                except trio.RunFinishedError:  # pragma: no cover - Trio gone first
                    pass
        finally:
            self._conn.close()  # the last connection: SQLite checkpoints at close

    def _round(self) -> list[Checkpoint]:
        commits = self._commits()
        self.idle = idle = commits == self._commits_seen
        self._commits_seen = commits
        passive = self._checkpoint("PASSIVE")
        done = [passive]
        if idle and passive.frames >= 0 and passive.wal_bytes > 0:
            mode = "TRUNCATE"
        elif passive.frames * self._frame_bytes > self.wal_max_bytes:
            mode = "RESTART"
        else:
            return done
        with self._gate.hold():
            done.append(self._checkpoint(mode))
        return done

    def _checkpoint(self, mode: str) -> Checkpoint:
        conn = self._conn
        assert conn is not None
        started = time.perf_counter()
        try:
            busy, frames, copied = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
            result = "busy" if busy else "done"
        except sqlite3.Error as exc:
            log.warning("store: %s checkpoint failed: %s", mode, exc)
            frames = copied = -1
            result = "error"
        seconds = time.perf_counter() - started
        try:
            wal_bytes = os.stat(self.path + "-wal").st_size
        except OSError:
            wal_bytes = 0
        done = Checkpoint(mode, result, frames, copied, wal_bytes, seconds)
        if mode != "PASSIVE" or result != "done":
            log.debug("store: checkpoint %s", done)
        metrics = self._metrics
        if metrics is not None:
            metrics.checkpoint_latency.labels(mode).observe(seconds)
            metrics.checkpoints.labels(mode, result).inc()
            metrics.wal_bytes.set(wal_bytes)
            if frames >= 0:
                metrics.wal_frames.set(frames)
                metrics.wal_frames_left.set(done.left)
        return done
