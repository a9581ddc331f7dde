"""The WebSocket handshake: an upgrade to any other path is 404 and one
without ``Sec-WebSocket-Key`` is 400; a frame sent in the same packet as the
upgrade request is handled at once; the token comes in the query
(``?token=``) or in an ``Authorization: Bearer`` header, the query's winning
when both are there, and no token at all is ``AUTH_FAILED`` then close 4001;
``[server] handshake_timeout_seconds`` bounds the whole request (silence, half
a request, a slow drip) and an idle keep-alive connection.

Bad tokens of every other kind are in ``tests/test_chat.py`` and
``tests/test_tokens_e2e.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
import trio.testing
from wsproto.events import AcceptConnection, RejectConnection

from chatd.config import Config
from chatd.server import ChatServer
from tests.helpers.clients import Client, closed_with, frame_json, ws_open, ws_url
from tests.helpers.http_client import raw_http, request_bytes
from tests.helpers.raw import OP_TEXT, RawWS, client_frame
from tests.helpers.servers import running
from tests.helpers.tokens import make_token

pytestmark = pytest.mark.usefixtures("collect_garbage")


@pytest.mark.parametrize("path", ["/ws/other", "/", "/ws/chat/extra", "/healthz"])
async def test_websocket_upgrade_to_other_path_is_404(server: ChatServer, path: str) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        client = RawWS(stream)
        event = await client.handshake(server.port, f"{path}?token={make_token()}")
        assert isinstance(event, RejectConnection), event
        assert client.status == 404
        assert client.response_headers["connection"] == "close"
        data = await stream.receive_some(65536)
        while data:
            data = await stream.receive_some(65536)


async def test_websocket_upgrade_without_key_is_400(server: ChatServer) -> None:
    request = request_bytes(
        "/ws/chat?token=" + make_token(),
        extra="Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n",
    )
    async with raw_http(server) as http:
        await http.stream.send_all(request)
        resp = await http.response()
        assert resp.status == 400
        assert await http.at_eof()


async def test_frame_sent_with_the_upgrade_request_is_handled(
    slow_autojump_clock: trio.testing.MockClock, server: ChatServer
) -> None:
    """A client may send its first frame in the same packet as the upgrade
    request; the server must not wait for more bytes before handling it."""
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        client = RawWS(stream)
        first = client_frame(OP_TEXT, frame_json("ping", request_id="early").encode())
        event = await client.handshake(
            server.port, f"/ws/chat?token={make_token()}", trailing=first
        )
        assert isinstance(event, AcceptConnection)
        pong = await client.expect("pong", timeout=2)
        assert pong["request_id"] == "early"


async def test_bearer_header_authenticates(server: ChatServer) -> None:
    headers = [(b"Authorization", f"Bearer {make_token(7, 'grace')}".encode())]
    async with ws_open(ws_url(server), extra_headers=headers) as ws:
        client = Client(ws)
        ack = await client.join("general")
        assert ack["data"]["members"] == [{"user_id": 7, "username": "grace"}]


async def test_query_token_wins_over_bad_header(server: ChatServer) -> None:
    headers = [(b"Authorization", b"Bearer not-a-token")]
    url = ws_url(server, make_token(8, "heidi"))
    async with ws_open(url, extra_headers=headers) as ws:
        client = Client(ws)
        ack = await client.join("general")
        assert ack["data"]["members"] == [{"user_id": 8, "username": "heidi"}]


async def test_query_token_wins_over_good_header(server: ChatServer) -> None:
    """The other half of "query wins": a bad query token is refused even with
    a good header."""
    headers = [(b"Authorization", f"Bearer {make_token(7, 'grace')}".encode())]
    async with ws_open(ws_url(server, "garbage"), extra_headers=headers) as ws:
        client = Client(ws)
        frame = await client.expect("error")
        assert frame["data"]["code"] == "AUTH_FAILED"
        await closed_with(client, 4001)


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [(b"Authorization", b"Bearer")],
        [(b"Authorization", b"Basic dXNlcjpwYXNz")],
    ],
    ids=["none", "empty-bearer", "basic"],
)
async def test_missing_token_is_auth_failed_then_4001(
    server: ChatServer, headers: list[tuple[bytes, bytes]]
) -> None:
    async with ws_open(ws_url(server), extra_headers=headers) as ws:
        client = Client(ws)
        frame = await client.recv()
        assert frame["type"] == "error", frame
        assert frame["data"]["code"] == "AUTH_FAILED"
        await closed_with(client, 4001)


@pytest.mark.parametrize(
    "sent",
    [b"", b"GET /ws/chat HTTP/1.1\r\nHost: loc", b"GET /healthz HTTP/1.1\r\n"],
    ids=["nothing", "half-request-line", "half-head"],
)
async def test_handshake_timeout_drops_silent_client(
    slow_autojump_clock: trio.testing.MockClock,
    make_config: Callable[..., Config],
    sent: bytes,
) -> None:
    async with running(make_config(server={"handshake_timeout_seconds": 10})) as srv:
        stream = await trio.open_tcp_stream("127.0.0.1", srv.port)
        async with stream:
            if sent:
                await stream.send_all(sent)
            start = trio.current_time()
            with trio.fail_after(60):
                data = await stream.receive_some(65536)
            elapsed = trio.current_time() - start
    assert data == b""
    assert 10 <= elapsed < 12


async def test_handshake_timeout_on_idle_keep_alive(
    slow_autojump_clock: trio.testing.MockClock,
    make_config: Callable[..., Config],
) -> None:
    async with running(make_config(server={"handshake_timeout_seconds": 10})) as srv:
        async with raw_http(srv) as http:
            await http.stream.send_all(request_bytes("/healthz"))
            assert (await http.response()).status == 200
            start = trio.current_time()
            assert await http.at_eof(timeout=60)
            assert 10 <= trio.current_time() - start < 12


async def test_slow_drip_request_is_cut_at_the_timeout(
    slow_autojump_clock: trio.testing.MockClock,
    make_config: Callable[..., Config],
) -> None:
    """A byte every 2 s keeps the socket busy but the whole request must
    still arrive within the timeout."""
    request = request_bytes("/healthz", extra="X-Pad: " + "a" * 40 + "\r\n")
    async with running(make_config(server={"handshake_timeout_seconds": 10})) as srv:
        stream = await trio.open_tcp_stream("127.0.0.1", srv.port)
        async with stream:
            start = trio.current_time()
            closed_at = None
            with trio.fail_after(300):
                for byte in request:
                    try:
                        await stream.send_all(bytes([byte]))
                    except trio.BrokenResourceError:
                        break
                    with trio.move_on_after(2):
                        try:
                            data = await stream.receive_some(65536)
                        except trio.BrokenResourceError:
                            data = b""  # reset: it closed with our last byte unread
                        assert data == b"", data
                        closed_at = trio.current_time()
                    if closed_at is not None:
                        break
            assert closed_at is not None, "the server answered or kept waiting"
    assert 10 <= closed_at - start < 13
