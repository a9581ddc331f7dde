"""Token buckets; the time is passed in, so the logic is pure and testable.

A bucket holds up to ``capacity`` tokens and refills continuously at ``rate``
tokens per second. ``take(now)`` spends one token or says how many seconds to
wait. A ``Limiter`` combines buckets (10 per minute *and* 100 per hour): a
request passes only when every bucket has a token, and then spends one from
each, so a refused request costs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


class TokenBucket:
    """``capacity`` tokens, refilled at ``capacity / period`` per second."""

    __slots__ = ("_stamp", "_tokens", "capacity", "rate")

    def __init__(self, capacity: int, period: float, now: float) -> None:
        if capacity < 1 or period <= 0:
            raise ValueError("capacity must be >= 1 and period > 0")
        self.capacity = float(capacity)
        self.rate = capacity / period
        self._tokens = float(capacity)
        self._stamp = now

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now

    def wait_time(self, now: float) -> float:
        """Seconds until one token is available (0 when one is there now)."""
        self._refill(now)
        if self._tokens >= 1.0:
            return 0.0
        return (1.0 - self._tokens) / self.rate

    def is_full(self, now: float) -> bool:
        """True when the bucket has refilled to capacity."""
        self._refill(now)
        return self._tokens >= self.capacity

    def spend(self) -> None:
        """Spend one token; call only after ``wait_time`` returned 0."""
        self._tokens -= 1.0

    def take(self, now: float) -> float:
        """Spend a token if one is there; else return the seconds to wait."""
        wait = self.wait_time(now)
        if wait == 0.0:
            self.spend()
        return wait


class Limiter:
    """Several buckets that must all allow a request."""

    __slots__ = ("_buckets",)

    def __init__(self, limits: Sequence[tuple[int, float]], now: float) -> None:
        self._buckets = [TokenBucket(capacity, period, now) for capacity, period in limits]

    def take(self, now: float) -> float:
        """0 when allowed (tokens spent), else the seconds to wait, rounded up
        to a whole second so that ``retry_after`` is always enough."""
        wait = 0.0
        for bucket in self._buckets:  # a loop, not max(genexpr): once per message
            bucket_wait = bucket.wait_time(now)
            if bucket_wait > wait:
                wait = bucket_wait
        if wait > 0.0:
            return float(max(1, math.ceil(wait)))
        for bucket in self._buckets:
            bucket.spend()
        return 0.0

    def is_full(self, now: float) -> bool:
        """True when every bucket has refilled: the same as a new limiter."""
        return all(bucket.is_full(now) for bucket in self._buckets)


class LimiterTable:
    """One ``Limiter`` per key (a user id), made on first use.

    A limiter whose buckets are all full is the same as a new one, so dropping
    it loses nothing: ``take`` prunes such limiters whenever the table has
    doubled since the last prune. A user who disconnects and reconnects keeps
    its (not yet refilled) limits.
    """

    __slots__ = ("_limits", "_prune_at", "_table")

    def __init__(self, limits: Sequence[tuple[int, float]]) -> None:
        self._limits = list(limits)
        self._table: dict[int, Limiter] = {}
        self._prune_at = 1024

    def take(self, key: int, now: float) -> float:
        """``Limiter.take`` for ``key``."""
        limiter = self._table.get(key)
        if limiter is None:
            if len(self._table) >= self._prune_at:
                self.prune(now)
            limiter = self._table[key] = Limiter(self._limits, now)
        return limiter.take(now)

    def prune(self, now: float) -> None:
        """Drop every limiter that has refilled completely."""
        self._table = {k: v for k, v in self._table.items() if not v.is_full(now)}
        self._prune_at = max(1024, 2 * len(self._table))

    def __len__(self) -> int:
        return len(self._table)
