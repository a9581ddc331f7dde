"""Per-room ordering of messages that reach a node by several paths.

With several nodes, a room's messages reach a node from its own commits and
from the bus, and two nodes' messages can cross on the way: seq 8 may arrive
before seq 7. Seqs are dense and follow commit order within a room (see
``chatd.store``), so a node that has delivered up to seq 7 knows exactly what
comes next. The ``Sequencer`` keeps, per room with members on this node, the
last seq delivered here and the messages that arrived early:

- ``offer(room, seq, item)``: the next seq is delivered at once (with whatever
  it unblocks); an older one is a duplicate and dropped; a newer one waits,
  and the gap is reported so that the caller reads the missing seqs from the
  store. A message with seq ``s`` is only ever published after its commit, and
  every seq below ``s`` committed before it, so the store always has them.
- ``fill(room, items)``: the store's answer for a gap (or a resync after the
  bus was down) goes in like offers.
- ``track(room, last_seq)`` starts following a room when its first local member
  joins, from the seq the store reported at the join; ``forget(room)`` stops
  when its last member leaves.

Pure logic: no I/O, no clock.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class _Channel(Generic[T]):
    __slots__ = ("early", "fetching", "last")

    def __init__(self, last: int) -> None:
        self.last = last
        #: seq -> item, arrived before the seqs below them
        self.early: dict[int, T] = {}
        #: the highest seq a fetch has been asked for (0: none pending)
        self.fetching = 0


class Sequencer(Generic[T]):
    """Delivers each tracked room's items once, in seq order."""

    def __init__(self) -> None:
        self._rooms: dict[str, _Channel[T]] = {}

    def track(self, room: str, last_seq: int) -> None:
        """Follow ``room`` from ``last_seq`` (no-op when already followed)."""
        if room not in self._rooms:
            self._rooms[room] = _Channel(last_seq)

    def forget(self, room: str) -> None:
        self._rooms.pop(room, None)

    def tracked(self) -> dict[str, int]:
        """Every followed room and the last seq delivered there."""
        return {room: state.last for room, state in self._rooms.items()}

    def last(self, room: str) -> int | None:
        state = self._rooms.get(room)
        return None if state is None else state.last

    def offer(self, room: str, seq: int, item: T) -> tuple[list[T], tuple[int, int] | None]:
        """Take one item. Returns the items now deliverable, in order, and
        the seq range ``(after, upto)`` to read from the store when this
        item revealed a gap (``after < seq <= upto`` missing), else None.
        Items of rooms not followed are dropped."""
        state = self._rooms.get(room)
        if state is None or seq <= state.last or seq in state.early:
            return [], None
        if seq != state.last + 1:
            state.early[seq] = item
            if seq - 1 > state.fetching:
                after = max(state.last, state.fetching)
                state.fetching = seq - 1
                return [], (after, seq - 1)
            return [], None
        ready = [item]
        state.last = seq
        self._drain(state, ready)
        return ready, None

    def fill(self, room: str, items: list[tuple[int, T]]) -> list[T]:
        """Items read from the store (ascending seq); returns what is now
        deliverable. Call it when a fetch ends, even with nothing found."""
        state = self._rooms.get(room)
        if state is None:
            return []
        ready: list[T] = []
        for seq, item in items:
            if seq == state.last + 1:
                # the copy that came live may carry more (the sender's
                # request_id): it wins over the store's
                ready.append(state.early.pop(seq, item))
                state.last = seq
                self._drain(state, ready)
            elif seq > state.last:
                state.early.setdefault(seq, item)
        return ready

    def fetch_done(self, room: str) -> tuple[int, int] | None:
        """A fetch ended (filled or failed). When a gap is still open, the
        range to read again."""
        state = self._rooms.get(room)
        if state is None:
            return None
        state.fetching = 0
        if state.early:
            upto = min(state.early) - 1
            if upto > state.last:
                state.fetching = upto
                return (state.last, upto)
        return None

    @staticmethod
    def _drain(state: _Channel[T], ready: list[T]) -> None:
        early = state.early
        while early:
            item = early.pop(state.last + 1, None)
            if item is None:
                break
            ready.append(item)
            state.last += 1
