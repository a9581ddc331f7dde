"""Read markers, unread counts, read receipts and last seen.

A *read marker* is kept per (user, channel): the newest message the user has
read, as (id, seq). A channel's unread count is its last seq minus the
marker's, so no count ever walks messages (``store.ReadPoint``).

Markers are written the way a chat client moves them, many times a second:
in memory first. ``_markers`` holds the markers of users present in rooms on
this node (read at their join) and every marker moved since the last write;
``_dirty`` the ones to write. ``run`` writes them all every
``FLUSH_INTERVAL`` seconds as one operation of the store's next commit group
(``Store.save_read_state``), so a member marking every message of a busy
room read costs a dict update per ``mark_read``, not a write. A crash loses
at most the last interval's moves: a marker may fall back a few seconds,
never forward (a marker only ever names committed messages, and the store
refuses to move one back). A stop writes what is left. Reads that must see
a user's markers (a join's counts, ``unread``) write that user's moves
first.

A join reads its user's marker at once where the store can answer without
waiting (``Store.marker_now``: SQLite), so a join never suspends for it;
otherwise in a batch: while one read of a room's markers is under way, the
joins behind it wait and are read together, in one query (a reconnect
storm into one room reads its markers in a few queries, not one per
member). A user's first join of a room creates the
marker at the room's newest message.

A ``mark_read`` of one of a room's newest messages is answered from the
room's ``Tail`` (no store read); others read the store (``read_point``).
When the marker moves, the user's other connections get ``read_marker``
and, unless the move is private, the other party of a conversation (or the
members of a room with at most ``receipts_max_members`` online) get a
``read_receipt``: each at most once per (reader, channel) per
``RECEIPT_INTERVAL``, the first at once and the newest at the end of the
interval (``throttle.Coalescer``), so a member marking every message of a
busy room read costs the others (and, in a cluster, Redis) one frame a
second, not one a message.

A user's last connection on this node closing records their last-seen
time, written with the markers.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, Generic, TypeVar

from chatd import protocol as p
from chatd.bus import Bus, to_channel
from chatd.errors import message_not_found
from chatd.hub import Hub, Peer
from chatd.store import ReadPoint, Store, StoredMessage, dm_channel, dm_peer, room_channel
from chatd.throttle import Coalescer

log = logging.getLogger("chatd")

P = TypeVar("P", bound=Peer)

#: Seconds between two writes of the markers moved meanwhile.
FLUSH_INTERVAL = 1.0
#: At most one read receipt per (reader, channel) per this many seconds.
RECEIPT_INTERVAL = 1.0

Key = tuple[int, str]
#: (id, seq) of a message
Position = tuple[int, int]
_NOWHERE: Position = (0, 0)


class ReadState(Generic[P]):
    """Every user's read markers as this node knows them."""

    def __init__(
        self,
        store: Store,
        hub: Hub[P],
        bus: Bus[P],
        wall: Callable[[], float],
        clock: Callable[[], float],
        receipts_max_members: int,
        wake: Callable[[], None],
    ) -> None:
        """``wake`` is called when there is work for ``run_due`` (its
        caller sleeps until ``next_due`` meanwhile)."""
        self._store = store
        self._hub = hub
        self._bus = bus
        self._wall = wall
        self._clock = clock
        self.receipts_max_members = receipts_max_members
        self._markers: dict[Key, Position] = {}
        self._dirty: set[Key] = set()
        #: (sender, room, to_user_id) -> the newest message it sent from here
        self._sent: dict[tuple[int, str | None, int | None], StoredMessage] = {}
        #: user id -> last seen (RFC 3339), to write
        self._seen: dict[int, str] = {}
        #: Writes queued and not yet committed.
        self._writing = 0
        #: When the moves noted since the last write are due to be written.
        self._write_at: float | None = None
        #: read_marker and read_receipt frames, each a sending to call:
        #: at most one per (kind, user, channel) per RECEIPT_INTERVAL
        self._notices: Coalescer[tuple[str, int, str], Callable[[], None]] = Coalescer(
            RECEIPT_INTERVAL
        )
        self._wake = wake

    # --- joins ----------------------------------------------------------------

    async def joined(self, user_id: int, room: str) -> ReadPoint:
        """The user's marker in ``room`` (created at its newest message on
        the user's first join) and the room's counts, for ``join_room_ack``."""
        channel = room_channel(room)
        key = (user_id, channel)
        self._absorb()
        if key in self._dirty:
            await self.flush()
        store = self._store
        found = store.marker_now(channel, user_id) or await store.marker(channel, user_id)
        last: Position = (found.last_id, found.last_seq)
        tail = self._hub.tail(room)
        if tail is not None:
            tail.seed(*last)
            if tail.last_seq > last[1]:
                last = (tail.last_id, tail.last_seq)
        stored = found.found.get(user_id)
        known = self._markers.get(key)
        if stored is None and known is None:
            self._move(key, last)  # the first join: nothing unread
            return ReadPoint(*last, *last, 0)
        mark = _furthest(stored[:2] if stored is not None else _NOWHERE, known or _NOWHERE)
        self._markers[key] = mark
        mentions = 0
        if stored is not None and stored[1] == mark[1]:
            mentions = stored[2]
        elif tail is not None:
            mentions = tail.mentions_after(user_id, mark[1]) or 0
        return ReadPoint(*mark, *last, mentions)

    def left(self, user_id: int, room: str) -> None:
        """The user's last connection in ``room`` here has left it."""
        key = (user_id, room_channel(room))
        if key not in self._dirty:
            self._markers.pop(key, None)

    # --- moving markers ---------------------------------------------------------

    async def mark(
        self,
        peer: P,
        data: p.MarkRead,
        before_read: Callable[[], Awaitable[None]],
    ) -> ReadPoint:
        """``mark_read``: move the marker to ``data.message_id`` (never
        back), tell the user's other connections and, unless private, the
        others; return the marker and counts. ``before_read`` runs before a
        store read (the session's read limit)."""
        ident = peer.identity
        uid = ident.user_id
        room = data.room
        other = data.with_user if data.with_user is not None else 0
        channel = room_channel(room) if room is not None else dm_channel(uid, other)
        key = (uid, channel)
        self._absorb()
        known = self._markers.get(key)
        point = None
        tail = self._hub.tail(room) if room is not None else None
        if tail is not None and known is not None:
            seq = tail.seq_of(data.message_id)
            if seq == -1:
                raise message_not_found(data.message_id)
            if seq is not None:
                mark = _furthest(known, (data.message_id, seq))
                mentions = tail.mentions_after(uid, mark[1])
                if mentions is not None:
                    point = ReadPoint(*mark, tail.last_id, tail.last_seq, mentions)
        if point is None:
            await before_read()
            point = await self._store.read_point(uid, channel, data.message_id, known or _NOWHERE)
            if point is None:
                raise message_not_found(data.message_id)
        if known is None:
            moved = point.last_read_id == data.message_id
        else:
            moved = point.last_read_seq > known[1]
        position = (point.last_read_id, point.last_read_seq)
        if not moved:
            self._markers.setdefault(key, position)
            return point
        self._move(key, position)
        where: dict[str, Any] = {"room": room} if room is not None else {"with_user": other}
        marker = {
            **where,
            "last_read_id": point.last_read_id,
            "unread": point.unread,
            "mentions": point.mentions,
        }
        self._tell(("m", uid, channel), partial(self._send_marker, uid, marker, peer))
        if not data.private and (
            room is None or self._hub.online_count(room) <= self.receipts_max_members
        ):
            receipt = partial(self._send_receipt, uid, ident.username, room, other, position[0])
            self._tell(("r", uid, channel), receipt)
        return point

    def _tell(self, key: tuple[str, int, str], send: Callable[[], None]) -> None:
        """Send now, or (within a second of the last of its kind) once its
        turn comes, unless a newer one replaces it meanwhile."""
        if self._notices.offer(key, send, self._clock()):
            send()
        else:
            self._wake()

    def _send_marker(self, user_id: int, marker: dict[str, Any], skip: P) -> None:
        frame = p.encode("read_marker", marker, self._wall())
        self._bus.to_user(user_id, "read_marker", frame, skip)

    def sent(self, stored: StoredMessage) -> None:
        """A message committed from this node: its sender has read up to it.
        (Noted in one dict set, the newest per sender and channel: this runs
        for every message; ``_absorb`` moves the markers before they are
        read or written.)"""
        msg = stored.message
        if msg.user_id:
            self._sent[msg.user_id, msg.room, msg.to_user_id] = stored
            if self._write_at is None:
                self._due_to_write()

    def _absorb(self) -> None:
        """Move the markers of the messages ``sent`` noted."""
        if not self._sent:
            return
        sent, self._sent = self._sent, {}
        for (uid, room, to_user), stored in sent.items():
            if room is not None:
                channel = room_channel(room)
            else:
                assert to_user is not None
                channel = dm_channel(uid, to_user)
            key = (uid, channel)
            known = self._markers.get(key)
            if known is None or stored.seq > known[1]:
                self._markers[key] = (stored.id, stored.seq)
                self._dirty.add(key)

    def _move(self, key: Key, position: Position) -> None:
        self._markers[key] = position
        self._dirty.add(key)
        self._due_to_write()

    def _due_to_write(self) -> None:
        if self._write_at is None:
            self._write_at = self._clock() + FLUSH_INTERVAL
            self._wake()

    def _send_receipt(
        self, reader: int, username: str, room: str | None, other: int, read_id: int
    ) -> None:
        fields: dict[str, Any] = {"user_id": reader}
        if room is not None:
            fields["username"] = username
        fields["last_read_id"] = read_id
        to_channel(
            self._bus,
            "read_receipt",
            fields,
            self._wall(),
            sender=reader,
            room=room,
            to_user=other,
        )

    # --- asking ------------------------------------------------------------------

    async def unread(self, user_id: int) -> dict[str, Any]:
        """``unread_counts``: every room where the user has a marker, every
        conversation with something unread (one store query)."""
        self._absorb()
        if any(key[0] == user_id for key in self._dirty):
            await self.flush()
        rooms: list[dict[str, Any]] = []
        direct: list[dict[str, Any]] = []
        for channel, point in await self._store.unread(user_id):
            counts = {
                "unread": point.unread,
                "last_read_id": point.last_read_id,
                "last_message_id": point.last_id,
            }
            if channel.startswith("r:"):
                rooms.append({"room": channel[2:], **counts, "mentions": point.mentions})
            elif point.unread:
                direct.append({"with_user": dm_peer(channel, user_id), **counts})
        rooms.sort(key=lambda r: r["room"])
        direct.sort(key=lambda d: d["with_user"])
        return {"rooms": rooms, "direct": direct}

    def disconnected(self, user_id: int) -> None:
        """A connection of the user closed: when it was their last one on
        this node, note when they were last seen."""
        if not self._hub.online(user_id):
            self._seen[user_id] = p.rfc3339(self._wall())
            self._due_to_write()

    async def presence(self, user_ids: Sequence[int]) -> list[dict[str, Any]]:
        """``presence``: each user online anywhere, or when last seen."""
        wanted = list(dict.fromkeys(user_ids))
        online = await self._bus.online(wanted)
        away = [uid for uid in wanted if uid not in online]
        seen = await self._store.last_seen(away) if away else {}
        for uid in away:
            if uid in self._seen:  # not written yet
                seen[uid] = self._seen[uid]
        return [
            {"user_id": uid, "online": uid in online, "last_seen": seen.get(uid)} for uid in wanted
        ]

    # --- writing -----------------------------------------------------------------

    async def flush(self) -> None:
        """Write every marker moved (and last-seen time noted) before this
        call. The store commits writes in queue order, so once this call's
        write (or, with nothing new to write, an empty one) is committed,
        so is any write queued before it."""
        self._write_at = None
        self._absorb()
        if not self._dirty and not self._seen:
            if self._writing:
                await self._store.flush()
            return
        dirty, self._dirty = self._dirty, set()
        seen, self._seen = self._seen, {}
        markers = [(uid, channel, *self._markers[uid, channel]) for uid, channel in dirty]
        self._writing += 1
        try:
            await self._store.save_read_state(markers, list(seen.items()))
        except BaseException:
            self._dirty |= dirty  # written with the next
            for uid, when in seen.items():
                self._seen.setdefault(uid, when)
            self._due_to_write()
            raise
        finally:
            self._writing -= 1
        hub = self._hub
        for key in dirty:
            uid, channel = key
            if key not in self._dirty and not (
                channel.startswith("r:") and hub.present(channel[2:], uid)
            ):
                self._markers.pop(key, None)

    # --- the timer ---------------------------------------------------------------

    def next_due(self) -> float | None:
        """When ``run_due`` has something to do (None: nothing for now)."""
        due = self._notices.next_due()
        write_at = self._write_at
        if due is None or (write_at is not None and write_at < due):
            return write_at
        return due

    async def run_due(self) -> None:
        """Send the receipts held back whose turn has come; write the
        markers moved when their interval has passed."""
        now = self._clock()
        ready = self._notices.due(now)
        if ready:
            with self._hub.batch():
                for send in ready:
                    send()
        if self._write_at is not None and now >= self._write_at:
            try:
                await self.flush()
            except Exception:
                log.exception("read state: writing markers failed; trying again")


def _furthest(a: Position, b: Position) -> Position:
    return a if a[1] >= b[1] else b
