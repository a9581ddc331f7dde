"""chatd.session.Session, driven frame by frame without sockets.

Rules of this file:

* No sockets, no server, no database, no real time. A test builds one node's
  ``Context`` (``Context.create``) and drives sessions through their whole
  API: ``start``, ``handle_text``, ``handle_binary``, ``refuse``, ``end``.
* The real pure parts: the ``Hub`` (with ``SendEach`` as its broadcaster),
  the ``Verifier``, ``Messages``, ``Metrics`` and a ``Config`` built by
  ``config.from_dict`` (through conftest's ``make_config``).
* Fakes for what the session talks to, and only those: ``FakePeer`` (the
  transport), ``FakeStore`` (storage: the test commits or fails each queued
  message itself) and ``FakeBus`` (delivery through the real hub, presence
  calls recorded, rate limits that are real token buckets unless the test
  forces an answer).
* Both clocks are numbers the test moves (``Clock``). Only ``auth`` frames
  read real time: pyjwt checks a new token's ``exp`` against ``time.time()``,
  so their tokens expire far in the future (``FAR``) or long ago.
* Concurrency (a join waiting on the bus or the store while other things
  happen) uses a ``trio.Event`` gate in the fake and
  ``trio.testing.wait_all_tasks_blocked``, never a sleep.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
import trio
from trio.testing import wait_all_tasks_blocked

import chatd.messages
import chatd.session
from chatd.auth import Identity
from chatd.bus import Limits, LocalLimits, kick
from chatd.config import Config
from chatd.errors import ChatError, ErrorCode, auth_failed
from chatd.hub import Hub, SendEach
from chatd.metrics import Metrics
from chatd.protocol import Member, rfc3339
from chatd.session import Context, Session
from chatd.store import (
    ChannelMarkers,
    Committed,
    Missed,
    NewMessage,
    ReadPoint,
    RoomAccess,
    StoredMessage,
    dm_channel,
    room_channel,
)
from chatd.transport.frames import OutFrame
from tests.helpers.tokens import SECRET, hand_made_token, make_token

#: The wall clock when a test starts (2023-11-14T22:13:20Z).
NOW = 1_700_000_000.0
#: When the test peers' tokens expire (by the wall clock).
EXP = NOW + 3600.0
#: ``[auth] leeway_seconds``, the default.
LEEWAY = 10.0
#: An ``exp`` in real time that no test run will reach (2096).
FAR = 4_000_000_000
#: An ``exp`` in real time long gone (2001).
PAST = 1_000_000_000

ALICE, BOB, CAROL = 1, 2, 3
NAMES = {ALICE: "alice", BOB: "bob", CAROL: "carol"}


# --- fakes ----------------------------------------------------------------------


class Clock:
    """A clock that reads a number the test moves."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakePeer:
    """One connection as the session drives it (``ClientPeer``).

    Keeps every frame it is sent, decoded, while it is open; like the real
    transport it delivers nothing once closed, but keeps what it was handed
    then in ``dropped``, so a test can tell whether the session even tried.
    ``close`` is recorded and makes the peer not ``open``."""

    def __init__(self, user_id: int, expires_at: float | None = EXP) -> None:
        self.identity = Identity(user_id, NAMES.get(user_id, f"user{user_id}"), expires_at)
        self.open = True
        self.behind = False
        self.frames: list[dict[str, Any]] = []
        self.dropped: list[dict[str, Any]] = []
        self.closes: list[tuple[int, str]] = []
        self.drains = 0

    def send(self, frame: OutFrame) -> None:
        (self.frames if self.open else self.dropped).append(json.loads(frame.payload))

    async def drained(self) -> None:
        """Nothing is ever buffered here; the calls are counted."""
        self.drains += 1

    def close(self, code: int, reason: str = "") -> None:
        self.closes.append((code, reason))
        self.open = False

    def types(self) -> list[str]:
        return [f["type"] for f in self.frames]

    def take(self) -> list[dict[str, Any]]:
        """The frames received so far, forgetting them."""
        frames, self.frames = self.frames, []
        return frames


@dataclass
class Pending:
    """A message queued for the next commit, as the store holds it."""

    ticket: int
    message: NewMessage
    on_done: Committed


@dataclass
class FakeStore:
    """The ``Store`` interface over lists in memory.

    ``append`` only queues: the test commits (``commit``: id, seq, then
    ``on_done``) or fails (``fail``) the oldest queued message, as the real
    store's writer would, in order. ``flush`` commits everything queued.
    Every read answers as of its call, after an optional gate (``gates``, by
    method name) and raises ``errors[name]`` when one is set. ``calls`` logs
    every read."""

    #: Room name -> (private, members).
    rooms: dict[str, tuple[bool, tuple[int, ...]]] = field(
        default_factory=lambda: {
            "general": (False, ()),
            "random": (False, ()),
            "staff": (True, (ALICE, BOB)),
        }
    )
    users: set[int] = field(default_factory=lambda: {0, ALICE, BOB, CAROL})
    channels: dict[str, list[StoredMessage]] = field(default_factory=dict)
    pending: list[Pending] = field(default_factory=list)
    appended: list[NewMessage] = field(default_factory=list)
    done: set[int] = field(default_factory=set)
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    flushes: int = 0
    gates: dict[str, trio.Event] = field(default_factory=dict)
    errors: dict[str, BaseException] = field(default_factory=dict)
    next_id: int = 1
    last_ticket: int = 0
    #: (user id, channel) -> (last_read_id, last_read_seq), as written
    markers: dict[tuple[int, str], tuple[int, int]] = field(default_factory=dict)
    #: user id -> last seen, as written
    seen: dict[int, str] = field(default_factory=dict)

    # --- writing (the test decides when) --------------------------------------

    async def append(self, message: NewMessage, on_done: Committed) -> int:
        self.last_ticket += 1
        self.appended.append(message)
        self.pending.append(Pending(self.last_ticket, message, on_done))
        return self.last_ticket

    def committed(self, ticket: int) -> bool:
        return ticket == 0 or ticket in self.done

    @property
    def backlog(self) -> int:
        """Writes queued and not yet committed or failed."""
        return len(self.pending)

    async def flush(self) -> None:
        self.flushes += 1
        while self.pending:
            self.commit()
        await self._gate("flush")

    def commit(self) -> StoredMessage:
        """Commit the oldest queued message and call its ``on_done``."""
        pending = self.pending.pop(0)
        stored = self.put(pending.message)
        self.done.add(pending.ticket)
        pending.on_done(stored)
        return stored

    def fail(self, exc: Exception) -> None:
        """The oldest queued message could not be committed."""
        pending = self.pending.pop(0)
        self.done.add(pending.ticket)
        pending.on_done(exc)

    def put(self, message: NewMessage) -> StoredMessage:
        """Store ``message`` at once (its id and seq), calling no one."""
        if message.room is not None:
            channel = room_channel(message.room)
        else:
            assert message.to_user_id is not None
            channel = dm_channel(message.user_id, message.to_user_id)
        messages = self.channels.setdefault(channel, [])
        stored = StoredMessage(self.next_id, message, len(messages) + 1)
        self.next_id += 1
        messages.append(stored)
        return stored

    def seed(self, room: str, count: int, user_id: int = BOB) -> list[StoredMessage]:
        """``count`` messages already in ``room``, from ``user_id``."""
        return [self.put(new_message(f"old {i}", room=room, user_id=user_id)) for i in range(count)]

    # --- reading --------------------------------------------------------------

    async def _gate(self, name: str) -> None:
        gate = self.gates.get(name)
        if gate is not None:
            await gate.wait()
        error = self.errors.get(name)
        if error is not None:
            raise error

    async def room_access(self, room: str, user_id: int) -> RoomAccess | None:
        self.calls.append(("room_access", room, user_id))
        known = self.rooms.get(room)
        await self._gate("room_access")
        if known is None:
            return None
        private, members = known
        return RoomAccess(room, private, not private or user_id in members)

    async def last_seq(self, channel: str) -> int:
        self.calls.append(("last_seq", channel))
        return len(self.channels.get(channel, []))

    async def user_exists(self, user_id: int) -> bool:
        self.calls.append(("user_exists", user_id))
        await self._gate("user_exists")
        return user_id in self.users

    async def history(
        self, channel: str, limit: int, offset: int
    ) -> tuple[list[StoredMessage], int]:
        self.calls.append(("history", channel, limit, offset))
        messages = self.channels.get(channel, [])
        end = max(0, len(messages) - offset)
        page = messages[max(0, end - limit) : end]
        await self._gate("history")
        return page, len(messages)

    async def missed(self, channel: str, since_id: int, cap: int, page: int = 0) -> Missed:
        self.calls.append(("missed", channel, since_id, cap, page))
        stored = self.channels.get(channel, [])
        newer = [m for m in stored if m.id > since_id]
        kept = newer[max(0, len(newer) - cap) :] if cap else []
        newest = stored[-1].id if stored else 0
        after_seq = kept[0].seq - 1 if kept else (stored[-1].seq if stored else 0)
        first = [m for m in stored if m.seq > after_seq][:page] if newest > since_id else []
        complete = len(kept) == len(newer)
        after_id = since_id if complete else stored[after_seq - 1].id
        await self._gate("missed")
        more = bool(page) and len(first) >= page
        return Missed(after_seq, after_id, complete, newest, tuple(first), more)

    async def after(self, channel: str, after_seq: int, cap: int) -> list[StoredMessage]:
        self.calls.append(("after", channel, after_seq, cap))
        page = [m for m in self.channels.get(channel, []) if m.seq > after_seq][:cap]
        await self._gate("after")
        return page

    async def replay(
        self, channel: str, after_seq: int, after_id: int, page: int
    ) -> tuple[list[StoredMessage], bool]:
        """(This store has no edits nor deletions: messages alone.)"""
        found = await self.after(channel, after_seq, page)
        return found, len(found) >= page

    # --- read state -------------------------------------------------------------

    def _top(self, channel: str) -> tuple[int, int]:
        messages = self.channels.get(channel, [])
        return (messages[-1].id, messages[-1].seq) if messages else (0, 0)

    def _mentions_after(self, user_id: int, channel: str, seq: int) -> int:
        return sum(
            1
            for m in self.channels.get(channel, [])
            if m.seq > seq and user_id in (m.message.mentions or ())
        )

    def marker_now(self, channel: str, user_id: int) -> ChannelMarkers | None:
        return None  # (every read of this store waits, at its gate)

    async def marker(self, channel: str, user_id: int) -> ChannelMarkers:
        self.calls.append(("marker", channel, user_id))
        found = {}
        mark = self.markers.get((user_id, channel))
        if mark is not None:
            found[user_id] = (*mark, self._mentions_after(user_id, channel, mark[1]))
        top = self._top(channel)
        await self._gate("marker")
        return ChannelMarkers(*top, found)

    async def unread(self, user_id: int) -> list[tuple[str, ReadPoint]]:
        self.calls.append(("unread", user_id))
        return [
            (
                channel,
                ReadPoint(*mark, *self._top(channel), self._mentions_after(uid, channel, mark[1])),
            )
            for (uid, channel), mark in sorted(self.markers.items())
            if uid == user_id
        ]

    async def read_point(
        self, user_id: int, channel: str, message_id: int, floor: tuple[int, int]
    ) -> ReadPoint | None:
        self.calls.append(("read_point", user_id, channel, message_id))
        await self._gate("read_point")
        target = [(m.id, m.seq) for m in self.channels.get(channel, []) if m.id == message_id]
        if not target:
            return None
        stored = self.markers.get((user_id, channel), (0, 0))
        mark = max(target[0], floor, stored, key=lambda p: p[1])
        top = self._top(channel)
        return ReadPoint(*mark, *top, self._mentions_after(user_id, channel, mark[1]))

    async def last_seen(self, user_ids: Sequence[int]) -> dict[int, str]:
        self.calls.append(("last_seen", tuple(user_ids)))
        return {uid: self.seen[uid] for uid in user_ids if uid in self.seen}

    async def save_read_state(
        self, markers: Sequence[tuple[int, str, int, int]], seen: Sequence[tuple[int, str]]
    ) -> None:
        self.calls.append(("save_read_state", len(markers), len(seen)))
        await self._gate("save_read_state")
        for uid, channel, read_id, read_seq in markers:
            old = self.markers.get((uid, channel))
            if old is None or read_seq > old[1]:
                self.markers[uid, channel] = (read_id, read_seq)
        self.seen.update(seen)

    # --- the rest of the interface: the session never calls it ------------------

    async def upsert_user(self, user_id: int, username: str) -> None:
        raise AssertionError("the session does not record users")

    async def direct_since(
        self, user_ids: Sequence[int], created_at: str, cap: int
    ) -> list[StoredMessage]:
        raise AssertionError("the session does not read direct messages by date")

    async def declare_rooms(self, rooms: Any) -> None:
        raise AssertionError("the session does not declare rooms")

    async def dev_user(self, username: str) -> int:
        raise AssertionError("the session does not make users")


