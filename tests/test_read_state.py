"""Read markers, unread counts, receipts, mentions, typing and last seen, end
to end on one real server (real SQLite, real sockets).

Marker writes, receipts held back and typing expiry are the server's timed
work: these tests run on ``slow_autojump_clock`` (virtual time that jumps
when the server, its SQLite thread included, is idle).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import trio
import trio.testing

from chatd.config import Config
from tests.helpers.clients import PRESENCE, Client, connect, next_of
from tests.helpers.servers import running

ALICE, BOB, CAROL = 1, 2, 3


async def post(client: Client, room: str, content: str, **extra: Any) -> int:
    """Send a room message; its id, from the sender's own copy."""
    await client.send("room_message", {"room": room, "content": content, **extra}, content)
    while True:
        frame = await client.recv()
        if frame["type"] == "room_message" and frame.get("request_id") == content:
            return int(frame["data"]["id"])
        assert frame["type"] in PRESENCE | {"room_message", "read_receipt", "typing"}, frame


async def dm(client: Client, to: int, content: str) -> int:
    await client.send("direct_message", {"to_user_id": to, "content": content}, content)
    while True:
        frame = await client.recv()
        if frame["type"] == "direct_message" and frame.get("request_id") == content:
            return int(frame["data"]["id"])


async def mark(client: Client, request_id: str = "m", **data: Any) -> dict[str, Any]:
    await client.send("mark_read", data, request_id)
    while True:
        frame = await client.recv()
        if frame.get("request_id") == request_id:
            return frame
        assert frame["type"] in PRESENCE | {"room_message", "direct_message"}, frame


async def unread(client: Client) -> dict[str, Any]:
    await client.send("unread", {}, "u")
    while True:
        frame = await client.recv()
        if frame.get("request_id") == "u":
            assert frame["type"] == "unread_counts", frame
            return dict(frame["data"])


async def enter(client: Client, room: str) -> dict[str, Any]:
    """Join ``room``; its ack (presence frames before it skipped)."""
    await client.send("join_room", {"room": room}, f"join:{room}")
    return await next_of(client, "join_room_ack")


def room_counts(counts: dict[str, Any], room: str) -> dict[str, Any]:
    [found] = [r for r in counts["rooms"] if r["room"] == room]
    return dict(found)


async def test_a_first_join_starts_with_nothing_unread_then_messages_count(
    make_config: Callable[..., Config], slow_autojump_clock: trio.testing.MockClock
) -> None:
    async with running(make_config()) as server:
        async with connect(server, BOB, "bob") as bob:
            await bob.join("general")
            before = [await post(bob, "general", f"old {i}") for i in range(3)]
            async with connect(server, ALICE, "alice") as alice:
                ack = (await alice.join("general"))["data"]
                assert ack["last_read_id"] == before[-1]
                assert (ack["unread"], ack["mentions"]) == (0, 0)
                new = [await post(bob, "general", f"new {i}") for i in range(4)]
                counts = await unread(alice)
                assert room_counts(counts, "general") == {
                    "room": "general",
                    "unread": 4,
                    "mentions": 0,
                    "last_read_id": before[-1],
                    "last_message_id": new[-1],
                }
                ack = await mark(alice, room="general", message_id=new[1])
                assert ack["type"] == "mark_read_ack"
                assert ack["data"] == {
                    "room": "general",
                    "last_read_id": new[1],
                    "unread": 2,
                    "mentions": 0,
                }
                # An older message than the marker: accepted, nothing moves.
                ack = await mark(alice, room="general", message_id=new[0])
                assert ack["data"]["last_read_id"] == new[1]
                assert ack["data"]["unread"] == 2
            # The marker outlives the connection: a join later shows it.
            async with connect(server, ALICE, "alice") as alice:
                ack = (await alice.join("general"))["data"]
                assert (ack["last_read_id"], ack["unread"]) == (new[1], 2)


