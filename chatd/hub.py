"""Who is connected where, and fan-out.

The hub knows every open session (``Peer``), which rooms each has joined and
how many connections each user has in each room (several tabs of one user are
one presence). It turns a committed message into one ``OutFrame`` and hands
that same frame to every member's connection: no task per recipient, no
per-recipient encoding (DESIGN D3). The sender's own copy alone is encoded
again, to echo its ``request_id``.

Pure logic: no I/O, no clock reads; ``now`` comes from the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from chatd.auth import Identity
from chatd.protocol import Member, MessageOut, encode
from chatd.ratelimit import Limiter
from chatd.store import StoredMessage
from chatd.transport.frames import OutFrame


class Peer(Protocol):
    """One connection as the hub sees it."""

    identity: Identity

    def send(self, frame: OutFrame) -> None:
        """Queue a frame; never blocks."""


class _Room:
    __slots__ = ("peers", "presence")

    def __init__(self) -> None:
        self.peers: set[Peer] = set()
        #: user id -> (username, number of that user's connections in the room)
        self.presence: dict[int, tuple[str, int]] = {}


class Hub:
    """Rooms and their connected members, and per-user rate limits."""

    def __init__(self, new_limiter: Callable[[float], Limiter]) -> None:
        self._rooms: dict[str, _Room] = {}
        self._joined: dict[Peer, set[str]] = {}
        self._new_limiter = new_limiter
        self._limiters: dict[int, Limiter] = {}
        self._connections: dict[int, int] = {}

    # --- sessions -----------------------------------------------------------

    def connect(self, peer: Peer) -> None:
        self._joined[peer] = set()
        uid = peer.identity.user_id
        self._connections[uid] = self._connections.get(uid, 0) + 1

    def disconnect(self, peer: Peer, now: float) -> None:
        for room in list(self._joined.get(peer, ())):
            self.leave(peer, room, now)
        self._joined.pop(peer, None)
        uid = peer.identity.user_id
        left = self._connections.get(uid, 0) - 1
        if left > 0:
            self._connections[uid] = left
        else:
            self._connections.pop(uid, None)
            self._limiters.pop(uid, None)

    def limiter(self, user_id: int, now: float) -> Limiter:
        """The message rate limiter shared by all of a user's connections."""
        limiter = self._limiters.get(user_id)
        if limiter is None:
            limiter = self._limiters[user_id] = self._new_limiter(now)
        return limiter

    # --- rooms --------------------------------------------------------------

    def join(self, peer: Peer, room: str, now: float) -> list[Member]:
        """Add ``peer`` to ``room``; return who is online there. Announces
        the user to the others when this is its first connection there."""
        state = self._rooms.get(room)
        if state is None:
            state = self._rooms[room] = _Room()
        if peer not in state.peers:
            state.peers.add(peer)
            self._joined[peer].add(room)
            ident = peer.identity
            _, count = state.presence.get(ident.user_id, ("", 0))
            state.presence[ident.user_id] = (ident.username, count + 1)
            if count == 0:
                self._presence(state, "user_connected", ident, room, now)
        return [Member(uid, name) for uid, (name, _) in state.presence.items()]

    def leave(self, peer: Peer, room: str, now: float) -> bool:
        """Remove ``peer`` from ``room``; False when it was not there."""
        state = self._rooms.get(room)
        if state is None or peer not in state.peers:
            return False
        state.peers.discard(peer)
        self._joined[peer].discard(room)
        ident = peer.identity
        name, count = state.presence[ident.user_id]
        if count > 1:
            state.presence[ident.user_id] = (name, count - 1)
        else:
            del state.presence[ident.user_id]
            self._presence(state, "user_disconnected", ident, room, now)
        if not state.peers:
            del self._rooms[room]
        return True

    def is_in(self, peer: Peer, room: str) -> bool:
        return room in self._joined.get(peer, ())

    def _presence(self, state: _Room, kind: str, ident: Identity, room: str, now: float) -> None:
        data = {"user_id": ident.user_id, "username": ident.username, "room": room}
        frame = OutFrame(encode(kind, data, now, user_id=ident.user_id))
        _send_all((p for p in state.peers if p.identity.user_id != ident.user_id), frame)

    # --- delivery -----------------------------------------------------------

    def deliver_room(
        self,
        stored: StoredMessage,
        now: float,
        origin: Peer | None = None,
        request_id: str | int | None = None,
    ) -> None:
        """Fan a committed room message out to every connection in its room."""
        msg = stored.message
        assert msg.room is not None
        data = message_out(stored)
        frame = OutFrame(encode("room_message", data, now, user_id=msg.user_id))
        state = self._rooms.get(msg.room)
        peers: Iterable[Peer] = state.peers if state else ()
        if origin is None or request_id is None:
            _send_all(peers, frame)
            return
        _send_all((p for p in peers if p is not origin), frame)
        if origin in self._joined:
            own = encode("room_message", data, now, user_id=msg.user_id, request_id=request_id)
            origin.send(OutFrame(own))


def _send_all(peers: Iterable[Peer], frame: OutFrame) -> None:
    for peer in peers:
        peer.send(frame)


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
    )
