"""Who is connected where, and fan-out.

The hub knows every open session (``Peer``), the connections of each user,
which rooms each connection has joined, and how many connections each user
has in each room (several tabs of one user are one presence). It turns a
committed message into one ``OutFrame`` and hands that same frame to every
recipient's connection: no task per recipient, no per-recipient encoding.
The sender's own copy alone is encoded again, to echo its ``request_id``.

The hub is generic in its peer type and is given its ``Broadcaster`` when it
is made: a room message goes to its room through ``broadcast`` (the room's
set of connections, the shared frame, and the sender's own copy), and
deliveries made together run inside ``corked()``. The server passes the
transport's ``Fanout``, which joins a commit group's consecutive messages to
one room into one buffer written once to each member; ``SendEach`` (each
connection's ``send``, at once) serves tests and anything without sockets.

Presence is counted here and reported, not acted on: ``join`` says whether
the user's first connection entered the room, ``leave`` and ``disconnect``
where its last one left. The caller (the session) tells the bus, which
announces it (``announce``), on this node alone or across the cluster.

A connection that joins a room is *held* in it until ``release``: the
room's frames for that connection are kept back, in order, until its
``join_room_ack`` (and, when it recovers missed messages, the replay from
storage) has been sent, then released, skipping the messages the replay
already carried (except the sender's own copies, which carry its
``request_id``). So nothing is lost or reordered between the stored past and
the live present.

Pure logic: no I/O, no clock reads; ``now`` comes from the caller.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Generic, Protocol, TypeVar

import msgspec

from chatd.auth import Identity
from chatd.metrics import Metrics
from chatd.protocol import DirectMessageOut, Member, MessageOut, NotificationOut, encode
from chatd.store import StoredMessage
from chatd.transport.frames import OutFrame


class Peer(Protocol):
    """One connection as the hub sees it."""

    @property
    def identity(self) -> Identity:
        """Who is connected (fixed for the connection's life)."""

    def send(self, frame: OutFrame) -> None:
        """Queue a frame; never blocks."""


P = TypeVar("P", bound=Peer)

_NOWHERE: frozenset[str] = frozenset()


class _Room(Generic[P]):
    __slots__ = ("floors", "held", "peers", "presence")

    def __init__(self) -> None:
        self.peers: set[P] = set()
        #: user id -> (username, number of that user's connections in the room)
        self.presence: dict[int, tuple[str, int]] = {}
        #: connections being caught up: (message id or None, frame) kept back
        self.held: dict[P, list[tuple[int | None, OutFrame]]] = {}
        #: caught-up connections: the last message id their replay carried,
        #: until a newer message reaches them (a message can reach a node
        #: late, after the replay that already had it; ids per room increase
        #: in delivery order, so the first newer one ends the check)
        self.floors: dict[P, int] = {}

    def send(self, frame: OutFrame, peers: Iterable[P], message_id: int | None = None) -> int:
        """Send (or hold) ``frame`` for each of ``peers``; return how many."""
        held = self.held
        floors = self.floors
        count = 0
        for peer in peers:
            if held and peer in held:
                held[peer].append((message_id, frame))
            elif floors and message_id is not None and peer in floors:
                if message_id <= floors[peer]:
                    continue  # the replay had it
                del floors[peer]
                peer.send(frame)
            else:
                peer.send(frame)
            count += 1
        return count


class Broadcaster(Protocol[P]):
    """How the hub's deliveries reach connections."""

    def broadcast(
        self, peers: set[P], frame: OutFrame, own: P | None, own_frame: OutFrame | None
    ) -> None:
        """``frame`` to every one of ``peers`` but ``own``, and ``own_frame``
        to ``own`` (whether or not it is in ``peers``). ``peers`` is a
        room's own set: the same object for every message to that room."""

    def corked(self) -> AbstractContextManager[None]:
        """A block whose deliveries are written together at its end."""


class SendEach(Generic[P]):
    """Each connection's ``send``, at once; ``corked`` does nothing."""

    def broadcast(
        self, peers: set[P], frame: OutFrame, own: P | None, own_frame: OutFrame | None
    ) -> None:
        for peer in peers:
            if peer is not own:
                peer.send(frame)
        if own is not None and own_frame is not None:
            own.send(own_frame)

    @contextmanager
    def corked(self) -> Iterator[None]:
        yield


class Hub(Generic[P]):
    """Rooms, their connected members, and every user's connections."""

    def __init__(self, fanout: Broadcaster[P], metrics: Metrics | None = None) -> None:
        self._fanout = fanout
        self._metrics = metrics or Metrics()
        self._rooms: dict[str, _Room[P]] = {}
        #: Every connected peer -> the rooms it joined (``_NOWHERE`` until
        #: its first join: an idle connection costs no set of its own).
        self._joined: dict[P, set[str] | frozenset[str]] = {}
        #: user id -> that user's connections (a tuple: usually just one).
        self._users: dict[int, tuple[P, ...]] = {}

    def batch(self) -> AbstractContextManager[None]:
        """Deliveries made together (a commit group, a batch of remote
        events): one write per connection for all of them."""
        return self._fanout.corked()

    # --- sessions -----------------------------------------------------------

    def connect(self, peer: P) -> None:
        self._joined[peer] = _NOWHERE
        uid = peer.identity.user_id
        self._users[uid] = (*self._users.get(uid, ()), peer)

    def disconnect(self, peer: P) -> list[str]:
        """Forget ``peer``; return the rooms its user has left with it (its
        last connection there)."""
        gone = [room for room in list(self._joined.get(peer, ())) if self.leave(peer, room)]
        self._joined.pop(peer, None)
        uid = peer.identity.user_id
        peers = self._users.get(uid)
        if peers is not None:
            rest = tuple(p for p in peers if p is not peer)
            if rest:
                self._users[uid] = rest
            else:
                del self._users[uid]
        return gone

    # --- rooms --------------------------------------------------------------

    def join(self, peer: P, room: str) -> bool:
        """Add ``peer`` to ``room``, held (its frames there wait for
        ``release``). True when it is its user's first connection there:
        the others are to be told."""
        state = self._rooms.get(room)
        if state is None:
            state = self._rooms[room] = _Room()
        state.held.setdefault(peer, [])
        if peer in state.peers:
            return False
        state.peers.add(peer)
        rooms = self._joined[peer]
        if not isinstance(rooms, set):
            rooms = self._joined[peer] = set()
        rooms.add(room)
        ident = peer.identity
        _, count = state.presence.get(ident.user_id, ("", 0))
        state.presence[ident.user_id] = (ident.username, count + 1)
        return count == 0

    def members(self, room: str) -> list[Member]:
        """The users with a connection in ``room`` on this node."""
        state = self._rooms.get(room)
        if state is None:
            return []
        return [Member(uid, name) for uid, (name, _) in state.presence.items()]

    def has_room(self, room: str) -> bool:
        """Whether ``room`` has a connection on this node."""
        return room in self._rooms

    def presence(self) -> list[tuple[str, int]]:
        """Every (room, user id) present on this node."""
        return [(room, uid) for room, state in self._rooms.items() for uid in state.presence]

    def users(self) -> list[int]:
        """Every user with a connection on this node."""
        return list(self._users)

    def release(self, peer: P, room: str, after_id: int) -> None:
        """Send what was held for ``peer`` in ``room``, skipping messages with
        an id up to ``after_id`` (the replay already sent them)."""
        state = self._rooms.get(room)
        if state is None:
            return
        newer = False
        for message_id, frame in state.held.pop(peer, ()):
            if message_id is None or message_id > after_id:
                peer.send(frame)
                newer = newer or message_id is not None
        if after_id > 0 and not newer:
            state.floors[peer] = after_id

    def leave(self, peer: P, room: str) -> bool:
        """Remove ``peer`` from ``room`` (where it must be, ``is_in``). True
        when it was its user's last connection there: the others are to be
        told."""
        state = self._rooms[room]
        state.peers.discard(peer)
        state.held.pop(peer, None)
        state.floors.pop(peer, None)
        rooms = self._joined[peer]
        if isinstance(rooms, set):
            rooms.discard(room)
        ident = peer.identity
        name, count = state.presence[ident.user_id]
        if not state.peers:
            del self._rooms[room]
        if count > 1:
            state.presence[ident.user_id] = (name, count - 1)
            return False
        del state.presence[ident.user_id]
        return True

    def is_in(self, peer: P, room: str) -> bool:
        return room in self._joined.get(peer, ())

    def announce(self, kind: str, ident: Identity, room: str, now: float) -> None:
        """Send a presence event (``user_connected``, ``user_disconnected``)
        to the room's connections on this node, except the user's own."""
        state = self._rooms.get(room)
        if state is None:
            return
        data = {"user_id": ident.user_id, "username": ident.username, "room": room}
        frame = OutFrame(encode(kind, data, now, user_id=ident.user_id))
        others = (p for p in state.peers if p.identity.user_id != ident.user_id)
        self._metrics.frames_out(kind, state.send(frame, others))

    # --- delivery -----------------------------------------------------------

    def deliver(
        self,
        stored: StoredMessage,
        now: float,
        origin: P | None = None,
        request_id: str | int | None = None,
    ) -> None:
        """Fan a committed message out: a room message to every connection in
        its room, a direct message to every connection of its recipient and
        of its sender. ``origin``'s copy alone carries ``request_id``."""
        msg = stored.message
        kind, data, sender = live_shape(stored)
        if msg.room is not None:
            state = self._rooms.get(msg.room) or _Room()
            peers: set[P] = state.peers
        else:
            assert msg.to_user_id is not None
            state = _Room()  # no holding for conversations
            users = self._users
            peers = {*users.get(msg.to_user_id, ()), *users.get(msg.user_id, ())}
        own = origin if request_id is not None and origin in self._joined else None
        others = len(peers) - (own is not None and own in peers)
        # The shared frame is built only when someone besides the sender gets
        # it (a sender alone in its room gets only its own copy).
        frame = OutFrame(encode(kind, data, now, user_id=sender)) if others else None
        copy = None
        if own is not None:
            copy = OutFrame(encode(kind, data, now, user_id=sender, request_id=request_id))
        if frame is not None and msg.room is not None and not state.held and not state.floors:
            self._fanout.broadcast(peers, frame, own, copy)
            self._metrics.frames_out(kind, others + (own is not None))
            return
        sent = 0
        if frame is not None:
            sent = state.send(frame, (p for p in peers if p is not own), stored.id)
        self._metrics.frames_out(kind, sent + (own is not None))
        if own is not None and copy is not None:
            # Held like the rest, but never skipped at release: a replay
            # lacks the request_id the sender is waiting for.
            state.send(copy, (own,), None)


Shape = tuple[str, MessageOut | DirectMessageOut | NotificationOut, int | None]


def live_shape(stored: StoredMessage) -> Shape:
    """The frame type, data and envelope ``user_id`` a stored message is
    delivered live with (and replayed with, on recovery). A notification is
    caused by no user: its envelope has no ``user_id``."""
    msg = stored.message
    if msg.message_type == "notification":
        return "notification", notification_out(stored), None
    if msg.room is not None:
        return "room_message", message_out(stored), msg.user_id
    return "direct_message", direct_message_out(stored), msg.user_id


# message_out and direct_message_out spell out the fields every stored
# message has on the wire (id .. data) rather than share a dict of them:
# they run once per delivered message.


def message_out(stored: StoredMessage) -> MessageOut:
    """A stored room message in its wire shape (live and in history)."""
    msg = stored.message
    return MessageOut(
        id=stored.id,
        room=msg.room or "",
        user_id=msg.user_id,
        username=msg.username,
        content=msg.content,
        message_type=msg.message_type,
        created_at=msg.created_at,
        media_url=msg.media_url,
        media_type=msg.media_type,
        duration=msg.duration,
        reply_to=msg.reply_to,
        data=_raw(msg.data),
    )


def direct_message_out(stored: StoredMessage) -> DirectMessageOut:
    """A stored direct message in its wire shape (live and in history)."""
    msg = stored.message
    assert msg.to_user_id is not None
    return DirectMessageOut(
        id=stored.id,
        from_user_id=msg.user_id,
        from_username=msg.username,
        to_user_id=msg.to_user_id,
        content=msg.content,
        message_type=msg.message_type,
        created_at=msg.created_at,
        media_url=msg.media_url,
        media_type=msg.media_type,
        duration=msg.duration,
        reply_to=msg.reply_to,
        data=_raw(msg.data),
    )


def notification_out(stored: StoredMessage) -> NotificationOut:
    """A stored notification in its live shape."""
    msg = stored.message
    return NotificationOut(
        id=stored.id,
        content=msg.content,
        created_at=msg.created_at,
        room=msg.room,
        to_user_id=msg.to_user_id,
        data=_raw(msg.data),
    )


def _raw(data: bytes | None) -> msgspec.Raw | None:
    return msgspec.Raw(data) if data is not None else None
