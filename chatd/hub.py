"""Who is connected where, and fan-out.

The hub knows every open session (``Peer``), the connections of each user,
which rooms each connection has joined, and how many connections each user
has in each room (several tabs of one user are one presence). It turns a
committed message into one ``OutFrame`` and hands that same frame to every
recipient's connection: no task per recipient, no per-recipient encoding.
The sender's own copy alone is encoded again, to echo its ``request_id``.

The hub is generic in its peer type and is given its ``Broadcaster`` when it
is made: a room message goes to the room's set of connections through
``broadcast`` (the set, the shared frame, and the sender's own copy), and
deliveries made together run inside ``corked()``. The server passes the
transport's ``Fanout``, which joins a commit group's consecutive messages to
one room into one buffer written once to each member; ``SendEach`` (each
connection's ``send``, at once) serves tests and anything without sockets.

Joining
    A connection that joins a room is *joining* until ``release``: the
    room's frames for it are kept back, in order, until its
    ``join_room_ack`` (and, when it recovers missed messages, the replay
    from storage) has been sent. A connection that replays does not keep
    the room's messages meanwhile: it drops them and notes the newest id it
    dropped, because the replay reads them from the store (a message is
    delivered only after its commit); ``release`` refuses until the replay
    has reached that id. Frames without an id (presence, the sender's own
    copies) are kept back either way. Joining connections are kept apart
    from the room's set, so the set's fan-out stays the fast path.

Presence
    The hub counts presence and reports it: ``join`` says whether the
    user's first connection entered the room, ``leave`` and ``disconnect``
    where its last one left; the caller (the session) tells the bus, which
    announces it (``announce``). In a room with more than
    ``presence_max_members`` members, ``announce`` does not send
    ``user_connected`` / ``user_disconnected`` to every member for every
    change: it notes the change, and ``flush_presence`` (called about once a
    second) sends one ``room_presence`` summary of what changed. So a join
    costs O(1) however big the room is. ``members`` pages the room's users
    by id (a sorted list of ids is kept per room).

Pure logic: no I/O, no clock reads; ``now`` comes from the caller.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Generic, Protocol, TypeVar

import msgspec

from chatd.auth import Identity
from chatd.blocks import Blocks
from chatd.metrics import Metrics
from chatd.protocol import (
    DeletedOut,
    DirectMessageOut,
    EditedOut,
    Member,
    MessageOut,
    NotificationOut,
    encode,
)
from chatd.store import Entry, StoredEvent, StoredMessage
from chatd.tail import Tail
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


class _Joining:
    """A connection whose join is not done: what is kept back for it."""

    __slots__ = ("dropped", "held", "replaying")

    def __init__(self, replaying: bool) -> None:
        #: (message id or None, frame), in order.
        self.held: list[tuple[int | None, OutFrame]] = []
        #: It replays from storage: messages are dropped, not kept.
        self.replaying = replaying
        #: The newest message id dropped (the replay must reach it).
        self.dropped = 0


class _Room(Generic[P]):
    __slots__ = (
        "count",
        "first",
        "floors",
        "joining",
        "order",
        "peers",
        "pending",
        "presence",
        "tail",
    )

    def __init__(self) -> None:
        #: The connections whose join is done: every frame, as it comes.
        self.peers: set[P] = set()
        #: The connections whose join is not done (see the module docstring).
        self.joining: dict[P, _Joining] = {}
        #: user id -> (username, number of that user's connections in the room)
        self.presence: dict[int, tuple[str, int]] = {}
        #: The ids of ``presence``, sorted (member pages).
        self.order: list[int] = []
        #: caught-up connections: the last message id their replay carried,
        #: until a newer message reaches them (a message can reach a node
        #: late, after the replay that already had it; ids per room increase
        #: in delivery order, so the first newer one ends the check)
        self.floors: dict[P, int] = {}
        #: Presence changes not yet summarised: user id -> (username, joined).
        self.pending: dict[int, tuple[str, bool]] = {}
        #: The room's member count as last announced (the cluster's, with Redis).
        self.count = 0
        #: The first members by id, encoded, as joins list them: (how many
        #: asked for, the JSON list), until a change among them.
        self.first: tuple[int, msgspec.Raw] | None = None
        #: The room's newest messages (``mark_read`` without a store read).
        self.tail = Tail()

    def changed(self, uid: int) -> None:
        """The presence of ``uid`` changed: a cached first page that lists
        it (or would) is stale."""
        first = self.first
        if first is not None and bisect_left(self.order, uid) < first[0]:
            self.first = None

    def send(self, frame: OutFrame, peers: Iterable[P], message_id: int | None = None) -> int:
        """Send ``frame`` to each of ``peers`` (released ones), skipping a
        message a floor says the peer has; return how many got it."""
        floors = self.floors
        count = 0
        for peer in peers:
            if floors and message_id is not None and peer in floors:
                if message_id <= floors[peer]:
                    continue  # the replay had it
                del floors[peer]
            peer.send(frame)
            count += 1
        return count

    def hold(self, frame: OutFrame, message_id: int | None, skip: P | None = None) -> int:
        """Keep ``frame`` back for every joining connection but ``skip``
        (drop it for those that replay, when it is a message); return how
        many."""
        count = 0
        for peer, joining in self.joining.items():
            if peer is skip:
                continue
            if message_id is not None and joining.replaying:
                if message_id > joining.dropped:
                    joining.dropped = message_id
            else:
                joining.held.append((message_id, frame))
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

    def __init__(
        self,
        fanout: Broadcaster[P],
        metrics: Metrics | None = None,
        *,
        presence_max_members: int = 100,
        summary_members: int = 100,
        blocks: Blocks | None = None,
    ) -> None:
        """Above ``presence_max_members`` members a room's presence is
        summarised; a summary lists at most ``summary_members`` users who
        joined and as many who left. ``blocks``: who blocks whom (their
        typing and receipts are not delivered)."""
        self._fanout = fanout
        self.blocks = blocks if blocks is not None else Blocks()
        self._metrics = metrics or Metrics()
        self.presence_max_members = presence_max_members
        self.summary_members = summary_members
        self._rooms: dict[str, _Room[P]] = {}
        #: Every connected peer -> the rooms it joined: ``_NOWHERE`` until its
        #: first join, a tuple for its one room (48 bytes; a set is 216, on
        #: each member of a big room), a set from its second.
        self._joined: dict[P, set[str] | frozenset[str] | tuple[str]] = {}
        #: user id -> that user's connections (a tuple: usually just one).
        self._users: dict[int, tuple[P, ...]] = {}
        #: Rooms with presence changes to summarise.
        self._dirty: set[str] = set()

    def configure(self, *, presence_max_members: int, summary_members: int) -> None:
        """New limits (a reload); summaries already noted are still sent."""
        self.presence_max_members = presence_max_members
        self.summary_members = summary_members

    def batch(self) -> AbstractContextManager[None]:
        """Deliveries made together (a commit group, a batch of remote
        events): one write per connection for all of them."""
        return self._fanout.corked()

    # --- sessions -----------------------------------------------------------

    def connect(self, peer: P) -> bool:
        """Add ``peer``; True when it is its user's first connection here."""
        self._joined[peer] = _NOWHERE
        uid = peer.identity.user_id
        mine = self._users.get(uid, ())
        self._users[uid] = (*mine, peer)
        return not mine

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

    def join(self, peer: P, room: str, *, replaying: bool = False) -> bool:
        """Add ``peer`` to ``room`` as joining (its frames there wait for
        ``release``; with ``replaying``, its messages are dropped for the
        replay to read). True when it is its user's first connection there:
        the others are to be told."""
        state = self._rooms.get(room)
        if state is None:
            state = self._rooms[room] = _Room()
        joining = state.joining.get(peer)
        if joining is not None:
            joining.replaying = joining.replaying or replaying
            return False
        state.joining[peer] = _Joining(replaying)
        if peer in state.peers:  # joined again: held anew until its new ack
            state.peers.discard(peer)
            state.floors.pop(peer, None)
            return False
        rooms = self._joined[peer]
        if isinstance(rooms, set):
            rooms.add(room)
        elif rooms:
            self._joined[peer] = {*rooms, room}
        else:
            self._joined[peer] = (room,)
        ident = peer.identity
        uid = ident.user_id
        _, count = state.presence.get(uid, ("", 0))
        state.presence[uid] = (ident.username, count + 1)
        state.changed(uid)
        if count:
            return False
        insort(state.order, uid)
        return True

    def release(self, peer: P, room: str, after_id: int) -> bool:
        """End ``peer``'s join: send what was kept back, skipping messages
        with an id up to ``after_id`` (the replay already sent them). False,
        and nothing done, when a message newer than ``after_id`` was dropped
        for the replay: read further, then release again."""
        state = self._rooms.get(room)
        if state is None:
            return True
        joining = state.joining.get(peer)
        if joining is None:
            return True
        if joining.dropped > after_id:
            return False
        del state.joining[peer]
        state.peers.add(peer)
        newer = False
        for message_id, frame in joining.held:
            if message_id is None or message_id > after_id:
                peer.send(frame)
                newer = newer or message_id is not None
        if after_id > 0 and not newer:
            state.floors[peer] = after_id
        return True

    def leave(self, peer: P, room: str) -> bool:
        """Remove ``peer`` from ``room`` (where it must be, ``is_in``). True
        when it was its user's last connection there: the others are to be
        told."""
        state = self._rooms[room]
        state.peers.discard(peer)
        state.joining.pop(peer, None)
        state.floors.pop(peer, None)
        rooms = self._joined[peer]
        if isinstance(rooms, set):
            rooms.discard(room)
        else:  # (its one room)
            self._joined[peer] = _NOWHERE
        uid = peer.identity.user_id
        name, count = state.presence[uid]
        state.changed(uid)
        if count > 1:
            state.presence[uid] = (name, count - 1)
            gone = False
        else:
            del state.presence[uid]
            order = state.order
            del order[bisect_right(order, uid) - 1]
            gone = True
        if not state.peers and not state.joining:
            del self._rooms[room]
            self._dirty.discard(room)
        return gone

    def remove(self, room: str, user_id: int, frame: OutFrame) -> Identity | None:
        """Take every connection of ``user_id`` here out of ``room``, each
        sent ``frame`` (a kick); the user's identity when it was there (its
        presence there has ended: the others are to be told)."""
        removed = None
        sent = 0
        for peer in self._users.get(user_id, ()):
            if self.is_in(peer, room):
                self.leave(peer, room)
                peer.send(frame)
                removed = peer.identity
                sent += 1
        self._metrics.frames_out("kicked", sent)
        return removed

    def is_in(self, peer: P, room: str) -> bool:
        return room in self._joined.get(peer, ())

    def members(self, room: str, after_user_id: int = 0, limit: int = 100) -> list[Member]:
        """The users with a connection in ``room`` on this node, by id: at
        most ``limit`` of them, from the first id above ``after_user_id``."""
        state = self._rooms.get(room)
        if state is None:
            return []
        order = state.order
        start = bisect_right(order, after_user_id)
        presence = state.presence
        return [Member(uid, presence[uid][0]) for uid in order[start : start + limit]]

    def first_members(self, room: str, limit: int) -> msgspec.Raw:
        """``members(room, 0, limit)`` as JSON, for the join acks: encoded
        once and reused by every join until one of those members changes
        (in a big room's storm, almost never)."""
        state = self._rooms.get(room)
        if state is None:
            return msgspec.Raw(b"[]")
        first = state.first
        if first is not None and first[0] == limit:
            return first[1]
        raw = msgspec.Raw(_encode_members(self.members(room, 0, limit)))
        state.first = (limit, raw)
        return raw

    def member_count(self, room: str) -> int:
        """How many users have a connection in ``room`` on this node."""
        state = self._rooms.get(room)
        return 0 if state is None else len(state.presence)

    def has_room(self, room: str) -> bool:
        """Whether ``room`` has a connection on this node."""
        return room in self._rooms

    def presence(self) -> list[tuple[str, int]]:
        """Every (room, user id) present on this node."""
        return [(room, uid) for room, state in self._rooms.items() for uid in state.presence]

    def users(self) -> list[int]:
        """Every user with a connection on this node."""
        return list(self._users)

    # --- presence -----------------------------------------------------------

    def announce(
        self, kind: str, ident: Identity, room: str, now: float, member_count: int | None = None
    ) -> None:
        """A presence change (``user_connected``, ``user_disconnected``) of
        ``room``, whose member count is now ``member_count`` (None: this
        node's own count). Sent at once to the room's connections on this
        node, except the user's own; in a big room (or one with changes
        already waiting) noted for the next ``room_presence`` summary."""
        state = self._rooms.get(room)
        if state is None:
            return
        count = len(state.presence) if member_count is None else member_count
        state.count = count
        uid = ident.user_id
        pending = state.pending
        if count > self.presence_max_members or pending:
            joined = kind == "user_connected"
            noted = pending.get(uid)
            if noted is not None and noted[1] != joined:
                del pending[uid]  # joined and left (or left and came back): no change
            else:
                pending[uid] = (ident.username, joined)
                self._dirty.add(room)
            return
        data = {"user_id": uid, "username": ident.username, "room": room}
        self._to_room(state, kind, OutFrame(encode(kind, data, now, user_id=uid)), uid)

    def send_room(self, room: str, kind: str, frame: OutFrame, skip_user: int) -> None:
        """A frame that is not a message (typing, a receipt) to every
        connection in ``room`` on this node but ``skip_user``'s; kept back,
        in order, for those still joining."""
        state = self._rooms.get(room)
        if state is not None:
            self._to_room(state, kind, frame, skip_user, self.blocks.blockers(skip_user))

    def _to_room(
        self,
        state: _Room[P],
        kind: str,
        frame: OutFrame,
        skip_user: int,
        blockers: frozenset[int] = frozenset(),
    ) -> None:
        """(``blockers``: users who block ``skip_user``, skipped too.)"""
        peers = state.peers
        if blockers or any(mine in peers for mine in self._users.get(skip_user, ())):
            sent = state.send(
                frame,
                [
                    p
                    for p in peers
                    if p.identity.user_id != skip_user and p.identity.user_id not in blockers
                ],
            )
        else:  # (the usual case for presence: the user's first or last connection here)
            self._fanout.broadcast(peers, frame, None, None)
            sent = len(peers)
        for peer, joining in state.joining.items():
            uid = peer.identity.user_id
            if uid != skip_user and uid not in blockers:
                joining.held.append((None, frame))
                sent += 1
        self._metrics.frames_out(kind, sent)

    def send_user(
        self, user_id: int, kind: str, frame: OutFrame, skip: P | None = None, sender: int = 0
    ) -> None:
        """A frame to every connection of ``user_id`` on this node but
        ``skip``; none when ``user_id`` blocks its ``sender`` (typing, a
        receipt)."""
        if sender and self.blocks.blocks(user_id, sender):
            return
        sent = 0
        for peer in self._users.get(user_id, ()):
            if peer is not skip:
                peer.send(frame)
                sent += 1
        if sent:
            self._metrics.frames_out(kind, sent)

    def present(self, room: str, user_id: int) -> bool:
        """Whether the user has a connection in ``room`` on this node."""
        state = self._rooms.get(room)
        return state is not None and user_id in state.presence

    def online_count(self, room: str) -> int:
        """How many users are online in ``room``: the cluster's count as
        last announced, or this node's when that is more."""
        state = self._rooms.get(room)
        return 0 if state is None else max(state.count, len(state.presence))

    def identity(self, user_id: int) -> Identity | None:
        """Who the user's first connection here is (None: none here)."""
        peers = self._users.get(user_id)
        return peers[0].identity if peers else None

    def online(self, user_id: int) -> bool:
        """Whether the user has a connection on this node."""
        return user_id in self._users

    def tail(self, room: str) -> Tail | None:
        """The newest messages of ``room`` delivered here (None: nobody is
        in the room on this node)."""
        state = self._rooms.get(room)
        return None if state is None else state.tail

    def flush_presence(self, now: float) -> int:
        """Send each room's waiting presence changes as one ``room_presence``
        summary to its connections; return how many rooms had some."""
        dirty, self._dirty = self._dirty, set()
        sent = 0
        cap = self.summary_members
        for room in dirty:
            state = self._rooms.get(room)
            if state is None or not state.pending:
                continue
            pending, state.pending = state.pending, {}
            joined = [Member(uid, name) for uid, (name, came) in pending.items() if came]
            left = [Member(uid, name) for uid, (name, came) in pending.items() if not came]
            data: dict[str, Any] = {
                "room": room,
                "member_count": state.count,
                "joined": joined[:cap],
                "left": left[:cap],
                "truncated": len(joined) > cap or len(left) > cap,
            }
            frame = OutFrame(encode("room_presence", data, now))
            self._fanout.broadcast(state.peers, frame, None, None)
            count = len(state.peers)
            if state.joining:
                count += state.hold(frame, None)
            self._metrics.frames_out("room_presence", count)
            self._metrics.presence_summaries.inc()
            sent += 1
        return sent

    def has_pending_presence(self) -> bool:
        """Whether a room has presence changes waiting for a summary."""
        return bool(self._dirty)

    # --- delivery -----------------------------------------------------------

    def deliver(
        self,
        stored: Entry,
        now: float,
        origin: P | None = None,
        request_id: str | int | None = None,
    ) -> None:
        """Fan a committed message (or an edit or deletion of one) out: in a
        room to every connection in the room, in a conversation to every
        connection of both parties. ``origin``'s copy alone carries
        ``request_id``."""
        kind, data, sender = live_shape(stored)
        own = origin if request_id is not None and origin in self._joined else None
        copy = None
        if own is not None:
            copy = OutFrame(encode(kind, data, now, user_id=sender, request_id=request_id))
        if isinstance(stored, StoredMessage):
            msg = stored.message
            room, parties = msg.room, (msg.to_user_id or 0, msg.user_id)
        else:
            room, parties = stored.room, (stored.to_user_id, stored.from_user_id)
        if room is None:
            users = self._users
            peers = {*users.get(parties[0], ()), *users.get(parties[1], ())}
            if own is not None:
                peers.discard(own)
            if peers:
                frame = OutFrame(encode(kind, data, now, user_id=sender))
                for peer in peers:
                    peer.send(frame)
            if own is not None and copy is not None:
                own.send(copy)
            self._metrics.frames_out(kind, len(peers) + (own is not None))
            return
        state = self._rooms.get(room)
        if state is None:  # nobody here; a sender who left still gets its copy
            if own is not None and copy is not None:
                own.send(copy)
                self._metrics.frames_out(kind, 1)
            return
        if isinstance(stored, StoredMessage):
            state.tail.add(stored)
        members = state.peers
        joining = state.joining
        own_joining = own is not None and own in joining
        others = len(members) + len(joining)
        if own is not None and (own_joining or own in members):
            others -= 1
        sent = 0
        if others:
            # The shared frame is built only when someone besides the sender
            # gets it (a sender alone in its room gets only its own copy).
            frame = OutFrame(encode(kind, data, now, user_id=sender))
            if state.floors:
                sent = state.send(frame, (p for p in members if p is not own), stored.id)
            else:
                with_run = None if own_joining else own
                self._fanout.broadcast(members, frame, with_run, copy if with_run else None)
                sent = len(members) - (own is not None and own in members)
                if with_run is not None:
                    copy = None  # sent with the run
            if joining:
                sent += state.hold(frame, stored.id, skip=own)
        if own is not None and copy is not None:
            if own_joining:
                # Kept back like the rest, but never dropped or skipped: the
                # replay lacks the request_id the sender is waiting for.
                joining[own].held.append((None, copy))
            else:
                own.send(copy)
        self._metrics.frames_out(kind, sent + (own is not None))