class FakeLimits:
    """One named rate limit: the real token buckets (``LocalLimits``) on the
    test's monotonic clock, unless the test sets ``wait`` (then every
    ``take`` answers it). Records every key taken."""

    def __init__(self, buckets: Sequence[tuple[int, float]], clock: Callable[[], float]) -> None:
        self.buckets = list(buckets)
        self.real = LocalLimits(buckets, clock)
        self.wait: float | None = None
        self.keys: list[int] = []

    async def take(self, key: int) -> float:
        self.keys.append(key)
        if self.wait is not None:
            return self.wait
        return await self.real.take(key)


class FakeBus:
    """The ``Bus`` interface for one node, as ``LocalBus`` but observable:
    committed messages are recorded and delivered through the real hub;
    ``joined`` and ``left`` are recorded and announce nothing (``joined``
    waits on ``gate`` when set and raises ``error`` when set); ``limits``
    hands out ``FakeLimits``, the latest of each name in ``made``."""

    def __init__(self, hub: Hub[FakePeer], wall: Clock, monotonic: Clock) -> None:
        self.hub = hub
        self.wall = wall
        self.monotonic = monotonic
        self.delivered: list[tuple[StoredMessage, FakePeer | None, str | int | None]] = []
        self.joins: list[tuple[FakePeer, str, bool]] = []
        self.follows: list[str] = []
        self.lefts: list[tuple[Identity, str]] = []
        self.limit_calls: list[tuple[str, list[tuple[int, float]]]] = []
        self.made: dict[str, FakeLimits] = {}
        self.gate: trio.Event | None = None
        self.error: BaseException | None = None
        self.onlines: list[int] = []
        self.offlines: list[int] = []

    def message(
        self,
        stored: StoredMessage,
        origin: FakePeer | None = None,
        request_id: str | int | None = None,
    ) -> None:
        self.delivered.append((stored, origin, request_id))
        self.hub.deliver(stored, self.wall(), origin, request_id)

    async def follow(self, room: str) -> None:
        self.follows.append(room)

    async def joined(
        self, peer: FakePeer, room: str, first: bool, limit: int
    ) -> tuple[list[Member], int]:
        self.joins.append((peer, room, first))
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return self.hub.members(room, 0, limit), self.hub.member_count(room)

    async def members(self, room: str, after_user_id: int, limit: int) -> tuple[list[Member], int]:
        return self.hub.members(room, after_user_id, limit), self.hub.member_count(room)

    def left(self, ident: Identity, room: str) -> None:
        self.lefts.append((ident, room))

    def limits(self, name: str, limits: Sequence[tuple[int, float]]) -> Limits:
        self.limit_calls.append((name, list(limits)))
        made = self.made[name] = FakeLimits(limits, self.monotonic)
        return made

    def to_user(
        self,
        user_id: int,
        kind: str,
        payload: bytes,
        skip: FakePeer | None = None,
        sender: int = 0,
    ) -> None:
        self.hub.send_user(user_id, kind, OutFrame(payload), skip, sender)

    def blocked(self, blocker: int, blocked: int, on: bool) -> None:
        self.hub.blocks.set(blocker, blocked, on)

    def moderated(self, room: str, user_id: int, kicked: bytes | None) -> None:
        kick(self, room, user_id, kicked)

    def to_room(self, room: str, kind: str, payload: bytes, skip_user: int) -> None:
        self.hub.send_room(room, kind, OutFrame(payload), skip_user)

    async def online(self, user_ids: Sequence[int]) -> set[int]:
        return {uid for uid in user_ids if self.hub.online(uid)}

    def user_online(self, ident: Identity) -> None:
        self.onlines.append(ident.user_id)

    def user_offline(self, ident: Identity) -> None:
        self.offlines.append(ident.user_id)


