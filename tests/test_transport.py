"""End-to-end tests of the transport: plain HTTP, the WebSocket handshake,
permessage-deflate, size limits and protocol errors, slow consumers, the
handshake timeout, the heartbeat and graceful shutdown.

Everything runs against the real server on a real TCP socket. Where
trio-websocket hides what is tested (frame bits, compression, raw bytes), a
small client on wsproto (``RawWS``) is used instead, and where wsproto itself
would refuse to send what is tested (unmasked frames, bad UTF-8, huge
headers), frames are built by hand (``client_frame``).
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate

from chatd.config import Config
from chatd.server import ChatServer
from tests.helpers.clients import Client, closed_with, connect, frame_json, ws_open, ws_url
from tests.helpers.http_client import raw_http, request_bytes
from tests.helpers.raw import (
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_TEXT,
    RawWS,
    client_frame,
    raw_deflate,
    raw_ws,
)
from tests.helpers.servers import running
from tests.helpers.tokens import make_token

pytestmark = pytest.mark.usefixtures("collect_garbage")

# === 1. plain HTTP ===============================================================


async def test_healthz_get(server: ChatServer) -> None:
    async with raw_http(server) as http:
        await http.stream.send_all(request_bytes("/healthz"))
        resp = await http.response()
    assert resp.status == 200
    assert resp.headers["content-type"] == "application/json"
    body = json.loads(resp.body)
    assert body["status"] == "ok"
    assert body["connections"] == 0
    assert "version" in body


async def test_healthz_counts_websocket_connections(server: ChatServer) -> None:
    async with connect(server) as alice:
        await alice.nothing_pending()
        async with raw_http(server) as http:
            await http.stream.send_all(request_bytes("/healthz"))
            resp = await http.response()
    assert json.loads(resp.body)["connections"] == 1


async def test_healthz_head_has_no_body(server: ChatServer) -> None:
    async with raw_http(server) as http:
        await http.stream.send_all(request_bytes("/healthz", "HEAD"))
        resp = await http.response(head_request=True)
        assert resp.status == 200
        assert int(resp.headers["content-length"]) > 0  # the GET body's length
        # Nothing follows the head: a second request on the same connection
        # is answered by a response that starts right there.
        await http.stream.send_all(request_bytes("/healthz"))
        again = await http.response()
    assert again.status == 200
    assert json.loads(again.body)["status"] == "ok"


async def test_healthz_post_is_405(server: ChatServer) -> None:
    async with raw_http(server) as http:
        await http.stream.send_all(
            request_bytes("/healthz", "POST", "Content-Length: 2\r\n") + b"{}"
        )
        resp = await http.response()
    assert resp.status == 405
    assert "GET" in resp.headers["allow"]


async def test_unknown_path_is_404(server: ChatServer) -> None:
    async with raw_http(server) as http:
        await http.stream.send_all(request_bytes("/other"))
        resp = await http.response()
    assert resp.status == 404
    assert json.loads(resp.body) == {"error": "not found"}


async def test_keep_alive_answers_two_requests(server: ChatServer) -> None:
    async with raw_http(server) as http:
        await http.stream.send_all(request_bytes("/healthz"))
        first = await http.response()
        await http.stream.send_all(request_bytes("/other"))
        second = await http.response()
        # Pipelined: both requests in one write, both answered in order.
        await http.stream.send_all(request_bytes("/other") + request_bytes("/healthz"))
        third = await http.response()
        fourth = await http.response()
    assert (first.status, second.status, third.status, fourth.status) == (200, 404, 404, 200)


async def test_connection_close_is_honoured(server: ChatServer) -> None:
    async with raw_http(server) as http:
        await http.stream.send_all(request_bytes("/healthz", extra="Connection: close\r\n"))
        resp = await http.response()
        assert resp.status == 200
        assert await http.at_eof()


async def test_http_1_0_request_is_answered_then_closed(server: ChatServer) -> None:
    async with raw_http(server) as http:
        await http.stream.send_all(b"GET /healthz HTTP/1.0\r\n\r\n")
        resp = await http.response()
        assert resp.status == 200
        assert json.loads(resp.body)["status"] == "ok"
        assert await http.at_eof()


async def test_garbage_request_line_is_400(server: ChatServer) -> None:
    async with raw_http(server) as http:
        await http.stream.send_all(b"THIS IS NOT HTTP\r\n\r\n")
        resp = await http.response()
        assert resp.status == 400
        assert await http.at_eof()


async def test_oversized_incomplete_request_head_is_refused_and_closed(server: ChatServer) -> None:
    """20 KiB of head and still no blank line: refused without waiting for more."""
    partial = request_bytes("/healthz", extra="X-Big: " + "a" * 20000 + "\r\n")[:-2]
    async with raw_http(server) as http:
        await http.stream.send_all(partial)
        resp = await http.response()
        assert resp.status in (400, 431)
        assert await http.at_eof()


async def test_huge_request_head_is_refused_and_closed(server: ChatServer) -> None:
    big = "".join(f"X-Big-{n}: {'a' * 1000}\r\n" for n in range(200))
    async with raw_http(server) as http:
        try:
            await http.stream.send_all(request_bytes("/healthz", extra=big))
        except trio.BrokenResourceError:
            pass  # the server may stop reading (and close) before the end
        resp = await http.response()
        assert resp.status in (400, 431)
        assert await http.at_eof()


async def test_oversized_request_head_is_refused_and_closed(server: ChatServer) -> None:
    """A whole 20 KiB head in one write (so one read on the server): h11
    alone bounds only an incomplete head; the server must measure this one."""
    big = "X-Big: " + "a" * 20000 + "\r\n"
    async with raw_http(server) as http:
        await http.stream.send_all(request_bytes("/healthz", extra=big))
        resp = await http.response()
        assert resp.status in (400, 431)
        assert await http.at_eof()


async def test_oversized_request_body_is_refused(server: ChatServer) -> None:
    body = b"a" * 70000
    async with raw_http(server) as http:
        await http.stream.send_all(
            request_bytes("/healthz", "POST", f"Content-Length: {len(body)}\r\n") + body
        )
        resp = await http.response()
        assert resp.status == 413
        assert await http.at_eof()


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


# === 2. tokens =================================================================


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


async def test_expired_token_is_auth_failed_then_4001(server: ChatServer) -> None:
    async with connect(server, token=make_token(1, "alice", ttl=-3600)) as client:
        frame = await client.expect("error")
        assert frame["data"]["code"] == "AUTH_FAILED"
        await closed_with(client, 4001)


# === 3. permessage-deflate =======================================================

BIG = "x" * 3000


async def test_deflate_negotiated_with_server_no_context_takeover(server: ChatServer) -> None:
    async with raw_ws(server, deflate=True) as client:
        offered = client.response_headers.get("sec-websocket-extensions", "")
        assert "permessage-deflate" in offered
        assert "server_no_context_takeover" in offered
        await client.send_json("ping", request_id=1)
        pong = await client.expect("pong")
        assert pong["request_id"] == 1


async def test_deflate_round_trip_both_ways(server: ChatServer) -> None:
    async with raw_ws(server, deflate=True) as client:
        await client.send_json("join_room", {"room": "general"}, request_id="j")
        ack = await client.expect("join_room_ack")
        assert ack["request_id"] == "j"
        for n in range(2):
            # The second identical message is compressed against the first
            # (the client keeps its context), so the server must too.
            await client.send_json(
                "room_message", {"room": "general", "content": BIG}, request_id=f"m{n}"
            )
            own = await client.expect("room_message")
            assert own["request_id"] == f"m{n}"
            assert own["data"]["content"] == BIG

        sent = [f for f in client.frames_out if f.opcode == OP_TEXT]
        assert sent and all(f.rsv1 for f in sent), "the client's frames went out compressed"
        assert all(len(f.payload) < len(BIG) // 10 for f in sent[1:])

        received = [f for f in client.frames_in if f.opcode == OP_TEXT]
        assert all(f.rsv1 for f in received)  # join_room_ack too: it is >= 128 bytes
        messages = received[-2:]
        for frame in messages:
            # Each frame on the wire is a compressed copy of the JSON that
            # stands alone (server_no_context_takeover): a fresh inflater
            # reads it.
            assert len(frame.payload) < len(BIG) // 10
            plain = zlib.decompressobj(-15).decompress(frame.payload + b"\x00\x00\xff\xff")
            assert json.loads(plain)["data"]["content"] == BIG


async def test_deflate_to_other_room_members(server: ChatServer) -> None:
    """A compressed and an uncompressed client in one room get the same
    message, each in its own form."""
    async with (
        raw_ws(server, user_id=1, username="alice", deflate=True) as alice,
        raw_ws(server, user_id=2, username="bob") as bob,
    ):
        await alice.send_json("join_room", {"room": "general"})
        await alice.expect("join_room_ack")
        await bob.send_json("join_room", {"room": "general"})
        await bob.expect("join_room_ack")
        await alice.expect("user_connected")
        await alice.send_json("room_message", {"room": "general", "content": BIG}, request_id=1)
        assert (await alice.expect("room_message"))["data"]["content"] == BIG
        assert (await bob.expect("room_message"))["data"]["content"] == BIG
        assert any(f.rsv1 and f.opcode == OP_TEXT for f in alice.frames_in)
        assert "sec-websocket-extensions" not in bob.response_headers
        bob_text = [f for f in bob.frames_in if f.opcode == OP_TEXT]
        assert bob_text and not any(f.rsv1 for f in bob_text)
        assert any(BIG.encode() in f.payload for f in bob_text)


async def test_deflate_small_window_is_respected(server: ChatServer) -> None:
    """A client that asks for server_max_window_bits=9 can inflate what it
    gets with a 512-byte window."""
    text = "".join(chr(0x41 + (i * 7919) % 26) for i in range(3000))
    offer = PerMessageDeflate(server_max_window_bits=9)
    async with raw_ws(server, deflate=offer) as client:
        assert "server_max_window_bits=9" in client.response_headers["sec-websocket-extensions"]
        await client.send_json("join_room", {"room": "general"})
        await client.expect("join_room_ack")
        await client.send_json("room_message", {"room": "general", "content": text}, request_id=1)
        own = await client.expect("room_message")
        assert own["data"]["content"] == text
        frame = [f for f in client.frames_in if f.opcode == OP_TEXT][-1]
        assert frame.rsv1
        plain = zlib.decompressobj(-9).decompress(frame.payload + b"\x00\x00\xff\xff")
        assert json.loads(plain)["data"]["content"] == text


async def test_deflate_refused_when_disabled(make_config: Callable[..., Config]) -> None:
    async with running(make_config(server={"compression": False})) as srv:
        async with raw_ws(srv, deflate=True) as client:
            assert "sec-websocket-extensions" not in client.response_headers
            await client.send_json("join_room", {"room": "general"})
            await client.expect("join_room_ack")
            await client.send_json(
                "room_message", {"room": "general", "content": BIG}, request_id=1
            )
            await client.expect("room_message")
            assert not any(f.rsv1 for f in client.frames_in)
            assert not any(f.rsv1 for f in client.frames_out)


async def test_plain_client_gets_plain_frames(server: ChatServer) -> None:
    async with raw_ws(server) as client:
        assert "sec-websocket-extensions" not in client.response_headers
        await client.send_json("join_room", {"room": "general"})
        await client.expect("join_room_ack")
        await client.send_json("room_message", {"room": "general", "content": BIG}, request_id=1)
        own = await client.expect("room_message")
        assert own["data"]["content"] == BIG
        text = [f for f in client.frames_in if f.opcode == OP_TEXT]
        assert not any(f.rsv1 for f in text)
        assert json.loads(text[-1].payload)["data"]["content"] == BIG


async def test_rsv1_without_deflate_is_protocol_error(server: ChatServer) -> None:
    async with raw_ws(server) as client:
        await client.send_raw(
            client_frame(OP_TEXT, raw_deflate(frame_json("ping").encode()), rsv1=True)
        )
        assert await client.close_code() == 1002


async def test_corrupt_deflate_data_closes(server: ChatServer) -> None:
    async with raw_ws(server, deflate=True) as client:
        await client.send_raw(client_frame(OP_TEXT, b"\xff\xff\xff\xff garbage", rsv1=True))
        assert await client.close_code() == 1007


# === 4. size limits and protocol errors ==========================================


def padded_ping(size: int, request_id: str = "p") -> str:
    """A valid ``ping`` frame (unknown fields are ignored) of about ``size``
    bytes: without the size limit the server would answer it."""
    base = frame_json("ping", request_id=request_id, pad="")
    return frame_json("ping", request_id=request_id, pad="a" * (size - len(base)))


async def test_message_under_the_limit_is_served(small_server: ChatServer) -> None:
    async with raw_ws(small_server) as client:
        await client.send(TextMessage(padded_ping(2000)))
        assert (await client.expect("pong"))["request_id"] == "p"


async def test_text_over_max_frame_bytes_closes_1009(small_server: ChatServer) -> None:
    async with raw_ws(small_server) as client:
        await client.send(TextMessage(padded_ping(3000)))
        assert await client.close_code() == 1009


async def test_trio_websocket_client_sees_1009(small_server: ChatServer) -> None:
    async with connect(small_server) as client:
        await client.send_raw(padded_ping(3000))
        await closed_with(client, 1009)


async def test_fragmented_message_over_the_limit_closes_1009(small_server: ChatServer) -> None:
    """Each fragment is small; together they pass the limit."""
    text = padded_ping(3000)
    async with raw_ws(small_server) as client:
        for start in range(0, len(text), 1000):
            chunk = text[start : start + 1000]
            await client.send(TextMessage(chunk, message_finished=start + 1000 >= len(text)))
        assert await client.close_code() == 1009


async def test_fragmented_message_under_the_limit_is_served(small_server: ChatServer) -> None:
    text = padded_ping(1800)
    async with raw_ws(small_server) as client:
        for start in range(0, len(text), 500):
            chunk = text[start : start + 500]
            await client.send(TextMessage(chunk, message_finished=start + 500 >= len(text)))
        assert (await client.expect("pong"))["request_id"] == "p"


async def test_huge_declared_length_closes_1009_at_the_header(small_server: ChatServer) -> None:
    async with raw_ws(small_server) as client:
        header = struct.pack("!BBQ", 0x81, 0x80 | 127, 2**40) + os.urandom(4)
        await client.send_raw(header)
        assert await client.close_code(timeout=2) == 1009


async def test_compression_bomb_closes_1009(small_server: ChatServer) -> None:
    """A valid ping padded with 200 000 spaces deflates to a few hundred
    bytes (under the limit on the wire), but inflates far past it."""
    bomb = frame_json("ping", request_id="p") + " " * 200_000
    async with raw_ws(small_server, deflate=True) as client:
        await client.send(TextMessage(bomb))
        sent = client.frames_out[-1]
        assert sent.rsv1 and len(sent.payload) < 2048
        assert await client.close_code() == 1009


async def test_compressed_message_under_the_limit_is_served(small_server: ChatServer) -> None:
    text = frame_json("ping", request_id="p") + " " * 1900
    async with raw_ws(small_server, deflate=True) as client:
        await client.send(TextMessage(text))
        assert client.frames_out[-1].rsv1
        assert (await client.expect("pong"))["request_id"] == "p"


async def test_hand_built_compression_bomb_closes_1009(small_server: ChatServer) -> None:
    payload = raw_deflate(b'{"type":"ping","data":{}}' + b" " * 1_000_000)
    assert len(payload) < 2048
    async with raw_ws(small_server, deflate=True) as client:
        await client.send_raw(client_frame(OP_TEXT, payload, rsv1=True))
        assert await client.close_code() == 1009


async def test_invalid_utf8_closes_1007(server: ChatServer) -> None:
    async with raw_ws(server) as client:
        await client.send_raw(client_frame(OP_TEXT, b'{"type":"ping","data":{"x":"\xc3\x28"}}'))
        assert await client.close_code() == 1007


async def test_unmasked_client_frame_closes_1002(server: ChatServer) -> None:
    async with raw_ws(server) as client:
        await client.send_raw(client_frame(OP_TEXT, frame_json("ping").encode(), mask=False))
        assert await client.close_code() == 1002


async def test_oversized_control_frame_closes_1002(server: ChatServer) -> None:
    async with raw_ws(server) as client:
        await client.send_raw(client_frame(OP_PING, b"p" * 126))
        assert await client.close_code() == 1002


async def test_max_size_control_frame_is_answered(server: ChatServer) -> None:
    async with raw_ws(server) as client:
        await client.send(Ping(b"p" * 125))
        event = await client.next_event()
        assert isinstance(event, Pong)
        assert event.payload == b"p" * 125


async def test_binary_frame_is_invalid_format_and_connection_stays(server: ChatServer) -> None:
    async with raw_ws(server) as client:
        await client.send(BytesMessage(b"\x00\x01binary"))
        err = await client.expect("error")
        assert err["data"]["code"] == "INVALID_FORMAT"
        await client.send_json("ping", request_id="after")
        pong = await client.expect("pong")
        assert pong["request_id"] == "after"


async def test_binary_frame_with_trio_websocket(server: ChatServer) -> None:
    async with connect(server) as client:
        await client.send_raw(b"\x00\x01binary")
        err = await client.expect("error")
        assert err["data"]["code"] == "INVALID_FORMAT"
        await client.nothing_pending()


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


async def test_client_close_is_answered(server: ChatServer) -> None:
    async with raw_ws(server) as client:
        await client.send(CloseConnection(1000, "bye"))
        event = await client.next_event()
        assert isinstance(event, CloseConnection)
        assert event.code == 1000
        assert await client.next_event() is None  # then the server closes TCP


@pytest.mark.parametrize("code", [999, 1005, 1006, 2999])
async def test_invalid_close_code_from_client_is_1002(server: ChatServer, code: int) -> None:
    async with raw_ws(server) as client:
        await client.send_raw(client_frame(OP_CLOSE, struct.pack("!H", code)))
        assert await client.close_code() == 1002


async def test_continuation_without_start_is_1002(server: ChatServer) -> None:
    async with raw_ws(server) as client:
        await client.send_raw(client_frame(OP_CONT, b"orphan"))
        assert await client.close_code() == 1002


async def test_fragmented_control_frame_is_1002(server: ChatServer) -> None:
    async with raw_ws(server) as client:
        await client.send_raw(client_frame(OP_PING, b"x", fin=False))
        assert await client.close_code() == 1002


async def test_ping_between_fragments_is_answered(server: ChatServer) -> None:
    text = frame_json("ping", request_id="frag").encode()
    async with raw_ws(server) as client:
        await client.send_raw(client_frame(OP_TEXT, text[:10], fin=False))
        await client.send_raw(client_frame(OP_PING, b"hb"))
        event = await client.next_event()
        assert isinstance(event, Pong)
        assert event.payload == b"hb"
        await client.send_raw(client_frame(OP_CONT, text[10:]))
        assert (await client.expect("pong"))["request_id"] == "frag"


async def test_mixed_frames_in_one_write_keep_their_order(server: ChatServer) -> None:
    """The reader parses plain text frames itself and hands every other frame
    to wsproto whole: in one write, whole messages, a fragmented one with a
    ping between its fragments, a 126-length frame, an empty text and a
    ping come back answered in the order sent."""
    long_id = "L" * 60
    frames = [
        client_frame(OP_TEXT, frame_json("ping", request_id="a").encode()),
        client_frame(OP_TEXT, frame_json("ping", request_id="b").encode()[:7], fin=False),
        client_frame(OP_PING, b"p1"),
        client_frame(OP_CONT, frame_json("ping", request_id="b").encode()[7:]),
        client_frame(OP_TEXT, frame_json("ping", request_id=long_id, pad="x" * 200).encode()),
        client_frame(OP_TEXT, frame_json("ping", request_id="d").encode()),
        client_frame(OP_PING, b"p2"),
        client_frame(OP_TEXT, frame_json("ping", request_id="e").encode()),
    ]
    async with raw_ws(server) as client:
        await client.send_raw(b"".join(frames))
        seen: list[Any] = []
        while len(seen) < 6:
            event = await client.next_event()
            if isinstance(event, Pong):
                seen.append(event.payload)
            else:
                assert isinstance(event, TextMessage)
                seen.append(json.loads(event.data)["request_id"])
        assert seen == ["a", b"p1", "b", long_id, "d", b"p2"]
        assert (await client.expect("pong"))["request_id"] == "e"


async def test_frames_split_at_every_byte_are_parsed(server: ChatServer) -> None:
    """Frames that arrive a few bytes at a time (headers and masks cut
    anywhere) are put together before they are parsed."""
    data = b"".join(
        client_frame(OP_TEXT, frame_json("ping", request_id=f"s{i}", pad="y" * n).encode())
        for i, n in enumerate((0, 90, 130, 300))
    ) + client_frame(OP_PING, b"end")
    async with raw_ws(server) as client:
        for k in range(0, len(data), 3):
            await client.send_raw(data[k : k + 3])
            await trio.sleep(0.001)
        for i in range(4):
            assert (await client.expect("pong"))["request_id"] == f"s{i}"
        event = await client.next_event()
        assert isinstance(event, Pong) and event.payload == b"end"


async def test_invalid_utf8_after_valid_frames_closes_1007(server: ChatServer) -> None:
    async with raw_ws(server) as client:
        good = client_frame(OP_TEXT, frame_json("ping", request_id="ok").encode())
        await client.send_raw(good + client_frame(OP_TEXT, b'{"type":"\xff"}'))
        assert (await client.expect("pong"))["request_id"] == "ok"
        assert await client.close_code() == 1007


# === 5. slow consumer ==============================================================


async def test_slow_consumer_is_closed_others_get_everything(
    make_config: Callable[..., Config],
) -> None:
    config = make_config(
        server={"send_buffer_bytes": 65536},
        limits={"messages_per_minute": 1_000_000, "messages_per_hour": 1_000_000},
    )
    batch = 20
    max_batches = 250  # 5000 messages of ~3 KB: 15 MB, far past any kernel buffer
    async with running(config) as srv:
        async with (
            raw_ws(srv, user_id=3, username="carol", rcvbuf=4096) as stalled,
            connect(srv, 2, "bob") as bob,
            connect(srv, 1, "alice") as alice,
        ):
            await stalled.send_json("join_room", {"room": "general"})
            # Read the ack only: from here on carol never reads again.
            await stalled.expect("join_room_ack")
            await bob.join("general")
            await alice.join("general")
            await bob.expect("user_connected")

            def stalled_conn() -> Any:
                return next((c for c in srv.connections if c.identity.user_id == 3), None)

            sent = 0
            with trio.fail_after(120):
                for _ in range(max_batches):
                    for _ in range(batch):
                        content = f"{sent:06d}:" + "m" * 3000
                        await alice.send(
                            "room_message", {"room": "general", "content": content}, request_id=sent
                        )
                        sent += 1
                    # alice and bob read everything, in order.
                    for n in range(sent - batch, sent):
                        own = await alice.expect("room_message")
                        assert own["request_id"] == n
                        got = await bob.expect("room_message")
                        assert got["data"]["content"].startswith(f"{n:06d}:")
                    conn = stalled_conn()
                    if conn is None or conn.close_code is not None:
                        break
                else:
                    pytest.fail("the stalled client was never closed")

                conn = stalled_conn()
                assert conn is None or conn.close_code == 1013
                # The others were not held up, and still are not.
                await alice.nothing_pending()
                await bob.nothing_pending()

                # Now carol reads: a prefix of the messages, whole and in
                # order, then the 1013 close (or EOF).
                seen: list[int] = []
                parts: list[str] = []
                code: int | None = None
                while True:
                    event = await stalled.next_event(timeout=30)
                    if event is None:
                        break
                    if isinstance(event, CloseConnection):
                        code = event.code
                        await stalled.send(event.response())
                        break
                    if isinstance(event, TextMessage):
                        parts.append(event.data)
                        if event.message_finished:
                            frame = json.loads("".join(parts))
                            parts.clear()
                            if frame["type"] == "room_message":
                                seen.append(int(frame["data"]["content"][:6]))
                assert not parts, "a message was cut"
                assert code in (1013, None)
                assert seen == list(range(len(seen)))
                assert len(seen) < sent
                # The server then closes the TCP connection and forgets carol.
                assert await stalled.next_event() is None
                await trio.testing.wait_all_tasks_blocked()
                assert stalled_conn() is None
        assert code == 1013


# === 6. handshake timeout ==========================================================


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


# === 7. heartbeat ================================================================


def heartbeat_config(make_config: Callable[..., Config]) -> Config:
    return make_config(server={"ping_interval_seconds": 30, "idle_timeout_seconds": 75})


async def test_server_pings_after_interval(
    slow_autojump_clock: trio.testing.MockClock, make_config: Callable[..., Config]
) -> None:
    async with running(heartbeat_config(make_config)) as srv:
        async with raw_ws(srv) as client:
            start = trio.current_time()
            event = await client.next_event(timeout=60)
            assert isinstance(event, Ping), event
            assert 29 <= trio.current_time() - start <= 31
            # A second one, one interval later.
            await client.send(event.response())
            event = await client.next_event(timeout=60)
            assert isinstance(event, Ping), event
            assert 59 <= trio.current_time() - start <= 61


async def test_silent_client_is_dropped_after_idle_timeout(
    slow_autojump_clock: trio.testing.MockClock, make_config: Callable[..., Config]
) -> None:
    async with running(heartbeat_config(make_config)) as srv:
        async with raw_ws(srv) as client:
            start = trio.current_time()
            pings = 0
            with trio.fail_after(300):
                while True:
                    event = await client.next_event(timeout=300)
                    if event is None:
                        break
                    assert isinstance(event, Ping), event  # never answered
                    pings += 1
            elapsed = trio.current_time() - start
    assert pings == 2  # at 30 s and 60 s
    assert 74 <= elapsed <= 77


async def test_client_sending_pings_stays_connected(
    slow_autojump_clock: trio.testing.MockClock, make_config: Callable[..., Config]
) -> None:
    async with running(heartbeat_config(make_config)) as srv:
        async with raw_ws(srv) as client:
            start = trio.current_time()
            n = 0
            while trio.current_time() - start < 160:
                await trio.sleep(20)
                # Server pings are read but never answered: only the
                # application pings show that the client is alive.
                await client.send_json("ping", request_id=n)
                pong = await client.expect("pong", timeout=30)
                assert pong["request_id"] == n
                n += 1
            assert not client.eof
            assert client.pings >= 4
            await client.send_json("join_room", {"room": "general"})
            await client.expect("join_room_ack")


async def test_client_answering_pings_stays_connected(
    slow_autojump_clock: trio.testing.MockClock, make_config: Callable[..., Config]
) -> None:
    async with running(heartbeat_config(make_config)) as srv:
        async with raw_ws(srv) as client:
            start = trio.current_time()
            pings = 0
            while trio.current_time() - start < 200:
                event = await client.next_event(timeout=60)
                assert isinstance(event, Ping), event
                await client.send(event.response())
                pings += 1
            assert pings >= 6
            await client.send_json("ping", request_id="alive")
            assert (await client.expect("pong"))["request_id"] == "alive"


async def test_trio_websocket_client_survives_heartbeat(
    slow_autojump_clock: trio.testing.MockClock, make_config: Callable[..., Config]
) -> None:
    """trio-websocket answers pings by itself: an idle but healthy client is
    never dropped."""
    async with running(heartbeat_config(make_config)) as srv:
        async with connect(srv) as client:
            await trio.sleep(300)
            await client.nothing_pending()


# === 8. graceful shutdown =========================================================


async def test_shutdown_closes_1001_and_keeps_acknowledged_messages(
    make_config: Callable[..., Config],
) -> None:
    config = make_config()
    async with running(config) as srv:
        async with connect(srv) as alice:
            await alice.join("general")
            await alice.send(
                "room_message", {"room": "general", "content": "last words"}, request_id=9
            )
            own = await alice.expect("room_message")
            assert own["request_id"] == 9
            message_id = own["data"]["id"]
            srv.stop()
            await closed_with(alice, 1001)

    async with running(make_config()) as srv:
        async with connect(srv, 2, "bob") as bob:
            history = await bob.request("room_history", {"room": "general"})
    assert history["type"] == "message_history"
    messages = history["data"]["messages"]
    assert [(m["id"], m["content"]) for m in messages] == [(message_id, "last words")]


async def test_shutdown_does_not_wait_forever_for_a_silent_client(
    slow_autojump_clock: trio.testing.MockClock, make_config: Callable[..., Config]
) -> None:
    """A client that never answers the 1001 close is cut off by the server."""
    config = make_config(server={"shutdown_timeout_seconds": 5})
    with trio.fail_after(60):
        async with running(config) as srv:
            async with raw_ws(srv) as client:
                await client.send_json("ping")
                await client.expect("pong")
                srv.stop()
                stopped = trio.current_time()
                event = await client.next_event(timeout=30)
                assert isinstance(event, CloseConnection) and event.code == 1001
                # Not answered: the server closes the TCP connection anyway.
                assert await client.next_event(timeout=30) is None
                assert trio.current_time() - stopped <= 6


async def test_shutdown_closes_every_client_and_refuses_new_ones(
    make_config: Callable[..., Config],
) -> None:
    async with running(make_config()) as srv:
        port = srv.port
        async with connect(srv, 1, "alice") as alice, connect(srv, 2, "bob") as bob:
            await alice.nothing_pending()
            await bob.nothing_pending()
            srv.stop()
            for client in (alice, bob):
                await closed_with(client, 1001)
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)


async def test_shutdown_commits_a_burst_sent_before_stop(
    make_config: Callable[..., Config],
) -> None:
    """Every message acknowledged before the stop is in the database."""
    count = 30
    async with running(make_config()) as srv:
        async with connect(srv) as alice:
            await alice.join("general")
            for n in range(count):
                await alice.send(
                    "room_message", {"room": "general", "content": f"m{n}"}, request_id=n
                )
            ids = []
            for n in range(count):
                own = await alice.expect("room_message")
                assert own["request_id"] == n
                ids.append(own["data"]["id"])
            srv.stop()
            await closed_with(alice, 1001)

    async with running(make_config()) as srv:
        async with connect(srv, 2, "bob") as bob:
            history = await bob.request("room_history", {"room": "general", "limit": 100})
    messages = history["data"]["messages"]
    assert [m["id"] for m in messages] == ids
    assert [m["content"] for m in messages] == [f"m{n}" for n in range(count)]
