"""One connection's protocol logic: a decoded frame in, frames and store
operations out.

The transport hands every complete text message to ``Session.handle_text``.
It is decoded (``protocol.decode_frame``), dispatched to the handler for its
type, and any ``ChatError`` raised on the way is turned into the one ``error``
frame here, in ``_fail``, echoing the ``request_id``; an error that carries a
close code (``AUTH_FAILED``: 4001) then closes the connection. Too many invalid
frames in a short time close it with 1008. A ``message_batch`` is unpacked and
each entry dispatched as if it had come alone.

A message (room or direct) is validated (``content.validate``),
rate-limited and posted (``messages.Messages``): committed in the store's
next group, then delivered by the bus, in commit order, the sender's copy
with its ``request_id``; a message the store refuses comes back here
(``failed``) as the sender's ``error``. Reads that follow a write on the
same connection first wait for that write's commit, so a client always reads
its own writes.

A join holds the room's frames for this connection (``Hub.join``) until its
``join_room_ack`` and any replay of missed messages have been sent, then
releases them; the bus is told of a presence that begins (``Bus.joined``) or
ends (``Bus.left``), and announces it.

No I/O here: the session talks to the transport through ``ClientPeer``, to
storage through the ``Store`` interface, and reads time through the two
clocks in its ``Context``; its tests drive it with fakes of all three.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

from chatd import protocol as p
from chatd import search
from chatd.auth import Identity, Verifier
from chatd.bus import Bus, Limits
from chatd.config import Config
from chatd.content import validate
from chatd.errors import ChatError, CloseCode, ErrorCode, invalid_format
from chatd.hub import Hub, direct_message_out, live_shape, message_out
from chatd.messages import SHED_AFTER, SHED_PERIOD, SHED_RETRY, Messages
from chatd.metrics import Metrics
from chatd.moderation import NO_RULES, Action, Moderation, lasts_until
from chatd.ratelimit import TokenBucket
from chatd.readstate import ReadState
from chatd.store import (
    Change,
    Entry,
    Missed,
    NewMessage,
    RoomAccess,
    Store,
    StoredMessage,
    dm_channel,
    room_channel,
)
from chatd.transport.frames import OutFrame
from chatd.typists import Typing

log = logging.getLogger("chatd")

#: Messages read from the store per page of a replay.
REPLAY_PAGE = 100
#: Largest page of room_members.
MAX_MEMBER_PAGE = 1000


class ClientPeer(Protocol):
    """The transport side of one connection, as the session drives it."""

    @property
    def identity(self) -> Identity:
        """Who connected (the hub's view; fixed for the connection's life)."""

    @property
    def open(self) -> bool:
        """Whether data frames still flow both ways (not closing, not gone)."""

    @property
    def behind(self) -> bool:
        """Whether the client sends faster than the node reads it (what
        arrives now was sent a while ago): the node is overloaded, and this
        connection is among the reasons."""

    def send(self, frame: OutFrame) -> None:
        """Queue a frame; never blocks."""

    def close(self, code: int, reason: str = "") -> None:
        """Send a close frame, then end the connection."""

    async def drained(self) -> None:
        """Return once little is left buffered for the connection (at once
        when it is no longer open)."""


class Slots(Protocol):
    """A bound on how many may do something at once (``trio.CapacityLimiter``)."""

    async def __aenter__(self) -> object: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> object: ...


S = TypeVar("S", bound=ClientPeer)


@dataclass
class Context(Generic[S]):
    """What every session shares. ``reload`` swaps in a new config's limits
    (sessions read ``ctx.config`` on every request)."""

    config: Config
    hub: Hub[S]
    store: Store
    #: Delivery, presence and rate limits: this node alone, or the cluster.
    bus: Bus[S]
    #: Commit, then deliver.
    messages: Messages[S]
    verifier: Verifier
    #: Seconds since the epoch, for timestamps and token expiry.
    wall: Callable[[], float]
    #: A monotonic clock, for rate limits.
    monotonic: Callable[[], float]
    #: Per-user message limits (messages_per_minute and _per_hour).
    message_limits: Limits
    #: Per-user read limits (reads_per_minute).
    read_limits: Limits
    #: The publish API's limits (the system sender's messages).
    api_limits: Limits
    metrics: Metrics
    #: How many joins replay missed messages at once.
    replays: Slots
    #: Read markers, unread counts, receipts, last seen.
    reads: ReadState[S]
    #: Who is typing where.
    typists: Typing[S]
    #: Per-user typing frames (typing_per_minute).
    typing_limits: Limits

    @classmethod
    def create(
        cls,
        config: Config,
        hub: Hub[S],
        store: Store,
        bus: Bus[S],
        *,
        wall: Callable[[], float],
        monotonic: Callable[[], float],
        metrics: Metrics,
        replays: Slots,
        wake: Callable[[], None],
    ) -> Context[S]:
        """``wake``: called when ``reads`` or ``typists`` has timed work
        (the caller then runs their ``run_due`` at their ``next_due``)."""
        specs = _limit_specs(config)
        limits = config.limits
        reads = ReadState(store, hub, bus, wall, monotonic, limits.receipts_max_members, wake)
        typists = Typing(bus, wall, monotonic, wake)

        def sent(stored: StoredMessage) -> None:
            reads.sent(stored)
            typists.sent(stored)

        return cls(
            config=config,
            hub=hub,
            store=store,
            bus=bus,
            messages=Messages(store, bus, metrics, monotonic, sent),
            verifier=Verifier(config),
            wall=wall,
            monotonic=monotonic,
            message_limits=bus.limits("messages", specs["messages"]),
            read_limits=bus.limits("reads", specs["reads"]),
            api_limits=bus.limits("api", specs["api"]),
            metrics=metrics,
            replays=replays,
            reads=reads,
            typists=typists,
            typing_limits=bus.limits("typing", specs["typing"]),
        )

    def reload(self, config: Config) -> None:
        """Use ``config`` from now on; a rate limit restarts (its buckets
        full) only when its own settings changed."""
        old, new = _limit_specs(self.config), _limit_specs(config)
        self.config = config
        limits = config.limits
        self.hub.configure(
            presence_max_members=limits.presence_max_members, summary_members=limits.ack_members
        )
        bus = self.bus
        if old["messages"] != new["messages"]:
            self.message_limits = bus.limits("messages", new["messages"])
        if old["reads"] != new["reads"]:
            self.read_limits = bus.limits("reads", new["reads"])
        if old["api"] != new["api"]:
            self.api_limits = bus.limits("api", new["api"])
        if old["typing"] != new["typing"]:
            self.typing_limits = bus.limits("typing", new["typing"])
        self.reads.receipts_max_members = limits.receipts_max_members


def _limit_specs(config: Config) -> dict[str, list[tuple[int, float]]]:
    """Each rate limit's buckets, (capacity, period), by its name."""
    limits, api = config.limits, config.api
    return {
        "messages": [(limits.messages_per_minute, 60.0), (limits.messages_per_hour, 3600.0)],
        "reads": [(limits.reads_per_minute, 60.0)],
        "api": [(api.messages_per_minute, 60.0), (api.messages_per_hour, 3600.0)],
        "typing": [(limits.typing_per_minute, 60.0)],
    }


