"""The one path of every message: committed by the store, then delivered by
the bus.

A session's ``room_message`` or ``direct_message`` and a notification from
the publish API all go through ``Messages``: ``post`` queues the message for
the store's next group commit and returns at once (a session goes on reading
its socket while the message waits for its group); after the commit, on the
Trio thread and in commit order, the committed message goes to the bus,
which delivers it everywhere (the sender's own copy carries its
``request_id``). Nothing is delivered before its commit. A message the store
refuses is reported to its origin alone (``Origin.failed``), which turns it
into the sender's ``error`` frame.

Edits and deletions (``change``) take the same path: checked and committed
by the store, then delivered by the bus as ``message_edited`` /
``message_deleted``.

So a message's path runs one way: transport -> session -> ``Messages`` ->
store -> ``Messages`` (the commit callback) -> bus -> hub -> fan-out ->
transport.

Overload: a new write is refused (``admit``: ``RATE_LIMITED``, retry after
1 s) while the store's queue is full or while its connection sends faster
than the node reads it; a connection refused past ``SHED_AFTER`` is closed
(``Session._admit``), and for ``SHED_HOLD`` seconds after such a close the
node says it is saturated (``shedding``, ``/readyz``).

Pure: the store and the bus do the I/O; the clock is passed in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from chatd.bus import Bus
from chatd.errors import ChatError, ErrorCode
from chatd.hub import Peer
from chatd.metrics import Metrics
from chatd.store import SATURATED, Change, NewMessage, Store, StoredEvent, StoredMessage

P = TypeVar("P", bound=Peer)
P_co = TypeVar("P_co", bound=Peer, covariant=True)

#: What a session's error says when the store could not take its message.
NOT_STORED = "The message could not be stored; not sent"

#: A connection refused as busy (``Messages.admit``) more than ``SHED_AFTER``
#: times at a pace over ``SHED_AFTER`` per ``SHED_PERIOD`` seconds goes on
#: sending though told to wait: it is closed 1013 (``Session._admit``), and
#: the frames it sent that chatd has not read yet are dropped unread. A
#: client that waits ``retry_after`` between tries (a few messages in flight
#: each second) never comes near; one sending hundreds a second into a
#: saturated node is closed within a second. A full ``message_batch`` (100
#: entries) refused at once does not close the connection by itself.
SHED_AFTER = 100
SHED_PERIOD = 10.0
#: The ``retry_after`` of the error that goes with that close.
SHED_RETRY = 2
#: Seconds after such a close during which ``/readyz`` says the node is
#: saturated, so that a load balancer sends new connections elsewhere.
SHED_HOLD = 5.0


class Origin(Protocol[P_co]):
    """Where a message came from: the connection that gets the copy with its
    ``request_id``, and who is told when it cannot be stored."""

    @property
    def peer(self) -> P_co: ...

    def failed(self, err: ChatError, request_id: str | int | None) -> None:
        """The message was not stored (and is not delivered)."""


class Messages(Generic[P]):
    """Commit, then deliver."""

    def __init__(
        self,
        store: Store,
        bus: Bus[P],
        metrics: Metrics,
        monotonic: Callable[[], float],
        sent: Callable[[StoredMessage], None] | None = None,
    ) -> None:
        """``sent`` runs after each delivery of a message from a connection
        of this node (its sender's read marker and typing move on)."""
        self._store = store
        self._bus = bus
        self._metrics = metrics
        self._monotonic = monotonic
        self._sent = sent
        #: When a connection was last closed for sending on while busy.
        self._shed_at = -math.inf

    def admit(self, behind: bool = False) -> None:
        """Refuse a new write while the store is saturated (``SATURATED``
        writes waiting), or one from a connection that sends faster than
        the node reads it (``behind``: the node's CPU is what is short):
        ``RATE_LIMITED`` with ``retry_after`` 1, nothing
        stored, the sender's own limits untouched. Refusing keeps the
        queue, and memory, short when the store is what is slow: senders
        get an answer at once instead of a stall at the queue's hard bound
        (bench/analysis.md, "Overload"). A connection that goes on sending
        is closed (``SHED_AFTER``)."""
        if behind or self._store.backlog >= SATURATED:
            self._metrics.shed.inc()
            raise ChatError(
                ErrorCode.RATE_LIMITED, "The server is busy; try again", {"retry_after": 1}
            )

    def shed(self) -> None:
        """A connection is being closed for sending on while busy."""
        self._metrics.busy_closes.inc()
        self._shed_at = self._monotonic()

    def shedding(self) -> bool:
        """Whether a connection was closed for sending on while busy in the
        last ``SHED_HOLD`` seconds: the node is overloaded."""
        return self._monotonic() - self._shed_at < SHED_HOLD

    async def post(
        self, message: NewMessage, origin: Origin[P], request_id: str | int | None
    ) -> int:
        """Queue ``message`` for commit (waits only while the store's queue
        is full); deliver it once committed. Returns the write's ticket
        (``Store.committed``)."""
        bus = self._bus
        metrics = self._metrics
        monotonic = self._monotonic
        received = monotonic()
        peer = origin.peer
        sent = self._sent

        def committed(result: StoredMessage | Exception) -> None:
            if isinstance(result, Exception):
                origin.failed(_as_chat_error(result, NOT_STORED), request_id)
                return
            bus.message(result, peer, request_id)
            if sent is not None:
                sent(result)
            metrics.messages.inc()
            metrics.delivery_latency.observe(monotonic() - received)

        return await self._store.append(message, committed)

    async def change(
        self,
        change: Change,
        origin: Origin[P] | None,
        request_id: str | int | None = None,
        done: Callable[[StoredEvent | ChatError], None] | None = None,
    ) -> int:
        """Queue an edit or a deletion; once committed, deliver its event
        like a message (``origin``'s copy with ``request_id``). A refusal
        goes to ``origin`` (its error frame) and to ``done``. Returns the
        write's ticket."""
        bus = self._bus
        metrics = self._metrics
        peer = origin.peer if origin is not None else None

        def committed(result: StoredEvent | Exception) -> None:
            if isinstance(result, Exception):
                err = _as_chat_error(result, "The change could not be stored")
                if origin is not None:
                    origin.failed(err, request_id)
                if done is not None:
                    done(err)
                return
            bus.message(result, peer, request_id)
            metrics.changes.labels(result.kind).inc()
            if done is not None:
                done(result)

        return await self._store.change(change, committed)

    async def publish(
        self, message: NewMessage, done: Callable[[StoredMessage | ChatError], None]
    ) -> None:
        """Queue ``message`` (from no connection: a notification) for
        commit; deliver it once committed, and tell ``done`` the outcome."""
        bus = self._bus
        metrics = self._metrics

        def committed(result: StoredMessage | Exception) -> None:
            if isinstance(result, Exception):
                done(_as_chat_error(result, "The notification could not be stored"))
                return
            bus.message(result)
            metrics.published.inc()
            done(result)

        await self._store.append(message, committed)


def _as_chat_error(exc: Exception, message: str) -> ChatError:
    """A store's refusal as the client sees it: its own ``ChatError`` (a
    ``reply_to`` outside the channel), else ``INTERNAL_ERROR``."""
    if isinstance(exc, ChatError):
        return exc
    return ChatError(ErrorCode.INTERNAL_ERROR, message)
