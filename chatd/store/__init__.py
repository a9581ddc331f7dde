"""What the rest of chatd knows of storage: plain records and one interface.

A ``Store`` commits messages in groups on its own thread and calls back, on the
Trio thread and in commit order, once each message has its ``id``; reads run on
worker threads. ``sqlite.py`` is the embedded default, ``postgres.py`` the
store several nodes share.

Every message has a ``seq``: its 1-based position in its channel (a room, or
one direct conversation). Seqs are dense and increase in commit order within a
channel, and so do ids, whichever node committed them: a node that receives
seq 7 of a channel knows that seqs 1..6 are committed, and can read any it has
not seen (docs/scaling.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import msgspec

from chatd.moderation import NO_RULES, AuditEntry, Moderated, Moderation, Role, RoomRules
from chatd.search import Page, Request

if TYPE_CHECKING:
    from chatd.config import RoomsConfig


#: Writes waiting for the store past which the node is saturated: new
#: messages, edits and notifications are refused (``Messages.admit``) and
#: /readyz says so, well before the queue's hard bound
#: (``writer.MAX_PENDING``, where every write waits for room).
SATURATED = 7_500


def room_channel(room: str) -> str:
    """The channel of a room's messages."""
    return f"r:{room}"


def dm_channel(a: int, b: int) -> str:
    """The channel of the conversation between two users (either order)."""
    low, high = sorted((a, b))
    return f"d:{low}:{high}"


def dm_peer(channel: str, user_id: int) -> int:
    """The other party of ``user_id`` in a conversation's channel."""
    low, _, high = channel[2:].partition(":")
    return int(high) if int(low) == user_id else int(low)


class NewMessage(msgspec.Struct, frozen=True, gc=False):
    """A validated message, not yet stored. ``room`` for rooms, else a DM.

    ``NewMessage`` and ``StoredMessage`` are made once per message on the hot
    path: msgspec structs build about 4x faster than frozen dataclasses, and
    (holding no containers) stay out of the cyclic garbage collector."""

    user_id: int
    username: str
    content: str
    message_type: str
    created_at: str
    room: str | None = None
    to_user_id: int | None = None
    media_url: str | None = None
    media_type: str | None = None
    duration: float | None = None
    reply_to: int | None = None
    #: A notification's JSON payload (``data``), encoded.
    data: bytes | None = None
    #: Users a room message mentions (known users only, once stored).
    mentions: tuple[int, ...] | None = None
    #: When its content was last edited (RFC 3339), as read back.
    edited_at: str | None = None
    #: Deleted: a tombstone (no content, no media), as read back.
    deleted: bool = False


class StoredMessage(msgspec.Struct, frozen=True, gc=False):
    """A committed message: what was sent, plus its ``id`` and its ``seq``
    (its position in its channel, from 1)."""

    id: int
    message: NewMessage
    seq: int = 0
    #: Its place among its channel's messages and events (PostgreSQL only:
    #: what the nodes' sequencers deliver in; 0 on SQLite).
    pos: int = 0


class Change(msgspec.Struct, frozen=True, gc=False):
    """An edit (``content`` set) or a deletion (``content`` None) of a
    stored message, not yet stored: checked and applied in the writer's
    transaction (``Store.change``), where the message is read."""

    message_id: int
    #: Who asks (0: the publish API's system sender).
    user_id: int
    #: Now, RFC 3339 (``edited_at``, the event's time).
    at: str
    content: str | None = None
    #: Edits: refused (PERMISSION_DENIED) when the message was created more
    #: than this many seconds before ``at`` (0: no limit).
    window: float = 0.0


