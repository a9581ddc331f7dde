"""At most one per key per period, the newest of the rest at the period's end.

Read receipts are coalesced this way: a reader who marks every message of a
busy room read sends one receipt at once, then at most one a second, each
the newest. ``offer`` says whether a value may go now; if not, it is kept
(replacing any kept before it) until ``due`` hands it out, one period after
the last one went.

Pure: no I/O, no clock reads (``now`` comes from the caller).
"""

from __future__ import annotations

from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Coalescer(Generic[K, V]):
    """Leading-edge and trailing-edge throttling per key."""

    def __init__(self, period: float) -> None:
        self.period = period
        #: key -> when its last value went
        self._sent: dict[K, float] = {}
        #: key -> the newest value held back
        self._held: dict[K, V] = {}

    def offer(self, key: K, value: V, now: float) -> bool:
        """True: send ``value`` now. False: it is held for ``due``."""
        last = self._sent.get(key)
        if last is None or now - last >= self.period:
            self._sent[key] = now
            self._held.pop(key, None)
            return True
        self._held[key] = value
        return False

    def due(self, now: float) -> list[V]:
        """The held values whose period has ended (each key's newest), now
        counted as sent; keys quiet for a period are forgotten."""
        period = self.period
        ready: list[V] = []
        for key, value in list(self._held.items()):
            if now - self._sent[key] >= period:
                del self._held[key]
                self._sent[key] = now
                ready.append(value)
        if len(self._sent) > 2 * len(self._held) + 64:
            self._sent = {
                k: t for k, t in self._sent.items() if now - t < period or k in self._held
            }
        return ready

    def next_due(self) -> float | None:
        """When the earliest held value falls due (None: nothing held)."""
        if not self._held:
            return None
        return min(self._sent[key] for key in self._held) + self.period
