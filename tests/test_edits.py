"""Editing and deleting messages, end to end on one real server (real
SQLite, real sockets): live delivery, history, versions, recovery, and every
refusal (nothing changed by one)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from chatd.config import Config
from tests.helpers.clients import PRESENCE, Client, connect, next_of
from tests.helpers.clocks import WallClock
from tests.helpers.http_client import http_request
from tests.helpers.servers import running

ALICE, BOB, CAROL = 1, 2, 3
#: What reaches a member without asking.
LIVE = {"room_message", "direct_message", "message_edited", "message_deleted"}


async def answer(client: Client, type_: str, data: Any, request_id: str) -> dict[str, Any]:
    """Send a frame; its answer (the frame carrying ``request_id``)."""
    await client.send(type_, data, request_id)
    while True:
        frame = await client.recv()
        if frame.get("request_id") == request_id:
            return frame
        assert frame["type"] in PRESENCE | LIVE, frame


async def post(client: Client, content: str, room: str = "general", **extra: Any) -> int:
    frame = await answer(
        client, "room_message", {"room": room, "content": content, **extra}, content
    )
    assert frame["type"] == "room_message", frame
    return int(frame["data"]["id"])


async def history(client: Client, room: str = "general", **page: Any) -> dict[str, Any]:
    frame = await answer(client, "room_history", {"room": room, **page}, "history")
    assert frame["type"] == "message_history", frame
    return dict(frame["data"])


def error_code(frame: dict[str, Any]) -> str:
    assert frame["type"] == "error", frame
    return str(frame["data"]["code"])


async def test_an_edit_reaches_the_room_and_history_and_keeps_versions(server) -> None:
    async with connect(server, ALICE, "alice") as alice, connect(server, BOB, "bob") as bob:
        await alice.join("general")
        await bob.join("general")
        first = await post(alice, "helo")
        await next_of(bob, "room_message")
        edited = await answer(
            alice, "edit_message", {"message_id": first, "content": "hello"}, "e1"
        )
        assert edited["type"] == "message_edited" and edited["user_id"] == ALICE
        data = edited["data"]
        assert data["message_id"] == first and data["id"] > first
        assert (data["room"], data["content"], data["user_id"]) == ("general", "hello", ALICE)
        assert data["edited_at"].endswith("Z")
        seen = await next_of(bob, "message_edited")
        assert seen["data"] == data and "request_id" not in seen
        # history: the current content, edited_at, in its place; totals as before
        page = await history(bob)
        assert page["total"] == 1
        (message,) = page["messages"]
        assert (message["id"], message["content"]) == (first, "hello")
        assert message["edited_at"] == data["edited_at"]
        # a second edit; the author reads every version, oldest first
        await answer(alice, "edit_message", {"message_id": first, "content": "hello!"}, "e2")
        versions = await answer(alice, "message_versions", {"message_id": first}, "v")
        assert versions["type"] == "message_versions"
        got = versions["data"]
        assert got["message_id"] == first
        assert [v["content"] for v in got["versions"]] == ["helo", "hello", "hello!"]
        assert got["versions"][0]["edited_at"] is None
        assert got["versions"][1]["edited_at"] == data["edited_at"]
        # anyone else who sees the message may not read its versions
        refused = await answer(bob, "message_versions", {"message_id": first}, "v2")
        assert error_code(refused) == "PERMISSION_DENIED"


async def test_a_deletion_leaves_a_tombstone_in_place(server) -> None:
    async with connect(server, ALICE, "alice") as alice, connect(server, BOB, "bob") as bob:
        await alice.join("general")
        await bob.join("general")
        ids = [await post(alice, f"m{i}") for i in range(3)]
        image = await post(
            alice, "a caption", message_type="image", media_url="/img.png", media_type="image/png"
        )
        for _ in range(4):
            await next_of(bob, "room_message")
        for target in (ids[1], image):
            deleted = await answer(alice, "delete_message", {"message_id": target}, f"d{target}")
            assert deleted["type"] == "message_deleted", deleted
            assert deleted["data"]["message_id"] == target
            assert deleted["data"]["deleted_by"] == ALICE
            assert deleted["data"]["room"] == "general"
            assert (await next_of(bob, "message_deleted"))["data"] == deleted["data"]
        page = await history(bob)
        assert page["total"] == 4 and page["has_more"] is False
        assert [m["id"] for m in page["messages"]] == [*ids, image]
        tombstones = {m["id"]: m for m in page["messages"] if m.get("deleted")}
        assert set(tombstones) == {ids[1], image}
        for m in tombstones.values():
            assert m["content"] == "" and m["deleted"] is True
            assert not {"media_url", "media_type", "duration"} & set(m)
        # paging counts the tombstones like any message
        older = await history(bob, limit=2, offset=2)
        assert [m["id"] for m in older["messages"]] == ids[:2]
        # a deleted message is gone for edits, deletions and versions
        for type_, data in (
            ("edit_message", {"message_id": ids[1], "content": "back"}),
            ("delete_message", {"message_id": ids[1]}),
            ("message_versions", {"message_id": ids[1]}),
        ):
            assert error_code(await answer(alice, type_, data, type_)) == "MESSAGE_NOT_FOUND"


async def test_direct_messages_are_edited_and_deleted_for_both_parties(server) -> None:
    async with (
        connect(server, ALICE, "alice") as alice,
        connect(server, ALICE, "alice") as alice2,
        connect(server, BOB, "bob") as bob,
        connect(server, CAROL, "carol") as carol,
    ):
        sent = await answer(alice, "direct_message", {"to_user_id": BOB, "content": "hi"}, "dm")
        dm_id = sent["data"]["id"]
        await next_of(bob, "direct_message")
        await next_of(alice2, "direct_message")
        edited = await answer(alice, "edit_message", {"message_id": dm_id, "content": "hey"}, "e")
        assert edited["type"] == "message_edited", edited
        assert edited["data"]["from_user_id"] == ALICE and edited["data"]["to_user_id"] == BOB
        assert "room" not in edited["data"]
        for other in (bob, alice2):
            assert (await next_of(other, "message_edited"))["data"] == edited["data"]
        # the recipient cannot edit or delete it; a third user cannot see it
        assert (
            error_code(
                await answer(bob, "edit_message", {"message_id": dm_id, "content": "x"}, "x")
            )
            == "PERMISSION_DENIED"
        )
        assert (
            error_code(await answer(bob, "delete_message", {"message_id": dm_id}, "x"))
            == "PERMISSION_DENIED"
        )
        for type_, data in (
            ("edit_message", {"message_id": dm_id, "content": "x"}),
            ("delete_message", {"message_id": dm_id}),
            ("message_versions", {"message_id": dm_id}),
        ):
            assert error_code(await answer(carol, type_, data, "c")) == "MESSAGE_NOT_FOUND"
        deleted = await answer(alice, "delete_message", {"message_id": dm_id}, "d")
        assert deleted["type"] == "message_deleted"
        assert (await next_of(bob, "message_deleted"))["data"] == deleted["data"]
        page = await answer(bob, "dm_history", {"with_user": ALICE}, "h")
        (message,) = page["data"]["messages"]
        assert message["deleted"] is True and message["content"] == ""


async def test_refusals_change_nothing(make_config: Callable[..., Config]) -> None:
    config = make_config(
        rooms={"public": ["general"], "private": {"staff": [BOB]}},
        limits={"max_content_length": 20},
    )
    async with running(config) as server:
        async with connect(server, ALICE, "alice") as alice, connect(server, BOB, "bob") as bob:
            await alice.join("general")
            await bob.join("general")
            await bob.join("staff")
            mine = await post(alice, "mine")
            reaction = await post(alice, "👍", message_type="reaction", reply_to=mine)
            theirs = await post(bob, "theirs")
            secret = await post(bob, "secret", room="staff")
            cases = [
                ({"message_id": theirs, "content": "x"}, "PERMISSION_DENIED"),
                ({"message_id": secret, "content": "x"}, "MESSAGE_NOT_FOUND"),
                ({"message_id": 10**9, "content": "x"}, "MESSAGE_NOT_FOUND"),
                ({"message_id": reaction, "content": "👎"}, "INVALID_FORMAT"),
                ({"message_id": mine, "content": "   "}, "INVALID_FORMAT"),
                ({"message_id": mine, "content": "x" * 21}, "MESSAGE_TOO_LONG"),
                ({"message_id": "7", "content": "x"}, "INVALID_FORMAT"),
                ({"message_id": 0, "content": "x"}, "INVALID_FORMAT"),
                ({"message_id": 2**63, "content": "x"}, "INVALID_FORMAT"),
                ({"message_id": 1.5, "content": "x"}, "INVALID_FORMAT"),
                ({"message_id": mine}, "INVALID_FORMAT"),
                ({"message_id": mine, "content": 5}, "INVALID_FORMAT"),
            ]
            for i, (data, code) in enumerate(cases):
                assert error_code(await answer(alice, "edit_message", data, f"c{i}")) == code, data
            for i, (data, code) in enumerate(
                [
                    ({"message_id": theirs}, "PERMISSION_DENIED"),
                    ({"message_id": secret}, "MESSAGE_NOT_FOUND"),
                    ({"message_id": -1}, "INVALID_FORMAT"),
                    ({}, "INVALID_FORMAT"),
                ]
            ):
                assert error_code(await answer(alice, "delete_message", data, f"d{i}")) == code
            # a secret's versions: not even its existence
            refused = await answer(alice, "message_versions", {"message_id": secret}, "v")
            assert error_code(refused) == "MESSAGE_NOT_FOUND"
            page = await history(bob)
            assert [(m["content"], "edited_at" in m) for m in page["messages"]] == [
                ("mine", False),
                ("👍", False),
                ("theirs", False),
            ]
            # no edit nor deletion reached anyone
            await alice.nothing_pending()
            await bob.nothing_pending()


async def test_edits_count_against_the_message_limit(make_config: Callable[..., Config]) -> None:
    config = make_config(limits={"messages_per_minute": 3, "messages_per_hour": 100})
    async with running(config) as server, connect(server, ALICE, "alice") as alice:
        await alice.join("general")
        first = await post(alice, "one")
        codes = []
        for i in range(4):
            frame = await answer(
                alice, "edit_message", {"message_id": first, "content": f"v{i}"}, f"e{i}"
            )
            codes.append(frame["type"] if frame["type"] != "error" else error_code(frame))
        assert codes == ["message_edited", "message_edited", "RATE_LIMITED", "RATE_LIMITED"]
        page = await history(alice)
        assert page["messages"][0]["content"] == "v1"


async def test_the_edit_window(make_config: Callable[..., Config]) -> None:
    wall = WallClock()  # (the server's wall clock: created_at and edited_at)
    async with running(make_config(limits={"edit_window_seconds": 60}), wall=wall) as server:
        async with connect(server, ALICE, "alice") as alice:
            await alice.join("general")
            first = await post(alice, "typo")
            wall.offset += 59
            ok = await answer(alice, "edit_message", {"message_id": first, "content": "fix"}, "a")
            assert ok["type"] == "message_edited"
            wall.offset += 2
            late = await answer(alice, "edit_message", {"message_id": first, "content": "no"}, "b")
            assert error_code(late) == "PERMISSION_DENIED"
            assert late["data"]["details"]["edit_window_seconds"] == 60
            # deletions have no window
            gone = await answer(alice, "delete_message", {"message_id": first}, "c")
            assert gone["type"] == "message_deleted"


def apply(view: dict[int, dict[str, Any]], frame: dict[str, Any]) -> int:
    """What a client does with a room frame: its local copy of the room
    (message id -> message), updated; returns the frame's id."""
    data = frame["data"]
    if frame["type"] == "room_message":
        view[data["id"]] = data
    elif frame["type"] == "message_edited":
        if data["message_id"] in view:
            view[data["message_id"]] = {
                **view[data["message_id"]],
                "content": data["content"],
                "edited_at": data["edited_at"],
            }
    elif frame["type"] == "message_deleted":
        if data["message_id"] in view:
            old = view[data["message_id"]]
            view[data["message_id"]] = {
                k: v
                for k, v in old.items()
                if k not in ("media_url", "media_type", "duration", "data", "mentions")
            } | {"content": "", "deleted": True}
    return int(data["id"])


