"""How a node shares what happens on it: alone, or with other nodes.

A ``Bus`` takes each committed message (in commit order, on the Trio thread)
and gets it to every connection that should see it, on this node and on the
others; it is told when a user's presence in a room begins or ends on this
node and announces it wherever it must; it knows who is online in a room
(pages of members by id, and how many); and it keeps the rate limits that
count a user once, wherever the user is connected.

``LocalBus`` is the bus of a node alone, the default: delivery is the hub's
fan-out, presence is announced to the room at once, rate limits are token
buckets in memory. ``chatd.cluster.bus.RedisBus`` is the bus of several
nodes sharing Redis. ``chatd.backends.open_bus`` makes the one the config
asks for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

import msgspec

from chatd.auth import Identity
from chatd.hub import Hub, Peer
from chatd.protocol import Member, encode
from chatd.ratelimit import LimiterTable
from chatd.store import Entry
from chatd.transport.frames import OutFrame

P = TypeVar("P", bound=Peer)
#: A list of members, or the same already encoded as JSON.
Members = list[Member] | msgspec.Raw
P_contra = TypeVar("P_contra", bound=Peer, contravariant=True)


class Limits(Protocol):
    """Per-key (user id) rate limits."""

    async def take(self, key: int) -> float:
        """0 when allowed (spent), else the whole seconds to wait (>= 1)."""


class LocalLimits:
    """Token buckets in this process's memory."""

    def __init__(self, limits: Sequence[tuple[int, float]], clock: Callable[[], float]) -> None:
        self.table = LimiterTable(limits)
        self._clock = clock

    async def take(self, key: int) -> float:
        return self.table.take(key, self._clock())


class Bus(Protocol[P_contra]):
    """Delivery, presence and rate limits: this node alone, or the cluster."""

    def message(
        self,
        stored: Entry,
        origin: P_contra | None = None,
        request_id: str | int | None = None,
    ) -> None:
        """Deliver a committed message (or an edit or deletion of one)
        everywhere; ``origin``'s copy carries ``request_id``. Called in
        commit order; never blocks."""

    async def follow(self, room: str) -> None:
        """A connection is about to join ``room`` on this node: from now on
        the room's messages must reach this node's hub."""

    async def joined(
        self, peer: P_contra, room: str, first: bool, limit: int
    ) -> tuple[Members, int]:
        """``peer`` has just joined ``room`` on this node (``first``: its
        user's first connection there, to announce); return the room's first
        ``limit`` online members by id, and how many are online."""

    async def members(self, room: str, after_user_id: int, limit: int) -> tuple[list[Member], int]:
        """At most ``limit`` of the room's online members with an id above
        ``after_user_id``, by id, and how many are online."""

    def left(self, ident: Identity, room: str) -> None:
        """The user's last connection in ``room`` on this node has left."""

    def to_user(
        self, user_id: int, kind: str, payload: bytes, skip: P_contra | None = None, sender: int = 0
    ) -> None:
        """A frame that is not a message (``kind``: its type; ``payload``:
        it encoded) to every connection of ``user_id``, on every node, but
        ``skip``; not when ``user_id`` blocks ``sender``. Never blocks."""

    def blocked(self, blocker: int, blocked: int, on: bool) -> None:
        """``blocker`` has blocked ``blocked`` (``on``) or stopped: every
        node's ``Blocks`` (the hub's) is told. Never blocks."""

    def to_room(self, room: str, kind: str, payload: bytes, skip_user: int) -> None:
        """A frame that is not a message to every connection in ``room``, on
        every node, but those of ``skip_user``. Never blocks."""

    def moderated(self, room: str, user_id: int, kicked: bytes | None) -> None:
        """A moderation action on ``user_id`` in ``room`` is committed: every
        other node forgets what it cached of the room's access (roles,
        bans, mutes; the caller's store has already); with ``kicked`` (the
        frame, encoded), the user's connections in the room leave it on
        every node, each sent it, and the user's presence there ends as for
        a leave. Never blocks."""

    async def online(self, user_ids: Sequence[int]) -> set[int]:
        """Which of ``user_ids`` have a connection anywhere."""

    def user_online(self, ident: Identity) -> None:
        """The user's first connection on this node has opened."""

    def user_offline(self, ident: Identity) -> None:
        """The user's last connection on this node has closed."""

    def limits(self, name: str, limits: Sequence[tuple[int, float]]) -> Limits:
        """Rate limits named ``name`` (buckets of (capacity, period))."""