class Session(Generic[S]):
    """The protocol state of one authenticated connection."""

    __slots__ = ("_busy", "_invalid", "_last_write", "ctx", "identity", "peer")

    def __init__(self, ctx: Context[S], peer: S) -> None:
        self.ctx = ctx
        self.peer = peer
        #: The token's user; ``auth`` replaces it (the same user, the new
        #: token's name and expiry).
        self.identity = peer.identity
        self._invalid = TokenBucket(
            ctx.config.limits.invalid_frames_per_minute, 60.0, ctx.monotonic()
        )
        #: The store's ticket of this connection's latest message.
        self._last_write = 0
        #: Refusals because the node was saturated (``_admit``); made at
        #: the first one.
        self._busy: TokenBucket | None = None

    # --- the one place frames come in and errors go out -----------------------

    async def handle_text(self, raw: str) -> None:
        """Handle one complete text message from the client (the transport
        hands on messages only while the connection is open)."""
        try:
            frame = p.decode_frame(raw, allowed=_TYPES)
        except ChatError as err:
            self._fail(err, p.peek_request_id(raw))
            return
        await self.dispatch(frame)

    async def handle_binary(self) -> None:
        """Binary frames are not part of the protocol."""
        self._fail(invalid_format("Binary frames are not supported; send JSON text"), None)

    async def dispatch(self, frame: p.ClientFrame) -> None:
        """Run the handler of one decoded frame, reporting its failure."""
        if log.isEnabledFor(logging.DEBUG):
            room = getattr(frame.data, "room", "")
            uid = self.identity.user_id
            log.debug("WS_MESSAGE: Type=%s, UserID=%d, Room=%s", frame.type, uid, room)
        self.ctx.metrics.frame_in(frame.type)
        try:
            await _HANDLERS[frame.type](self, frame)
        except ChatError as err:
            self._fail(err, frame.request_id)
        except Exception:  # a failing store read, a bug: this request fails, not the node
            log.exception("session: %s of user %d failed", frame.type, self.identity.user_id)
            failed = ChatError(ErrorCode.INTERNAL_ERROR, "The request failed; try again")
            self._fail(failed, frame.request_id)

    def failed(self, err: ChatError, request_id: str | int | None) -> None:
        """A message of this session was not stored (``messages.Origin``)."""
        self._fail(err, request_id)

    def _fail(self, err: ChatError, request_id: str | int | None) -> None:
        if not self.peer.open:
            return
        metrics = self.ctx.metrics
        metrics.error(err.code.value)
        if err.code is ErrorCode.RATE_LIMITED:
            metrics.rate_limited.inc()
        self._send(p.error_frame(err, self.ctx.wall(), request_id), "error")
        if err.close is not None:
            self.peer.close(err.close, err.message)
        elif err.code is ErrorCode.INVALID_FORMAT and self._invalid.take(self.ctx.monotonic()) > 0:
            self.peer.close(CloseCode.POLICY_VIOLATION, "Too many invalid frames")

    def _send(self, payload: bytes, type_: str) -> None:
        self.ctx.metrics.frames_out(type_)
        self.peer.send(OutFrame(payload))

    def _reply(self, type_: str, data: Any, frame: p.ClientFrame) -> None:
        self._send(p.encode(type_, data, self.ctx.wall(), request_id=frame.request_id), type_)

    # --- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """The connection is authenticated and open."""
        if self.ctx.hub.connect(self.peer):
            self.ctx.bus.user_online(self.peer.identity)

    def end(self) -> None:
        """The connection is gone: leave every room."""
        ctx = self.ctx
        ident = self.peer.identity
        for room in ctx.hub.disconnect(self.peer):
            self._left(room)
        if not ctx.hub.online(ident.user_id):
            ctx.bus.user_offline(ident)
            ctx.typists.gone(ident.user_id)
            ctx.reads.disconnected(ident.user_id)

    def _left(self, room: str) -> None:
        """This user's last connection here has left ``room``."""
        self.ctx.bus.left(self.peer.identity, room)
        self.ctx.reads.left(self.peer.identity.user_id, room)

    def refuse(self, err: ChatError) -> None:
        """Report a failure before the session started (a bad token)."""
        self._fail(err, None)

    # --- rooms ----------------------------------------------------------------

    async def _join_room(self, frame: p.ClientFrame) -> None:
        data: p.JoinRoom = frame.data
        self._check_token()
        await self._read_limit()
        access = await self._check_room(data.room)
        peer = self.peer
        ctx = self.ctx
        hub = ctx.hub
        room = data.room
        since_id = data.since_id
        limits = ctx.config.limits
        # The room's frames for this connection wait until the ack (and any
        # replay) has gone out; a replay reads the room's messages itself.
        rejoin = hub.is_in(peer, room)
        await ctx.bus.follow(room)
        if not peer.open:
            return
        first = hub.join(peer, room, replaying=since_id is not None)
        try:
            members, count = await ctx.bus.joined(peer, room, first, limits.ack_members)
            read = await ctx.reads.joined(self.identity.user_id, room)
            ack: dict[str, Any] = {
                "room": room,
                "success": True,
                "message": "Joined room successfully",
                "members": members,
                "member_count": count,
                "last_read_id": read.last_read_id,
                "unread": read.unread,
                "mentions": read.mentions,
                "role": access.rules.role(self.identity.user_id),
            }
            if since_id is None:
                self._still_in(room)
                self._reply("join_room_ack", ack, frame)
                hub.release(peer, room, 0)
                return
            # At most a few joins replay at once (``ctx.replays``): in a
            # reconnect storm the others wait here, holding nothing (the hub
            # drops their messages, which the replay will read).
            waiting = ctx.metrics.replays_waiting
            waiting.inc()
            waited = False
            try:
                async with ctx.replays:
                    waiting.dec()
                    waited = True
                    missed = await ctx.store.missed(
                        room_channel(room), since_id, limits.recovery_max_messages, REPLAY_PAGE
                    )
                    ack["recovered"] = missed.complete
                    self._still_in(room)
                    self._reply("join_room_ack", ack, frame)
                    await self._replay(room, since_id, missed)
            finally:
                if not waited:
                    waiting.dec()
        except BaseException:
            # The join failed: a connection that was in the room before and
            # did not ask for a replay gets what was held; any other is out
            # of the room (what was held or dropped for it is gone with it,
            # and its presence ends if it had begun): its error says to join
            # again.
            if rejoin and since_id is None:
                hub.release(peer, room, 0)
            elif hub.is_in(peer, room) and hub.leave(peer, room):
                self._left(room)
            raise

    async def _replay(self, room: str, since_id: int, missed: Missed) -> None:
        """Send the room's messages, edits and deletions after ``since_id``,
        in id order, a page at a time (the first read with ``missed``, each
        next one once the connection's buffer has drained), then end the
        join: once the replay has reached the newest entry the hub dropped
        for it."""
        ctx = self.ctx
        peer = self.peer
        channel = room_channel(room)
        seq, after_id = missed.after_seq, missed.after_id
        # Live entries up to the last one the client has (by the replay, or
        # before it: its since_id, but never past the newest stored entry)
        # are not sent again.
        last_id = min(since_id, missed.newest_id)
        page: Sequence[Entry] = missed.entries
        more = missed.more
        while peer.open and ctx.hub.is_in(peer, room):  # (not kicked meanwhile)
            now = ctx.wall()
            for entry in page:
                kind, shape, sender = live_shape(entry)
                self._send(p.encode(kind, shape, now, user_id=sender), kind)
                if isinstance(entry, StoredMessage):
                    seq = entry.seq
            if page:
                after_id = last_id = page[-1].id
            if not more and ctx.hub.release(peer, room, last_id):
                return
            await peer.drained()
            page, more = await ctx.store.replay(channel, seq, after_id, REPLAY_PAGE)

    async def _room_members(self, frame: p.ClientFrame) -> None:
        data: p.RoomMembers = frame.data
        await self._read_limit()
        await self._check_room(data.room)
        limits = self.ctx.config.limits
        asked = limits.ack_members if data.limit is None else data.limit
        limit = max(1, min(MAX_MEMBER_PAGE, asked))
        members, count = await self.ctx.bus.members(data.room, data.after_user_id, limit + 1)
        reply = {
            "room": data.room,
            "members": members[:limit],
            "member_count": count,
            "has_more": len(members) > limit,
        }
        self._reply("room_members_ack", reply, frame)

    async def _leave_room(self, frame: p.ClientFrame) -> None:
        data: p.LeaveRoom = frame.data
        ctx = self.ctx
        if not ctx.hub.is_in(self.peer, data.room):
            raise ChatError(ErrorCode.PERMISSION_DENIED, "Not in this room", {"room": data.room})
        if ctx.hub.leave(self.peer, data.room):
            self._left(data.room)
        self._reply("leave_room_ack", {"room": data.room, "success": True}, frame)

    def _still_in(self, room: str) -> None:
        """A join that waited is still a join: a kick or a ban meanwhile
        took the connection out of the room (it got ``kicked``)."""
        if not self.ctx.hub.is_in(self.peer, room):
            raise ChatError(
                ErrorCode.PERMISSION_DENIED, "Removed from the room while joining", {"room": room}
            )

    async def _check_room(self, room: str) -> RoomAccess:
        """The room exists and this user may see it."""
        access = await self.ctx.store.room_access(room, self.identity.user_id)
        if access is None:
            raise ChatError(ErrorCode.ROOM_NOT_FOUND, "Room not found", {"room": room})
        if not access.allowed:
            raise ChatError(
                ErrorCode.PERMISSION_DENIED, "Not a member of this private room", {"room": room}
            )
        self._refuse_if(access, "ban", "banned_until", "You are banned from this room")
        return access

    def _refuse_if(self, access: RoomAccess, kind: str, key: str, message: str) -> None:
        """``PERMISSION_DENIED`` while this user's ban or mute (``kind``) in
        the room lasts, with its end in ``details[key]`` (null: until lifted)."""
        until = access.rules.until(self.identity.user_id, kind, self.ctx.wall())
        if until is not False:
            end = None if until is None else p.rfc3339(until)
            raise ChatError(ErrorCode.PERMISSION_DENIED, message, {"room": access.name, key: end})

    # --- messages -------------------------------------------------------------

    async def _room_message(self, frame: p.ClientFrame) -> None:
        data: p.RoomMessage = frame.data
        self._check_token()
        ctx = self.ctx
        if not ctx.hub.is_in(self.peer, data.room):
            raise ChatError(
                ErrorCode.PERMISSION_DENIED,
                "Join the room before sending to it",
                {"room": data.room},
            )
        # (a cached answer, as a rule: no wait)
        access = await ctx.store.room_access(data.room, self.identity.user_id)
        if access is not None and access.rules is not NO_RULES:
            self._refuse_if(access, "mute", "muted_until", "You are muted in this room")
        await self._post(data, frame.request_id, room=data.room)

    async def _direct_message(self, frame: p.ClientFrame) -> None:
        data: p.DirectMessage = frame.data
        self._check_token()
        await self._check_user(data.to_user_id)
        await self._post(data, frame.request_id, to_user_id=data.to_user_id)

    async def _post(
        self,
        data: p.RoomMessage | p.DirectMessage,
        request_id: str | int | None,
        *,
        room: str | None = None,
        to_user_id: int | None = None,
    ) -> None:
        """Validate, rate-limit and post a message (delivered after commit)."""
        ctx = self.ctx
        validate(data, ctx.config.limits)
        await self._admit()
        await self._message_limit()
        message = NewMessage(
            user_id=self.identity.user_id,
            username=self.identity.username,
            content=data.content,
            message_type=data.message_type,
            created_at=p.rfc3339(ctx.wall()),
            room=room,
            to_user_id=to_user_id,
            media_url=data.media_url,
            media_type=data.media_type,
            duration=data.duration,
            reply_to=data.reply_to,
            mentions=_mentions(data),
        )
        self._last_write = await ctx.messages.post(message, self, request_id)

    async def _edit_message(self, frame: p.ClientFrame) -> None:
        data: p.EditMessage = frame.data
        await self._change(data.message_id, data.content, frame.request_id)

    async def _delete_message(self, frame: p.ClientFrame) -> None:
        data: p.DeleteMessage = frame.data
        await self._change(data.message_id, None, frame.request_id)

    async def _change(
        self, message_id: int, content: str | None, request_id: str | int | None
    ) -> None:
        """An edit (``content``) or a deletion: the length rule and the
        message rate limit here, the rest where it is stored
        (``chatd.edits``); delivered after commit, like a message."""
        self._check_token()
        ctx = self.ctx
        limits = ctx.config.limits
        if content is not None and len(content) > limits.max_content_length:
            raise ChatError(
                ErrorCode.MESSAGE_TOO_LONG,
                f"Content is longer than {limits.max_content_length} characters",
                {"max_length": limits.max_content_length},
            )
        await self._admit()
        await self._message_limit()
        change = Change(
            message_id,
            self.identity.user_id,
            p.rfc3339(ctx.wall()),
            content,
            window=limits.edit_window_seconds,
        )
        self._last_write = await ctx.messages.change(change, self, request_id)

    async def _message_versions(self, frame: p.ClientFrame) -> None:
        data: p.MessageVersions = frame.data
        await self._read_limit()
        await self._own_writes()  # its own edit, read back
        found = await self.ctx.store.versions(data.message_id, self.identity.user_id)
        versions = [{"content": content, "edited_at": at} for content, at in found]
        self._reply(
            "message_versions", {"message_id": data.message_id, "versions": versions}, frame
        )

    async def _check_user(self, user_id: int) -> None:
        if not await self.ctx.store.user_exists(user_id):
            raise ChatError(ErrorCode.USER_NOT_FOUND, "User not found", {"user_id": user_id})

    # --- history --------------------------------------------------------------

    async def _room_history(self, frame: p.ClientFrame) -> None:
        data: p.RoomHistory = frame.data
        await self._read_limit()
        await self._check_room(data.room)
        await self._history(frame, "room", data.room, room_channel(data.room), message_out)

    async def _dm_history(self, frame: p.ClientFrame) -> None:
        data: p.DmHistory = frame.data
        await self._read_limit()
        await self._check_user(data.with_user)
        channel = dm_channel(self.identity.user_id, data.with_user)
        await self._history(frame, "with_user", data.with_user, channel, direct_message_out)

    async def _history(
        self,
        frame: p.ClientFrame,
        key: str,
        value: str | int,
        channel: str,
        shape: Callable[[StoredMessage], Any],
    ) -> None:
        """Answer ``message_history`` with one page of ``channel``."""
        data: p.RoomHistory | p.DmHistory = frame.data
        store = self.ctx.store
        await self._own_writes()
        limit = p.clamp_limit(data.limit, self.ctx.config.limits.max_history_page)
        messages, total = await store.history(channel, limit, data.offset)
        reply = {
            key: value,
            "messages": [shape(m) for m in messages],
            "total": total,
            "has_more": data.offset + len(messages) < total,
            "limit": limit,
            "offset": data.offset,
        }
        self._reply("message_history", reply, frame)

    # --- search -----------------------------------------------------------------

    async def _search(self, frame: p.ClientFrame) -> None:
        """``search_results``: the newest matches, in what this user may
        read (``chatd.search``); a room or a conversation checked as its
        history is."""
        data: p.Search = frame.data
        await self._read_limit()
        words = search.parse(data.query)
        ctx, me = self.ctx, self.identity.user_id
        channel = None
        if data.room is not None:
            await self._check_room(data.room)
            channel = room_channel(data.room)
        elif data.with_user is not None:
            await self._check_user(data.with_user)
            channel = dm_channel(me, data.with_user)
        store = ctx.store
        await self._own_writes()  # its own messages, found
        limit = max(1, min(p.SEARCH_MAX_LIMIT, data.limit))
        budget = ctx.config.limits.search_time_ms / 1000
        started = ctx.monotonic()
        request = search.Request(me, words, channel, data.before_id, limit, budget, ctx.wall())
        page = await store.search(request)
        ctx.metrics.searched(ctx.monotonic() - started, page.cut)
        found = [
            message_out(m) if m.message.room is not None else direct_message_out(m)
            for m in page.found
        ]
        reply = {
            "query": data.query,
            "messages": found,
            "has_more": page.next_before_id is not None,
            "next_before_id": page.next_before_id,
        }
        self._reply("search_results", reply, frame)

    # --- read state, typing, presence ------------------------------------------

    async def _mark_read(self, frame: p.ClientFrame) -> None:
        data: p.MarkRead = frame.data
        ctx = self.ctx
        if data.room is not None and not ctx.hub.is_in(self.peer, data.room):
            raise ChatError(
                ErrorCode.PERMISSION_DENIED, "Join the room to mark it read", {"room": data.room}
            )
        await self._own_writes()  # its own newest message
        point = await ctx.reads.mark(self.peer, data, self._read_limit)
        where: dict[str, Any] = (
            {"room": data.room} if data.room is not None else {"with_user": data.with_user}
        )
        reply = {
            **where,
            "last_read_id": point.last_read_id,
            "unread": point.unread,
            "mentions": point.mentions,
        }
        self._reply("mark_read_ack", reply, frame)

    async def _unread(self, frame: p.ClientFrame) -> None:
        await self._read_limit()
        await self._own_writes()
        self._reply("unread_counts", await self.ctx.reads.unread(self.identity.user_id), frame)

    async def _typing(self, frame: p.ClientFrame) -> None:
        data: p.Typing = frame.data
        ctx = self.ctx
        wait = await ctx.typing_limits.take(self.identity.user_id)
        if wait > 0:
            raise ChatError(
                ErrorCode.RATE_LIMITED, "Too many typing frames", {"retry_after": int(wait)}
            )
        start = data.state == "start"
        if data.room is not None:
            if not ctx.hub.is_in(self.peer, data.room):
                raise ChatError(
                    ErrorCode.PERMISSION_DENIED, "Join the room to type in it", {"room": data.room}
                )
            ctx.typists.typing(self.identity, data.room, 0, start)
            return
        assert data.to_user_id is not None
        if data.to_user_id == self.identity.user_id:
            return  # (to oneself: never echoed)
        await self._check_user(data.to_user_id)
        ctx.typists.typing(self.identity, None, data.to_user_id, start)

    async def _presence_query(self, frame: p.ClientFrame) -> None:
        data: p.PresenceQuery = frame.data
        await self._read_limit()
        users = await self.ctx.reads.presence(data.user_ids)
        self._reply("presence", {"users": users}, frame)

    # --- the rest -------------------------------------------------------------

    async def _ping(self, frame: p.ClientFrame) -> None:
        self._reply("pong", {"timestamp": p.rfc3339(self.ctx.wall())}, frame)

    async def _auth(self, frame: p.ClientFrame) -> None:
        data: p.Auth = frame.data
        identity = self.ctx.verifier.verify(data.token)
        if identity.user_id != self.identity.user_id:
            raise ChatError(
                ErrorCode.AUTH_FAILED,
                "A refreshed token must name the same user",
                close=CloseCode.AUTH_FAILED,
            )
        self.identity = identity
        expires = p.rfc3339(identity.expires_at) if identity.expires_at is not None else None
        self._reply("auth_ack", {"user_id": identity.user_id, "expires_at": expires}, frame)

    async def _message_batch(self, frame: p.ClientFrame) -> None:
        data: p.MessageBatch = frame.data
        most = self.ctx.config.limits.max_batch_entries
        if len(data.messages) > most:
            raise invalid_format(f"A batch has at most {most} entries", "data.messages")
        for entry in data.messages:
            if not self.peer.open:
                return
            try:
                inner = p.decode_entry(entry, allowed=_BATCH_TYPES)
            except ChatError as err:
                self._fail(err, entry.request_id)
                continue
            await self.dispatch(inner)

    # --- rules ----------------------------------------------------------------

    def _check_token(self) -> None:
        self.ctx.verifier.check_live(self.identity, self.ctx.wall())

    async def _own_writes(self) -> None:
        """Return once this connection's latest write is committed (and so
        delivered): what it reads next includes its own writes."""
        store = self.ctx.store
        if not store.committed(self._last_write):
            await store.flush()

    async def _admit(self) -> None:
        """A write is refused while the node is saturated, or while this
        connection is ``behind`` (``Messages.admit``: what a sender reads
        as "busy, try again" is the same either way). A connection refused
        past ``SHED_AFTER`` goes on sending though told to wait: once what
        it sent before is committed and acknowledged, it is closed 1013,
        and what it sent after, still unread, is dropped with the
        connection (the transport reads nothing more once the session has
        closed it). Its client learns that every message without an answer
        was not taken."""
        ctx = self.ctx
        try:
            ctx.messages.admit(self.peer.behind)
        except ChatError:
            now = ctx.monotonic()
            busy = self._busy
            if busy is None:
                busy = self._busy = TokenBucket(SHED_AFTER, SHED_PERIOD, now)
            if busy.take(now) == 0.0:
                raise
            await self._own_writes()  # acknowledged before the close
            ctx.messages.shed()
            raise ChatError(
                ErrorCode.RATE_LIMITED,
                "The server is busy; reconnect in a few seconds",
                {"retry_after": SHED_RETRY},
                close=CloseCode.TRY_AGAIN_LATER,
            ) from None

    async def _message_limit(self) -> None:
        wait = await self.ctx.message_limits.take(self.identity.user_id)
        if wait > 0:
            raise ChatError(ErrorCode.RATE_LIMITED, "Too many messages", {"retry_after": int(wait)})

    # --- moderation -------------------------------------------------------------

    async def _moderate(self, frame: p.ClientFrame) -> None:
        """kick, ban, unban, mute, unmute: checked and recorded by the store
        (``chatd.moderation``), then every node told (``Bus.moderated``)."""
        data: p.Unban = frame.data
        action: Action = frame.type  # type: ignore[assignment]  # (one of _HANDLERS')
        self._check_token()
        await self._read_limit()
        ctx = self.ctx
        now = ctx.wall()
        duration = data.duration_seconds if isinstance(data, p.Ban) else None
        reason = data.reason if isinstance(data, p.Kick) else None
        actor = self.identity.user_id
        done = await ctx.store.moderate(
            Moderation(
                action=action,
                room=data.room,
                actor_id=actor,
                user_id=data.user_id,
                until=lasts_until(now, duration),  # (only ban and mute have one)
                reason=reason,
                at=now,
            )
        )
        until = None if done.until is None else p.rfc3339(done.until)
        kicked = None
        if action in ("kick", "ban"):
            notice = {"room": data.room, "by_user_id": actor, "reason": reason, "until": until}
            kicked = p.encode("kicked", notice, now)
        ctx.bus.moderated(data.room, data.user_id, kicked)
        ack = {"action": action, "room": data.room, "user_id": data.user_id, "until": until}
        self._reply("moderation_ack", ack, frame)

    async def _block(self, frame: p.ClientFrame) -> None:
        """block_user, unblock_user: stored (the store refuses the blocked
        user's direct messages from then on), every node's ``Blocks`` told;
        the answer is the user's block list."""
        data: p.BlockUser = frame.data
        self._check_token()
        await self._read_limit()
        ctx = self.ctx
        me = self.identity.user_id
        on = frame.type == "block_user"
        blocked = await ctx.store.block(me, data.user_id, on)
        ctx.bus.blocked(me, data.user_id, on)
        self._reply("block_list", {"user_ids": blocked}, frame)

    async def _block_list(self, frame: p.ClientFrame) -> None:
        await self._read_limit()
        blocked = await self.ctx.store.blocks(self.identity.user_id)
        self._reply("block_list", {"user_ids": blocked}, frame)

    async def _read_limit(self) -> None:
        wait = await self.ctx.read_limits.take(self.identity.user_id)
        if wait > 0:
            raise ChatError(ErrorCode.RATE_LIMITED, "Too many requests", {"retry_after": int(wait)})


