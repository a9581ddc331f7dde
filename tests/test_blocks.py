"""Blocking, end to end on one real server (real SQLite, real sockets): a
blocked user's direct messages refused where they are stored, their typing
and read receipts not delivered to the blocker (in conversations and in
rooms), the block list, a restart, and the refusals; and ``chatd.blocks``
alone."""

from __future__ import annotations

from collections.abc import Callable

import trio
import trio.testing

from chatd.blocks import Blocks
from chatd.config import Config
from tests.helpers.clients import Client, connect, next_of
from tests.helpers.servers import running
from tests.test_edits import answer, error_code, post

ALICE, BOB, CAROL = 1, 2, 3


async def block_list(client: Client, type_: str, request_id: str, **data: int) -> list[int]:
    frame = await answer(client, type_, data, request_id)
    assert frame["type"] == "block_list", frame
    return list(frame["data"]["user_ids"])


async def dm(client: Client, to: int, content: str) -> dict:
    return await answer(client, "direct_message", {"to_user_id": to, "content": content}, content)


async def test_a_blocked_users_messages_typing_and_receipts_stop_at_the_blocker(
    make_config: Callable[..., Config], slow_autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config()
    async with running(config) as server:
        async with (
            connect(server, ALICE, "alice") as alice,
            connect(server, BOB, "bob") as bob,
            connect(server, CAROL, "carol") as carol,
        ):
            assert await block_list(alice, "block_list", "l0") == []
            assert await block_list(alice, "block_user", "b", user_id=BOB) == [BOB]
            assert await block_list(alice, "block_user", "b2", user_id=BOB) == [BOB]  # (once)
            # bob's direct messages to alice are refused; nothing reaches her
            refused = await dm(bob, ALICE, "hello?")
            assert error_code(refused) == "PERMISSION_DENIED"
            assert refused["data"]["details"] == {"user_id": ALICE}
            # alice still writes to bob, and carol to alice
            assert (await dm(alice, BOB, "bye"))["type"] == "direct_message"
            assert (await next_of(bob, "direct_message"))["data"]["content"] == "bye"
            assert (await dm(carol, ALICE, "hi"))["type"] == "direct_message"
            assert (await next_of(alice, "direct_message"))["data"]["content"] == "hi"
            # bob's typing, to alice and in a room: not to alice; carol sees it
            for client in (alice, bob, carol):
                await client.join("general")
            await bob.send("typing", {"to_user_id": ALICE, "state": "start"})
            await bob.send("typing", {"room": "general", "state": "start"})
            assert (await next_of(carol, "typing"))["data"]["user_id"] == BOB
            # bob's read receipt of alice's message: not to alice
            sent = await post(alice, "in the room")
            await next_of(bob, "room_message")
            await next_of(carol, "room_message")
            read = {"room": "general", "message_id": sent}
            assert (await answer(bob, "mark_read", read, "m"))["type"] == "mark_read_ack"
            receipt = await next_of(carol, "read_receipt")
            assert receipt["data"]["user_id"] == BOB
            await trio.sleep(3)  # (receipts and typing are held at most a second or two)
            await alice.nothing_pending()
            # unblocked: everything flows again
            assert await block_list(alice, "unblock_user", "u", user_id=BOB) == []
            assert (await dm(bob, ALICE, "friends?"))["type"] == "direct_message"
            assert (await next_of(alice, "direct_message"))["data"]["content"] == "friends?"
            await bob.send("typing", {"to_user_id": ALICE, "state": "start"})
            assert (await next_of(alice, "typing"))["data"]["user_id"] == BOB


async def test_blocks_outlive_a_restart(make_config: Callable[..., Config]) -> None:
    config = make_config()
    async with running(config) as server:
        async with connect(server, ALICE, "alice") as alice, connect(server, BOB, "bob"):
            assert await block_list(alice, "block_user", "b", user_id=BOB) == [BOB]
    async with running(config) as server:
        async with connect(server, ALICE, "alice") as alice, connect(server, BOB, "bob") as bob:
            assert await block_list(alice, "block_list", "l") == [BOB]
            assert error_code(await dm(bob, ALICE, "again")) == "PERMISSION_DENIED"
            # the node read its blocks at the start: bob's typing stays away
            await bob.send("typing", {"to_user_id": ALICE, "state": "start"})
            await alice.nothing_pending()


async def test_bad_blocks_get_a_clear_error_and_change_nothing(
    make_config: Callable[..., Config],
) -> None:
    async with running(make_config()) as server:
        async with connect(server, ALICE, "alice") as alice, connect(server, BOB, "bob"):
            for data, code in (
                ({"user_id": ALICE}, "INVALID_FORMAT"),  # oneself
                ({"user_id": 999}, "USER_NOT_FOUND"),  # nobody by that id
                ({"user_id": 0}, "INVALID_FORMAT"),
                ({"user_id": "2"}, "INVALID_FORMAT"),
                ({}, "INVALID_FORMAT"),
            ):
                refused = await answer(alice, "block_user", data, "x")
                assert error_code(refused) == code, (data, refused)
            assert await block_list(alice, "block_list", "l") == []


def test_the_nodes_copy_of_blocks() -> None:
    blocks = Blocks([(1, 2), (3, 2), (1, 4)])
    assert blocks.blockers(2) == {1, 3}
    assert blocks.blocks(1, 4) and not blocks.blocks(4, 1)
    blocks.set(1, 2, False)
    blocks.set(3, 2, False)
    assert blocks.blockers(2) == frozenset()
    blocks.set(3, 2, False)  # (stopping twice is nothing)
    assert not blocks.blocks(3, 2)