class World:
    """One node: the shared ``Context`` over the fakes and the real parts,
    and sessions connected to it."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.wall = Clock(NOW)
        self.monotonic = Clock(1000.0)
        self.metrics = Metrics()
        #: How many times the read state or typing asked for the timer.
        self.wakes = 0
        self.hub: Hub[FakePeer] = Hub(SendEach(), self.metrics)
        self.store = FakeStore()
        self.bus = FakeBus(self.hub, self.wall, self.monotonic)
        self.ctx: Context[FakePeer] = Context.create(
            config,
            self.hub,
            self.store,
            self.bus,
            wall=self.wall,
            monotonic=self.monotonic,
            metrics=self.metrics,
            replays=trio.CapacityLimiter(2),
            wake=self.wake,
        )

    def wake(self) -> None:
        self.wakes += 1

    async def run_due(self) -> None:
        """Run the timed work of the read state and typing that is due on
        the test's clock (what the server's timer task does)."""
        now = self.monotonic()
        for work in (self.ctx.reads, self.ctx.typists):
            due = work.next_due()
            if due is not None and due <= now:
                await work.run_due()

    def connect(self, user_id: int = ALICE, expires_at: float | None = EXP) -> Session[FakePeer]:
        """A started session of a new connection of ``user_id``."""
        session = Session(self.ctx, FakePeer(user_id, expires_at))
        session.start()
        return session

    def limits(self, name: str) -> FakeLimits:
        return self.bus.made[name]

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@pytest.fixture
def make_world(make_config: Callable[..., Config]) -> Callable[..., World]:
    """A world whose config has these sections (over conftest's base)."""

    def make(**sections: Any) -> World:
        return World(make_config(**sections))

    return make


@pytest.fixture
def world(make_world: Callable[..., World]) -> World:
    return make_world()


# --- helpers ----------------------------------------------------------------------


def new_message(
    content: str = "hi",
    *,
    room: str | None = "general",
    user_id: int = BOB,
    to_user_id: int | None = None,
    message_type: str = "text",
    data: bytes | None = None,
) -> NewMessage:
    return NewMessage(
        user_id=user_id,
        username=NAMES.get(user_id, "system"),
        content=content,
        message_type=message_type,
        created_at="2023-11-14T22:00:00.000Z",
        room=room,
        to_user_id=to_user_id,
        data=data,
    )


async def send(
    session: Session[FakePeer],
    type_: str,
    data: dict[str, Any] | None = None,
    request_id: str | int | None = None,
) -> None:
    frame: dict[str, Any] = {"type": type_, "data": {} if data is None else data}
    if request_id is not None:
        frame["request_id"] = request_id
    await session.handle_text(json.dumps(frame))


async def join(session: Session[FakePeer], room: str = "general") -> dict[str, Any]:
    """Join ``room`` (which must succeed); the peer's frames are cleared."""
    await send(session, "join_room", {"room": room})
    frames = session.peer.take()
    assert [f["type"] for f in frames] == ["join_room_ack"], frames
    return frames[0]


async def post(
    session: Session[FakePeer], content: str = "hi", request_id: str | int | None = None
) -> None:
    await send(session, "room_message", {"room": "general", "content": content}, request_id)


def the_error(
    peer: FakePeer,
    code: ErrorCode,
    request_id: str | int | None = None,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The peer's one frame, an ``error`` with ``code`` echoing
    ``request_id`` (and with exactly ``details`` when given); cleared."""
    frames = peer.take()
    assert len(frames) == 1, frames
    (frame,) = frames
    assert frame["type"] == "error", frame
    assert frame["data"]["code"] == code.value, frame
    assert frame.get("request_id") == request_id, frame
    assert frame["timestamp"].endswith("Z")
    if details is not None:
        assert frame["data"]["details"] == details, frame
    data: dict[str, Any] = frame["data"]
    return data


def bad_token(**claims: Any) -> str:
    """A token for alice signed with another secret."""
    body = {"user_id": ALICE, "username": "alice", "exp": FAR, **claims}
    return jwt.encode(body, "some-other-secret-that-is-32-bytes-or-more", algorithm="HS256")


# --- lifecycle ------------------------------------------------------------------------


async def test_start_registers_the_connection_in_the_hub(world: World) -> None:
    session = Session(world.ctx, FakePeer(ALICE))
    assert world.hub.users() == []
    session.start()
    assert world.hub.users() == [ALICE]
    await join(session)
    assert world.hub.is_in(session.peer, "general")


async def test_end_tells_the_bus_of_each_room_the_user_left(world: World) -> None:
    tab1, tab2 = world.connect(ALICE), world.connect(ALICE)
    await join(tab1, "general")
    await join(tab1, "random")
    await join(tab2, "general")
    tab1.end()
    # general still has alice's other tab: only random is left
    assert world.bus.lefts == [(tab1.peer.identity, "random")]
    assert world.hub.members("general") == [Member(ALICE, "alice")]
    assert world.hub.users() == [ALICE]
    tab2.end()
    assert world.bus.lefts[1:] == [(tab2.peer.identity, "general")]
    assert world.hub.users() == []
    assert world.hub.presence() == []


async def test_end_without_rooms_tells_the_bus_nothing(world: World) -> None:
    session = world.connect()
    session.end()
    assert world.bus.lefts == []
    assert world.hub.users() == []


async def test_refuse_sends_the_error_then_closes(world: World) -> None:
    session = Session(world.ctx, FakePeer(ALICE))
    session.refuse(auth_failed("Invalid token: bad signature"))
    data = the_error(session.peer, ErrorCode.AUTH_FAILED, None, {})
    assert data["message"] == "Invalid token: bad signature"
    assert session.peer.closes == [(4001, "Invalid token: bad signature")]
    assert world.hub.users() == []
    assert world.sample("chatd_errors_total", code="AUTH_FAILED") == 1


# --- frames in: decoding, binary, invalid frames ----------------------------------------


@pytest.mark.parametrize(
    ("raw", "field", "request_id"),
    [
        ("not json", None, None),
        ("[1, 2]", None, None),
        ('{"type": "nope", "request_id": 5}', "type", 5),
        ('{"data": {}, "request_id": "x"}', "type", "x"),
        ('{"type": "join_room", "data": {}, "request_id": "r1"}', "data.room", "r1"),
        ('{"type": "join_room", "data": {"room": "no spaces"}, "request_id": "j"}',
         "data.room", "j"),
        ('{"type": "join_room", "data": {"room": "general\\n"}}', "data.room", None),
        ('{"type": "join_room", "data": {"room": "general", "since_id": -1}}',
         "data.since_id", None),
        ('{"type": "room_history", "data": {"room": "general", "offset": -1}, "request_id": 3}',
         "data.offset", 3),
        ('{"type": "dm_history", "data": {"with_user": -1}}', "data.with_user", None),
        ('{"type": "room_message", "data": {"room": "general", "content": "x",'
         ' "message_type": "video"}, "request_id": "m"}', "data.message_type", "m"),
        ('{"type": "room_message", "data": {"room": "general", "content": "x", "duration": 0}}',
         "data.duration", None),
        ('{"type": "room_message", "data": {"room": "general", "content": "x", "reply_to": 0}}',
         "data.reply_to", None),
        ('{"type": "direct_message", "data": {"to_user_id": 0, "content": "x"}, "request_id": "d"}',
         "data.to_user_id", "d"),
        ('{"type": "auth", "data": {"token": ""}, "request_id": "a"}', "data.token", "a"),
        ('{"type": "ping", "data": []}', "data", None),
        ('{"type": "ping", "request_id": {"a": 1}}', "request_id", None),
        ('{"type": "ping", "request_id": true}', "request_id", None),
        ('{"type": "ping", "request_id": "' + "x" * 65 + '"}', "request_id", None),
        ('{"type": "message_batch", "data": {"messages": {}}, "request_id": 9}',
         "data.messages", 9),
        ('{"type": "notification", "data": {}, "request_id": "n"}', "type", "n"),
    ],
)  # fmt: skip
async def test_a_frame_that_does_not_decode_is_invalid_format(
    world: World, raw: str, field: str | None, request_id: str | int | None
) -> None:
    session = world.connect()
    await session.handle_text(raw)
    data = the_error(session.peer, ErrorCode.INVALID_FORMAT, request_id)
    assert data["details"] == ({"field": field} if field else {})
    # nothing was done, and the connection goes on
    assert world.store.calls == [] and world.store.appended == [] and world.bus.joins == []
    assert session.peer.open and session.peer.closes == []
    await send(session, "ping", request_id="after")
    assert session.peer.types() == ["pong"]


async def test_a_binary_frame_is_invalid_format(world: World) -> None:
    session = world.connect()
    await session.handle_binary()
    data = the_error(session.peer, ErrorCode.INVALID_FORMAT, None, {})
    assert "Binary" in data["message"]
    assert session.peer.open


async def test_too_many_invalid_frames_close_1008(make_world: Callable[..., World]) -> None:
    world = make_world(limits={"invalid_frames_per_minute": 3})
    session = world.connect()
    await session.handle_text("{")
    await session.handle_binary()  # binary frames count too
    await send(session, "nope")
    assert session.peer.open
    # the 4th invalid frame in a minute gets its error, then the close
    await session.handle_text("[]")
    assert session.peer.types() == ["error"] * 4
    assert session.peer.closes == [(1008, "Too many invalid frames")]
    assert not session.peer.open


async def test_invalid_frames_are_counted_per_minute(make_world: Callable[..., World]) -> None:
    world = make_world(limits={"invalid_frames_per_minute": 3})
    session = world.connect()
    for _ in range(3):
        await session.handle_text("{")
    world.monotonic.advance(19.9)  # not quite one frame's worth: still over
    await session.handle_text("{")
    assert session.peer.closes == [(1008, "Too many invalid frames")]


async def test_invalid_frames_refill_over_time(make_world: Callable[..., World]) -> None:
    world = make_world(limits={"invalid_frames_per_minute": 3})
    session = world.connect()
    for _ in range(3):
        await session.handle_text("{")
    world.monotonic.advance(20.0)  # one frame's worth refilled (3 a minute)
    await session.handle_text("{")
    assert session.peer.open
    await session.handle_text("{")
    assert session.peer.closes == [(1008, "Too many invalid frames")]


async def test_other_errors_do_not_count_as_invalid_frames(
    make_world: Callable[..., World],
) -> None:
    world = make_world(limits={"invalid_frames_per_minute": 1})
    session = world.connect()
    for i in range(5):
        await send(session, "join_room", {"room": "nowhere"}, i)
        await send(session, "leave_room", {"room": "general"}, i)
    assert session.peer.types() == ["error"] * 10
    assert session.peer.open and session.peer.closes == []


# --- ping -------------------------------------------------------------------------------


@pytest.mark.parametrize("request_id", ["p1", 42, -(2**63), "", None])
async def test_ping_answers_pong_with_the_request_id(
    world: World, request_id: str | int | None
) -> None:
    session = world.connect()
    world.wall.now = NOW + 0.123
    await send(session, "ping", request_id=request_id)
    expected: dict[str, Any] = {
        "type": "pong",
        "data": {"timestamp": "2023-11-14T22:13:20.123Z"},
        "timestamp": "2023-11-14T22:13:20.123Z",
    }
    if request_id is not None:
        expected["request_id"] = request_id
    assert session.peer.frames == [expected]


async def test_ping_without_data(world: World) -> None:
    session = world.connect()
    await session.handle_text('{"type": "ping", "request_id": 1}')
    assert session.peer.types() == ["pong"]
    assert session.peer.frames[0]["request_id"] == 1


# --- auth: refreshing the token -----------------------------------------------------------


async def test_auth_with_a_new_token_of_the_same_user(world: World) -> None:
    session = world.connect()
    await send(session, "auth", {"token": make_token(ALICE, "alice", exp=FAR)}, "r")
    assert session.peer.take() == [
        {
            "type": "auth_ack",
            "data": {"user_id": ALICE, "expires_at": rfc3339(FAR)},
            "timestamp": rfc3339(NOW),
            "request_id": "r",
        }
    ]
    # the connection now lives past its first token's expiry
    world.wall.now = EXP + LEEWAY + 3600
    await join(session)
    await post(session, "still here", "m")
    assert [m.content for m in world.store.appended] == ["still here"]
    assert session.peer.open


async def test_auth_with_a_token_without_exp(make_world: Callable[..., World]) -> None:
    world = make_world(auth={"require_exp": False})
    session = world.connect()
    await send(session, "auth", {"token": make_token(ALICE, "alice", exp=None)}, 1)
    (ack,) = session.peer.take()
    assert ack["type"] == "auth_ack"
    assert ack["data"] == {"user_id": ALICE, "expires_at": None}
    world.wall.advance(10 * 365 * 86400.0)
    await join(session)


async def test_auth_with_another_users_token_fails_and_closes(world: World) -> None:
    session = world.connect()
    await send(session, "auth", {"token": make_token(BOB, "bob", exp=FAR)}, "r")
    data = the_error(session.peer, ErrorCode.AUTH_FAILED, "r", {})
    assert "same user" in data["message"]
    assert session.peer.closes == [(4001, data["message"])]
    assert session.identity.user_id == ALICE


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("not-a-jwt", "Invalid token"),
        (bad_token(), "Invalid token"),
        (make_token(ALICE, "alice", exp=PAST), "Token expired"),
        (make_token(None, "alice", exp=FAR), "no integer user_id"),
        (
            hand_made_token({"alg": "none", "typ": "JWT"}, {"user_id": ALICE, "exp": FAR}, None),
            "Invalid token",
        ),
        ("x" * 9000, "Token too long"),
    ],
    ids=["garbage", "wrong-secret", "expired", "no-user-id", "alg-none", "too-long"],
)
async def test_auth_with_a_bad_token_fails_and_closes(
    world: World, token: str, reason: str
) -> None:
    session = world.connect()
    await send(session, "auth", {"token": token}, 7)
    data = the_error(session.peer, ErrorCode.AUTH_FAILED, 7, {})
    assert reason in data["message"]
    assert session.peer.closes == [(4001, data["message"])]
    assert session.identity == session.peer.identity  # unchanged


def test_the_tests_secret_signs_the_tokens(world: World) -> None:
    """The config the tests build accepts ``make_token``'s tokens: the auth
    tests above fail for the reason they name, not for a wrong key."""
    assert world.config.auth.jwt_secret == SECRET
    assert world.ctx.verifier.verify(make_token(BOB, "bob", exp=FAR)).user_id == BOB


# --- the token's expiry, checked again ----------------------------------------------------


async def _prepare(world: World, type_: str) -> tuple[Session[FakePeer], dict[str, Any]]:
    """A session ready to send a frame of ``type_``, and that frame's data."""
    session = world.connect()
    if type_ == "room_message":
        await join(session)
        return session, {"room": "general", "content": "hello"}
    if type_ == "direct_message":
        return session, {"to_user_id": BOB, "content": "hello"}
    return session, {"room": "random"}


CHECKED = ["join_room", "room_message", "direct_message"]


@pytest.mark.parametrize("type_", CHECKED)
async def test_an_expired_token_fails_and_closes(world: World, type_: str) -> None:
    session, data = await _prepare(world, type_)
    joins = len(world.bus.joins)
    world.wall.now = EXP + LEEWAY + 0.001
    await send(session, type_, data, "late")
    the_error(session.peer, ErrorCode.AUTH_FAILED, "late", {})
    assert session.peer.closes == [(4001, "Token expired")]
    assert world.store.appended == []
    assert len(world.bus.joins) == joins
    assert not world.hub.is_in(session.peer, "random")


@pytest.mark.parametrize("type_", CHECKED)
async def test_a_token_within_the_leeway_still_works(world: World, type_: str) -> None:
    session, data = await _prepare(world, type_)
    world.wall.now = EXP + LEEWAY
    await send(session, type_, data, "ok")
    assert "error" not in session.peer.types()
    assert session.peer.open


async def test_a_token_without_exp_never_expires(world: World) -> None:
    session = world.connect(expires_at=None)
    world.wall.advance(100 * 365 * 86400.0)
    await join(session)
    await post(session)
    assert len(world.store.appended) == 1


@pytest.mark.parametrize(
    ("type_", "data", "answer"),
    [
        ("ping", {}, "pong"),
        ("room_history", {"room": "general"}, "message_history"),
        ("dm_history", {"with_user": BOB}, "message_history"),
    ],
)
async def test_other_frames_do_not_check_the_token(
    world: World, type_: str, data: dict[str, Any], answer: str
) -> None:
    """Only join_room, room_message and direct_message check ``exp``
    (docs/protocol.md, auth)."""
    session = world.connect()
    world.wall.now = EXP + 3600
    await send(session, type_, data, 1)
    assert session.peer.types() == [answer]
    assert session.peer.open


async def test_leave_room_does_not_check_the_token(world: World) -> None:
    session = world.connect()
    await join(session)
    world.wall.now = EXP + 3600
    await send(session, "leave_room", {"room": "general"}, 1)
    assert session.peer.types() == ["leave_room_ack"]


# --- join_room ----------------------------------------------------------------------------


async def test_join_room_ack(world: World) -> None:
    world.store.seed("general", 3)
    session = world.connect()
    await send(session, "join_room", {"room": "general"}, 1)
    assert session.peer.frames == [
        {
            "type": "join_room_ack",
            "data": {
                "room": "general",
                "success": True,
                "message": "Joined room successfully",
                "members": [{"user_id": ALICE, "username": "alice"}],
                "member_count": 1,
                # a first join: the marker starts at the room's newest message
                "last_read_id": 3,
                "unread": 0,
                "mentions": 0,
                "role": "member",
            },
            "timestamp": rfc3339(NOW),
            "request_id": 1,
        }
    ]
    assert world.store.calls == [
        ("room_access", "general", ALICE),
        ("marker", "r:general", ALICE),
    ]
    # the bus follows the room before the join; alice's first connection there
    assert world.bus.follows == ["general"]
    assert world.bus.joins == [(session.peer, "general", True)]
    assert world.hub.is_in(session.peer, "general")


async def test_join_an_unknown_room(world: World) -> None:
    session = world.connect()
    await send(session, "join_room", {"room": "nowhere"}, "j")
    data = the_error(session.peer, ErrorCode.ROOM_NOT_FOUND, "j", {"room": "nowhere"})
    assert data["message"] == "Room not found"
    assert world.bus.joins == []
    assert not world.hub.has_room("nowhere")


@pytest.mark.parametrize(("user_id", "allowed"), [(ALICE, True), (BOB, True), (CAROL, False)])
async def test_join_a_private_room(world: World, user_id: int, allowed: bool) -> None:
    session = world.connect(user_id)
    await send(session, "join_room", {"room": "staff"}, "s")
    if allowed:
        assert session.peer.types() == ["join_room_ack"]
        assert world.hub.is_in(session.peer, "staff")
    else:
        the_error(session.peer, ErrorCode.PERMISSION_DENIED, "s", {"room": "staff"})
        assert world.bus.joins == []
        assert not world.hub.is_in(session.peer, "staff")


async def test_join_tells_the_bus_first_only_for_a_users_first_connection(world: World) -> None:
    tab1, tab2, bob = world.connect(ALICE), world.connect(ALICE), world.connect(BOB)
    await join(tab1)
    await join(tab2)
    await join(bob)
    await join(tab1, "random")
    assert [(p.identity.user_id, room, first) for p, room, first in world.bus.joins] == [
        (ALICE, "general", True),
        (ALICE, "general", False),
        (BOB, "general", True),
        (ALICE, "random", True),
    ]


async def test_join_lists_the_rooms_members(world: World) -> None:
    alice, tab2, bob = world.connect(ALICE), world.connect(ALICE), world.connect(BOB)
    await join(alice)
    await join(tab2)
    ack = await join(bob)
    assert ack["data"]["members"] == [
        {"user_id": ALICE, "username": "alice"},
        {"user_id": BOB, "username": "bob"},
    ]


async def test_joining_twice_is_a_second_ack(world: World) -> None:
    session = world.connect()
    await join(session)
    await send(session, "join_room", {"room": "general"}, 2)
    assert session.peer.types() == ["join_room_ack"]
    assert [first for *_, first in world.bus.joins] == [True, False]
    session.end()
    assert world.bus.lefts == [(session.peer.identity, "general")]  # once


async def test_join_without_since_id_neither_recovers_nor_replays(world: World) -> None:
    world.store.seed("general", 2)
    session = world.connect()
    ack = await join(session)
    assert "recovered" not in ack["data"]
    assert [c[0] for c in world.store.calls] == ["room_access", "marker"]


async def test_join_with_since_id_replays_the_missed_messages_after_the_ack(
    world: World,
) -> None:
    old = world.store.seed("general", 5)
    world.store.seed("random", 2)  # another room's messages are not replayed
    session = world.connect()
    world.wall.now = NOW + 1
    await send(session, "join_room", {"room": "general", "since_id": old[1].id}, "j")
    ack, *replay = session.peer.take()
    assert ack["type"] == "join_room_ack" and ack["request_id"] == "j"
    assert ack["data"]["recovered"] is True
    assert [f["type"] for f in replay] == ["room_message"] * 3
    assert [f["data"]["id"] for f in replay] == [m.id for m in old[2:]]
    assert replay[0] == {
        "type": "room_message",
        "data": {
            "id": old[2].id,
            "room": "general",
            "user_id": BOB,
            "username": "bob",
            "content": "old 2",
            "message_type": "text",
            "created_at": "2023-11-14T22:00:00.000Z",
        },
        "timestamp": rfc3339(NOW + 1),
        "user_id": BOB,
    }
    limit = world.config.limits.recovery_max_messages
    general = room_channel("general")
    # Where the missed messages start, from the index, and the first page of
    # them, in one read: nothing more was needed.
    assert world.store.calls[-1] == ("missed", general, old[1].id, limit, 100)


async def test_join_recovery_past_its_cap_sends_the_newest_and_says_so(
    make_world: Callable[..., World],
) -> None:
    world = make_world(limits={"recovery_max_messages": 2})
    old = world.store.seed("general", 5)
    session = world.connect()
    await send(session, "join_room", {"room": "general", "since_id": 0})
    ack, *replay = session.peer.take()
    assert ack["data"]["recovered"] is False
    assert [f["data"]["id"] for f in replay] == [old[3].id, old[4].id]


async def test_join_recovery_with_nothing_missed(world: World) -> None:
    old = world.store.seed("general", 3)
    session = world.connect()
    await send(session, "join_room", {"room": "general", "since_id": old[-1].id})
    (ack,) = session.peer.take()
    assert ack["data"]["recovered"] is True


async def test_join_recovery_replays_a_notification_as_a_notification(world: World) -> None:
    world.store.seed("general", 1)
    note = world.store.put(
        new_message(
            "Deploy finished",
            user_id=0,
            message_type="notification",
            data=b'{"build":42}',
        )
    )
    session = world.connect()
    await send(session, "join_room", {"room": "general", "since_id": note.id - 1})
    _, replayed = session.peer.take()
    assert replayed == {
        "type": "notification",
        "data": {
            "id": note.id,
            "content": "Deploy finished",
            "created_at": "2023-11-14T22:00:00.000Z",
            "room": "general",
            "data": {"build": 42},
        },
        "timestamp": rfc3339(NOW),
    }


async def test_a_joins_room_frames_wait_for_its_ack(world: World) -> None:
    bob = world.connect(BOB)
    await join(bob)
    alice = world.connect(ALICE)
    world.bus.gate = gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, alice, "join_room", {"room": "general"}, "j")
        await wait_all_tasks_blocked()
        assert len(world.bus.joins) == 2  # alice's join is waiting on the bus
        await post(bob, "while you joined", "m")
        world.store.commit()
        assert [f["type"] for f in bob.peer.take()] == ["room_message"]
        assert alice.peer.frames == []  # held
        gate.set()
    assert alice.peer.types() == ["join_room_ack", "room_message"]
    assert alice.peer.frames[1]["data"]["content"] == "while you joined"
    assert "request_id" not in alice.peer.frames[1]


async def test_a_recovering_join_gets_no_duplicate(world: World) -> None:
    """A message committed while the join waits is both held and in the
    replay: it arrives once, in order, and later ones still arrive."""
    old = world.store.seed("general", 2)
    bob = world.connect(BOB)
    await join(bob)
    alice = world.connect(ALICE)
    world.bus.gate = gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, alice, "join_room", {"room": "general", "since_id": old[0].id})
        await wait_all_tasks_blocked()
        await post(bob, "during")
        during = world.store.commit()
        gate.set()
    assert [(f["type"], f["data"].get("id")) for f in alice.peer.take()] == [
        ("join_room_ack", None),
        ("room_message", old[1].id),
        ("room_message", during.id),
    ]
    await post(bob, "after")
    after = world.store.commit()
    assert [f["data"]["id"] for f in alice.peer.take()] == [after.id]


