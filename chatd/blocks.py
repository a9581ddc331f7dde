"""Who blocks whom, as this node knows it: what keeps a blocked user's
typing and read receipts from reaching the user who blocked them.

The store holds the blocks (``Store.block``) and refuses a blocked user's
direct message in the writer's transaction, so that refusal needs nothing
here. Typing and receipts are never stored: they are filtered where they
are delivered, by the hub of each node, against this copy, which a node
reads whole at its start (``Store.all_blocks``: users block few others,
and few users block anyone) and keeps up to date with its own changes and
with the other nodes' (``Bus.blocked``).

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

_NOBODY: frozenset[int] = frozenset()


class Blocks:
    """Every (blocker, blocked) pair, by the blocked user."""

    __slots__ = ("_blockers",)

    def __init__(self, pairs: Iterable[tuple[int, int]] = ()) -> None:
        #: blocked user -> the users who block them
        self._blockers: dict[int, frozenset[int]] = {}
        for blocker, blocked in pairs:
            self.set(blocker, blocked, True)

    def set(self, blocker: int, blocked: int, on: bool) -> None:
        mine = self._blockers.get(blocked, _NOBODY)
        mine = mine | {blocker} if on else mine - {blocker}
        if mine:
            self._blockers[blocked] = mine
        else:
            self._blockers.pop(blocked, None)

    def blockers(self, user_id: int) -> frozenset[int]:
        """The users who block ``user_id`` (usually nobody)."""
        return self._blockers.get(user_id, _NOBODY)

    def blocks(self, blocker: int, user_id: int) -> bool:
        return blocker in self._blockers.get(user_id, _NOBODY)
