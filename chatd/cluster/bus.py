"""The bus of several nodes: Redis pub/sub between them, the store behind it.

Every node subscribes to one Redis channel, ``<prefix>:events``. A node
publishes each message it commits once (batched: one PUBLISH carries what
piled up meanwhile, msgpack-encoded), so a message crosses to each node once,
not once per user; each node then fans it out to its own connections.

Nothing is lost when Redis is not there, because Redis only carries what is
already in the store:

- Room messages, and their edits and deletions, go through a ``Sequencer``: a
  node follows each room that has members on it, from the room's last
  position (``pos``: messages and events counted together, dense like seqs,
  taken under the same lock) at the first join, and delivers positions in
  order. An entry that arrives early (two nodes' entries crossed) waits,
  and the positions it skipped are read from the store; they are committed,
  since positions follow commit order. So every node delivers a room's
  messages, edits and deletions in id order, as a replay does.
- When the subscription comes back after Redis restarted or was unreachable,
  the node reads every followed room from its last delivered position, and
  the direct messages of its connected users created since shortly before
  it last heard from Redis, and their edits and deletions (duplicates are
  dropped by id).
- Events that could not be published wait in a bounded outbox and go out
  when Redis is back (receivers drop what they already have).

Presence and rate limits live in Redis too (``presence.py``, ``limits.py``),
with leases so that a dead node's users disappear from every room.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Generic, Protocol, TypeVar

import coredis
import msgspec
import trio

from chatd.auth import Identity
from chatd.bus import Limits, Members, kick
from chatd.cluster.limits import RedisLimiter
from chatd.cluster.presence import RedisPresence
from chatd.config import Config
from chatd.hub import Hub, Peer
from chatd.metrics import Metrics
from chatd.protocol import Member, rfc3339
from chatd.sequencer import Sequencer
from chatd.store import Entry, NewMessage, Store, StoredEvent, StoredMessage, room_channel
from chatd.transport.frames import OutFrame

log = logging.getLogger("chatd.cluster")

#: Events kept for publishing while Redis is unreachable (oldest dropped).
MAX_OUTBOX = 100_000
#: Events in one PUBLISH.
MAX_BATCH = 512
#: Messages read from the store per query when catching up.
CATCH_UP = 1000
#: Direct messages are re-read from this long before Redis was last heard.
DM_MARGIN_SECONDS = 60.0
#: How long a starting node waits for its subscription before serving.
STARTUP_WAIT = 5.0
#: Longest wait for one Redis call (coredis has no timeout by default).
REDIS_TIMEOUT = 2.0
#: How long a stopping node tries to share what is left.
CLOSE_WAIT = 2.0
#: Direct-message ids remembered, to drop duplicates after a resync.
DM_SEEN = 65536
#: The presence "room" every connected user is in (``Bus.online``): not a
#: valid room name, so never a real room.
ONLINE = "/online"


class LogStore(Store, Protocol):
    """A store that counts positions (PostgreSQL's): what the sequencers
    follow."""

    async def last_pos(self, channel: str) -> tuple[int, int]:
        """The channel's last position and last seq (0, 0: none)."""

    async def log_range(
        self, channel: str, after_pos: int, upto_pos: int, floor_seq: int, floor_pos: int
    ) -> list[Entry]:
        """The channel's entries with a position in ``(after_pos,
        upto_pos]``, in order; (``floor_pos``, ``floor_seq``) is a position
        at or before ``after_pos`` and the seq of the last message there."""

    async def direct_events_since(
        self, user_ids: Sequence[int], at: str, cap: int
    ) -> list[StoredEvent]:
        """Edits and deletions of direct messages to or from any of
        ``user_ids`` made at or after ``at`` (RFC 3339), oldest first."""


class Event(msgspec.Struct, array_like=True, frozen=True):
    """One thing that happened on a node, as it crosses Redis."""

    node: str
    #: "m": a committed message; "e": an edit or deletion of one
    #: (``message_type`` says which); "p": a presence change; "u", "r":
    #: another frame to a user's or a room's connections; "k": a moderation
    #: action in a room (``data``: the ``kicked`` frame, or None); "b": a
    #: block (``user_id`` blocks ``to_user_id``; ``id`` 1) or its end (0)
    kind: str
    id: int = 0
    seq: int = 0
    user_id: int = 0
    username: str = ""
    content: str = ""
    message_type: str = ""
    created_at: str = ""
    room: str | None = None
    to_user_id: int | None = None
    media_url: str | None = None
    media_type: str | None = None
    duration: float | None = None
    reply_to: int | None = None
    data: bytes | None = None
    #: A presence change: the room's online users after it, cluster-wide
    #: (0: not known).
    member_count: int = 0
    mentions: tuple[int, ...] | None = None
    #: A message's or an event's position in its channel.
    pos: int = 0
    #: An edit's or deletion's message, and a conversation's first party.
    message_id: int = 0
    from_user_id: int = 0

    @classmethod
    def of(cls, node: str, stored: Entry) -> Event:
        if isinstance(stored, StoredEvent):
            e = stored
            return cls(
                node, "e", e.id, user_id=e.user_id, content=e.content, message_type=e.kind,
                created_at=e.at, room=e.room, to_user_id=e.to_user_id, pos=e.pos,
                message_id=e.message_id, from_user_id=e.from_user_id,
            )  # fmt: skip
        m = stored.message
        return cls(
            node, "m", stored.id, stored.seq, m.user_id, m.username, m.content, m.message_type,
            m.created_at, m.room, m.to_user_id, m.media_url, m.media_type, m.duration,
            m.reply_to, m.data, 0, m.mentions, stored.pos,
        )  # fmt: skip

    def entry(self) -> Entry:
        """The message or event this carries."""
        if self.kind == "m":
            return self.stored()
        return StoredEvent(
            id=self.id,
            kind=self.message_type,
            message_id=self.message_id,
            user_id=self.user_id,
            at=self.created_at,
            room=self.room,
            from_user_id=self.from_user_id,
            to_user_id=self.to_user_id or 0,
            content=self.content,
            pos=self.pos,
        )

    def stored(self) -> StoredMessage:
        message = NewMessage(
            user_id=self.user_id,
            username=self.username,
            content=self.content,
            message_type=self.message_type,
            created_at=self.created_at,
            room=self.room,
            to_user_id=self.to_user_id,
            media_url=self.media_url,
            media_type=self.media_type,
            duration=self.duration,
            reply_to=self.reply_to,
            data=self.data,
            mentions=self.mentions,
        )
        return StoredMessage(self.id, message, self.seq, self.pos)


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(list[Event]).decode

P = TypeVar("P", bound=Peer)
Item = tuple[Entry, P | None, str | int | None]
PresenceOp = tuple[str, Identity, str] | trio.Event


class RedisBus(Generic[P]):
    """Delivery, presence and rate limits shared by the nodes of a cluster."""

    def __init__(
        self,
        config: Config,
        hub: Hub[P],
        store: LogStore,
        client: coredis.Redis[bytes],
        wall: Callable[[], float],
        metrics: Metrics,
    ) -> None:
        bus = config.bus
        self.node_id = bus.node_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.channel = f"{bus.prefix}:events"
        self.hub = hub
        self.store = store
        self.client = client
        self.presence = RedisPresence(client, bus.prefix, self.node_id, bus.lease_seconds)
        self._prefix = bus.prefix
        self._wall = wall
        self._metrics = metrics
        self._rooms: Sequencer[Item[P]] = Sequencer()
        #: room -> the seq of the last message delivered there (with the
        #: sequencer's last position: where a read of the store starts)
        self._seqs: dict[str, int] = {}
        self._dm_seen: set[int] = set()
        self._dm_order: deque[int] = deque()
        self._outbox: deque[Event] = deque(maxlen=MAX_OUTBOX)
        self._outbox_ready = trio.Event()
        self._drained = trio.Event()
        self._ops_in, self._ops_out = trio.open_memory_channel[PresenceOp](10_000)
        #: Wall time of the last successful exchange with Redis.
        self.last_heard = wall()
        self._down = False
        self._nursery: trio.Nursery | None = None

    # --- the Bus interface ----------------------------------------------------

    def message(
        self, stored: Entry, origin: P | None = None, request_id: str | int | None = None
    ) -> None:
        self._publish(Event.of(self.node_id, stored))
        self._deliver(stored, origin, request_id)

    def _publish(self, event: Event) -> None:
        if len(self._outbox) == MAX_OUTBOX:
            self._metrics.bus_dropped.inc()  # the deque drops the oldest
        self._outbox.append(event)
        self._outbox_ready.set()

    async def follow(self, room: str) -> None:
        """Follow the room from its newest position, read now (before the
        join: what is committed after it reaches the hub in order), unless
        this node follows it already."""
        if self._rooms.last(room) is None:
            pos, seq = await self.store.last_pos(room_channel(room))
            if self._rooms.last(room) is None:
                self._rooms.track(room, pos)
                self._seqs[room] = seq

    async def joined(self, peer: P, room: str, first: bool, limit: int) -> tuple[Members, int]:
        if first:
            self._share("user_connected", peer.identity, room)
        done = trio.Event()
        self._ops_in.send_nowait(done)  # after this node's earlier presence changes
        await done.wait()
        return await self.members(room, 0, limit)

    async def members(self, room: str, after_user_id: int, limit: int) -> tuple[list[Member], int]:
        try:
            with trio.fail_after(REDIS_TIMEOUT):
                found, count = await self.presence.members(room, after_user_id, limit)
            return [Member(uid, name) for uid, name in found], count
        except Exception as exc:
            self._lost("presence", exc)
            hub = self.hub
            return hub.members(room, after_user_id, limit), hub.member_count(room)

    def left(self, ident: Identity, room: str) -> None:
        if not self.hub.has_room(room):
            self._rooms.forget(room)
            self._seqs.pop(room, None)
        self._share("user_disconnected", ident, room)

    def limits(self, name: str, limits: Sequence[tuple[int, float]]) -> Limits:
        return RedisLimiter(self.client, self._prefix, limits, name)

    def to_user(
        self, user_id: int, kind: str, payload: bytes, skip: P | None = None, sender: int = 0
    ) -> None:
        self.hub.send_user(user_id, kind, OutFrame(payload), skip, sender)
        event = Event(
            self.node_id, "u", user_id=user_id, message_type=kind, data=payload,
            from_user_id=sender,
        )  # fmt: skip
        self._publish(event)

    def blocked(self, blocker: int, blocked: int, on: bool) -> None:
        self.hub.blocks.set(blocker, blocked, on)
        event = Event(self.node_id, "b", user_id=blocker, to_user_id=blocked, id=int(on))
        self._publish(event)

    def to_room(self, room: str, kind: str, payload: bytes, skip_user: int) -> None:
        self.hub.send_room(room, kind, OutFrame(payload), skip_user)
        event = Event(
            self.node_id, "r", user_id=skip_user, message_type=kind, room=room, data=payload
        )
        self._publish(event)

    def moderated(self, room: str, user_id: int, kicked: bytes | None) -> None:
        kick(self, room, user_id, kicked)
        self._publish(Event(self.node_id, "k", user_id=user_id, room=room, data=kicked))

    async def online(self, user_ids: Sequence[int]) -> set[int]:
        here = {uid for uid in user_ids if self.hub.online(uid)}
        away = [uid for uid in user_ids if uid not in here]
        try:
            with trio.fail_after(REDIS_TIMEOUT):
                flags = await self.presence.present(ONLINE, away)
        except Exception as exc:
            self._lost("presence", exc)
            return here
        return here | {uid for uid, on in zip(away, flags, strict=True) if on}

    def user_online(self, ident: Identity) -> None:
        self._share("user_connected", ident, ONLINE)

    def user_offline(self, ident: Identity) -> None:
        self._share("user_disconnected", ident, ONLINE)

    # --- delivery on this node --------------------------------------------------

    def _deliver(
        self, stored: Entry, origin: P | None = None, request_id: str | int | None = None
    ) -> None:
        room = stored.message.room if isinstance(stored, StoredMessage) else stored.room
        if room is None:
            if stored.id in self._dm_seen:
                return
            self._remember_dm(stored.id)
            self.hub.deliver(stored, self._wall(), origin, request_id)
            return
        ready, gap = self._rooms.offer(room, stored.pos, (stored, origin, request_id))
        self._send(ready)
        if gap is not None and self._nursery is not None:
            self._nursery.start_soon(self._fill, room, gap)

    def _send(self, items: list[Item[P]]) -> None:
        now = self._wall()
        seqs = self._seqs
        for stored, origin, request_id in items:
            if isinstance(stored, StoredMessage) and stored.message.room is not None:
                seqs[stored.message.room] = stored.seq
            self.hub.deliver(stored, now, origin, request_id)

    def _remember_dm(self, message_id: int) -> None:
        self._dm_seen.add(message_id)
        self._dm_order.append(message_id)
        if len(self._dm_order) > DM_SEEN:
            self._dm_seen.discard(self._dm_order.popleft())

    async def _fill(self, room: str, gap: tuple[int, int]) -> None:
        """Read positions ``gap[0] < pos <= gap[1]`` of ``room`` from the store."""
        after, upto = gap
        self._metrics.bus_gap_reads.inc(upto - after)
        found: list[Entry] = []
        try:
            found = await self._read(room, after, upto)
            await self._own_offered()
        except Exception as exc:
            log.warning("cluster: cannot read room %s from the store: %s", room, exc)
            await trio.sleep(1.0)
        self._filled(room, found)

    async def _own_offered(self) -> None:
        """Return once this node's messages committed so far have been
        offered to the sequencer. A read from the store may find one of them
        committed but its callback not yet run; delivered from the store, the
        sender's copy would lack its request_id (its acknowledgement), and the
        live copy would then come too late to count. With the callbacks run
        first, the live copy is there and wins (``Sequencer.fill``)."""
        await self.store.flush()

    async def _read(self, room: str, after: int, upto: int) -> list[Entry]:
        """Positions ``after < pos <= upto`` of a followed room, read from
        the store from the last one delivered here."""
        floor_pos = self._rooms.last(room)
        if floor_pos is None:
            return []
        floor_seq = self._seqs.get(room, 0)
        return await self.store.log_range(room_channel(room), after, upto, floor_seq, floor_pos)

    def _filled(self, room: str, found: list[Entry]) -> None:
        """Deliver what a read from the store made deliverable; read again
        when a gap is still open (the read failed, or entries arrived early
        meanwhile)."""
        with self.hub.batch():
            self._send(self._rooms.fill(room, [(e.pos, (e, None, None)) for e in found]))
        again = self._rooms.fetch_done(room)
        if again is not None and self._nursery is not None:
            self._nursery.start_soon(self._fill, room, again)

    async def _resync(self, heard: float) -> None:
        """After the subscription came back: read what may have been missed."""
        for room, last in self._rooms.tracked().items():
            while True:
                try:
                    found = await self._read(room, last, last + CATCH_UP)
                    await self._own_offered()
                except Exception as exc:
                    log.warning("cluster: cannot catch up room %s: %s", room, exc)
                    break
                self._filled(room, found)
                if len(found) < CATCH_UP or self._rooms.last(room) is None:
                    break
                last = found[-1].pos
        users = self.hub.users()
        if users:
            since = rfc3339(heard - DM_MARGIN_SECONDS)
            try:
                missed: list[Entry] = [
                    *await self.store.direct_since(users, since, 10 * CATCH_UP),
                    *await self.store.direct_events_since(users, since, 10 * CATCH_UP),
                ]
            except Exception as exc:
                log.warning("cluster: cannot catch up direct messages: %s", exc)
                return
            missed.sort(key=lambda entry: entry.id)
            with self.hub.batch():
                for stored in missed:
                    self._deliver(stored)

    # --- presence -------------------------------------------------------------

    def _share(self, kind: str, ident: Identity, room: str) -> None:
        """Queue a presence change on this node for Redis (in order); it is
        announced once Redis says whether it changes the cluster's view."""
        try:
            self._ops_in.send_nowait((kind, ident, room))
        except trio.WouldBlock:
            log.warning(
                "cluster: presence queue full; %s of user %d not shared", kind, ident.user_id
            )

    async def _presence_worker(self) -> None:
        async for op in self._ops_out:
            if isinstance(op, trio.Event):
                op.set()
                continue
            kind, ident, room = op
            count: int | None
            try:
                with trio.fail_after(REDIS_TIMEOUT):
                    if kind == "user_connected":
                        changed, count = await self.presence.join(
                            room, ident.user_id, ident.username
                        )
                    else:
                        changed, count = await self.presence.leave(room, ident.user_id)
                self._heard()
            except Exception as exc:
                self._lost("presence", exc)
                changed, count = True, None  # alone for now: say it here at least
            if changed and room != ONLINE:
                self._announce(kind, ident.user_id, ident.username, room, count, publish=True)

    def _announce(
        self,
        kind: str,
        user_id: int,
        username: str,
        room: str,
        count: int | None,
        *,
        publish: bool,
    ) -> None:
        """Announce a presence change of the cluster on this node (a summary
        in a big room: ``count`` is the room's online users, None when Redis
        could not say); with ``publish``, to the other nodes too."""
        self.hub.announce(kind, Identity(user_id, username, None), room, self._wall(), count)
        if publish:
            self._publish(
                Event(
                    self.node_id,
                    "p",
                    user_id=user_id,
                    username=username,
                    message_type=kind,
                    room=room,
                    member_count=count or 0,
                )
            )

    async def _leases(self) -> None:
        """Renew this node's presence entries; reap those of dead nodes."""
        while True:
            await trio.sleep(self.presence.renew_interval)
            try:
                held = self.hub.presence() + [(ONLINE, uid) for uid in self.hub.users()]
                with trio.fail_after(REDIS_TIMEOUT):
                    lost = await self.presence.renew(held)
                for room, user_id in lost:  # reaped while cut off, or Redis restarted
                    if room == ONLINE:
                        ident = self.hub.identity(user_id)
                        if ident is not None:
                            self._share("user_connected", ident, room)
                        continue
                    for member in self.hub.members(room, user_id - 1, 1):
                        if member.user_id == user_id:
                            ident = Identity(user_id, member.username, None)
                            self._share("user_connected", ident, room)
                with trio.fail_after(REDIS_TIMEOUT):
                    gone = await self.presence.reap()
                for room, user_id, username, count in gone:
                    if room == ONLINE:
                        continue
                    self._announce(
                        "user_disconnected", user_id, username, room, count, publish=True
                    )
                self._heard()
            except Exception as exc:
                self._lost("presence", exc)

    # --- Redis ------------------------------------------------------------------

    def _heard(self) -> None:
        self.last_heard = self._wall()
        self._metrics.bus_up.set(1)
        if self._down:
            self._down = False
            log.warning("cluster: Redis is reachable again")

    def _lost(self, what: str, exc: BaseException) -> None:
        self._metrics.bus_up.set(0)
        if not self._down:
            self._down = True
            log.warning("cluster: Redis unreachable (%s): %s", what, exc)

    async def _publisher(self) -> None:
        backoff = 0.05
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready = trio.Event()
            while self._outbox:
                batch = [self._outbox[i] for i in range(min(MAX_BATCH, len(self._outbox)))]
                try:
                    with trio.fail_after(REDIS_TIMEOUT):
                        await self.client.publish(self.channel, _encode(batch))
                except Exception as exc:
                    self._lost("publish", exc)
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                backoff = 0.05
                self._heard()
                self._metrics.bus_sent.inc(len(batch))
                for _ in batch:
                    self._outbox.popleft()
            self._drained.set()

    async def _subscriber(self, subscribed: trio.Event) -> None:
        while True:
            try:
                async with self.client.pubsub(channels=[self.channel]) as pubsub:
                    async for message in pubsub:
                        self._received(message)
                        subscribed.set()
            except Exception as exc:  # the client retries by itself; this is more
                self._lost("subscribe", exc)
                await trio.sleep(1.0)

    def _received(self, message: Any) -> None:
        kind = message["type"]
        if kind == "subscribe":
            # (re)subscribed: whatever passed meanwhile is in the store
            heard = self.last_heard
            self._heard()
            if self._nursery is not None:
                self._nursery.start_soon(self._resync, heard)
            return
        if kind != "message":
            return
        self._heard()
        try:
            events = _decode(message["data"])
        except msgspec.DecodeError:
            log.warning("cluster: undecodable event on %s ignored", self.channel)
            return
        with self.hub.batch():  # a batch of events: one write per connection
            for event in events:
                if event.node == self.node_id:
                    continue
                self._metrics.bus_received.inc()
                if event.kind in ("m", "e"):
                    self._deliver(event.entry())
                elif event.kind == "u" and event.data is not None:
                    frame = OutFrame(event.data)
                    self.hub.send_user(
                        event.user_id, event.message_type, frame, sender=event.from_user_id
                    )
                elif event.kind == "b" and event.to_user_id is not None:
                    self.hub.blocks.set(event.user_id, event.to_user_id, bool(event.id))
                elif event.kind == "r" and event.room is not None and event.data is not None:
                    frame = OutFrame(event.data)
                    self.hub.send_room(event.room, event.message_type, frame, event.user_id)
                elif event.kind == "k" and event.room is not None:
                    self.store.forget_access()
                    kick(self, event.room, event.user_id, event.data)
                elif event.kind == "p" and event.room is not None:
                    self._announce(
                        event.message_type,
                        event.user_id,
                        event.username,
                        event.room,
                        event.member_count or None,
                        publish=False,
                    )

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._publisher)
            nursery.start_soon(self._presence_worker)
            nursery.start_soon(self._leases)
            subscribed = trio.Event()
            nursery.start_soon(self._subscriber, subscribed)
            with trio.move_on_after(STARTUP_WAIT):
                await subscribed.wait()
            if not subscribed.is_set():
                log.warning("cluster: not subscribed to Redis yet; serving, will catch up")
            task_status.started()

    async def close(self) -> None:
        """Share what is left (presence changes, unpublished events), then
        remove this node's presence entries (at most ``CLOSE_WAIT``)."""
        with trio.move_on_after(CLOSE_WAIT) as scope:
            scope.shield = True
            done = trio.Event()
            self._ops_in.send_nowait(done)
            await done.wait()
            if self._outbox:
                self._drained = trio.Event()
                await self._drained.wait()
            try:
                for room, user_id, username, count in await self.presence.forget_node():
                    self._announce(
                        "user_disconnected", user_id, username, room, count, publish=True
                    )
            except Exception as exc:
                log.warning("cluster: could not remove this node's presence: %s", exc)
            if self._outbox:
                self._drained = trio.Event()
                await self._drained.wait()


@asynccontextmanager
async def open_redis_bus(
    config: Config,
    hub: Hub[P],
    store: LogStore,
    wall: Callable[[], float],
    metrics: Metrics,
) -> AsyncIterator[RedisBus[P]]:
    """Connect to Redis, subscribe, and run the bus for the block."""
    client: coredis.Redis[bytes] = coredis.Redis.from_url(config.bus.url, decode_responses=False)
    async with client, trio.open_nursery() as nursery:
        bus: RedisBus[P] = RedisBus(config, hub, store, client, wall, metrics)
        await nursery.start(bus.run)
        log.info("cluster %r over Redis, this node is %s", config.bus.prefix, bus.node_id)
        try:
            yield bus
        finally:
            await bus.close()
            nursery.cancel_scope.cancel()