async def test_sending_moves_the_senders_marker(
    make_config: Callable[..., Config], slow_autojump_clock: trio.testing.MockClock
) -> None:
    async with running(make_config()) as server:
        async with connect(server, ALICE, "alice") as alice, connect(server, BOB, "bob") as bob:
            await alice.join("general")
            await bob.join("general")
            await post(bob, "general", "hello")
            last = await post(alice, "general", "hi bob")
            counts = room_counts(await unread(alice), "general")
            assert (counts["unread"], counts["last_read_id"]) == (0, last)
            counts = room_counts(await unread(bob), "general")
            assert counts["unread"] == 1  # alice's message; bob's own is read


async def test_mark_read_tells_the_users_other_devices_and_the_room(
    make_config: Callable[..., Config], slow_autojump_clock: trio.testing.MockClock
) -> None:
    async with running(make_config()) as server:
        async with (
            connect(server, ALICE, "alice") as phone,
            connect(server, ALICE, "alice") as laptop,
            connect(server, BOB, "bob") as bob,
        ):
            for client in (phone, laptop, bob):
                await client.join("general")
            sent = await post(bob, "general", "look")
            await next_of(phone, "room_message")
            await next_of(laptop, "room_message")
            ack = await mark(phone, room="general", message_id=sent)
            assert ack["data"]["unread"] == 0
            marker = await next_of(laptop, "read_marker")
            assert marker["data"] == {
                "room": "general",
                "last_read_id": sent,
                "unread": 0,
                "mentions": 0,
            }
            receipt = await next_of(bob, "read_receipt")
            assert receipt["data"] == {
                "room": "general",
                "user_id": ALICE,
                "username": "alice",
                "last_read_id": sent,
            }
            # Never a receipt to the reader's own connections.
            await phone.nothing_pending()
            await laptop.nothing_pending()


async def test_receipts_are_coalesced_to_one_a_second_the_newest_last(
    make_config: Callable[..., Config], slow_autojump_clock: trio.testing.MockClock
) -> None:
    async with running(make_config(limits={"messages_per_minute": 100})) as server:
        async with connect(server, ALICE, "alice") as alice, connect(server, BOB, "bob") as bob:
            await alice.join("general")
            await bob.join("general")
            ids = [await post(bob, "general", f"m{i}") for i in range(3)]
            for i, message_id in enumerate(ids):
                await mark(alice, f"m{i}", room="general", message_id=message_id)
            first = await next_of(bob, "read_receipt")
            assert first["data"]["last_read_id"] == ids[0]
            started = trio.current_time()
            last = await next_of(bob, "read_receipt")
            assert last["data"]["last_read_id"] == ids[2]  # the newest; the middle one never
            assert trio.current_time() - started <= 1.0 + 1e-6
            await bob.nothing_pending()


async def test_private_marks_and_big_rooms_send_no_receipt(
    make_config: Callable[..., Config], slow_autojump_clock: trio.testing.MockClock
) -> None:
    async with running(make_config(limits={"receipts_max_members": 2})) as server:
        async with connect(server, ALICE, "alice") as alice, connect(server, BOB, "bob") as bob:
            await alice.join("general")
            await bob.join("general")
            sent = await post(bob, "general", "one")
            await mark(alice, room="general", message_id=sent, private=True)
            await trio.sleep(2)
            await bob.nothing_pending()
            async with connect(server, CAROL, "carol") as carol:
                await carol.join("general")  # three online: over the limit
                sent = await post(bob, "general", "two")
                await next_of(carol, "room_message")
                ack = await mark(alice, room="general", message_id=sent)
                assert ack["data"]["last_read_id"] == sent
                await trio.sleep(2)
                await bob.nothing_pending()
                await carol.nothing_pending()


