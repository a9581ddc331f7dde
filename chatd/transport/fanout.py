"""A node's fan-out: the cork, and runs of one room's messages.

The server makes one ``Fanout`` per node and hands it to the store (which
runs each commit group's callbacks inside ``corked()``), to the hub (which
sends each room message through ``broadcast``) and to every connection
(whose writes consult it). Nothing here is global: two servers in one
process each have their own.

Corked
    Within a ``corked()`` block, a connection with nothing buffered buffers
    what it is sent instead of writing it (``defer``); at the end of the
    block each such connection writes all of it in one ``writev``
    (``flush``). So a commit group costs one system call per member, not
    one per message.

Runs
    Consecutive messages to one room within a corked block are a *run*:
    ``broadcast`` gathers each message's shared frame (and the sender's own
    copy, which carries its ``request_id``); when the run ends, the frames
    are joined once per compression setting and each member takes the
    joined bytes in one step (``send_joined``); the senders get theirs
    message by message. Outside a block, a broadcast is a run of one,
    written at once. The run still pending when a block ends is written
    after the block's buffers are flushed, at once, not buffered first.

    A run ends before anything else is written to any connection: a
    connection's ``send`` and ``close`` call ``end_run`` first when a run is
    pending. So every connection gets its frames in the order they were
    sent, and a run never spans an await (it lives inside one synchronous
    corked block).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Generic, Protocol, TypeVar

from chatd.transport.frames import OutFrame


class Member(Protocol):
    """A connection as the fan-out drives it."""

    def send(self, frame: OutFrame) -> None:
        """Queue one frame (ends a pending run first)."""

    def send_joined(self, frames: list[OutFrame], joined: dict[int | None, bytes]) -> None:
        """Queue a run's frames; ``joined`` caches their joined bytes per
        compression setting, shared by the run's members."""

    def flush(self) -> None:
        """Write what is buffered now, in one ``writev``."""


M = TypeVar("M", bound=Member)


class Run(Generic[M]):
    """Consecutive messages to one room: the room's set of connections,
    each message's shared frame, and its sender and the sender's own copy
    (None when it has none)."""

    __slots__ = ("copies", "frames", "owns", "peers")

    def __init__(self, peers: set[M]) -> None:
        self.peers = peers
        self.frames: list[OutFrame] = []
        self.owns: list[M | None] = []
        self.copies: list[OutFrame | None] = []


class Fanout(Generic[M]):
    """The cork and the pending run of one node."""

    __slots__ = ("_deferred", "corking", "run")

    def __init__(self) -> None:
        #: Inside a ``corked()`` block: connections buffer instead of writing.
        self.corking = False
        #: The run being gathered (None: none). Connections end it before
        #: any other write.
        self.run: Run[M] | None = None
        #: Connections that buffered while corked, flushed at the end.
        self._deferred: list[M] = []

    @contextmanager
    def corked(self) -> Iterator[None]:
        """Within the block, data for a connection with nothing buffered is
        buffered instead of written; at the end each such connection writes
        all of it in one ``writev``. Blocks nest: the outer one flushes."""
        if self.corking:
            yield
            return
        self.corking = True
        try:
            yield
        finally:
            self.corking = False
            deferred, self._deferred = self._deferred, []
            for conn in deferred:
                conn.flush()
            if self.run is not None:
                # The last run goes after what the block buffered, written
                # at once: each member's bytes in one write, not buffered
                # and flushed (a group of one message is all run: about 40%
                # of the fan-out's cost at 500 messages/s).
                self.end_run()

    def defer(self, conn: M) -> None:
        """``conn`` buffered its first bytes of this corked block: flush it
        at the end of the block."""
        self._deferred.append(conn)

    def broadcast(
        self, peers: set[M], frame: OutFrame, own: M | None, own_frame: OutFrame | None
    ) -> None:
        """``frame`` to every one of ``peers`` but ``own``, ``own_frame`` to
        ``own``. ``peers`` is a room's own set (the same object for every
        message to that room). While corked, gathered into the run of
        ``peers``' room, written when it ends; otherwise a run of one, now."""
        run = self.run
        if run is None or run.peers is not peers:
            if run is not None:
                self.end_run()
            run = self.run = Run(peers)
        run.frames.append(frame)
        run.owns.append(own)
        run.copies.append(own_frame)
        if not self.corking:
            self.end_run()

    def end_run(self) -> None:
        """Write the pending run: the joined frames to each member (one join
        per compression setting), message by message to its senders."""
        run = self.run
        assert run is not None
        self.run = None
        frames, owns = run.frames, run.owns
        joined: dict[int | None, bytes] = {}
        senders = {conn for conn in owns if conn is not None}
        for conn in run.peers:
            if conn not in senders:
                conn.send_joined(frames, joined)
        for conn in senders:
            member = conn in run.peers
            for frame, own, copy in zip(frames, owns, run.copies, strict=True):
                if own is conn:
                    if copy is not None:
                        conn.send(copy)
                elif member:
                    conn.send(frame)
