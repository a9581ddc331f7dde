"""Big rooms, end to end on one real server: the ack's member list and count,
``room_members`` pages, presence summarised above ``presence_max_members``,
and many clients reconnecting at once with ``since_id`` while the room
talks (each gets every message once, in order).

The summaries come from the server's once-a-second task: these tests run on
``slow_autojump_clock`` (virtual time that jumps when the server, its SQLite
thread included, is idle), so a second costs no real time.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import trio
import trio.testing

from chatd.config import Config
from tests.helpers.clients import Client, connect
from tests.helpers.servers import running


def ids(members: list[dict[str, Any]]) -> list[int]:
    return [m["user_id"] for m in members]


async def post(client: Client, content: str) -> int:
    """Send a message to general; its id, from the sender's own copy (the
    frames before it, presence, are skipped)."""
    await client.send("room_message", {"room": "general", "content": content}, content)
    while True:
        frame = await client.recv()
        if frame["type"] == "room_message" and frame.get("request_id") == content:
            return int(frame["data"]["id"])


async def test_the_ack_counts_every_member_and_lists_the_first_ones(
    make_config: Callable[..., Config], slow_autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(limits={"ack_members": 2})
    async with running(config) as server, AsyncExitStack() as stack:
        for uid in (30, 10, 20):
            client = await stack.enter_async_context(connect(server, uid, f"u{uid}"))
            await client.join("general")
        ann = await stack.enter_async_context(connect(server, 5, "ann"))
        ack = (await ann.join("general"))["data"]
        assert ack["member_count"] == 4
        assert ack["members"] == [
            {"user_id": 5, "username": "ann"},
            {"user_id": 10, "username": "u10"},
        ]
        page = await ann.request("room_members", {"room": "general", "after_user_id": 10}, "p")
        assert page["type"] == "room_members_ack" and page["request_id"] == "p"
        assert ids(page["data"]["members"]) == [20, 30]
        assert page["data"] == {**page["data"], "member_count": 4, "has_more": False}


async def test_presence_in_a_big_room_comes_as_summaries(
    make_config: Callable[..., Config], slow_autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(limits={"presence_max_members": 2})
    async with running(config) as server:
        async with connect(server, 1, "ann") as ann, connect(server, 2, "bob") as bob:
            await ann.join("general")
            await bob.join("general")
            # Two members: small, announced one by one.
            assert (await ann.expect("user_connected"))["data"]["user_id"] == 2
            async with connect(server, 3, "cat") as cat, connect(server, 4, "dan") as dan:
                await cat.join("general")
                await dan.join("general")
                summary = (await ann.expect("room_presence"))["data"]
                assert summary == {
                    "room": "general",
                    "member_count": 4,
                    "joined": [
                        {"user_id": 3, "username": "cat"},
                        {"user_id": 4, "username": "dan"},
                    ],
                    "left": [],
                    "truncated": False,
                }
                assert (await bob.expect("room_presence"))["data"] == summary
                # cat joined before dan's summary: it gets the same frame.
                assert (await cat.expect("room_presence"))["data"] == summary
                await ann.nothing_pending()
            left = (await ann.expect("room_presence"))["data"]
            assert sorted(ids(left["left"])) == [3, 4] and left["member_count"] == 2
            # Small again: one by one.
            await bob.ws.aclose()
            gone = await ann.expect("user_disconnected")
            assert gone["data"]["user_id"] == 2
            await ann.nothing_pending()


async def test_below_the_threshold_nothing_changes(
    make_config: Callable[..., Config], slow_autojump_clock: trio.testing.MockClock
) -> None:
    """The default threshold (100): a room of a few gets user_connected and
    user_disconnected as the protocol document has them, and no summary."""
    async with running(make_config()) as server:
        async with connect(server, 1, "ann") as ann:
            await ann.join("general")
            async with connect(server, 2, "bob") as bob:
                await bob.join("general")
                assert (await ann.expect("user_connected"))["data"]["username"] == "bob"
            assert (await ann.expect("user_disconnected"))["data"]["username"] == "bob"
            await trio.sleep(3)  # a few ticks of the summary task
            await ann.nothing_pending()


async def test_clients_reconnecting_at_once_get_every_message_once_in_order(
    make_config: Callable[..., Config], slow_autojump_clock: trio.testing.MockClock
) -> None:
    """40 clients (more than replay at once) re-join with since_id while a
    publisher keeps talking: each gets, after its ack, every message it
    missed and every later one, once and in id order."""
    clients = 40
    async with running(make_config()) as server:
        async with connect(server, 1000, "pub") as pub:
            await pub.join("general")
            seen: dict[int, int] = {}
            async with AsyncExitStack() as stack:
                members: list[Client] = []
                for uid in range(1, clients + 1):
                    member = await stack.enter_async_context(connect(server, uid, f"u{uid}"))
                    await member.join("general")
                    members.append(member)
                first = await post(pub, "m0")
                for uid, member in enumerate(members, 1):
                    while True:
                        frame = await member.recv()
                        if frame["type"] == "room_message":
                            break
                    seen[uid] = frame["data"]["id"]
                assert set(seen.values()) == {first}
            # Everyone is gone; the room goes on.
            sent = [first]
            for n in range(1, 30):
                sent.append(await post(pub, f"m{n}"))
            got: dict[int, list[int]] = {}

            async def rejoin(uid: int) -> None:
                async with connect(server, uid, f"u{uid}") as member:
                    await member.send(
                        "join_room", {"room": "general", "since_id": seen[uid]}, request_id="j"
                    )
                    ack = await member.expect("join_room_ack")
                    assert ack["data"]["recovered"] is True
                    mine = got[uid] = []
                    while len(mine) < 39:  # m1 .. m39
                        frame = await member.recv(30)
                        if frame["type"] == "room_message":
                            mine.append(frame["data"]["id"])

            async with trio.open_nursery() as nursery:
                for uid in range(1, clients + 1):
                    nursery.start_soon(rejoin, uid)
                for n in range(30, 40):  # while they come back
                    sent.append(await post(pub, f"m{n}"))
            for uid in range(1, clients + 1):
                assert got[uid] == sent[1:], uid