async def test_direct_messages_unread_receipts_and_the_notifications_conversation(
    make_config: Callable[..., Config], slow_autojump_clock: trio.testing.MockClock
) -> None:
    async with running(make_config()) as server:
        async with connect(server, ALICE, "alice") as alice, connect(server, BOB, "bob") as bob:
            first = await dm(bob, ALICE, "are you there?")
            second = await dm(bob, ALICE, "hello?")
            counts = await unread(alice)
            # A new conversation is unread from its first message.
            assert counts["direct"] == [
                {"with_user": BOB, "unread": 2, "last_read_id": 0, "last_message_id": second}
            ]
            assert (await unread(bob))["direct"] == []  # bob's own messages
            ack = await mark(alice, with_user=BOB, message_id=first)
            assert ack["data"] == {
                "with_user": BOB,
                "last_read_id": first,
                "unread": 1,
                "mentions": 0,
            }
            receipt = await next_of(bob, "read_receipt")
            assert receipt["data"] == {"with_user": ALICE, "user_id": ALICE, "last_read_id": first}
            await mark(alice, "p", with_user=BOB, message_id=second, private=True)
            assert (await unread(alice))["direct"] == []  # nothing unread: not listed
            await trio.sleep(2)
            await bob.nothing_pending()  # the private move sent no receipt
            # A message of a room is not found in a conversation.
            await bob.join("general")
            elsewhere = await post(bob, "general", "hi all")
            ack = await mark(alice, with_user=BOB, message_id=elsewhere)
            assert ack["type"] == "error"
            assert ack["data"]["code"] == "MESSAGE_NOT_FOUND"
            assert ack["data"]["details"] == {"message_id": elsewhere}


async def test_bad_markers_get_clear_errors(
    make_config: Callable[..., Config], slow_autojump_clock: trio.testing.MockClock
) -> None:
    async with running(make_config()) as server:
        async with connect(server, ALICE, "alice") as alice, connect(server, BOB, "bob") as bob:
            await bob.join("random")
            in_random = await post(bob, "random", "elsewhere")
            # A room not joined.
            error = await mark(alice, room="general", message_id=in_random)
            assert error["data"]["code"] == "PERMISSION_DENIED"
            await alice.join("general")
            for message_id in (in_random, 10**12):
                error = await mark(alice, room="general", message_id=message_id)
                assert error["type"] == "error"
                assert error["data"]["code"] == "MESSAGE_NOT_FOUND"
            for data in (
                {"message_id": 1},  # neither room nor with_user
                {"room": "general", "with_user": BOB, "message_id": 1},  # both
                {"room": "general", "message_id": 1.5},
                {"room": "general", "message_id": "1"},
                {"room": "general"},
            ):
                error = await mark(alice, "bad", **data)
                assert error["type"] == "error"
                assert error["data"]["code"] == "INVALID_FORMAT", data


async def test_mentions_are_stored_delivered_and_counted(
    make_config: Callable[..., Config], slow_autojump_clock: trio.testing.MockClock
) -> None:
    async with running(make_config()) as server:
        async with connect(server, ALICE, "alice") as alice, connect(server, BOB, "bob") as bob:
            await alice.join("general")
            await bob.join("general")
            # 999 never connected: an unknown id, dropped.
            sent = await post(bob, "general", "@alice look", mentions=[ALICE, 999, ALICE])
            live = await next_of(alice, "room_message")
            assert live["data"]["mentions"] == [ALICE]
            plain = await post(bob, "general", "no mention")
            assert "mentions" not in (await next_of(alice, "room_message"))["data"]
            counts = room_counts(await unread(alice), "general")
            assert (counts["unread"], counts["mentions"]) == (2, 1)
            history = await alice.request("room_history", {"room": "general"}, "h")
            by_id = {m["id"]: m for m in history["data"]["messages"]}
            assert by_id[sent]["mentions"] == [ALICE]
            assert "mentions" not in by_id[plain]
            ack = await mark(alice, room="general", message_id=sent)
            assert (ack["data"]["unread"], ack["data"]["mentions"]) == (1, 0)
            await next_of(bob, "read_receipt")
            for mentions in ([1.0], ["1"], list(range(1, 52)), [0], [-3]):
                await bob.send(
                    "room_message",
                    {"room": "general", "content": "x", "mentions": mentions},
                    "bad",
                )
                error = await next_of(bob, "error")
                assert error["data"]["code"] == "INVALID_FORMAT", mentions
            await alice.nothing_pending()


