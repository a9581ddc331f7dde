"""The store and the bus the config asks for.

``[storage] backend``: SQLite (the default, one node) or PostgreSQL (shared
by several nodes). ``[bus] backend``: ``local`` (one node alone) or
``redis`` (several nodes). The PostgreSQL and Redis modules are imported
only when asked for.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

from chatd.bus import Bus, LocalBus
from chatd.config import Config
from chatd.hub import Hub, Peer
from chatd.metrics import Metrics
from chatd.store import Store
from chatd.store.sqlite import open_sqlite_store
from chatd.store.writer import Cork

P = TypeVar("P", bound=Peer)


@asynccontextmanager
async def open_store(config: Config, metrics: Metrics, cork: Cork) -> AsyncIterator[Store]:
    """The store the config asks for, open for the block; each commit
    group's callbacks run inside ``cork.corked()``."""
    storage = config.storage
    if storage.backend == "postgres":
        from chatd.store.postgres import open_postgres_store

        async with open_postgres_store(storage.dsn, storage.pool_size, metrics, cork) as pg:
            yield pg
    else:
        async with open_sqlite_store(
            storage.sqlite_path,
            storage.synchronous,
            metrics,
            cork,
            checkpoint_interval=storage.checkpoint_interval_seconds,
            wal_max_bytes=storage.wal_max_bytes,
        ) as db:
            yield db


@asynccontextmanager
async def open_bus(
    config: Config,
    hub: Hub[P],
    store: Store,
    wall: Callable[[], float],
    monotonic: Callable[[], float],
    metrics: Metrics,
) -> AsyncIterator[Bus[P]]:
    """The bus the config asks for, running for the block."""
    if config.bus.backend == "redis":
        from chatd.cluster.bus import open_redis_bus
        from chatd.store.postgres import PostgresStore

        # (the config asks for PostgreSQL with Redis: its positions order
        # what the nodes deliver)
        assert isinstance(store, PostgresStore), "[bus] redis needs the postgres store"
        async with open_redis_bus(config, hub, store, wall, metrics) as bus:
            yield bus
    else:
        yield LocalBus(hub, wall, monotonic)
