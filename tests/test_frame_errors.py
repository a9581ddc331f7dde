"""Protocol errors on an open WebSocket, and the frames that must still work:
invalid UTF-8 (1007); an unmasked client frame, an oversized or fragmented
control frame, a continuation with no start, an invalid close code (1002); a
125-byte ping, the client's close, a binary frame (``INVALID_FORMAT``, the
connection stays), a ping between the fragments of a message; and the order
in which the reader answers frames that come in one write, or a few bytes at
a time.

Where wsproto itself would refuse to send what is tested, the frames are
built by hand (``client_frame``, ``tests/helpers/raw.py``) and written raw.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
import trio
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from chatd.server import ChatServer
from tests.helpers.clients import connect, frame_json
from tests.helpers.raw import OP_CLOSE, OP_CONT, OP_PING, OP_TEXT, client_frame, raw_ws

pytestmark = pytest.mark.usefixtures("collect_garbage")


async def test_invalid_utf8_closes_1007(server: ChatServer) -> None:
    async with raw_ws(server) as client:
        await client.send_raw(client_frame(OP_TEXT, b'{"type":"ping","data":{"x":"\xc3\x28"}}'))
        assert await client.close_code() == 1007


async def test_invalid_utf8_after_valid_frames_closes_1007(server: ChatServer) -> None:
    async with raw_ws(server) as client:
        good = client_frame(OP_TEXT, frame_json("ping", request_id="ok").encode())
        await client.send_raw(good + client_frame(OP_TEXT, b'{"type":"\xff"}'))
        assert (await client.expect("pong"))["request_id"] == "ok"
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


async def test_fragmented_control_frame_is_1002(server: ChatServer) -> None:
    async with raw_ws(server) as client:
        await client.send_raw(client_frame(OP_PING, b"x", fin=False))
        assert await client.close_code() == 1002


async def test_continuation_without_start_is_1002(server: ChatServer) -> None:
    async with raw_ws(server) as client:
        await client.send_raw(client_frame(OP_CONT, b"orphan"))
        assert await client.close_code() == 1002


@pytest.mark.parametrize("code", [999, 1005, 1006, 2999])
async def test_invalid_close_code_from_client_is_1002(server: ChatServer, code: int) -> None:
    async with raw_ws(server) as client:
        await client.send_raw(client_frame(OP_CLOSE, struct.pack("!H", code)))
        assert await client.close_code() == 1002


async def test_client_close_is_answered(server: ChatServer) -> None:
    async with raw_ws(server) as client:
        await client.send(CloseConnection(1000, "bye"))
        event = await client.next_event()
        assert isinstance(event, CloseConnection)
        assert event.code == 1000
        assert await client.next_event() is None  # then the server closes TCP


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
