"""The newest messages of a room as a node has delivered them: id -> seq.

A ``mark_read`` names a message by id, and its unread count is a difference
of seqs; a client marks the messages it has just been shown, the newest. So
each room with connections on a node keeps its last ``TAIL`` messages' ids
(consecutive seqs, ending at ``last_seq``) and their mentions, and a
``mark_read`` of one of them costs no store read: the id's seq by bisection
(ids increase with seq in a channel), the unread mentions after it by a walk
of at most ``TAIL`` entries. Anything older is the store's.

A message that does not follow the last one (a node that joined the room's
stream late; a seq skipped) starts the tail afresh, so the ids it holds are
always every message between its first and last seq.

Pure: no I/O.
"""

from __future__ import annotations

from bisect import bisect_left

from chatd.store import StoredMessage

#: Messages a tail keeps (it trims to this once it holds twice as many).
TAIL = 256


class Tail:
    """One room's newest messages."""

    __slots__ = ("ids", "last_id", "last_seq", "mentions")

    def __init__(self) -> None:
        #: Ids of consecutive seqs, ending at ``last_seq``.
        self.ids: list[int] = []
        #: Each one's mentions (None: none), in the same order.
        self.mentions: list[tuple[int, ...] | None] = []
        #: The room's newest message known here (0: none), and its seq.
        self.last_id = 0
        self.last_seq = 0

    @property
    def first_seq(self) -> int:
        """The seq of the oldest id held (``last_seq + 1`` when none)."""
        return self.last_seq - len(self.ids) + 1

    def add(self, stored: StoredMessage) -> None:
        """A message delivered to the room, in seq order."""
        seq = stored.seq
        if seq != self.last_seq + 1 or not seq:
            if seq <= self.last_seq and seq:
                return  # (an old one: already held, or older than the tail)
            self.ids.clear()
            self.mentions.clear()
        ids = self.ids
        ids.append(stored.id)
        self.mentions.append(stored.message.mentions)
        self.last_id = stored.id
        self.last_seq = seq
        if len(ids) >= 2 * TAIL:
            del ids[:TAIL]
            del self.mentions[:TAIL]

    def seed(self, last_id: int, last_seq: int) -> None:
        """The room's newest message as the store says (a join's read): an
        empty tail that ends there, unless it holds that far already."""
        if last_seq > self.last_seq:
            self.ids.clear()
            self.mentions.clear()
            self.last_id = last_id
            self.last_seq = last_seq

    def seq_of(self, message_id: int) -> int | None:
        """The seq of ``message_id`` when the tail can tell: -1 when it is
        not a message of the room (its id falls within the tail's), None
        when the tail does not reach it (older, or newer than delivered)."""
        ids = self.ids
        if not ids or message_id < ids[0] or message_id > ids[-1]:
            return None
        at = bisect_left(ids, message_id)
        if ids[at] != message_id:
            return -1
        return self.first_seq + at

    def mentions_after(self, user_id: int, seq: int) -> int | None:
        """How many messages after ``seq`` mention ``user_id``; None when
        ``seq`` is older than the tail."""
        first = self.first_seq
        if seq < first - 1:
            return None
        count = 0
        for named in self.mentions[seq - first + 1 :]:
            if named is not None and user_id in named:
                count += 1
        return count