async def test_a_recovering_join_gets_no_gap(world: World) -> None:
    """A message committed after the replay was read is released after it."""
    old = world.store.seed("general", 2)
    bob = world.connect(BOB)
    await join(bob)
    alice = world.connect(ALICE)
    world.store.gates["missed"] = gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, alice, "join_room", {"room": "general", "since_id": old[0].id})
        await wait_all_tasks_blocked()
        assert world.store.calls[-1][0] == "missed"  # read, not yet answered
        await post(bob, "during")
        during = world.store.commit()
        assert alice.peer.frames == []
        gate.set()
    assert [(f["type"], f["data"].get("id")) for f in alice.peer.take()] == [
        ("join_room_ack", None),
        ("room_message", old[1].id),
        ("room_message", during.id),
    ]


async def test_a_long_replay_goes_in_pages_each_once_the_buffer_drained(
    world: World,
) -> None:
    old = world.store.seed("general", 250)
    session = world.connect()
    await send(session, "join_room", {"room": "general", "since_id": 0})
    ack, *replay = session.peer.take()
    assert ack["data"]["recovered"] is True
    assert [f["data"]["id"] for f in replay] == [m.id for m in old]
    general = room_channel("general")
    # The first page came with ``missed``; then one read per page.
    pages = [c for c in world.store.calls if c[0] == "after"]
    assert pages == [("after", general, 100, 100), ("after", general, 200, 100)]
    assert session.peer.drains == 2  # between pages, not after the last
    assert world.hub.is_in(session.peer, "general")


async def test_messages_committed_during_a_replay_come_once_and_in_order(
    world: World,
) -> None:
    """The room's messages are dropped while the replay runs (it reads them
    from the store); the join ends only once the replay has reached the
    newest one dropped."""
    old = world.store.seed("general", 3)
    bob = world.connect(BOB)
    await join(bob)
    alice = world.connect(ALICE)
    world.store.gates["missed"] = gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, alice, "join_room", {"room": "general", "since_id": 0})
        await wait_all_tasks_blocked()
        assert world.store.calls[-1][0] == "missed"  # the first page is read
        await post(bob, "during")
        during = world.store.commit()
        assert alice.peer.types() == []  # the live copy was dropped
        gate.set()
    frames = alice.peer.take()
    assert [f["data"].get("id") for f in frames] == [None, *(m.id for m in old), during.id]
    # a second read took what was dropped
    assert [c[2] for c in world.store.calls if c[0] == "after"] == [3]
    await post(bob, "after")
    later = world.store.commit()
    assert [f["data"]["id"] for f in alice.peer.take()] == [later.id]


async def test_replays_wait_for_a_slot(make_world: Callable[..., World]) -> None:
    """At most ``ctx.replays`` joins replay at once (a reconnect storm keeps
    its memory bounded); the others wait for a slot before anything is read
    or answered, holding nothing."""
    world = make_world()
    world.ctx.replays = trio.CapacityLimiter(1)
    world.store.seed("general", 2)
    first, second = world.connect(ALICE), world.connect(BOB)
    world.store.gates["missed"] = gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, first, "join_room", {"room": "general", "since_id": 0})
        await wait_all_tasks_blocked()
        nursery.start_soon(send, second, "join_room", {"room": "general", "since_id": 0})
        await wait_all_tasks_blocked()
        assert second.peer.types() == []
        assert [c[0] for c in world.store.calls].count("missed") == 1  # the first's only
        assert world.sample("chatd_replays_waiting") == 1
        gate.set()
    assert world.sample("chatd_replays_waiting") == 0
    assert second.peer.types() == ["join_room_ack", "room_message", "room_message"]


async def test_a_replay_that_fails_takes_the_connection_out_of_the_room(world: World) -> None:
    world.store.seed("general", 150)  # a second page to read
    session = world.connect()
    world.store.errors["after"] = OSError("disk I/O error")
    await send(session, "join_room", {"room": "general", "since_id": 0}, "j")
    ack, *first_page, error = session.peer.take()
    assert ack["type"] == "join_room_ack" and len(first_page) == 100
    assert error["type"] == "error" and error["data"]["code"] == "INTERNAL_ERROR"
    assert error["request_id"] == "j"
    assert not world.hub.is_in(session.peer, "general")
    assert world.bus.lefts == [(session.peer.identity, "general")]


async def test_the_ack_lists_at_most_ack_members_and_counts_them_all(
    make_world: Callable[..., World],
) -> None:
    world = make_world(limits={"ack_members": 2})
    for uid in (CAROL, BOB, 7):
        await join(world.connect(uid))
    session = world.connect(ALICE)
    ack = await join(session)
    assert ack["data"]["members"] == [
        {"user_id": ALICE, "username": "alice"},
        {"user_id": BOB, "username": "bob"},
    ]
    assert ack["data"]["member_count"] == 4


async def test_room_members_pages_by_id(make_world: Callable[..., World]) -> None:
    world = make_world(limits={"ack_members": 2})
    for uid in (9, 3, 7, 5):
        await join(world.connect(uid))
    session = world.connect(ALICE)
    await join(session)
    await send(session, "room_members", {"room": "general"}, "p1")
    (page,) = session.peer.take()
    assert page == {
        "type": "room_members_ack",
        "data": {
            "room": "general",
            "members": [
                {"user_id": ALICE, "username": "alice"},
                {"user_id": CAROL, "username": "carol"},
            ],
            "member_count": 5,
            "has_more": True,
        },
        "timestamp": rfc3339(NOW),
        "request_id": "p1",
    }
    await send(session, "room_members", {"room": "general", "after_user_id": 3, "limit": 10})
    (rest,) = session.peer.take()
    assert [m["user_id"] for m in rest["data"]["members"]] == [5, 7, 9]
    assert rest["data"]["has_more"] is False
    await send(session, "room_members", {"room": "general", "after_user_id": 9})
    (empty,) = session.peer.take()
    assert empty["data"]["members"] == [] and empty["data"]["has_more"] is False


@pytest.mark.parametrize(("limit", "listed"), [(0, 1), (-5, 1), (5000, 3)])
async def test_room_members_limit_is_clamped(world: World, limit: int, listed: int) -> None:
    for uid in (BOB, CAROL):
        await join(world.connect(uid))
    session = world.connect()
    await join(session)
    await send(session, "room_members", {"room": "general", "limit": limit})
    (page,) = session.peer.take()
    assert len(page["data"]["members"]) == listed