class StoredEvent(msgspec.Struct, frozen=True, gc=False):
    """A committed edit or deletion. Its ``id`` comes from the sequence of
    message ids, so a channel's messages and events are one log in id order
    (recovery replays both)."""

    id: int
    #: "edited" or "deleted"
    kind: str
    message_id: int
    #: Who did it (0: the system sender).
    user_id: int
    #: RFC 3339: the edit's ``edited_at``, or when it was deleted.
    at: str
    #: Where the message is: its room, else its conversation's parties (the
    #: message's sender, then its recipient).
    room: str | None = None
    from_user_id: int = 0
    to_user_id: int = 0
    #: An edit's new content.
    content: str = ""
    #: Its place among its channel's messages and events (``StoredMessage.pos``).
    pos: int = 0


#: One entry of a channel's log, in id order.
Entry = StoredMessage | StoredEvent


def event_of(
    event_id: int,
    channel: str,
    message_id: int,
    kind: str,
    user_id: int,
    at: str,
    content: str | None,
    author: int,
    to_user: int | None,
    pos: int = 0,
) -> StoredEvent:
    """An event as either store reads or writes it: where its message is
    (``channel``; a conversation's parties are the message's ``author`` and
    ``to_user``)."""
    room = channel[2:] if channel.startswith("r:") else None
    return StoredEvent(
        id=int(event_id),
        kind=kind,
        message_id=int(message_id),
        user_id=int(user_id),
        at=at,
        room=room,
        from_user_id=0 if room is not None else int(author),
        to_user_id=int(to_user or 0) if room is None else 0,
        content=content or "",
        pos=int(pos),
    )


class Purged(NamedTuple):
    """One purge batch (``Store.purge``)."""

    #: Messages deleted from rooms, and from conversations.
    rooms: int
    direct: int
    #: The next batch's cursor (the last id read).
    cursor: int
    #: Whether the pass is over.
    finished: bool
    #: The first message kept that a later pass may purge (None: none).
    first_kept: int | None
    #: How long the batch held the writer.
    seconds: float


@dataclass(frozen=True, slots=True)
class RoomAccess:
    """A room as one user may see it."""

    name: str
    private: bool
    #: Whether the user may join it and read it: any user a public room,
    #: its members a private one.
    allowed: bool
    #: Its roles, bans and mutes.
    rules: RoomRules = NO_RULES


class ReadPoint(NamedTuple):
    """A user's read marker in a channel, and where the channel ends."""

    #: The newest message the user has read (0: none), and its seq.
    last_read_id: int
    last_read_seq: int
    #: The channel's newest message (0: none), and its seq.
    last_id: int
    last_seq: int
    #: Unread messages that mention the user.
    mentions: int = 0

    @property
    def unread(self) -> int:
        """Messages after the marker: a difference of positions, no count."""
        return max(0, self.last_seq - self.last_read_seq)


class ChannelMarkers(NamedTuple):
    """Some users' markers in one channel (``Store.markers``)."""

    #: The channel's newest message (0: none), and its seq.
    last_id: int
    last_seq: int
    #: user id -> (last_read_id, last_read_seq, unread mentions), for the
    #: users that have a marker there.
    found: dict[int, tuple[int, int, int]]


class Missed(NamedTuple):
    """What a reconnecting client missed in a channel (``Store.missed``)."""

    #: Replay the channel's messages with a seq above this, oldest first,
    after_seq: int
    #: and its edits and deletions with an id above this, in id order with
    #: the messages.
    after_id: int
    #: Whether that is everything after the client's ``since_id`` (False:
    #: the cap left the oldest messages out).
    complete: bool
    #: The channel's newest id (message or event) when it was read (0:
    #: none); every entry with an id up to it and above ``since_id`` is in
    #: the replay.
    newest_id: int
    #: The replay's first page, read with the rest in one go when asked for.
    entries: tuple[Entry, ...] = ()
    #: Whether more pages follow it.
    more: bool = False


