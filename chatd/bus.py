"""How a node shares what happens on it: alone, or with other nodes.

A ``Bus`` takes each committed message (in commit order, on the Trio thread)
and gets it to every connection that should see it, on this node and on the
others; it learns where users are present in a room; and it keeps the rate
limits that count a user once, wherever the user is connected.

``LocalBus`` is the bus of a node alone, the default: delivery is the hub's
fan-out, presence is the hub's own, rate limits are token buckets in memory.
``chatd.cluster.bus.RedisBus`` is the bus of several nodes sharing Redis.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Protocol

from chatd.hub import Hub, Peer
from chatd.metrics import Metrics
from chatd.protocol import Member
from chatd.ratelimit import LimiterTable
from chatd.store import Store, StoredMessage

if TYPE_CHECKING:
    from chatd.config import Config


class Limits(Protocol):
    """Per-key (user id) rate limits."""

    async def take(self, key: int) -> float:
        """0 when allowed (spent), else the whole seconds to wait (>= 1)."""


class LocalLimits:
    """Token buckets in this process's memory."""

    def __init__(self, limits: Sequence[tuple[int, float]], clock: Callable[[], float]) -> None:
        self.table = LimiterTable(limits)
        self._clock = clock

    async def take(self, key: int) -> float:
        return self.table.take(key, self._clock())


class Bus(Protocol):
    #: Whether a join must hold the room's frames until its ack is sent
    #: (``joined`` awaits something).
    holds_joins: bool

    def message(
        self, stored: StoredMessage, origin: Peer | None = None, request_id: str | int | None = None
    ) -> None:
        """Deliver a committed message everywhere; ``origin``'s copy carries
        ``request_id``. Called in commit order; never blocks."""

    async def joined(self, peer: Peer, room: str, last_seq: int) -> list[Member]:
        """``peer`` has just joined ``room`` on this node (the store said
        ``last_seq`` at the join); return the room's online members."""

    def limits(self, name: str, limits: Sequence[tuple[int, float]]) -> Limits:
        """Rate limits named ``name`` (buckets of (capacity, period))."""


class LocalBus:
    """The bus of one node alone."""

    #: Whether a join must hold the room's frames until the ack is sent.
    holds_joins = False

    def __init__(self, hub: Hub, wall: Callable[[], float], monotonic: Callable[[], float]) -> None:
        self.hub = hub
        self._wall = wall
        self._monotonic = monotonic

    def message(
        self, stored: StoredMessage, origin: Peer | None = None, request_id: str | int | None = None
    ) -> None:
        self.hub.deliver(stored, self._wall(), origin, request_id)

    async def joined(self, peer: Peer, room: str, last_seq: int) -> list[Member]:
        return self.hub.members(room)

    def limits(self, name: str, limits: Sequence[tuple[int, float]]) -> Limits:
        return LocalLimits(limits, self._monotonic)


@asynccontextmanager
async def open_bus(
    config: Config,
    hub: Hub,
    store: Store,
    wall: Callable[[], float],
    monotonic: Callable[[], float],
    metrics: Metrics,
) -> AsyncIterator[Bus]:
    """The bus the config asks for, running for the block."""
    if config.bus.backend == "redis":
        from chatd.cluster.bus import open_redis_bus

        async with open_redis_bus(config, hub, store, wall, metrics) as bus:
            yield bus
    else:
        yield LocalBus(hub, wall, monotonic)