async def test_room_members_needs_access_to_the_room(world: World) -> None:
    session = world.connect(CAROL)  # not a member of the private staff room
    await send(session, "room_members", {"room": "staff"}, "s")
    the_error(session.peer, ErrorCode.PERMISSION_DENIED, "s", {"room": "staff"})
    await send(session, "room_members", {"room": "nowhere"}, "n")
    the_error(session.peer, ErrorCode.ROOM_NOT_FOUND, "n", {"room": "nowhere"})
    # a public room may be listed without joining it
    await send(session, "room_members", {"room": "general"}, "g")
    assert session.peer.types() == ["room_members_ack"]


async def test_room_members_takes_the_read_limit(world: World) -> None:
    session = world.connect()
    world.limits("reads").wait = 7
    await send(session, "room_members", {"room": "general"}, "r")
    the_error(session.peer, ErrorCode.RATE_LIMITED, "r", {"retry_after": 7})


async def test_a_join_whose_connection_closes_during_the_room_check_does_nothing(
    world: World,
) -> None:
    session = world.connect()
    world.store.gates["room_access"] = gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, session, "join_room", {"room": "general"}, 1)
        await wait_all_tasks_blocked()
        session.peer.close(1001, "going away")
        gate.set()
    assert world.bus.joins == []
    assert not world.hub.is_in(session.peer, "general")
    assert session.peer.frames == [] and session.peer.dropped == []
    session.end()
    assert world.bus.lefts == []


@pytest.mark.parametrize("where", ["bus", "store"])
async def test_a_join_whose_bus_or_store_raises(world: World, where: str) -> None:
    """Anything but a ``ChatError`` (a failing store read, a bug) fails the
    request with ``INTERNAL_ERROR``, not the connection or the node; the
    join leaves nothing behind."""
    bob = world.connect(BOB)
    await join(bob)
    alice = world.connect(ALICE)
    if where == "bus":
        world.bus.error = RuntimeError("presence lost")
    else:
        world.store.errors["missed"] = RuntimeError("disk gone")
    await send(alice, "join_room", {"room": "general", "since_id": 0}, "j")
    the_error(alice.peer, ErrorCode.INTERNAL_ERROR, "j", {})
    assert alice.peer.open
    assert world.bus.lefts == [(alice.peer.identity, "general")]
    assert world.hub.members("general") == [Member(BOB, "bob")]
    alice.end()
    assert world.bus.lefts == [(alice.peer.identity, "general")]
    await post(bob, "after")
    world.store.commit()
    assert alice.peer.types() == [] and alice.peer.dropped == []


async def test_a_failed_rejoin_keeps_the_connection_in_the_room(world: World) -> None:
    """A connection already in the room whose second join (no replay) fails
    stays in it, and gets what was held meanwhile (nothing lost, nothing
    announced)."""
    bob = world.connect(BOB)
    await join(bob)
    alice = world.connect(ALICE)
    await join(alice)
    world.bus.gate = gate = trio.Event()
    world.bus.error = ChatError(ErrorCode.INTERNAL_ERROR, "Presence is unavailable")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, alice, "join_room", {"room": "general"}, "j")
        await wait_all_tasks_blocked()
        await post(bob, "meanwhile")
        world.store.commit()
        assert alice.peer.frames == []  # held while the join runs
        gate.set()
    frames = alice.peer.take()
    assert [f["type"] for f in frames] == ["room_message", "error"]
    assert frames[0]["data"]["content"] == "meanwhile"
    assert frames[1]["data"]["code"] == "INTERNAL_ERROR" and frames[1]["request_id"] == "j"
    assert world.hub.is_in(alice.peer, "general") and world.bus.lefts == []
    await post(bob, "later")
    world.store.commit()
    assert alice.peer.types() == ["room_message"]


async def test_a_failed_replaying_rejoin_takes_the_connection_out(world: World) -> None:
    """A second join with since_id drops the room's messages for its replay;
    when the replay cannot be read, the connection is taken out of the room
    (its error says to join again) rather than left with a hole."""
    bob = world.connect(BOB)
    await join(bob)
    alice = world.connect(ALICE)
    await join(alice)
    world.store.gates["missed"] = gate = trio.Event()
    world.store.errors["missed"] = ChatError(ErrorCode.INTERNAL_ERROR, "Storage is unavailable")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, alice, "join_room", {"room": "general", "since_id": 0}, "j")
        await wait_all_tasks_blocked()
        await post(bob, "meanwhile")
        world.store.commit()
        gate.set()
    the_error(alice.peer, ErrorCode.INTERNAL_ERROR, "j", {})
    assert not world.hub.is_in(alice.peer, "general")
    assert world.bus.lefts == [(alice.peer.identity, "general")]
    await post(bob, "later")
    world.store.commit()
    assert alice.peer.frames == []


async def test_a_failing_read_is_an_internal_error_and_the_connection_stays(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """A store read that fails with anything but a ``ChatError`` (SQLite's
    own errors, a bug) fails that request alone: one ``INTERNAL_ERROR``, a
    logged traceback, and the next request is served."""
    session = world.connect()
    world.store.errors["history"] = OSError("disk I/O error")
    await send(session, "room_history", {"room": "general"}, "h")
    the_error(session.peer, ErrorCode.INTERNAL_ERROR, "h", {})
    assert session.peer.open
    assert any(r.exc_info and "room_history" in r.getMessage() for r in caplog.records)
    del world.store.errors["history"]
    await send(session, "room_history", {"room": "general"}, "h2")
    assert session.peer.types() == ["message_history"]


async def test_a_join_the_store_fails_leaves_the_connection_out_of_the_room(
    world: World,
) -> None:
    bob = world.connect(BOB)
    await join(bob)
    alice = world.connect(ALICE)
    world.bus.gate = gate = trio.Event()
    unavailable = ChatError(ErrorCode.INTERNAL_ERROR, "Storage is unavailable; try again")
    world.store.errors["missed"] = unavailable
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, alice, "join_room", {"room": "general", "since_id": 0}, "j")
        await wait_all_tasks_blocked()
        await post(bob, "meanwhile")
        world.store.commit()
        gate.set()
    # "A request that fails gets exactly one error frame and nothing else"
    the_error(alice.peer, ErrorCode.INTERNAL_ERROR, "j", {})
    await post(bob, "later")
    world.store.commit()
    assert alice.peer.frames == []
    assert world.hub.members("general") == [Member(BOB, "bob")]
    await post(alice, "am I in?", "m")
    the_error(alice.peer, ErrorCode.PERMISSION_DENIED, "m", {"room": "general"})


async def test_a_since_id_beyond_the_newest_message_hides_no_live_message(
    world: World,
) -> None:
    world.store.seed("general", 5)
    bob = world.connect(BOB)
    await join(bob)
    alice = world.connect(ALICE)
    await send(alice, "join_room", {"room": "general", "since_id": 1000})
    (ack,) = alice.peer.take()
    assert ack["data"]["recovered"] is True
    await post(bob, "new")
    new = world.store.commit()
    assert new.id < 1000
    assert [f["data"].get("id") for f in alice.peer.frames] == [new.id]


# --- leave_room ---------------------------------------------------------------------------


async def test_leave_room_ack_and_the_bus_is_told(world: World) -> None:
    bob = world.connect(BOB)
    await join(bob)
    session = world.connect()
    await join(session)
    await send(session, "leave_room", {"room": "general"}, "l")
    assert session.peer.take() == [
        {
            "type": "leave_room_ack",
            "data": {"room": "general", "success": True},
            "timestamp": rfc3339(NOW),
            "request_id": "l",
        }
    ]
    assert world.bus.lefts == [(session.peer.identity, "general")]
    assert not world.hub.is_in(session.peer, "general")
    # no more of the room's messages, and no more sending to it
    await post(bob, "gone?")
    world.store.commit()
    assert session.peer.frames == []
    await post(session, "hello?", "m")
    the_error(session.peer, ErrorCode.PERMISSION_DENIED, "m", {"room": "general"})


async def test_leave_a_room_not_joined(world: World) -> None:
    bob = world.connect(BOB)
    await join(bob)  # the room exists on this node; alice is not in it
    session = world.connect()
    for room in ("general", "random", "nowhere"):
        await send(session, "leave_room", {"room": room}, room)
        data = the_error(session.peer, ErrorCode.PERMISSION_DENIED, room, {"room": room})
        assert data["message"] == "Not in this room"
    assert world.bus.lefts == []
    assert world.hub.is_in(bob.peer, "general")


async def test_leave_with_another_tab_still_there_tells_the_bus_nothing(world: World) -> None:
    tab1, tab2 = world.connect(ALICE), world.connect(ALICE)
    await join(tab1)
    await join(tab2)
    await send(tab1, "leave_room", {"room": "general"})
    assert tab1.peer.types() == ["leave_room_ack"]
    assert world.bus.lefts == []
    await send(tab2, "leave_room", {"room": "general"})
    assert world.bus.lefts == [(tab2.peer.identity, "general")]


# --- room_message: commit, then deliver -----------------------------------------------------


async def test_a_room_message_is_delivered_only_after_its_commit(world: World) -> None:
    bob = world.connect(BOB)
    await join(bob)
    alice = world.connect(ALICE)
    await join(alice)
    world.wall.now = NOW + 0.5
    await post(alice, "hello", "m1")
    assert world.store.appended == [
        NewMessage(
            user_id=ALICE,
            username="alice",
            content="hello",
            message_type="text",
            created_at="2023-11-14T22:13:20.500Z",
            room="general",
        )
    ]
    assert alice.peer.frames == [] and bob.peer.frames == [] and world.bus.delivered == []
    world.wall.now = NOW + 1
    stored = world.store.commit()
    assert world.bus.delivered == [(stored, alice.peer, "m1")]
    data = {
        "id": stored.id,
        "room": "general",
        "user_id": ALICE,
        "username": "alice",
        "content": "hello",
        "message_type": "text",
        "created_at": "2023-11-14T22:13:20.500Z",
    }
    frame = {"type": "room_message", "data": data, "timestamp": rfc3339(NOW + 1), "user_id": 1}
    assert alice.peer.take() == [{**frame, "request_id": "m1"}]
    assert bob.peer.take() == [frame]
    assert world.sample("chatd_messages_total") == 1


async def test_room_messages_are_delivered_in_commit_order(world: World) -> None:
    session = world.connect()
    await join(session)
    for i in range(3):
        await post(session, f"m{i}", i)
    assert session.peer.frames == []
    for _ in range(3):
        world.store.commit()
    assert [(f["request_id"], f["data"]["content"]) for f in session.peer.frames] == [
        (0, "m0"),
        (1, "m1"),
        (2, "m2"),
    ]


async def test_a_room_message_carries_every_field(world: World) -> None:
    session = world.connect()
    await join(session)
    data = {
        "room": "general",
        "content": "a cat",
        "message_type": "image",
        "media_url": "https://cdn.example.com/cat.png",
        "media_type": "image/png",
        "reply_to": 12,
        # what a client may not set is ignored
        "user_id": 99,
        "created_at": "1999-01-01T00:00:00.000Z",
    }
    await send(session, "room_message", data, "img")
    (message,) = world.store.appended
    assert (message.user_id, message.username, message.created_at) == (1, "alice", rfc3339(NOW))
    assert (message.media_url, message.media_type, message.reply_to) == (
        "https://cdn.example.com/cat.png",
        "image/png",
        12,
    )
    world.store.commit()
    (frame,) = session.peer.frames
    assert frame["data"]["media_url"] == "https://cdn.example.com/cat.png"
    assert frame["data"]["reply_to"] == 12 and "duration" not in frame["data"]


async def test_a_room_message_to_a_room_not_joined(world: World) -> None:
    session = world.connect()
    await join(session, "random")
    await post(session, "hi", "m")
    data = the_error(session.peer, ErrorCode.PERMISSION_DENIED, "m", {"room": "general"})
    assert data["message"] == "Join the room before sending to it"
    assert world.store.appended == []
    assert world.limits("messages").keys == []