async def test_counts_are_right_after_a_restart(
    make_config: Callable[..., Config], slow_autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config()
    async with running(config) as server:
        async with connect(server, ALICE, "alice") as alice, connect(server, BOB, "bob") as bob:
            await alice.join("general")
            await bob.join("general")
            ids = [await post(bob, "general", f"m{i}", mentions=[ALICE]) for i in range(5)]
            await dm(bob, ALICE, "psst")
            await mark(alice, room="general", message_id=ids[2])
            # the server stops within the marker's write interval: the stop
            # writes it
    async with running(config) as server:
        async with connect(server, ALICE, "alice") as alice:
            counts = await unread(alice)
            assert room_counts(counts, "general") == {
                "room": "general",
                "unread": 2,
                "mentions": 2,
                "last_read_id": ids[2],
                "last_message_id": ids[4],
            }
            assert [d["unread"] for d in counts["direct"]] == [1]
            ack = (await alice.join("general"))["data"]
            assert (ack["last_read_id"], ack["unread"], ack["mentions"]) == (ids[2], 2, 2)


async def test_typing_is_relayed_throttled_and_expired(
    make_config: Callable[..., Config], slow_autojump_clock: trio.testing.MockClock
) -> None:
    async with running(make_config()) as server:
        async with (
            connect(server, ALICE, "alice") as alice,
            connect(server, ALICE, "alice") as alice2,
            connect(server, BOB, "bob") as bob,
        ):
            for client in (alice, alice2, bob):
                await client.join("general")
            await alice.send("typing", {"room": "general", "state": "start"})
            start = await next_of(bob, "typing")
            assert start["data"] == {
                "room": "general",
                "user_id": ALICE,
                "username": "alice",
                "state": "start",
            }
            began = trio.current_time()
            # renewed within 2 s: not relayed again
            await trio.sleep(1)
            await alice.send("typing", {"room": "general", "state": "start"})
            await bob.nothing_pending()
            # not renewed within 6 s of the renewal: the server stops it
            stop = await next_of(bob, "typing", wait=10)
            assert stop["data"]["state"] == "stop"
            assert trio.current_time() - began >= 7 - 1e-6
            # the typist's message ends it, right after the message
            await alice.send("typing", {"room": "general", "state": "start"})
            assert (await next_of(bob, "typing"))["data"]["state"] == "start"
            await post(alice, "general", "done typing")
            assert (await next_of(bob, "room_message"))["data"]["content"] == "done typing"
            assert (await next_of(bob, "typing"))["data"]["state"] == "stop"
            # never echoed to the typist's own connections, never stored
            frames = []
            with trio.move_on_after(0.5):
                while True:
                    frames.append((await alice2.recv())["type"])
            assert "typing" not in frames
            history = await bob.request("room_history", {"room": "general"}, "h")
            assert [m["content"] for m in history["data"]["messages"]] == ["done typing"]


async def test_a_room_shows_at_most_a_few_typists_at_once(
    make_config: Callable[..., Config], slow_autojump_clock: trio.testing.MockClock
) -> None:
    """Past ``ROOM_TYPISTS`` typists in a room, one more's start is not
    relayed; its next renewal is, once a place is free."""
    from contextlib import AsyncExitStack

    from chatd.typists import ROOM_TYPISTS

    async with running(make_config()) as server, AsyncExitStack() as stack:
        watcher = await stack.enter_async_context(connect(server, 100, "watcher"))
        await watcher.join("general")
        typists = []
        for uid in range(1, ROOM_TYPISTS + 2):
            client = await stack.enter_async_context(connect(server, uid, f"user{uid}"))
            await client.join("general")
            typists.append(client)
        for uid, client in enumerate(typists[:-1], 1):
            await client.send("typing", {"room": "general", "state": "start"})
            assert (await next_of(watcher, "typing"))["data"]["user_id"] == uid
        await typists[-1].send("typing", {"room": "general", "state": "start"})
        with trio.move_on_after(3):  # not relayed (3 s: past a renewal's 2)
            frame = await next_of(watcher, "typing")
            raise AssertionError(f"a start past {ROOM_TYPISTS} typists was relayed: {frame}")
        # the first stops; the last one's renewal takes its place
        await typists[0].send("typing", {"room": "general", "state": "stop"})
        stop = await next_of(watcher, "typing")
        assert (stop["data"]["user_id"], stop["data"]["state"]) == (1, "stop")
        await typists[-1].send("typing", {"room": "general", "state": "start"})
        start = await next_of(watcher, "typing")
        assert (start["data"]["user_id"], start["data"]["state"]) == (ROOM_TYPISTS + 1, "start")


async def test_typing_in_conversations_and_its_errors(
    make_config: Callable[..., Config], slow_autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(limits={"typing_per_minute": 3})
    async with running(config) as server:
        async with connect(server, ALICE, "alice") as alice, connect(server, BOB, "bob") as bob:
            await alice.send("typing", {"to_user_id": BOB, "state": "start"})
            frame = await bob.expect("typing")
            assert frame["data"] == {
                "with_user": ALICE,
                "user_id": ALICE,
                "username": "alice",
                "state": "start",
            }
            await alice.send("typing", {"to_user_id": BOB, "state": "stop"})
            assert (await bob.expect("typing"))["data"]["state"] == "stop"
            await alice.send("typing", {"room": "general", "state": "start"}, "t")
            error = await alice.expect("error")
            assert error["data"]["code"] == "PERMISSION_DENIED"
            await alice.send("typing", {"to_user_id": BOB, "state": "start"}, "t")
            error = await alice.expect("error")
            assert error["data"]["code"] == "RATE_LIMITED"
            assert error["data"]["details"]["retry_after"] >= 1
            for data in ({"room": "general"}, {"to_user_id": BOB, "state": "maybe"}):
                await alice.send("typing", data, "bad")
                assert (await alice.expect("error"))["data"]["code"] == "INVALID_FORMAT"


async def test_last_seen_and_online_through_presence_query(
    make_config: Callable[..., Config], slow_autojump_clock: trio.testing.MockClock
) -> None:
    async with running(make_config()) as server:
        async with connect(server, ALICE, "alice") as alice:
            async with connect(server, CAROL, "carol") as carol:
                await carol.nothing_pending()
            async with connect(server, BOB, "bob"):
                await trio.sleep(3)
                reply = await alice.request(
                    "presence_query", {"user_ids": [BOB, CAROL, 404, BOB]}, "q"
                )
                assert reply["type"] == "presence" and reply["request_id"] == "q"
                users = reply["data"]["users"]
                assert users[0] == {"user_id": BOB, "online": True, "last_seen": None}
                assert users[1]["user_id"] == CAROL and users[1]["online"] is False
                assert re.fullmatch(
                    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", users[1]["last_seen"]
                )
                assert users[2] == {"user_id": 404, "online": False, "last_seen": None}
                assert len(users) == 3  # each asked-for user once
            error = await alice.request("presence_query", {"user_ids": list(range(101))}, "q")
            assert error["type"] == "error" and error["data"]["code"] == "INVALID_FORMAT"


async def test_a_private_rooms_read_state_reaches_only_its_members(
    make_config: Callable[..., Config], slow_autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(rooms={"public": ["general"], "private": {"staff": [ALICE, BOB]}})
    async with running(config) as server:
        async with (
            connect(server, ALICE, "alice") as alice,
            connect(server, BOB, "bob") as bob,
            connect(server, CAROL, "carol") as carol,
        ):
            for client in (alice, bob, carol):
                await enter(client, "general")
            await enter(alice, "staff")
            await enter(bob, "staff")
            sent = await post(bob, "staff", "staff only", mentions=[ALICE, CAROL])
            await next_of(alice, "room_message")
            await mark(alice, room="staff", message_id=sent)
            assert (await next_of(bob, "read_receipt"))["data"]["room"] == "staff"
            await alice.send("typing", {"room": "staff", "state": "start"})
            assert (await next_of(bob, "typing"))["data"]["room"] == "staff"
            # carol: not a member; no receipt, no typing, no count of the room
            assert [r["room"] for r in (await unread(carol))["rooms"]] == ["general"]
            await carol.nothing_pending()
            denied = await mark(carol, room="staff", message_id=sent)
            assert denied["data"]["code"] == "PERMISSION_DENIED"
            await carol.send("join_room", {"room": "staff"}, "j")
            assert (await next_of(carol, "error"))["data"]["code"] == "PERMISSION_DENIED"
