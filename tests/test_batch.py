"""``message_batch`` both ways, end to end.

Client to server: entries are handled in order, each as if sent alone.
Server to client: only a client that connected with ``?batch=1`` ever gets one.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from trio_websocket import open_websocket_url

from tests.helpers.clients import Client, closed_with, connect, ws_url
from tests.helpers.clocks import WallClock
from tests.helpers.servers import running
from tests.helpers.tokens import make_token


def entry(type_: str, data: Any, request_id: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": type_, "data": data}
    if request_id is not None:
        out["request_id"] = request_id
    return out


def say(content: str, request_id: Any = None, room: str = "general") -> dict[str, Any]:
    return entry("room_message", {"room": room, "content": content}, request_id)


async def collect(client: Client, count: int) -> dict[Any, dict[str, Any]]:
    """The next ``count`` frames, by request_id (each must carry one)."""
    frames = [await client.recv() for _ in range(count)]
    by_rid = {f.get("request_id"): f for f in frames}
    assert len(by_rid) == count and None not in by_rid, frames
    return by_rid


async def test_entries_run_in_order_each_answered_alone(server):
    async with connect(server, 1, "alice") as alice, connect(server, 2, "bob") as bob:
        await bob.join("general")
        # The message needs the join before it, the history needs the message.
        batch = [
            entry("join_room", {"room": "general"}, "j"),
            say("hello", "m"),
            entry("ping", {}, "p"),
            entry("room_history", {"room": "general"}, "h"),
        ]
        await alice.send("message_batch", {"messages": batch}, request_id="whole")
        got = await collect(alice, 4)
        assert got["j"]["type"] == "join_room_ack"
        assert got["m"]["type"] == "room_message" and got["m"]["data"]["content"] == "hello"
        assert got["p"]["type"] == "pong"
        assert got["h"]["type"] == "message_history"
        assert got["h"]["data"]["messages"] == [got["m"]["data"]]
        await alice.nothing_pending()  # nothing for the batch as a whole

        assert (await bob.expect("user_connected"))["data"]["user_id"] == 1
        live = await bob.expect("room_message")
        assert live["data"] == got["m"]["data"] and "request_id" not in live
        await bob.nothing_pending()


async def test_each_entry_counts_for_the_rate_limit(make_config, db_path):
    config = make_config(limits={"messages_per_minute": 3, "messages_per_hour": 100})
    async with running(config) as server:
        async with connect(server, 1, "alice") as alice, connect(server, 2, "bob") as bob:
            await alice.join("general")
            await bob.join("general")
            await alice.expect("user_connected")
            batch = [say(f"b{i}", i) for i in range(5)]
            await alice.send("message_batch", {"messages": batch})
            frames = [await alice.recv() for _ in range(5)]

            delivered = [f for f in frames if f["type"] == "room_message"]
            refused = [f for f in frames if f["type"] == "error"]
            assert [f["request_id"] for f in delivered] == [0, 1, 2]
            assert [f["data"]["content"] for f in delivered] == ["b0", "b1", "b2"]
            ids = [f["data"]["id"] for f in delivered]
            assert ids == sorted(ids)
            assert [f["request_id"] for f in refused] == [3, 4]
            for err in refused:
                assert err["data"]["code"] == "RATE_LIMITED"
                assert err["data"]["details"]["retry_after"] >= 1

            seen = [(await bob.expect("room_message"))["data"]["content"] for _ in range(3)]
            assert seen == ["b0", "b1", "b2"]
            await bob.nothing_pending()
            await alice.nothing_pending()
    with sqlite3.connect(db_path) as db:
        contents = [r[0] for r in db.execute("SELECT content FROM messages ORDER BY id")]
    assert contents == ["b0", "b1", "b2"]


async def test_a_bad_entry_fails_alone(server):
    async with connect(server) as alice:
        await alice.join("general")
        batch = [
            say("first", "a"),
            entry("room_message", {"room": 5, "content": "x"}, "b"),
            entry("warp_drive", {}, "c"),
            entry("join_room", {"room": "nowhere"}, "d"),
            say("x" * 5000, "e"),
            say("last", "f"),
        ]
        await alice.send("message_batch", {"messages": batch})
        got = await collect(alice, 6)
        assert got["a"]["data"]["content"] == "first"
        assert got["b"]["data"]["code"] == "INVALID_FORMAT"
        assert got["b"]["data"]["details"]["field"] == "data.room"
        assert got["c"]["data"]["code"] == "INVALID_FORMAT"
        assert got["c"]["data"]["details"]["field"] == "type"
        assert got["d"]["data"]["code"] == "ROOM_NOT_FOUND"
        assert got["e"]["data"]["code"] == "MESSAGE_TOO_LONG"
        assert got["f"]["type"] == "room_message" and got["f"]["data"]["content"] == "last"
        await alice.nothing_pending()
        history = await alice.request("room_history", {"room": "general"})
        assert [m["content"] for m in history["data"]["messages"]] == ["first", "last"]


async def test_more_than_100_entries_is_one_invalid_format(server):
    async with connect(server, 1, "alice") as alice, connect(server, 2, "bob") as bob:
        await alice.join("general")
        await bob.join("general")
        await alice.expect("user_connected")
        batch = [say(f"m{i}", i) for i in range(101)]
        await alice.send("message_batch", {"messages": batch}, request_id="big")
        err = await alice.expect("error")
        assert err["request_id"] == "big"
        assert err["data"]["code"] == "INVALID_FORMAT"
        assert err["data"]["details"]["field"] == "data.messages"
        await alice.nothing_pending()
        await bob.nothing_pending()  # not one entry ran

        await alice.send("message_batch", {"messages": batch[:100]})
        got = await collect(alice, 100)
        assert all(f["type"] == "room_message" for f in got.values())


async def test_a_batch_inside_a_batch_is_refused_for_that_entry(server):
    async with connect(server) as alice:
        await alice.join("general")
        inner = {"messages": [say("nested", "n")]}
        batch = [say("before", "a"), entry("message_batch", inner, "inner"), say("after", "b")]
        await alice.send("message_batch", {"messages": batch})
        got = await collect(alice, 3)
        assert got["inner"]["type"] == "error"
        assert got["inner"]["data"]["code"] == "INVALID_FORMAT"
        assert got["inner"]["data"]["details"]["field"] == "type"
        assert got["a"]["data"]["content"] == "before"
        assert got["b"]["data"]["content"] == "after"
        await alice.nothing_pending()  # "nested" never ran


# --- server -> client ---------------------------------------------------------


@asynccontextmanager
async def connect_batching(server: Any, user_id: int, username: str) -> AsyncIterator[Client]:
    url = ws_url(server, make_token(user_id, username), batch="1")
    async with open_websocket_url(url) as ws:
        yield Client(ws)
    await ws._stream.aclose()  # see conftest.connect


async def flat(client: Client, count: int) -> tuple[list[dict[str, Any]], int]:
    """Receive until ``count`` frames were seen, unwrapping batches; also
    return how many ``message_batch`` frames carried them."""
    frames: list[dict[str, Any]] = []
    batches = 0
    while len(frames) < count:
        frame = await client.recv()
        if frame["type"] == "message_batch":
            batches += 1
            assert frame["timestamp"].endswith("Z")
            assert set(frame["data"]) == {"messages"}
            inner = frame["data"]["messages"]
            assert isinstance(inner, list) and len(inner) >= 2
            assert all(not isinstance(f.get("data"), str) for f in inner)
            frames.extend(inner)
        else:
            frames.append(frame)
    assert len(frames) == count, frames
    return frames, batches


async def five_messages(server: Any) -> list[dict[str, Any]]:
    async with connect(server, 1, "alice") as alice:
        await alice.join("general")
        out = []
        for i in range(5):
            frame = await alice.request("room_message", {"room": "general", "content": f"m{i + 1}"})
            out.append(frame["data"])
    return out


async def test_a_batch_client_gets_a_recovery_in_message_batch_frames(server):
    sent = await five_messages(server)
    async with connect_batching(server, 2, "bob") as bob:
        await bob.send("join_room", {"room": "general", "since_id": 0}, request_id="j")
        frames, batches = await flat(bob, 6)
        assert batches >= 1
        ack, *replayed = frames
        assert ack["type"] == "join_room_ack" and ack["request_id"] == "j"
        assert ack["data"]["recovered"] is True
        assert [f["type"] for f in replayed] == ["room_message"] * 5
        assert [f["data"] for f in replayed] == sent
        assert [f["data"]["content"] for f in replayed] == ["m1", "m2", "m3", "m4", "m5"]
        assert all(f["user_id"] == 1 and f["timestamp"].endswith("Z") for f in replayed)
        # A lone frame is sent as it is.
        pong = await bob.request("ping", {}, request_id="p")
        assert pong["type"] == "pong" and pong["request_id"] == "p"


async def test_without_batch_1_no_message_batch_is_ever_sent(server):
    sent = await five_messages(server)
    for query in ({}, {"batch": "0"}, {"batch": "true"}):
        url = ws_url(server, make_token(2, "bob"), **query)
        async with open_websocket_url(url) as ws:
            bob = Client(ws)
            await bob.send("join_room", {"room": "general", "since_id": 0}, request_id="j")
            frames = [await bob.recv() for _ in range(6)]
            assert [f["type"] for f in frames] == ["join_room_ack"] + ["room_message"] * 5
            assert [f["data"] for f in frames[1:]] == sent
            await bob.nothing_pending()
            await bob.send("leave_room", {"room": "general"})
            assert json.loads(await ws.get_message())["type"] == "leave_room_ack"
        await ws._stream.aclose()


async def test_an_expired_token_stops_the_batch(make_config, db_path):
    wall = WallClock()
    async with running(make_config(), wall=wall) as server:
        async with connect(server, token=make_token(1, "alice", ttl=60)) as alice:
            await alice.join("general")
            wall.offset = 3600
            batch = [entry("ping", {}, "p"), say("late", "m"), entry("ping", {}, "q")]
            await alice.send("message_batch", {"messages": batch})
            assert (await alice.expect("pong"))["request_id"] == "p"
            err = await alice.expect("error")
            assert err["request_id"] == "m" and err["data"]["code"] == "AUTH_FAILED"
            await closed_with(alice, 4001)  # no pong for "q"
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (0,)