@pytest.mark.parametrize(
    ("failure", "code", "details"),
    [
        (RuntimeError("disk full"), ErrorCode.INTERNAL_ERROR, {}),
        (OSError("I/O error"), ErrorCode.INTERNAL_ERROR, {}),
        (
            ChatError(
                ErrorCode.INVALID_FORMAT,
                "reply_to must name a message of this room",
                {"field": "data.reply_to"},
            ),
            ErrorCode.INVALID_FORMAT,
            {"field": "data.reply_to"},
        ),
    ],
)
@pytest.mark.parametrize("kind", ["room_message", "direct_message"])
async def test_a_message_the_store_refuses_is_one_error(
    world: World, kind: str, failure: Exception, code: ErrorCode, details: dict[str, Any]
) -> None:
    bob = world.connect(BOB)
    await join(bob)
    session = world.connect()
    await join(session)
    if kind == "room_message":
        await post(session, "x", "m")
    else:
        await send(session, "direct_message", {"to_user_id": BOB, "content": "x"}, "m")
    world.store.fail(failure)
    data = the_error(session.peer, code, "m", details)
    if code is ErrorCode.INTERNAL_ERROR:
        assert data["message"] == "The message could not be stored; not sent"
    else:
        assert data["message"] == str(failure)
    assert world.bus.delivered == [] and bob.peer.frames == []
    assert session.peer.open


async def test_a_message_committed_after_its_sender_left(world: World) -> None:
    bob = world.connect(BOB)
    await join(bob)
    session = world.connect()
    await join(session)
    await post(session, "last words", "m")
    session.peer.close(1000)
    session.end()
    world.store.commit()
    assert [f["data"]["content"] for f in bob.peer.take()] == ["last words"]
    assert session.peer.frames == [] and session.peer.dropped == []


async def test_no_error_once_the_connection_is_closed(world: World) -> None:
    session = world.connect()
    await join(session)
    await post(session, "x", "m")
    session.peer.close(1001, "going away")
    world.store.fail(RuntimeError("disk full"))
    assert session.peer.frames == [] and session.peer.dropped == []
    assert world.sample("chatd_errors_total", code="INTERNAL_ERROR") == 0


# --- direct_message --------------------------------------------------------------------


async def test_a_direct_message_reaches_both_users_after_its_commit(world: World) -> None:
    alice, alice_phone = world.connect(ALICE), world.connect(ALICE)
    bob, carol = world.connect(BOB), world.connect(CAROL)
    await send(alice, "direct_message", {"to_user_id": BOB, "content": "psst"}, "d1")
    assert world.store.calls == [("user_exists", BOB)]
    (message,) = world.store.appended
    assert (message.to_user_id, message.room, message.user_id) == (BOB, None, ALICE)
    assert all(s.peer.frames == [] for s in (alice, alice_phone, bob, carol))
    stored = world.store.commit()
    data = {
        "id": stored.id,
        "from_user_id": ALICE,
        "from_username": "alice",
        "to_user_id": BOB,
        "content": "psst",
        "message_type": "text",
        "created_at": rfc3339(NOW),
    }
    frame = {"type": "direct_message", "data": data, "timestamp": rfc3339(NOW), "user_id": 1}
    assert alice.peer.frames == [{**frame, "request_id": "d1"}]
    assert alice_phone.peer.frames == [frame]
    assert bob.peer.frames == [frame]
    assert carol.peer.frames == []


async def test_a_direct_message_to_oneself(world: World) -> None:
    session = world.connect()
    await send(session, "direct_message", {"to_user_id": ALICE, "content": "note"}, "n")
    world.store.commit()
    (frame,) = session.peer.frames
    assert frame["request_id"] == "n" and frame["data"]["to_user_id"] == ALICE


async def test_a_direct_message_to_an_unknown_user(world: World) -> None:
    session = world.connect()
    await send(session, "direct_message", {"to_user_id": 404, "content": "hello?"}, "d")
    data = the_error(session.peer, ErrorCode.USER_NOT_FOUND, "d", {"user_id": 404})
    assert data["message"] == "User not found"
    assert world.store.appended == []
    assert world.limits("messages").keys == []


# --- content rules, through the session ---------------------------------------------------

#: Each row: a room_message's data (besides the room), and None when it is
#: accepted, else the error's code and details.
CONTENT: list[tuple[dict[str, Any], tuple[ErrorCode, dict[str, Any]] | None]] = [
    # text
    ({"content": "hello"}, None),
    ({"content": "x" * 40}, None),
    ({"content": "x" * 41}, (ErrorCode.MESSAGE_TOO_LONG, {"max_length": 40})),
    ({"content": ""}, (ErrorCode.INVALID_FORMAT, {"field": "data.content"})),
    ({"content": " \n\t "}, (ErrorCode.INVALID_FORMAT, {"field": "data.content"})),
    ({}, (ErrorCode.INVALID_FORMAT, {"field": "data.content"})),
    # the media rules hold on every kind
    ({"content": "see", "media_url": "/a.png"}, None),
    ({"content": "see", "media_url": "javascript:alert(1)"},
     (ErrorCode.INVALID_FORMAT, {"field": "data.media_url"})),
    ({"content": "see", "media_type": "not a mime"},
     (ErrorCode.INVALID_FORMAT, {"field": "data.media_type"})),
    ({"content": "see", "duration": 61}, (ErrorCode.INVALID_FORMAT, {"field": "data.duration"})),
    # image
    ({"message_type": "image", "media_url": "/cat.png", "media_type": "image/png"}, None),
    ({"message_type": "image", "content": "my cat", "media_url": "/c.png",
      "media_type": "IMAGE/PNG"}, None),
    ({"message_type": "image", "media_type": "image/png"},
     (ErrorCode.INVALID_FORMAT, {"field": "data.media_url"})),
    ({"message_type": "image", "media_url": "/cat.png"},
     (ErrorCode.INVALID_FORMAT, {"field": "data.media_type"})),
    ({"message_type": "image", "media_url": "/cat.png", "media_type": "audio/ogg"},
     (ErrorCode.INVALID_FORMAT, {"field": "data.media_type"})),
    ({"message_type": "image", "media_url": "/cat.png", "media_type": "png"},
     (ErrorCode.INVALID_FORMAT, {"field": "data.media_type"})),
    ({"message_type": "image", "content": "x" * 41, "media_url": "/c.png",
      "media_type": "image/png"}, (ErrorCode.MESSAGE_TOO_LONG, {"max_length": 40})),
    # audio
    ({"message_type": "audio", "media_url": "/a.ogg", "duration": 60}, None),
    ({"message_type": "audio", "media_url": "/a.ogg", "duration": 1.5,
      "media_type": "audio/ogg"}, None),
    ({"message_type": "audio", "duration": 3},
     (ErrorCode.INVALID_FORMAT, {"field": "data.media_url"})),
    ({"message_type": "audio", "media_url": "/a.ogg"},
     (ErrorCode.INVALID_FORMAT, {"field": "data.duration"})),
    ({"message_type": "audio", "media_url": "/a.ogg", "duration": 60.5},
     (ErrorCode.INVALID_FORMAT, {"field": "data.duration"})),
    ({"message_type": "audio", "media_url": "/a.ogg", "duration": 3, "media_type": "image/png"},
     (ErrorCode.INVALID_FORMAT, {"field": "data.media_type"})),
    # reaction
    ({"message_type": "reaction", "content": "👍", "reply_to": 1}, None),
    ({"message_type": "reaction", "content": "x" * 32, "reply_to": 1}, None),
    ({"message_type": "reaction", "content": "👍"},
     (ErrorCode.INVALID_FORMAT, {"field": "data.reply_to"})),
    ({"message_type": "reaction", "content": "", "reply_to": 1},
     (ErrorCode.INVALID_FORMAT, {"field": "data.content"})),
    ({"message_type": "reaction", "content": "x" * 33, "reply_to": 1},
     (ErrorCode.INVALID_FORMAT, {"field": "data.content"})),
]  # fmt: skip


async def _content_world(make_world: Callable[..., World]) -> tuple[World, Session[FakePeer]]:
    world = make_world(limits={"max_content_length": 40, "max_audio_seconds": 60})
    session = world.connect()
    await join(session)
    return world, session


@pytest.mark.parametrize(("data", "refused"), CONTENT)
async def test_content_rules(
    make_world: Callable[..., World],
    data: dict[str, Any],
    refused: tuple[ErrorCode, dict[str, Any]] | None,
) -> None:
    world, session = await _content_world(make_world)
    await send(session, "room_message", {"room": "general", **data}, "c")
    if refused is None:
        assert session.peer.frames == []
        (message,) = world.store.appended
        assert message.message_type == data.get("message_type", "text")
        assert message.content == data.get("content", "")
        assert message.media_url == data.get("media_url")
        assert message.duration == data.get("duration")
        assert world.limits("messages").keys == [ALICE]
    else:
        code, details = refused
        the_error(session.peer, code, "c", details)
        assert world.store.appended == []
        # refused before the rate limit: it cost nothing
        assert world.limits("messages").keys == []


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("/uploads/cat.png", True),
        ("http://example.com/cat.png", True),
        ("https://cdn.example.com/c.png?s=1#x", True),
        ("HTTPS://EXAMPLE.COM/C.PNG", True),
        ("javascript:alert(1)", False),
        ("JavaScript://example.com/%0aalert(1)", False),
        ("data:image/png;base64,AAAA", False),
        ("//evil.example/x.png", False),
        ("ftp://example.com/x.png", False),
        ("file:///etc/passwd", False),
        ("http://", False),
        ("https:///x.png", False),
        ("http://?x", False),
        ("cat.png", False),
        ("", False),
        ("/a b.png", False),
        ("/a\tb.png", False),
        ("/a\x01.png", False),
        ("https://example.com/\n", False),
    ],
)
async def test_media_url_schemes(make_world: Callable[..., World], url: str, ok: bool) -> None:
    world, session = await _content_world(make_world)
    data = {"room": "general", "message_type": "image", "media_url": url, "media_type": "image/png"}
    await send(session, "room_message", data, "u")
    if ok:
        assert session.peer.frames == []
        assert [m.media_url for m in world.store.appended] == [url]
    else:
        the_error(session.peer, ErrorCode.INVALID_FORMAT, "u", {"field": "data.media_url"})
        assert world.store.appended == []


@pytest.mark.parametrize(
    ("data", "refused"),
    [
        ({"content": "x" * 41}, (ErrorCode.MESSAGE_TOO_LONG, {"max_length": 40})),
        ({"content": " "}, (ErrorCode.INVALID_FORMAT, {"field": "data.content"})),
        ({"content": "x", "media_url": "data:,x"},
         (ErrorCode.INVALID_FORMAT, {"field": "data.media_url"})),
        ({"message_type": "image", "media_url": "/c.png"},
         (ErrorCode.INVALID_FORMAT, {"field": "data.media_type"})),
        ({"message_type": "reaction", "content": "+1"},
         (ErrorCode.INVALID_FORMAT, {"field": "data.reply_to"})),
    ],
)  # fmt: skip
async def test_direct_messages_follow_the_same_rules(
    make_world: Callable[..., World],
    data: dict[str, Any],
    refused: tuple[ErrorCode, dict[str, Any]],
) -> None:
    world, session = await _content_world(make_world)
    await send(session, "direct_message", {"to_user_id": BOB, **data}, "d")
    code, details = refused
    the_error(session.peer, code, "d", details)
    assert world.store.appended == []


# --- rate limits ---------------------------------------------------------------------------


async def test_the_context_asks_the_bus_for_each_limit(make_world: Callable[..., World]) -> None:
    world = make_world(
        limits={
            "messages_per_minute": 7,
            "messages_per_hour": 70,
            "reads_per_minute": 9,
            "typing_per_minute": 11,
        },
        api={"messages_per_minute": 5, "messages_per_hour": 50},
    )
    assert world.bus.limit_calls == [
        ("messages", [(7, 60.0), (70, 3600.0)]),
        ("reads", [(9, 60.0)]),
        ("api", [(5, 60.0), (50, 3600.0)]),
        ("typing", [(11, 60.0)]),
    ]


