"""Shared fixtures: a real chatd server in-process on a free port, real
SQLite files under ``tmp_path``, real PostgreSQL and Redis servers for the
tests of several nodes. The helpers the tests call are in ``tests/helpers/``.

Rules of this suite: every test talks to the real server over TCP; a test
that involves timing runs on ``autojump_clock`` (or ``slow_autojump_clock``
when the server's SQLite thread is involved) and never sleeps for real.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric import rsa

from chatd.config import Config, from_dict
from chatd.server import ChatServer
from tests.helpers.servers import SMALL_FRAME_BYTES, deep_merge, running, write_config
from tests.helpers.store import AnyStore, Backend, open_store
from tests.helpers.tokens import SECRET


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "chatd.db"


@pytest.fixture
def make_config(db_path: Path) -> Callable[..., Config]:
    """Build a validated config: port 0, the test database, the test secret."""

    def make(**sections: Any) -> Config:
        base: dict[str, Any] = {
            "server": {"host": "127.0.0.1", "port": 0},
            "auth": {"jwt_secret": SECRET},
            "storage": {"sqlite_path": str(db_path)},
            "rooms": {"public": ["general", "random"], "private": {"staff": [1, 2]}},
            "limits": {"messages_per_minute": 1000, "messages_per_hour": 10000},
        }
        return from_dict(deep_merge(base, sections), source="test.toml")

    return make


@pytest.fixture
async def server(make_config: Callable[..., Config]) -> AsyncIterator[ChatServer]:
    async with running(make_config()) as srv:
        yield srv


@pytest.fixture
async def small_server(make_config: Callable[..., Config]) -> AsyncIterator[ChatServer]:
    """A server whose ``max_frame_bytes`` is ``SMALL_FRAME_BYTES`` (2048)."""
    async with running(make_config(limits={"max_frame_bytes": SMALL_FRAME_BYTES})) as srv:
        yield srv


@pytest.fixture
def config_file(tmp_path: Path, db_path: Path) -> Path:
    """``write_config``'s file: the same database and secret as ``make_config``."""
    return write_config(tmp_path, db_path)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Which store, and where: a file, or a fresh PostgreSQL database (the
    store contract's tests run against each)."""
    if request.param == "postgres":
        return "postgres", str(request.getfixturevalue("pg_dsn"))
    return "sqlite", str(tmp_path / "data" / "chatd.db")


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[AnyStore]:
    async with open_store(backend) as opened:
        yield opened


@pytest.fixture
def slow_autojump_clock() -> trio.testing.MockClock:
    """Virtual time that jumps only after 50 ms of real idleness, so that work
    on the SQLite thread (which Trio cannot see) finishes before time jumps."""
    return trio.testing.MockClock(autojump_threshold=0.05)


@pytest.fixture
def collect_garbage() -> Iterator[None]:
    """Collect after the test, so that a socket left open is reported
    (ResourceWarning, an error here) by the test that leaked it. A module
    asks for it for all its tests with
    ``pytestmark = pytest.mark.usefixtures("collect_garbage")``."""
    yield
    gc.collect()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    """An RSA key (2048 bits) for the RS256 tests, one per module."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


# --- real PostgreSQL and Redis, for the tests of several nodes ----------------


@pytest.fixture(scope="session")
def postgres() -> Any:
    """A PostgreSQL server for the whole run (skips when none can start)."""
    from tests.helpers.services import postgres_server, unavailable

    server, reason = postgres_server()
    if server is None:
        unavailable(reason)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis() -> Any:
    """A Redis server for the whole run (skips when none can start)."""
    from tests.helpers.services import redis_server, unavailable

    server, reason = redis_server()
    if server is None:
        unavailable(reason)
    yield server
    server.close()


@pytest.fixture
def pg_dsn(postgres: Any) -> str:
    """A fresh, empty database of its own for one test."""
    dsn: str = postgres.new_database()
    return dsn


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix of its own for one test: its own cluster in the shared Redis."""
    import uuid

    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def client(redis: Any) -> AsyncIterator[Any]:
    """A coredis client of the session's Redis, for one test."""
    import coredis

    async with coredis.Redis.from_url(redis.url) as c:
        yield c
