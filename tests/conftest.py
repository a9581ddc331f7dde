"""Shared fixtures: a real chatd server in-process on a free port, real
SQLite files under ``tmp_path``, and a small JSON client on trio-websocket.

Rules of this suite: every test talks to the real server over TCP; a test
that involves timing runs on ``autojump_clock`` (or ``slow_autojump_clock``
when the server's SQLite thread is involved) and never sleeps for real.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
import trio.testing
from trio_websocket import WebSocketConnection, open_websocket_url

from chatd.config import Config, from_dict
from chatd.server import ChatServer

SECRET = "test-secret-that-is-at-least-32-bytes-long"


def make_token(
    user_id: Any = 1, username: Any = "alice", *, ttl: float = 3600, **claims: Any
) -> str:
    """A token signed with the tests' secret (``claims`` override)."""
    now = int(time.time())
    body: dict[str, Any] = {"user_id": user_id, "username": username, "iat": now, "exp": now + ttl}
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, SECRET, algorithm="HS256")


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


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


@asynccontextmanager
async def running(config: Config, **kwargs: Any) -> AsyncIterator[ChatServer]:
    """Run a server for the block; stop it gracefully after."""
    async with trio.open_nursery() as nursery:
        server: ChatServer = await nursery.start(ChatServer(config, **kwargs).run)
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
async def server(make_config: Callable[..., Config]) -> AsyncIterator[ChatServer]:
    async with running(make_config()) as srv:
        yield srv


class Client:
    """A JSON-speaking test client over one trio-websocket connection."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws

    async def send(
        self, type_: str, data: Any = None, request_id: Any = None, **extra: Any
    ) -> None:
        frame: dict[str, Any] = {"type": type_, "data": {} if data is None else data, **extra}
        if request_id is not None:
            frame["request_id"] = request_id
        await self.ws.send_message(json.dumps(frame))

    async def send_raw(self, text: str | bytes) -> None:
        await self.ws.send_message(text)

    async def recv(self, wait: float = 5.0) -> dict[str, Any]:
        with trio.fail_after(wait):
            message = await self.ws.get_message()
        frame: dict[str, Any] = json.loads(message)
        return frame

    async def expect(self, type_: str, wait: float = 5.0) -> dict[str, Any]:
        """The next frame, which must be of ``type_``."""
        frame = await self.recv(wait)
        assert frame["type"] == type_, frame
        return frame

    async def request(self, type_: str, data: Any = None, request_id: Any = None) -> dict[str, Any]:
        await self.send(type_, data, request_id)
        return await self.recv()

    async def join(self, room: str = "general") -> dict[str, Any]:
        frame = await self.request("join_room", {"room": room})
        assert frame["type"] == "join_room_ack", frame
        return frame

    async def nothing_pending(self) -> None:
        """Assert that nothing is waiting: a ping's pong is the next frame."""
        frame = await self.request("ping", {}, request_id="__barrier__")
        assert frame["type"] == "pong" and frame.get("request_id") == "__barrier__", frame


def ws_url(server: ChatServer, token: str | None = None, **query: str) -> str:
    params = dict(query)
    if token is not None:
        params["token"] = token
    qs = "&".join(f"{k}={v}" for k, v in params.items())
    return f"ws://127.0.0.1:{server.port}/ws/chat" + (f"?{qs}" if qs else "")


@asynccontextmanager
async def ws_open(url: str, **kwargs: Any) -> AsyncIterator[WebSocketConnection]:
    """``open_websocket_url`` that also closes its TCP stream at the end.

    trio-websocket 0.12.2 leaves the client socket open when the *server*
    closes first (``WebSocketConnection._aclose`` returns early once a close
    reason is set), which surfaces later as a ResourceWarning, an error under
    ``filterwarnings = error``.
    """
    async with open_websocket_url(url, **kwargs) as ws:
        try:
            yield ws
        finally:
            stream = ws._stream
    await trio.aclose_forcefully(stream)


@asynccontextmanager
async def connect(
    server: ChatServer,
    user_id: int = 1,
    username: str = "alice",
    *,
    token: str | None = None,
    **kwargs: Any,
) -> AsyncIterator[Client]:
    """Open a client as ``user_id`` (or with an explicit ``token``)."""
    url = ws_url(server, token if token is not None else make_token(user_id, username))
    async with ws_open(url, **kwargs) as ws:
        yield Client(ws)


@pytest.fixture
def slow_autojump_clock() -> trio.testing.MockClock:
    """Virtual time that jumps only after 50 ms of real idleness, so that work
    on the SQLite thread (which Trio cannot see) finishes before time jumps."""
    return trio.testing.MockClock(autojump_threshold=0.05)


# --- real PostgreSQL and Redis, for the tests of several nodes ----------------


def _unavailable(reason: str) -> None:
    """Skip, saying why; under CHATD_REQUIRE_SERVICES=1 (CI), fail instead."""
    import os

    if os.environ.get("CHATD_REQUIRE_SERVICES") == "1":
        pytest.fail(f"CHATD_REQUIRE_SERVICES=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres() -> Any:
    """A PostgreSQL server for the whole run (skips when none can start)."""
    from tests.services import postgres_server

    server, reason = postgres_server()
    if server is None:
        _unavailable(reason)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis() -> Any:
    """A Redis server for the whole run (skips when none can start)."""
    from tests.services import redis_server

    server, reason = redis_server()
    if server is None:
        _unavailable(reason)
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


async def wait_until(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``predicate`` (every 20 ms) until it is true, 10 s at most."""
    try:
        with trio.fail_after(10):
            while True:
                if await predicate():
                    return
                await trio.sleep(0.02)
    except trio.TooSlowError:
        raise AssertionError(f"timed out waiting for {what}") from None
