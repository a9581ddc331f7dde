"""``[limits] max_frame_bytes``: a message past it is closed 1009, whether it
comes whole, in fragments, with a huge declared length (refused at the
header) or compressed (a compression bomb, refused by its inflated size);
one under it is served. Every test runs on ``small_server`` (2048 bytes).

An endless fragmented message is in ``tests/test_abuse.py``.
"""

from __future__ import annotations

import os
import struct

import pytest
from wsproto.events import TextMessage

from chatd.server import ChatServer
from tests.helpers.clients import closed_with, connect, frame_json
from tests.helpers.raw import OP_TEXT, client_frame, raw_deflate, raw_ws

pytestmark = pytest.mark.usefixtures("collect_garbage")


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
