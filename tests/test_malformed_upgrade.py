"""Requests that once ended the whole node with one connection: each is a
400 now, the connection is closed, and the node answers the next client.

h11 accepts each of them; what failed came after: ``urlsplit`` on a target
``//[`` (an unclosed IPv6 host: ValueError), and, for an upgrade, wsproto's
second reading of the request (a non-ASCII Connection,
Sec-WebSocket-Extensions or Sec-WebSocket-Protocol value and a Host that is
not IDNA raise UnicodeError; an HTTP/1.0 upgrade without Host raises h11's
LocalProtocolError when wsproto writes the request again as HTTP/1.1) or its
answer (``client_max_window_bits=abc``: ValueError from ``int``, with
compression on, the default: now an offer declined, the upgrade going
on). And whatever a connection's handler raises
ends that connection alone (``serve_connection``).
"""

from __future__ import annotations

from typing import Any

import pytest

from chatd.server import ChatServer
from chatd.transport import http
from tests.helpers.http_client import http_request, raw_http

pytestmark = pytest.mark.usefixtures("collect_garbage")

KEY = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
UPGRADE = b"Upgrade: websocket\r\nConnection: Upgrade\r\n"

MALFORMED = {
    "upgrade-ipv6-target": b"GET //[ HTTP/1.1\r\nHost: x\r\n" + UPGRADE + KEY + b"\r\n",
    "non-ascii-connection": b"GET /ws/chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade, \xff\r\n" + KEY + b"\r\n",
    "non-ascii-protocol": b"GET /ws/chat HTTP/1.1\r\nHost: x\r\n"
    + UPGRADE
    + KEY
    + b"Sec-WebSocket-Protocol: chat, \xe9\r\n\r\n",
    "non-ascii-extensions": b"GET /ws/chat HTTP/1.1\r\nHost: x\r\n"
    + UPGRADE
    + KEY
    + b"Sec-WebSocket-Extensions: permessage-deflate\xe9\r\n\r\n",
    "non-ascii-host": b"GET /ws/chat HTTP/1.1\r\nHost: \xff\xfe\r\n" + UPGRADE + KEY + b"\r\n",
    "non-idna-host": b"GET /ws/chat HTTP/1.1\r\nHost: xn--zz\r\n" + UPGRADE + KEY + b"\r\n",
    "http-1.0-upgrade-without-host": b"GET /ws/chat HTTP/1.0\r\n" + UPGRADE + KEY + b"\r\n",
}


async def test_plain_request_to_a_bad_target_is_400_and_kept_alive(server: ChatServer) -> None:
    async with raw_http(server) as client:
        await client.stream.send_all(b"GET //[ HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await client.response()).status == 400
        await client.stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await client.response()).status == 200


@pytest.mark.parametrize("request_bytes", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_request_is_400_and_the_node_lives(
    server: ChatServer, request_bytes: bytes
) -> None:
    async with raw_http(server) as client:
        await client.stream.send_all(request_bytes)
        resp = await client.response()
        assert resp.status == 400
        assert resp.headers["connection"] == "close"
        assert await client.at_eof()
    assert (await http_request(server.port, "GET", "/healthz")).status == 200


async def test_an_offer_with_a_bad_window_size_is_declined_not_the_upgrade(
    server: ChatServer,
) -> None:
    """``client_max_window_bits=abc`` once ended the node (wsproto's ``int``),
    then refused the upgrade (400); RFC 7692 §7 says to decline the offer:
    the upgrade goes on without compression."""
    async with raw_http(server) as client:
        await client.stream.send_all(
            b"GET /ws/chat HTTP/1.1\r\nHost: x\r\n"
            + UPGRADE
            + KEY
            + b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits=abc\r\n\r\n"
        )
        resp = await client.response()
        assert resp.status == 101
        assert "sec-websocket-extensions" not in resp.headers
    assert (await http_request(server.port, "GET", "/healthz")).status == 200


async def test_a_bug_in_a_handler_ends_its_connection_not_the_node(
    server: ChatServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    async def broken(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug")
        return await real(*args)

    real = http._serve_http
    monkeypatch.setattr(http, "_serve_http", broken)
    async with raw_http(server) as client:
        await client.stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await client.at_eof()
    assert "HTTP_ERROR" in caplog.text and "a bug" in caplog.text
    assert (await http_request(server.port, "GET", "/healthz")).status == 200