def to_channel(
    bus: Bus[Any],
    kind: str,
    fields: dict[str, Any],
    now: float,
    *,
    sender: int,
    room: str | None,
    to_user: int = 0,
) -> None:
    """A frame about ``sender`` that is not a message (a receipt, typing):
    ``{room, **fields}`` to the room's connections but the sender's, or
    ``{with_user: sender, **fields}`` to ``to_user``'s connections; never
    to a user who blocks ``sender``."""
    where: dict[str, Any] = {"room": room} if room is not None else {"with_user": sender}
    payload = encode(kind, {**where, **fields}, now)
    if room is not None:
        bus.to_room(room, kind, payload, sender)
    else:
        bus.to_user(to_user, kind, payload, sender=sender)


class _HasHub(Protocol[P]):
    hub: Hub[P]

    def left(self, ident: Identity, room: str) -> None: ...


def kick(bus: _HasHub[Any], room: str, user_id: int, kicked: bytes | None) -> None:
    """A bus's own part of ``moderated``: with ``kicked``, the user's
    connections on this node out of ``room``, and its leave announced."""
    if kicked is not None:
        gone = bus.hub.remove(room, user_id, OutFrame(kicked))
        if gone is not None:
            bus.left(gone, room)


class LocalBus(Generic[P]):
    """The bus of one node alone."""

    def __init__(
        self, hub: Hub[P], wall: Callable[[], float], monotonic: Callable[[], float]
    ) -> None:
        self.hub = hub
        self._wall = wall
        self._monotonic = monotonic

    def message(
        self, stored: Entry, origin: P | None = None, request_id: str | int | None = None
    ) -> None:
        self.hub.deliver(stored, self._wall(), origin, request_id)

    async def follow(self, room: str) -> None:
        """Every message committed on this node reaches its hub already."""

    async def joined(self, peer: P, room: str, first: bool, limit: int) -> tuple[Members, int]:
        if first:
            self.hub.announce("user_connected", peer.identity, room, self._wall())
        return self.hub.first_members(room, limit), self.hub.member_count(room)

    async def members(self, room: str, after_user_id: int, limit: int) -> tuple[list[Member], int]:
        return self.hub.members(room, after_user_id, limit), self.hub.member_count(room)

    def left(self, ident: Identity, room: str) -> None:
        self.hub.announce("user_disconnected", ident, room, self._wall())

    def to_user(
        self, user_id: int, kind: str, payload: bytes, skip: P | None = None, sender: int = 0
    ) -> None:
        self.hub.send_user(user_id, kind, OutFrame(payload), skip, sender)

    def blocked(self, blocker: int, blocked: int, on: bool) -> None:
        self.hub.blocks.set(blocker, blocked, on)

    def to_room(self, room: str, kind: str, payload: bytes, skip_user: int) -> None:
        self.hub.send_room(room, kind, OutFrame(payload), skip_user)

    def moderated(self, room: str, user_id: int, kicked: bytes | None) -> None:
        kick(self, room, user_id, kicked)

    async def online(self, user_ids: Sequence[int]) -> set[int]:
        hub = self.hub
        return {uid for uid in user_ids if hub.online(uid)}

    def user_online(self, ident: Identity) -> None:
        """(A node alone knows from its hub.)"""

    def user_offline(self, ident: Identity) -> None:
        """(A node alone knows from its hub.)"""

    def limits(self, name: str, limits: Sequence[tuple[int, float]]) -> Limits:
        return LocalLimits(limits, self._monotonic)