def merge_log(
    messages: Sequence[StoredMessage], events: Sequence[StoredEvent], cap: int
) -> tuple[list[Entry], bool]:
    """One page of a channel's log: ``messages`` (the next ``cap`` at most,
    by seq) and ``events`` (the next ``cap`` at most, by id) in id order, up
    to where the first list that came back full ends (what lies beyond it
    is read with the next page); and whether a next page may hold more."""
    end = None
    if len(messages) >= cap:
        end = messages[-1].id
    if len(events) >= cap and (end is None or events[-1].id < end):
        end = events[-1].id
    entries: list[Entry] = sorted([*messages, *events], key=_by_id)
    if end is not None:
        entries = [e for e in entries if e.id <= end]
    return entries, end is not None


def _by_id(entry: Entry) -> int:
    return entry.id


#: Called on the Trio thread with the committed message, or the exception
#: that kept it from being committed.
Committed = Callable[[StoredMessage | Exception], None]
#: The same for an edit or a deletion.
Changed = Callable[[StoredEvent | Exception], None]


#: A webhook delivery to store: event, body (b"": made when it is sent),
#: due (Unix time), whose (``message.unread``: at most one pending a user).
OutboxRow = tuple[str, bytes, float, int | None]
#: What a commit group's results cause (chatd.webhooks).
Outbox = Callable[[Sequence[Any], float], list[OutboxRow]]