def _mentions(data: p.RoomMessage | p.DirectMessage) -> tuple[int, ...] | None:
    """A room message's mentions (direct messages have none)."""
    named = data.mentions if isinstance(data, p.RoomMessage) else None
    return tuple(named) if named else None


#: The handler of each frame type: one table for every session (a table of
#: bound methods per session cost ~2 KiB per idle connection).
_HANDLERS: dict[str, Callable[[Session[Any], p.ClientFrame], Awaitable[None]]] = {
    "join_room": Session._join_room,
    "leave_room": Session._leave_room,
    "room_message": Session._room_message,
    "direct_message": Session._direct_message,
    "room_history": Session._room_history,
    "dm_history": Session._dm_history,
    "room_members": Session._room_members,
    "mark_read": Session._mark_read,
    "unread": Session._unread,
    "edit_message": Session._edit_message,
    "delete_message": Session._delete_message,
    "message_versions": Session._message_versions,
    "typing": Session._typing,
    "presence_query": Session._presence_query,
    "ping": Session._ping,
    "auth": Session._auth,
    "message_batch": Session._message_batch,
    "kick": Session._moderate,
    "ban": Session._moderate,
    "unban": Session._moderate,
    "mute": Session._moderate,
    "unmute": Session._moderate,
    "block_user": Session._block,
    "unblock_user": Session._block,
    "block_list": Session._block_list,
    "search": Session._search,
}
_TYPES = frozenset(_HANDLERS)
_BATCH_TYPES = _TYPES - {"message_batch"}