@pytest.mark.parametrize(
    ("changed", "renewed"),
    [
        ({}, set()),
        ({"limits": {"messages_per_hour": 20000}}, {"messages"}),
        ({"limits": {"reads_per_minute": 5}}, {"reads"}),
        ({"api": {"messages_per_minute": 1}}, {"api"}),
        ({"limits": {"max_content_length": 5}}, set()),
    ],
)
async def test_reload_renews_only_the_limits_that_changed(
    make_config: Callable[..., Config],
    changed: dict[str, Any],
    renewed: set[str],
) -> None:
    world = World(make_config())
    before = {
        "messages": world.ctx.message_limits,
        "reads": world.ctx.read_limits,
        "api": world.ctx.api_limits,
    }
    new_config = make_config(**changed)
    world.ctx.reload(new_config)
    after = {
        "messages": world.ctx.message_limits,
        "reads": world.ctx.read_limits,
        "api": world.ctx.api_limits,
    }
    assert {name for name in before if before[name] is not after[name]} == renewed
    assert world.ctx.config is new_config


async def test_messages_over_the_limit_are_refused(make_world: Callable[..., World]) -> None:
    world = make_world(limits={"messages_per_minute": 2, "messages_per_hour": 100})
    session = world.connect()
    await join(session)
    await post(session, "one", 1)
    await post(session, "two", 2)
    await post(session, "three", 3)
    data = the_error(session.peer, ErrorCode.RATE_LIMITED, 3, {"retry_after": 30})
    assert data["message"] == "Too many messages"
    assert [m.content for m in world.store.appended] == ["one", "two"]
    assert world.sample("chatd_rate_limited_total") == 1
    world.monotonic.advance(29.0)
    await send(session, "direct_message", {"to_user_id": BOB, "content": "dm"}, 4)
    the_error(session.peer, ErrorCode.RATE_LIMITED, 4, {"retry_after": 1})
    world.monotonic.advance(1.0)
    await post(session, "four", 5)
    assert session.peer.frames == []
    assert [m.content for m in world.store.appended] == ["one", "two", "four"]
    assert session.peer.open


async def test_the_hourly_message_limit(make_world: Callable[..., World]) -> None:
    world = make_world(limits={"messages_per_minute": 3, "messages_per_hour": 3})
    session = world.connect()
    await join(session)
    for i in range(3):
        await post(session, f"{i}", i)
    world.monotonic.advance(60.0)  # the minute's bucket is full again
    await post(session, "more", "x")
    # the hour's bucket refilled 60 * 3/3600 = 0.05 of a message: 1140 s to go
    the_error(session.peer, ErrorCode.RATE_LIMITED, "x", {"retry_after": 1140})


async def test_the_message_limit_is_per_user_across_connections(
    make_world: Callable[..., World],
) -> None:
    world = make_world(limits={"messages_per_minute": 2, "messages_per_hour": 100})
    tab1, tab2, bob = world.connect(ALICE), world.connect(ALICE), world.connect(BOB)
    for session in (tab1, tab2, bob):
        await join(session)
    await post(tab1, "a1")
    await post(tab2, "a2")
    await post(bob, "b1")
    await post(tab2, "a3", "x")
    the_error(tab2.peer, ErrorCode.RATE_LIMITED, "x")
    assert [m.content for m in world.store.appended] == ["a1", "a2", "b1"]


async def test_reads_over_the_limit_are_refused(make_world: Callable[..., World]) -> None:
    world = make_world(limits={"reads_per_minute": 2})
    session = world.connect()
    await send(session, "join_room", {"room": "general"}, 1)
    await send(session, "room_history", {"room": "general"}, 2)
    assert session.peer.types() == ["join_room_ack", "message_history"]
    session.peer.take()
    reads: list[tuple[str, dict[str, Any]]] = [
        ("dm_history", {"with_user": BOB}),
        ("room_history", {"room": "general"}),
        ("join_room", {"room": "random"}),
    ]
    for i, (type_, data) in enumerate(reads):
        await send(session, type_, data, i)
        error = the_error(session.peer, ErrorCode.RATE_LIMITED, i, {"retry_after": 30})
        assert error["message"] == "Too many requests"
    assert not world.hub.is_in(session.peer, "random")
    assert len(world.bus.joins) == 1
    # messages have their own limit
    await post(session, "still allowed")
    assert len(world.store.appended) == 1


@pytest.mark.parametrize(
    ("type_", "data", "limit"),
    [
        ("join_room", {"room": "general"}, "reads"),
        ("room_history", {"room": "general"}, "reads"),
        ("dm_history", {"with_user": BOB}, "reads"),
        ("room_message", {"room": "general", "content": "x"}, "messages"),
        ("direct_message", {"to_user_id": BOB, "content": "x"}, "messages"),
        ("ping", {}, None),
        ("leave_room", {"room": "general"}, None),
        ("auth", {"token": make_token(ALICE, "alice", exp=FAR)}, None),
    ],
)
async def test_which_frames_take_which_limit(
    world: World, type_: str, data: dict[str, Any], limit: str | None
) -> None:
    session = world.connect()
    if type_ in ("room_message", "leave_room"):
        await join(session)
    world.limits("reads").keys.clear()
    await send(session, type_, data, "x")
    assert "error" not in session.peer.types()
    taken = {name for name in ("messages", "reads", "api") if world.limits(name).keys}
    assert taken == ({limit} if limit else set())


@pytest.mark.parametrize("wait", [1.0, 7.0, 3599.0])
async def test_the_buss_limits_decide(world: World, wait: float) -> None:
    """The session asks the bus's limits (a cluster counts a user once,
    wherever it is connected) and reports their wait."""
    session = world.connect()
    await join(session)
    world.limits("messages").wait = wait
    world.limits("reads").wait = wait
    await post(session, "x", "m")
    the_error(session.peer, ErrorCode.RATE_LIMITED, "m", {"retry_after": int(wait)})
    await send(session, "room_history", {"room": "general"}, "h")
    the_error(session.peer, ErrorCode.RATE_LIMITED, "h", {"retry_after": int(wait)})
    assert world.store.appended == []
    assert ("history", room_channel("general"), 50, 0) not in world.store.calls
    assert world.limits("messages").keys == [ALICE]


# --- history ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "offset", "first", "count", "has_more", "echoed"),
    [
        (None, None, 1, 7, False, 50),
        (3, 0, 5, 3, True, 3),
        (3, 3, 2, 3, True, 3),
        (3, 6, 1, 1, False, 3),
        (3, 7, None, 0, False, 3),
        (3, 100, None, 0, False, 3),
        (7, 0, 1, 7, False, 7),
        (0, 0, 7, 1, True, 1),
        (-5, 2, 5, 1, True, 1),
        (1000, 0, 1, 7, False, 100),
        (2**40, 0, 1, 7, False, 100),
    ],
)
async def test_room_history_paging(
    world: World,
    limit: int | None,
    offset: int | None,
    first: int | None,
    count: int,
    has_more: bool,
    echoed: int,
) -> None:
    old = world.store.seed("general", 7)
    session = world.connect()
    data: dict[str, Any] = {"room": "general"}
    if limit is not None:
        data["limit"] = limit
    if offset is not None:
        data["offset"] = offset
    await send(session, "room_history", data, "h")
    (frame,) = session.peer.take()
    assert frame["type"] == "message_history" and frame["request_id"] == "h"
    page = frame["data"]
    ids = [m["id"] for m in page["messages"]]
    assert ids == ([m.id for m in old[first - 1 : first - 1 + count]] if first else [])
    assert page["total"] == 7
    assert page["has_more"] is has_more
    assert page["limit"] == echoed
    assert page["offset"] == (offset or 0)
    assert page["room"] == "general"
    assert world.store.calls[-1] == ("history", room_channel("general"), echoed, offset or 0)


async def test_room_history_is_clamped_to_the_configs_page(
    make_world: Callable[..., World],
) -> None:
    world = make_world(limits={"max_history_page": 5})
    world.store.seed("general", 7)
    session = world.connect()
    await send(session, "room_history", {"room": "general", "limit": 50})
    (frame,) = session.peer.take()
    assert frame["data"]["limit"] == 5 and len(frame["data"]["messages"]) == 5
    assert frame["data"]["has_more"] is True


async def test_room_history_messages_have_the_live_shape(world: World) -> None:
    world.store.put(
        NewMessage(
            user_id=BOB,
            username="bob",
            content="listen",
            message_type="audio",
            created_at="2023-11-14T22:00:00.000Z",
            room="general",
            media_url="/a.ogg",
            duration=2.5,
        )
    )
    session = world.connect()
    await send(session, "room_history", {"room": "general"})
    (frame,) = session.peer.frames
    assert frame["data"]["messages"] == [
        {
            "id": 1,
            "room": "general",
            "user_id": BOB,
            "username": "bob",
            "content": "listen",
            "message_type": "audio",
            "created_at": "2023-11-14T22:00:00.000Z",
            "media_url": "/a.ogg",
            "duration": 2.5,
        }
    ]


async def test_room_history_of_an_empty_room(world: World) -> None:
    session = world.connect()
    await send(session, "room_history", {"room": "random"}, 1)
    (frame,) = session.peer.frames
    assert frame["data"] == {
        "room": "random",
        "messages": [],
        "total": 0,
        "has_more": False,
        "limit": 50,
        "offset": 0,
    }


@pytest.mark.parametrize(
    ("user_id", "room", "code"),
    [
        (ALICE, "nowhere", ErrorCode.ROOM_NOT_FOUND),
        (CAROL, "staff", ErrorCode.PERMISSION_DENIED),
        (BOB, "staff", None),
        (CAROL, "general", None),  # a public room needs no join to be read
    ],
)
async def test_room_history_access(
    world: World, user_id: int, room: str, code: ErrorCode | None
) -> None:
    session = world.connect(user_id)
    await send(session, "room_history", {"room": room}, "h")
    if code is None:
        assert session.peer.types() == ["message_history"]
    else:
        the_error(session.peer, code, "h", {"room": room})
        assert [c[0] for c in world.store.calls] == ["room_access"]


async def test_dm_history_is_one_conversation_from_both_sides(world: World) -> None:
    alice, bob = world.connect(ALICE), world.connect(BOB)
    world.store.put(new_message("hi bob", room=None, user_id=ALICE, to_user_id=BOB))
    world.store.put(new_message("hi carol", room=None, user_id=ALICE, to_user_id=CAROL))
    world.store.put(new_message("hi alice", room=None, user_id=BOB, to_user_id=ALICE))
    await send(alice, "dm_history", {"with_user": BOB}, "a")
    await send(bob, "dm_history", {"with_user": ALICE, "limit": 1}, "b")
    (from_alice,) = alice.peer.frames
    (from_bob,) = bob.peer.frames
    assert from_alice["request_id"] == "a"
    assert from_alice["data"]["with_user"] == BOB and "room" not in from_alice["data"]
    assert [m["content"] for m in from_alice["data"]["messages"]] == ["hi bob", "hi alice"]
    assert from_alice["data"]["messages"][0] == {
        "id": 1,
        "from_user_id": ALICE,
        "from_username": "alice",
        "to_user_id": BOB,
        "content": "hi bob",
        "message_type": "text",
        "created_at": "2023-11-14T22:00:00.000Z",
    }
    assert from_alice["data"]["total"] == 2 and from_alice["data"]["has_more"] is False
    assert [m["content"] for m in from_bob["data"]["messages"]] == ["hi alice"]
    assert from_bob["data"]["has_more"] is True
    channels = [c[1] for c in world.store.calls if c[0] == "history"]
    assert channels == [dm_channel(ALICE, BOB)] * 2


async def test_dm_history_with_the_system_sender(world: World) -> None:
    session = world.connect()
    await send(session, "dm_history", {"with_user": 0})
    assert session.peer.types() == ["message_history"]
    assert session.peer.frames[0]["data"]["with_user"] == 0
    assert world.store.calls[-1] == ("history", dm_channel(ALICE, 0), 50, 0)


async def test_dm_history_with_an_unknown_user(world: World) -> None:
    session = world.connect()
    await send(session, "dm_history", {"with_user": 404}, "h")
    the_error(session.peer, ErrorCode.USER_NOT_FOUND, "h", {"user_id": 404})
    assert [c[0] for c in world.store.calls] == ["user_exists"]


# --- reading one's own writes ------------------------------------------------------------------


