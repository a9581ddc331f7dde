"""Typing indicators: relayed, throttled, expired by the server, never stored.

A ``typing {room | to_user_id, state}`` goes to the other connections of the
room (every node's, through the bus) or to the recipient's connections, as
``typing {room | with_user, user_id, username, state}``; never to the
typist's own connections. The node the typist is connected to keeps the
state of each (typist, channel):

* a ``start`` is relayed at most once per ``RELAY_INTERVAL`` seconds; one in
  between only renews it (a client sends one every few keystrokes);
* a ``start`` not renewed within ``EXPIRY`` seconds ends with a ``stop``
  the server sends itself (the typist's tab closed mid-sentence);
* the typist's message to that channel ends it with a ``stop`` sent right
  after the message (``sent``); so does the typist's connection closing;
* a room shows at most ``ROOM_TYPISTS`` typists at once (per node): a start
  from one more is dropped, not relayed, and its next renewal gets in once
  one of them stops. Every member of a room of 1,000 typing at once would
  otherwise be a million frames every two seconds; capped, the work is
  ``ROOM_TYPISTS`` times the room's size, whoever types (a screen says
  "several people are typing" past three anyway).

A flood of ``typing`` frames costs a dict lookup each; the session counts
them against the ``typing_per_minute`` limit too.

Pure: sending goes through the bus, time comes from the clocks passed in,
and the server's timer calls ``run_due`` at ``next_due``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from chatd.auth import Identity
from chatd.bus import Bus, to_channel
from chatd.hub import Peer
from chatd.store import StoredMessage, dm_channel, room_channel

P = TypeVar("P", bound=Peer)

#: A start is relayed at most once per this many seconds per (user, channel).
RELAY_INTERVAL = 2.0
#: A start not renewed within this many seconds ends.
EXPIRY = 6.0
#: Most typists relayed at once in one room (from one node).
ROOM_TYPISTS = 5


class _Typist:
    __slots__ = ("expires", "ident", "relayed", "room", "to_user")

    def __init__(self, ident: Identity, room: str | None, to_user: int, now: float) -> None:
        self.ident = ident
        self.room = room
        self.to_user = to_user
        self.relayed = now
        self.expires = now + EXPIRY


class Typing(Generic[P]):
    """Who is typing where, for the typists connected to this node."""

    def __init__(
        self,
        bus: Bus[P],
        wall: Callable[[], float],
        clock: Callable[[], float],
        wake: Callable[[], None],
    ) -> None:
        """``wake`` is called when a start begins (something to expire)."""
        self._bus = bus
        self._wall = wall
        self._clock = clock
        self._typing: dict[tuple[int, str], _Typist] = {}
        #: room channel -> typists relayed there now
        self._in_room: dict[str, int] = {}
        self._wake = wake

    def __len__(self) -> int:
        return len(self._typing)

    def typing(self, ident: Identity, room: str | None, to_user: int, start: bool) -> None:
        """A ``typing`` frame (the session has checked where it goes)."""
        uid = ident.user_id
        key = (uid, room_channel(room) if room is not None else dm_channel(uid, to_user))
        now = self._clock()
        typist = self._typing.get(key)
        if not start:
            if typist is not None:
                self._end(key)
            return
        if typist is not None:
            typist.expires = now + EXPIRY
            if now - typist.relayed < RELAY_INTERVAL:
                return
            typist.relayed = now
        else:
            if room is not None:
                count = self._in_room.get(key[1], 0)
                if count >= ROOM_TYPISTS:
                    return
                self._in_room[key[1]] = count + 1
            typist = self._typing[key] = _Typist(ident, room, to_user, now)
            self._wake()
        self._relay(typist, "start")

    def _end(self, key: tuple[int, str]) -> None:
        """The typist stops: ``stop`` relayed, its room's place freed."""
        typist = self._typing.pop(key)
        if typist.room is not None:
            count = self._in_room.pop(key[1]) - 1
            if count:
                self._in_room[key[1]] = count
        self._relay(typist, "stop")

    def sent(self, stored: StoredMessage) -> None:
        """A message committed from this node: its sender stops typing there."""
        if not self._typing:
            return
        msg = stored.message
        if msg.room is not None:
            channel = room_channel(msg.room)
        else:
            assert msg.to_user_id is not None
            channel = dm_channel(msg.user_id, msg.to_user_id)
        if (msg.user_id, channel) in self._typing:
            self._end((msg.user_id, channel))

    def gone(self, user_id: int) -> None:
        """The user's last connection on this node has closed."""
        if not self._typing:
            return
        for key in [k for k in self._typing if k[0] == user_id]:
            self._end(key)

    def _relay(self, typist: _Typist, state: str) -> None:
        ident = typist.ident
        fields = {"user_id": ident.user_id, "username": ident.username, "state": state}
        to_channel(
            self._bus,
            "typing",
            fields,
            self._wall(),
            sender=ident.user_id,
            room=typist.room,
            to_user=typist.to_user,
        )

    def next_due(self) -> float | None:
        """When the first start not renewed expires (None: nobody types)."""
        return min((t.expires for t in self._typing.values()), default=None)

    async def run_due(self) -> None:
        """Stop every start not renewed in time."""
        now = self._clock()
        for key in [k for k, t in self._typing.items() if t.expires <= now]:
            self._end(key)
