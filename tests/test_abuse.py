"""Transport abuse not covered elsewhere (the handshake timeout is in
``tests/test_handshake.py``, oversized heads in ``tests/test_http.py``,
compression bombs and the size guard on finite fragmented messages in
``tests/test_frame_limits.py``, 1007 and 1002 in ``tests/test_frame_errors.py``,
the slow consumer in ``tests/test_slow_consumer.py``):

* an endless fragmented message (continuation frames forever, never a FIN),
  plain and compressed: closed 1009 at the first fragment past
  ``max_frame_bytes``, so the server never holds more than that of it;
* more connections from one address than ``[server]
  max_connections_per_address``: the extra one completes the handshake and is
  closed 1013, the others keep working, and a freed slot is usable again;
* more than ``[server] max_connections`` in all: 1013 "Server full";
* ``[server] trusted_proxies``: behind a trusted proxy the per-address limit
  counts the forwarded address (X-Forwarded-For, else X-Real-IP); from an
  untrusted peer those headers are ignored.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed
from wsproto.events import CloseConnection, Pong

from chatd.config import Config
from chatd.server import ChatServer
from tests.helpers.clients import Client, connect
from tests.helpers.raw import OP_CONT, OP_PING, OP_TEXT, client_frame, raw_ws
from tests.helpers.servers import SMALL_FRAME_BYTES, running

#: The ``small_server`` fixture's ``max_frame_bytes``.
MAX = SMALL_FRAME_BYTES


# === endless fragmented messages ===================================================


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "deflated"])
async def test_endless_fragmented_message_is_closed_1009_at_the_limit(
    small_server: ChatServer, compressed: bool
) -> None:
    """Fragments of 300 bytes (inflated), never a FIN. After each fragment a
    ping: its pong proves the server took the fragment and is still
    reading; the 1009 must come at the first fragment past the limit."""
    step = 300
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)

    def payload(text: bytes) -> bytes:
        if not compressed:
            return text
        # One deflate stream split across fragments; it never ends, so no
        # fragment drops the sync flush's tail (RFC 7692 7.2.1 does at the end).
        return comp.compress(text) + comp.flush(zlib.Z_SYNC_FLUSH)

    inflated = wire = 0
    code = None
    async with raw_ws(small_server, deflate=compressed) as client:
        with trio.fail_after(30):
            for n in range(10_000):  # bounded: the close must come long before
                text = (b'{"type":"ping","pad":"' if n == 0 else b"") + b"a" * step
                body = payload(text)
                opcode = OP_TEXT if n == 0 else OP_CONT
                await client.send_raw(
                    client_frame(opcode, body, fin=False, rsv1=compressed and n == 0)
                )
                inflated += len(text)
                wire += len(body)
                await client.send_raw(client_frame(OP_PING, str(n).encode()))
                event = await client.next_event()
                if isinstance(event, CloseConnection):
                    code = event.code
                    break
                assert isinstance(event, Pong) and event.payload == str(n).encode(), event
            else:
                pytest.fail("an endless message was never refused")
    assert code == 1009
    # Refused at the first fragment that passed the limit, not later.
    assert inflated - step <= MAX < inflated
    if compressed:
        assert wire < MAX  # the inflated size refused it, not the bytes on the wire


# === connections per address and in all ===============================================


async def assert_closed_1013(client: Client, reason: str) -> None:
    with pytest.raises(ConnectionClosed) as info:
        await client.recv()
    assert info.value.reason is not None
    assert info.value.reason.code == 1013
    assert info.value.reason.reason == reason


async def wait_for_count(server: ChatServer, address: str, count: int) -> None:
    """Until the server counts ``count`` WebSocket connections from ``address``."""
    with trio.fail_after(5):
        while server.gate.per_address.get(address, 0) != count:  # noqa: ASYNC110
            await trio.sleep(0.01)


async def test_connections_per_address_past_the_limit_get_1013(
    make_config: Callable[..., Config], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="chatd")
    config = make_config(server={"max_connections_per_address": 2})
    async with running(config) as srv:
        async with connect(srv, 1, "alice") as alice, connect(srv, 2, "bob") as bob:
            await alice.join("general")
            await bob.join("general")
            await alice.expect("user_connected")
            async with connect(srv, 3, "carol") as extra:
                await assert_closed_1013(extra, "Too many connections from your address")
            # The two already open are not disturbed.
            sent = await alice.request("room_message", {"room": "general", "content": "still"})
            assert sent["type"] == "room_message"
            assert (await bob.expect("room_message"))["data"]["content"] == "still"
            await bob.nothing_pending()
            await wait_for_count(srv, "127.0.0.1", 2)
        # Both gone: the address has its slots back.
        await wait_for_count(srv, "127.0.0.1", 0)
        async with connect(srv, 3, "carol") as carol, connect(srv, 4, "dave") as dave:
            await carol.join("general")
            await dave.join("general")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "WS_REFUSED: IP=127.0.0.1, Reason=Too many connections from your address" in text
    # The refused connection never reached a session: carol's first connect
    # left no WS_CONNECT.
    assert text.count("WS_CONNECT: UserID=3") == 1


async def test_max_connections_in_all_gives_1013_server_full(
    make_config: Callable[..., Config],
) -> None:
    config = make_config(server={"max_connections": 2})
    async with running(config) as srv:
        async with connect(srv, 1, "alice") as alice, connect(srv, 2, "bob") as bob:
            async with connect(srv, 3, "carol") as extra:
                await assert_closed_1013(extra, "Server full")
            await alice.nothing_pending()
            await bob.nothing_pending()
            assert len(srv.gate.connections) == 2
        with trio.fail_after(5):
            while srv.gate.connections:  # noqa: ASYNC110
                await trio.sleep(0.01)
        async with connect(srv, 3, "carol") as carol:
            await carol.nothing_pending()


# === trusted proxies ===================================================================


def forwarded(value: str, header: bytes = b"X-Forwarded-For") -> dict[str, Any]:
    return {"extra_headers": [(header, value.encode())]}


async def test_behind_a_trusted_proxy_the_forwarded_address_is_counted(
    make_config: Callable[..., Config], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="chatd")
    config = make_config(
        server={"trusted_proxies": ["127.0.0.1"], "max_connections_per_address": 1}
    )
    async with running(config) as srv:
        async with connect(srv, 1, "alice", **forwarded("203.0.113.5")) as alice:
            await alice.nothing_pending()
            # The same client behind the proxy: over its limit of one.
            async with connect(srv, 2, "bob", **forwarded("203.0.113.5")) as again:
                await assert_closed_1013(again, "Too many connections from your address")
            # A client that claims an address, then the proxy's own hop: the
            # nearest untrusted address (the proxy's view) is the one counted.
            async with connect(srv, 2, "bob", **forwarded("198.51.100.1, 203.0.113.5")) as spoof:
                await assert_closed_1013(spoof, "Too many connections from your address")
            # Other clients through the same proxy (same TCP peer) are not held back.
            async with (
                connect(srv, 3, "carol", **forwarded("203.0.113.6")) as carol,
                connect(srv, 4, "dave", **forwarded("203.0.113.7", b"X-Real-IP")) as dave,
            ):
                await carol.nothing_pending()
                await dave.nothing_pending()
                assert srv.gate.per_address.get("127.0.0.1", 0) == 0
            await alice.nothing_pending()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "WS_CONNECT: UserID=1, IP=203.0.113.5" in text
    assert "WS_CONNECT: UserID=3, IP=203.0.113.6" in text
    assert "WS_CONNECT: UserID=4, IP=203.0.113.7" in text
    assert "WS_REFUSED: IP=203.0.113.5" in text


async def test_an_untrusted_peers_forwarded_headers_are_ignored(
    make_config: Callable[..., Config], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="chatd")
    config = make_config(
        server={"trusted_proxies": ["192.0.2.1"], "max_connections_per_address": 1}
    )
    async with running(config) as srv:
        async with connect(srv, 1, "alice", **forwarded("203.0.113.5")) as alice:
            await alice.nothing_pending()
            # Another made-up address does not buy another slot.
            async with connect(srv, 2, "bob", **forwarded("203.0.113.6")) as bob:
                await assert_closed_1013(bob, "Too many connections from your address")
            async with connect(srv, 2, "bob", **forwarded("203.0.113.7", b"X-Real-IP")) as bob:
                await assert_closed_1013(bob, "Too many connections from your address")
            await alice.nothing_pending()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "WS_CONNECT: UserID=1, IP=127.0.0.1" in text
    assert "203.0.113" not in text
