"""WebSocket clients that speak chatd's JSON protocol over trio-websocket, as
a browser would: the URL of a server (``ws_url``), a connection (``ws_open``,
``connect``) wrapped in a small JSON client (``Client``), and what a test
asserts about its end (``closed_with``).

For frames trio-websocket cannot send or hides (bad bits, compression, raw
bytes), see ``tests.helpers.raw``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from tests.helpers.tokens import make_token


class HasPort(Protocol):
    """A server, a cluster node or a load balancer: anything with a ``port``."""

    @property
    def port(self) -> int: ...


def frame_json(type_: str, data: Any = None, request_id: Any = None, **extra: Any) -> str:
    """The JSON text of a client frame (``data`` defaults to ``{}``)."""
    frame: dict[str, Any] = {"type": type_, "data": {} if data is None else data, **extra}
    if request_id is not None:
        frame["request_id"] = request_id
    return json.dumps(frame)


class Client:
    """A JSON-speaking test client over one trio-websocket connection."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws

    async def send(
        self, type_: str, data: Any = None, request_id: Any = None, **extra: Any
    ) -> None:
        await self.ws.send_message(frame_json(type_, data, request_id, **extra))

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


#: Presence announcements, which a test waiting for something else skips.
PRESENCE = frozenset({"user_connected", "user_disconnected", "room_presence"})


async def next_of(client: Client, type_: str, wait: float = 5.0) -> dict[str, Any]:
    """The next frame of ``type_``, skipping presence announcements (any
    other frame on the way is a failure)."""
    while True:
        frame = await client.recv(wait)
        if frame["type"] == type_:
            return frame
        assert frame["type"] in PRESENCE, frame


def ws_url(target: int | HasPort, token: str | None = None, **query: str) -> str:
    """The chat endpoint of ``target`` (a port, or anything with ``.port``)."""
    port = target if isinstance(target, int) else target.port
    params = dict(query)
    if token is not None:
        params["token"] = token
    qs = "&".join(f"{k}={v}" for k, v in params.items())
    return f"ws://127.0.0.1:{port}/ws/chat" + (f"?{qs}" if qs else "")


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
    target: int | HasPort,
    user_id: int = 1,
    username: str = "alice",
    *,
    token: str | None = None,
    **kwargs: Any,
) -> AsyncIterator[Client]:
    """Open a client on ``target`` (a server or a port) as ``user_id`` (or
    with an explicit ``token``)."""
    url = ws_url(target, token if token is not None else make_token(user_id, username))
    async with ws_open(url, **kwargs) as ws:
        yield Client(ws)


async def closed_with(client: Client, code: int, *, wait: float = 5.0, skip: bool = False) -> None:
    """The connection is closed with ``code``: the next thing on it is the
    close (``skip``: frames before the close are read and dropped)."""
    with pytest.raises(ConnectionClosed) as info:
        await client.recv(wait)
        while skip:
            await client.recv(wait)
    reason = info.value.reason
    assert reason is not None
    assert reason.code == code


async def room_history_ids(client: Client, room: str) -> tuple[list[int], int]:
    """Every id of the room, oldest first, paging with offset; and the total."""
    pages: list[list[int]] = []
    offset = 0
    total = -1
    while True:
        reply = await client.request("room_history", {"room": room, "limit": 100, "offset": offset})
        assert reply["type"] == "message_history", reply
        data = reply["data"]
        ids = [m["id"] for m in data["messages"]]
        assert ids == sorted(ids)
        pages.append(ids)
        total = data["total"]
        offset += len(ids)
        if not data["has_more"]:
            break
        assert ids, "has_more with an empty page"
    return [i for page in reversed(pages) for i in page], total
