"""permessage-deflate (RFC 7692): negotiated with
``server_no_context_takeover``, compressed both ways, each client of a room
getting the message in its own form, a small ``server_max_window_bits``
respected, refused when ``[server] compression = false``; RSV1 without the
extension is 1002 and corrupt deflate data 1007.

``RawWS`` (``tests/helpers/raw.py``) records the frames on the wire, so the
tests see the RSV1 bit and the compressed payloads. What a compressed
message may inflate to is in ``tests/test_frame_limits.py``.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable

import pytest
from wsproto.extensions import PerMessageDeflate

from chatd.config import Config
from chatd.server import ChatServer
from tests.helpers.clients import frame_json
from tests.helpers.raw import OP_TEXT, client_frame, raw_deflate, raw_ws
from tests.helpers.servers import running

pytestmark = pytest.mark.usefixtures("collect_garbage")


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