_encode_members = msgspec.json.Encoder().encode

Shape = tuple[
    str, MessageOut | DirectMessageOut | NotificationOut | EditedOut | DeletedOut, int | None
]


def live_shape(stored: Entry) -> Shape:
    """The frame type, data and envelope ``user_id`` a stored message (or
    an edit or deletion) is delivered live with (and replayed with, on
    recovery). A notification, and a deletion by the publish API, are caused
    by no user: their envelope has no ``user_id``."""
    if isinstance(stored, StoredEvent):
        return event_shape(stored)
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
        mentions=msg.mentions,
        edited_at=msg.edited_at,
        deleted=msg.deleted,
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
        edited_at=msg.edited_at,
        deleted=msg.deleted,
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


def event_shape(event: StoredEvent) -> Shape:
    """``message_edited`` or ``message_deleted``: where (the room, or the
    conversation's parties), what, and who."""
    if event.room is not None:
        where: dict[str, Any] = {"room": event.room}
    else:
        where = {"from_user_id": event.from_user_id, "to_user_id": event.to_user_id}
    sender = event.user_id or None
    if event.kind == "edited":
        edited = EditedOut(
            id=event.id,
            message_id=event.message_id,
            content=event.content,
            edited_at=event.at,
            user_id=event.user_id,
            **where,
        )
        return "message_edited", edited, sender
    deleted = DeletedOut(
        id=event.id, message_id=event.message_id, deleted_by=event.user_id, **where
    )
    return "message_deleted", deleted, sender


def _raw(data: bytes | None) -> msgspec.Raw | None:
    return msgspec.Raw(data) if data is not None else None