async def test_recovery_replays_edits_and_deletions_in_id_order(server) -> None:
    async with connect(server, ALICE, "alice") as alice:
        await alice.join("general")
        view: dict[int, dict[str, Any]] = {}
        last = 0
        async with connect(server, BOB, "bob") as bob:
            await bob.join("general")
            early = [await post(alice, f"early{i}") for i in range(3)]
            for _ in early:
                last = apply(view, await next_of(bob, "room_message"))
        # bob is away: messages, then edits and deletions of old and new ones
        late = [await post(alice, f"late{i}") for i in range(3)]
        await answer(alice, "edit_message", {"message_id": early[0], "content": "E0"}, "a")
        await answer(alice, "delete_message", {"message_id": early[1]}, "b")
        await answer(alice, "edit_message", {"message_id": late[0], "content": "L0"}, "c")
        await post(alice, "later")
        await answer(alice, "delete_message", {"message_id": late[1]}, "d")
        async with connect(server, BOB, "bob") as bob:
            ack = await answer(bob, "join_room", {"room": "general", "since_id": last}, "j")
            assert ack["data"]["recovered"] is True
            ids = []
            while True:
                frame = await bob.recv()
                assert frame["type"] in {"room_message", "message_edited", "message_deleted"}
                ids.append(apply(view, frame))
                if frame["type"] == "message_deleted" and frame["data"]["message_id"] == late[1]:
                    break
            assert ids == sorted(ids) and len(ids) == 8
            await bob.nothing_pending()
            page = await history(bob)
            assert [view[m["id"]] for m in page["messages"]] == page["messages"]


