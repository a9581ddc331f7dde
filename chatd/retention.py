"""How long messages are kept: the policy of ``[retention]``, apart from
storage.

A room's messages are kept ``room_days`` (or the room's own number in
``[retention.rooms]``), a conversation's ``direct_days``; 0 keeps them for
ever. A message older than its channel's cutoff is purged with its edits,
deletions, earlier versions and mentions (``store/retention.py``), the
oldest first (in id order, all channels together), so what a channel keeps
is always its newest messages, and
its history pages and recovery stay whole: the channel remembers the last
message purged (its horizon), history's ``total`` counts what is kept, and
a recovery from before the horizon answers ``recovered: false``.

Pure: no I/O (the time is passed in).
"""

from __future__ import annotations

from chatd.config import RetentionConfig
from chatd.protocol import rfc3339

DAY = 86400.0


class Policy:
    """``[retention]``, as cutoffs per channel."""

    def __init__(self, config: RetentionConfig) -> None:
        self.config = config

    @property
    def on(self) -> bool:
        """Whether anything is ever purged."""
        c = self.config
        return bool(c.room_days or c.direct_days or any(c.rooms.values()))

    def days(self, channel: str) -> int:
        """How many days the channel's messages are kept (0: for ever)."""
        c = self.config
        if channel.startswith("r:"):
            return c.rooms.get(channel[2:], c.room_days)
        return c.direct_days

    def cutoff(self, channel: str, now: float) -> str | None:
        """The creation time (RFC 3339) before which the channel's messages
        go; None when they are kept for ever."""
        days = self.days(channel)
        return rfc3339(now - days * DAY) if days else None

    def newest_cutoff(self, now: float) -> str:
        """The latest of every cutoff: no message created after it goes
        (only meaningful when ``on``)."""
        c = self.config
        shortest = min(d for d in (c.room_days, c.direct_days, *c.rooms.values()) if d)
        return rfc3339(now - shortest * DAY)