class Store(Protocol):
    #: Webhooks on: the deliveries a commit group's results cause (stored in
    #: its transaction), and what is called once some are.
    outbox: Outbox | None
    outbox_wake: Callable[[], None] | None

    async def append(self, message: NewMessage, on_done: Committed) -> int:
        """Queue ``message`` for the next group commit (waits only when the
        queue is full); return its ticket. ``on_done`` runs after the
        commit, in commit order."""

    async def change(self, change: Change, on_done: Changed) -> int:
        """Queue an edit or a deletion for the next group commit, like
        ``append``; ``on_done`` gets the event, or the ``ChatError`` that
        refused it (``chatd.edits``)."""

    @property
    def backlog(self) -> int:
        """Writes queued and not yet committed (``writer.MAX_PENDING`` at
        most: past it, ``append`` waits, and so does the connection that
        sent the message)."""

    def committed(self, ticket: int) -> bool:
        """Whether the write with this ticket (0: none) is committed (or
        failed): a session reads its own writes by flushing only when not."""

    async def flush(self) -> None:
        """Return once everything queued before this call is committed."""

    async def upsert_user(self, user_id: int, username: str) -> None:
        """Record a user (its latest display name)."""

    async def room_access(self, room: str, user_id: int) -> RoomAccess | None:
        """The room named, as ``user_id`` may see it; None when unknown. An
        answer that lets the user in (a public room, a member of a private
        one) is reused for ``ACCESS_TTL`` seconds (``writer.Reads``); any
        other is read again each time."""

    def forget_access(self) -> None:
        """Read every room's access afresh (rooms, roles or sanctions changed)."""

    async def last_seq(self, channel: str) -> int:
        """The channel's newest seq (0: no message yet)."""

    async def user_exists(self, user_id: int) -> bool:
        """Whether the user is known (has connected, or was added)."""

    async def history(
        self, channel: str, limit: int, offset: int
    ) -> tuple[list[StoredMessage], int]:
        """One page of a channel counted back from the newest message, and
        the channel's total."""

    async def missed(self, channel: str, since_id: int, cap: int, page: int = 0) -> Missed:
        """Where the channel's entries with an id above ``since_id`` start
        (at most the newest ``cap`` messages, with the events among and
        after them), read from the channel's indexes, with the first page
        of them (``page`` of each kind at most); the rest are then read in
        pages (``replay``). One read for a client that missed a page or
        less."""

    async def replay(
        self, channel: str, after_seq: int, after_id: int, page: int
    ) -> tuple[list[Entry], bool]:
        """The next page of a replay: messages with a seq above
        ``after_seq`` and events with an id above ``after_id``, in id order
        (``merge_log``), and whether more may follow."""

    async def versions(self, message_id: int, user_id: int) -> list[tuple[str, str | None]]:
        """Every content of a message, oldest first, with when it was
        written by an edit (None: the first); for its author (raises
        ``ChatError`` otherwise, see ``chatd.edits``)."""

    async def after(self, channel: str, after_seq: int, cap: int) -> list[StoredMessage]:
        """The channel's messages with a seq above ``after_seq``, oldest
        first, at most ``cap`` of them (the oldest ``cap``)."""

    async def search(self, request: Request) -> Page[StoredMessage]:
        """Up to ``request.limit`` messages with an id below its
        ``before_id`` whose current content has every word, newest first,
        in its channel or anywhere its user may read; cut after its
        ``budget`` (``chatd.search``)."""

    async def backfill(self, limit: int) -> int:
        """Index the newest ``limit`` ids of what was stored before the
        index existed, in one writer operation; the newest message still
        to index (0: none left)."""

    async def direct_since(
        self, user_ids: Sequence[int], created_at: str, cap: int
    ) -> list[StoredMessage]:
        """Direct messages to or from any of ``user_ids`` created at or after
        ``created_at`` (RFC 3339), oldest first, at most ``cap``."""

    def marker_now(self, channel: str, user_id: int) -> ChannelMarkers | None:
        """``marker``, read at once without waiting, when this store can
        (SQLite: a point read on the event loop's thread); None otherwise."""

    async def marker(self, channel: str, user_id: int) -> ChannelMarkers:
        """The user's marker in ``channel`` (in ``found`` when it has one),
        read together with those of every other user asked for meanwhile:
        while one read of a channel's markers is under way, the next waits
        and takes everyone who asked since (``writer.Reads``)."""

    async def unread(self, user_id: int) -> list[tuple[str, ReadPoint]]:
        """Every channel where the user has a marker, with its counts (one
        query; each count a difference of positions, never a count of
        rows)."""

    async def read_point(
        self, user_id: int, channel: str, message_id: int, floor: tuple[int, int]
    ) -> ReadPoint | None:
        """The user's marker in ``channel`` once moved to ``message_id``
        (never back, nor below ``floor``, an (id, seq) the caller knows of);
        None when the message is not in that channel."""

    async def last_seen(self, user_ids: Sequence[int]) -> dict[int, str]:
        """When each of these users (those known to have one) last
        disconnected, RFC 3339."""

    async def save_read_state(
        self, markers: Sequence[tuple[int, str, int, int]], seen: Sequence[tuple[int, str]]
    ) -> None:
        """Move markers (user id, channel, last_read_id, last_read_seq)
        forward, never back, and record last-seen times (user id, time), in
        the next group commit."""

    async def outbox_leader(self) -> bool:
        """Whether this node sends the webhook outbox (one node does)."""

    async def outbox_head(self, limit: int) -> list[tuple[int, bytes, float, int, int | None]]:
        """The oldest stored ``message.created`` rows (id, body, due,
        attempts, batch_end: the last row of the delivery it begins, once
        sent), in order."""

    async def outbox_batch(self, first: int, last: int) -> None:
        """The ``message.created`` rows from ``first`` to ``last`` are sent
        together from now on (a retry sends the same ones)."""

    async def outbox_unread(
        self, now: float, limit: int
    ) -> tuple[list[tuple[int, int, bytes, int]], float | None]:
        """The ``message.unread`` deliveries due (id, user id, body,
        attempts), and when the next one not due yet is (None: none)."""

    async def outbox_body(self, delivery_id: int, body: bytes) -> None:
        """A delivery's body, made at its first attempt, kept for the next."""

    async def username(self, user_id: int) -> str:
        """A known user's name ("" when unknown)."""

    async def outbox_pending(self) -> int:
        """How many deliveries are stored."""

    async def outbox_done(self, first: int, last: int, event: str) -> None:
        """A delivery sent (or given up): its ``event`` rows from ``first``
        to ``last`` removed."""

    async def outbox_retry(self, first: int, due: float, attempts: int) -> None:
        """A delivery (the one whose first row is ``first``) to try again at
        ``due`` (Unix time)."""

    async def moderate(self, action: Moderation) -> Moderated:
        """Check and do a moderator's action, with its audit line, in the
        next group commit (``store/moderation.py``); raise the refusal
        (``ChatError``). This node's cached access to the room is forgotten."""

    async def set_role(self, room: str, user_id: int, role: Role, actor_id: int, at: float) -> bool:
        """Give a user a role in a room (logged); False when there is no
        such room. This node's cached access to the room is forgotten."""

    async def block(self, user_id: int, other: int, on: bool) -> list[int]:
        """``user_id`` blocks ``other`` (``on``) or stops, in the next group
        commit; the user's blocks after it. Raises ``ChatError`` (oneself,
        an unknown user)."""

    async def blocks(self, user_id: int) -> list[int]:
        """The users ``user_id`` blocks, by id."""

    async def all_blocks(self) -> list[tuple[int, int]]:
        """Every (blocker, blocked) pair: what a starting node keeps in
        memory (``chatd.blocks``)."""

    async def purge(
        self,
        cursor: int,
        cutoff: Callable[[str], str | None],
        newest: str,
        limit: int,
        kept: set[str],
    ) -> Purged:
        """One retention batch, in one writer operation: among the ``limit``
        messages after id ``cursor``, delete those created before their
        channel's ``cutoff`` with their edits, deletions, versions and
        mentions (``store/retention.py``)."""

    async def declare_rooms(self, rooms: RoomsConfig) -> None:
        """Make sure every room of the config exists (members added, never
        removed), with the config's roles."""

    async def dev_user(self, username: str) -> int:
        """The id of the (first) user with this name, or a new user's id."""