async def test_the_publish_api_deletes_any_message(make_config: Callable[..., Config]) -> None:
    key = "delete-key-0123456789abcdef"
    async with running(make_config(api={"keys": [key]})) as server:
        async with connect(server, ALICE, "alice") as alice, connect(server, BOB, "bob") as bob:
            await alice.join("general")
            await bob.join("general")
            target = await post(alice, "spam")
            await next_of(bob, "room_message")

            async def delete(path: str, with_key: str | None = key) -> Any:
                headers = [("authorization", f"Bearer {with_key}")] if with_key else []
                return await http_request(server.port, "DELETE", path, b"", headers)

            assert (await delete(f"/api/messages/{target}", None)).status == 401
            assert (
                await delete(f"/api/messages/{target}", "wrong-key-0123456789abc")
            ).status == 401
            for bad in ("abc", "0", "-1", str(2**63), "1.5", "", "%D9%A1", "1/2"):
                reply = await delete(f"/api/messages/{bad}")
                assert reply.status == 400 and reply.json()["code"] == "INVALID_FORMAT", bad
            missing = await delete("/api/messages/999999")
            assert missing.status == 404 and missing.json()["code"] == "MESSAGE_NOT_FOUND"
            reply = await delete(f"/api/messages/{target}")
            assert reply.status == 200, reply.body
            body = reply.json()
            assert body["message_id"] == target and body["id"] > target
            for client in (alice, bob):
                frame = await next_of(client, "message_deleted")
                assert frame["data"] == {
                    "id": body["id"],
                    "message_id": target,
                    "room": "general",
                    "deleted_by": 0,
                }
                assert "user_id" not in frame  # caused by no user
            again = await delete(f"/api/messages/{target}")
            assert again.status == 404 and again.json()["code"] == "MESSAGE_NOT_FOUND"
            assert (await http_request(server.port, "GET", f"/api/messages/{target}")).status == 405
            page = await history(bob)
            assert page["messages"][0]["deleted"] is True