HISTORIES = [
    ("room_message", {"room": "general", "content": "mine"}, "room_history", {"room": "general"}),
    ("direct_message", {"to_user_id": BOB, "content": "mine"}, "dm_history", {"with_user": BOB}),
]


@pytest.mark.parametrize(("write", "written", "read", "asked"), HISTORIES)
async def test_history_after_an_uncommitted_write_waits_for_it(
    world: World, write: str, written: dict[str, Any], read: str, asked: dict[str, Any]
) -> None:
    session = world.connect()
    await join(session)
    await send(session, write, written, "w")
    assert world.store.pending
    world.store.gates["flush"] = gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, session, read, asked, "r")
        await wait_all_tasks_blocked()
        assert world.store.flushes == 1
        assert not any(c[0] == "history" for c in world.store.calls)  # not read yet
        gate.set()
    copy, history = session.peer.take()
    assert (copy["type"], copy["request_id"]) == (write, "w")
    assert history["type"] == "message_history" and history["request_id"] == "r"
    assert [m["content"] for m in history["data"]["messages"]] == ["mine"]
    # committed now: the next read does not wait
    await send(session, read, asked)
    assert world.store.flushes == 1


@pytest.mark.parametrize(("write", "written", "read", "asked"), HISTORIES)
async def test_history_after_a_committed_write_does_not_flush(
    world: World, write: str, written: dict[str, Any], read: str, asked: dict[str, Any]
) -> None:
    session = world.connect()
    await join(session)
    await send(session, read, asked)  # no write yet
    await send(session, write, written)
    world.store.commit()
    await send(session, read, asked)
    assert world.store.flushes == 0
    assert session.peer.types() == ["message_history", write, "message_history"]


async def test_history_after_a_failed_write_does_not_flush(world: World) -> None:
    session = world.connect()
    await join(session)
    await post(session, "lost", "w")
    world.store.fail(RuntimeError("disk full"))
    await send(session, "room_history", {"room": "general"})
    assert world.store.flushes == 0
    assert session.peer.types() == ["error", "message_history"]


async def test_history_after_a_refused_write_does_not_flush(world: World) -> None:
    session = world.connect()
    await join(session)
    await post(session, "   ")  # invalid: never queued
    await send(session, "room_history", {"room": "general"})
    assert world.store.flushes == 0


async def test_history_does_not_wait_for_other_connections_writes(world: World) -> None:
    bob = world.connect(BOB)
    await join(bob)
    await post(bob, "bob's")
    session = world.connect()
    await send(session, "room_history", {"room": "general"})
    assert world.store.flushes == 0
    assert world.store.pending  # still not committed
    assert session.peer.frames[0]["data"]["messages"] == []


# --- message_batch -----------------------------------------------------------------------------


def batch(*entries: tuple[str, dict[str, Any] | None, str | int | None]) -> dict[str, Any]:
    messages = []
    for type_, data, request_id in entries:
        entry: dict[str, Any] = {"type": type_}
        if data is not None:
            entry["data"] = data
        if request_id is not None:
            entry["request_id"] = request_id
        messages.append(entry)
    return {"messages": messages}


async def test_batch_entries_run_in_order_each_with_its_request_id(world: World) -> None:
    session = world.connect()
    data = batch(
        ("ping", None, 1),
        ("join_room", {"room": "general"}, 2),
        ("room_message", {"room": "general", "content": "from a batch"}, 3),
        ("room_history", {"room": "general"}, 4),
        ("leave_room", {"room": "general"}, "5"),
    )
    await send(session, "message_batch", data, "b")
    frames = session.peer.frames
    # the history reads the batch's own write: its copy comes first
    assert [(f["type"], f.get("request_id")) for f in frames] == [
        ("pong", 1),
        ("join_room_ack", 2),
        ("room_message", 3),
        ("message_history", 4),
        ("leave_room_ack", "5"),
    ]
    assert [m["content"] for m in frames[3]["data"]["messages"]] == ["from a batch"]
    assert world.sample("chatd_frames_in_total", type="message_batch") == 1
    assert world.sample("chatd_frames_in_total", type="ping") == 1


async def test_a_bad_batch_entry_gets_its_own_error_and_the_rest_go_on(world: World) -> None:
    session = world.connect()
    data = batch(
        ("ping", None, 1),
        ("nope", None, 2),
        ("join_room", {"room": "no spaces"}, 3),
        ("message_batch", {"messages": []}, 4),
        ("join_room", {"room": "nowhere"}, 5),
        ("room_message", {"room": "general", "content": "not joined"}, 6),
        ("ping", None, 7),
    )
    await send(session, "message_batch", data, "b")
    frames = session.peer.frames
    assert [(f["type"], f.get("request_id")) for f in frames] == [
        ("pong", 1),
        ("error", 2),
        ("error", 3),
        ("error", 4),
        ("error", 5),
        ("error", 6),
        ("pong", 7),
    ]
    assert [f["data"]["details"] for f in frames[1:6]] == [
        {"field": "type"},
        {"field": "data.room"},
        {"field": "type"},  # a batch may not nest a batch
        {"room": "nowhere"},
        {"room": "general"},
    ]
    assert [f["data"]["code"] for f in frames[4:6]] == ["ROOM_NOT_FOUND", "PERMISSION_DENIED"]
    assert session.peer.open


async def test_a_batch_over_the_entry_limit_is_refused_whole(
    make_world: Callable[..., World],
) -> None:
    world = make_world(limits={"max_batch_entries": 3})
    session = world.connect()
    await send(session, "message_batch", batch(*[("ping", None, i) for i in range(4)]), "b")
    data = the_error(session.peer, ErrorCode.INVALID_FORMAT, "b", {"field": "data.messages"})
    assert "3" in data["message"]
    await send(session, "message_batch", batch(*[("ping", None, i) for i in range(3)]), "b")
    assert session.peer.types() == ["pong"] * 3


async def test_an_empty_batch_does_nothing(world: World) -> None:
    session = world.connect()
    await send(session, "message_batch", {"messages": []}, "b")
    assert session.peer.frames == []


async def test_a_batch_stops_once_the_connection_closed(world: World) -> None:
    session = world.connect()
    await join(session)
    data = batch(
        ("room_message", {"room": "general", "content": "one"}, 1),
        ("auth", {"token": make_token(BOB, "bob", exp=FAR)}, 2),
        ("ping", None, 3),
        ("room_message", {"room": "general", "content": "two"}, 4),
    )
    await send(session, "message_batch", data, "b")
    the_error(session.peer, ErrorCode.AUTH_FAILED, 2)
    assert session.peer.closes == [(4001, "A refreshed token must name the same user")]
    assert session.peer.dropped == []  # not even tried
    assert [m.content for m in world.store.appended] == ["one"]


async def test_batch_entries_each_take_the_message_limit(
    make_world: Callable[..., World],
) -> None:
    world = make_world(limits={"messages_per_minute": 2, "messages_per_hour": 100})
    session = world.connect()
    await join(session)
    entries = [("room_message", {"room": "general", "content": f"{i}"}, i) for i in range(4)]
    await send(session, "message_batch", batch(*entries))
    assert [(f["type"], f["request_id"]) for f in session.peer.take()] == [
        ("error", 2),
        ("error", 3),
    ]
    assert [m.content for m in world.store.appended] == ["0", "1"]


async def test_bad_batch_entries_count_as_invalid_frames(
    make_world: Callable[..., World],
) -> None:
    world = make_world(limits={"invalid_frames_per_minute": 2})
    session = world.connect()
    await send(session, "message_batch", batch(*[("nope", None, i) for i in range(6)]))
    assert [f["request_id"] for f in session.peer.frames] == [0, 1, 2]
    assert session.peer.closes == [(1008, "Too many invalid frames")]
    assert session.peer.dropped == []


# --- read state -----------------------------------------------------------------


async def test_marking_each_new_message_read_reads_nothing_and_writes_once(
    make_world: Callable[..., World],
) -> None:
    """A member who marks every message of a busy room read as it comes:
    each ``mark_read`` is answered from the room's tail (no store read), and
    the markers moved meanwhile are written together, once per interval."""
    world = make_world(limits={"messages_per_minute": 1000, "messages_per_hour": 10000})
    alice, bob = world.connect(ALICE), world.connect(BOB)
    await join(alice)
    await join(bob)
    world.store.calls.clear()
    for i in range(30):
        await post(bob, f"m{i}")
        stored = world.store.commit()
        await send(alice, "mark_read", {"room": "general", "message_id": stored.id}, i)
        acks = [f for f in alice.peer.take() if f["type"] == "mark_read_ack"]
        assert [a["data"]["unread"] for a in acks] == [0]
    # not one read, not one write yet (room_access, asked by each message
    # for the room's mutes, is the store's cached answer: writer.Reads)
    assert [c for c in world.store.calls if c[0] != "room_access"] == []
    assert world.store.markers == {}
    world.store.calls.clear()
    world.monotonic.advance(1.0)
    await world.run_due()
    assert world.store.calls == [("save_read_state", 2, 0)]  # alice's, and bob's own
    general = room_channel("general")
    assert world.store.markers[ALICE, general] == world.store.markers[BOB, general]


async def test_a_join_reads_a_marker_moved_since_the_last_write(
    make_world: Callable[..., World],
) -> None:
    world = make_world()
    alice, bob = world.connect(ALICE), world.connect(BOB)
    await join(alice)
    await join(bob)
    for i in range(3):
        await post(bob, f"m{i}")
    await world.store.flush()
    first = world.store.channels[room_channel("general")][0]
    await send(alice, "mark_read", {"room": "general", "message_id": first.id}, "m")
    world.store.calls.clear()
    again = world.connect(ALICE)  # a second device joins before the write is due
    ack = await join(again)
    assert (ack["data"]["last_read_id"], ack["data"]["unread"]) == (first.id, 2)
    assert [c[0] for c in world.store.calls] == ["room_access", "save_read_state", "marker"]


async def test_a_connection_behind_is_refused_as_busy_and_closed_if_it_goes_on(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection that sends faster than the node reads it (``behind``)
    has its writes refused as if the node were saturated, reads still
    answered; past ``SHED_AFTER`` refusals at that pace, what it sent before
    is committed and acknowledged first (a flush), then it is closed 1013.
    The refusals refill: one a second, with the default pace (100 in 10 s),
    never closes it."""
    monkeypatch.setattr(chatd.session, "SHED_AFTER", 3)
    session = world.connect(BOB)
    await join(session)
    session.peer.behind = True
    for i in range(3):
        await post(session, "refused", i)
        the_error(session.peer, ErrorCode.RATE_LIMITED, i, {"retry_after": 1})
    await send(session, "room_history", {"room": "general"}, "h")  # reads go on
    assert [f["type"] for f in session.peer.take()] == ["message_history"]
    session.peer.behind = False
    await post(session, "before", "b")  # taken: queued, not committed
    session.peer.behind = True
    assert world.store.flushes == 0
    await post(session, "once too often", "x")
    assert world.store.flushes == 1
    frames = session.peer.take()
    assert [(f["type"], f.get("request_id")) for f in frames] == [
        ("room_message", "b"), ("error", "x"),
    ]  # fmt: skip
    assert frames[1]["data"]["details"] == {"retry_after": 2}
    assert session.peer.closes == [(1013, "The server is busy; reconnect in a few seconds")]
    assert [m.content for m in world.store.appended] == ["before"]
    assert world.sample("chatd_messages_shed_total") == 4
    assert world.sample("chatd_busy_closes_total") == 1
    assert world.ctx.messages.shedding()
    world.monotonic.advance(chatd.messages.SHED_HOLD)
    assert not world.ctx.messages.shedding()

    # the default pace: a refusal a second for a minute is not closed
    monkeypatch.undo()
    patient = world.connect(CAROL)
    await join(patient)
    patient.peer.behind = True
    for i in range(60):
        await post(patient, "try", i)
        the_error(patient.peer, ErrorCode.RATE_LIMITED, i, {"retry_after": 1})
        world.monotonic.advance(1.0)
    assert patient.peer.open
    patient.peer.behind = False
    await post(patient, "taken", "t")
    assert [m.content for m in world.store.appended] == ["before", "taken"]