class AdminOps(Protocol):
    """A store module's functions behind ``chatd user`` and ``chatd room``."""

    def upsert_user(self, conn: Any, user_id: int, username: str) -> None: ...
    def create_room(
        self, conn: Any, name: str, private: bool, members: tuple[int, ...]
    ) -> bool: ...
    def add_members(self, conn: Any, room: str, members: tuple[int, ...]) -> bool: ...
    def list_rooms(self, conn: Any) -> list[tuple[str, bool, list[int]]]: ...
    def set_role(
        self, conn: Any, room: str, user_id: int, role: Role, actor_id: int, at: float
    ) -> bool: ...
    def audit(self, conn: Any, room: str, limit: int) -> list[AuditEntry]: ...
    def export_user(self, conn: Any, user_id: int) -> Any: ...
    def erase_user(self, conn: Any, user_id: int) -> int | None: ...


class Admin:
    """What the user and room commands change: a store module's functions
    (``ops``) on one connection, inside the caller's transaction."""

    def __init__(self, conn: Any, ops: AdminOps) -> None:
        self.conn = conn
        self.ops = ops

    def upsert_user(self, user_id: int, username: str) -> None:
        self.ops.upsert_user(self.conn, user_id, username)

    def create_room(self, name: str, private: bool, members: tuple[int, ...]) -> bool:
        return self.ops.create_room(self.conn, name, private, members)

    def add_members(self, room: str, members: tuple[int, ...]) -> bool:
        return self.ops.add_members(self.conn, room, members)

    def list_rooms(self) -> list[tuple[str, bool, list[int]]]:
        return self.ops.list_rooms(self.conn)

    def set_role(self, room: str, user_id: int, role: Role, at: float) -> bool:
        return self.ops.set_role(self.conn, room, user_id, role, 0, at)

    def audit(self, room: str, limit: int) -> list[AuditEntry]:
        return self.ops.audit(self.conn, room, limit)

    def export_user(self, user_id: int) -> Any:
        """The user's data (``store.privacy.UserExport``); None when unknown."""
        return self.ops.export_user(self.conn, user_id)

    def erase_user(self, user_id: int) -> int | None:
        """Erase the user (``store/privacy.py``): how many of their messages
        became tombstones; None when unknown."""
        return self.ops.erase_user(self.conn, user_id)
