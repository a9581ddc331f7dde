"""``room_history`` paging edges and the reads rate limit, end to end."""

from __future__ import annotations

from typing import Any

import trio

from tests.helpers.clients import Client, connect
from tests.helpers.servers import running


async def post(client: Client, room: str, contents: list[str]) -> list[dict[str, Any]]:
    """Send messages one by one; return their data as the sender saw it."""
    out = []
    for content in contents:
        frame = await client.request("room_message", {"room": room, "content": content})
        assert frame["type"] == "room_message", frame
        out.append(frame["data"])
    return out


async def history(client: Client, **data: Any) -> dict[str, Any]:
    frame = await client.request("room_history", {"room": "general", **data})
    assert frame["type"] == "message_history", frame
    result: dict[str, Any] = frame["data"]
    return result


async def test_an_empty_room_has_an_empty_history(server):
    async with connect(server) as alice:
        data = await history(alice, room="random")
    assert data["room"] == "random"
    assert data["total"] == 0
    assert data["messages"] == []
    assert data["has_more"] is False


async def test_pages_of_an_exact_multiple_of_the_limit(server):
    async with connect(server) as alice:
        await alice.join("general")
        sent = await post(alice, "general", [f"m{i}" for i in range(6)])

        newest = await history(alice, limit=3, offset=0)
        assert newest["messages"] == sent[3:6]  # the newest three, oldest first
        assert newest["total"] == 6 and newest["has_more"] is True
        assert newest["limit"] == 3 and newest["offset"] == 0

        oldest = await history(alice, limit=3, offset=3)
        assert oldest["messages"] == sent[0:3]
        assert oldest["total"] == 6 and oldest["has_more"] is False

        past = await history(alice, limit=3, offset=6)
        assert past["messages"] == [] and past["total"] == 6 and past["has_more"] is False
        far = await history(alice, limit=3, offset=1000)
        assert far["messages"] == [] and far["total"] == 6 and far["has_more"] is False

        straddle = await history(alice, limit=4, offset=4)
        assert straddle["messages"] == sent[0:2] and straddle["has_more"] is False


async def test_limit_is_clamped_to_1_and_100(server):
    async with connect(server) as alice:
        await alice.join("general")
        sent = await post(alice, "general", [f"m{i}" for i in range(103)])

        for asked in (0, -5):
            one = await history(alice, limit=asked)
            assert one["limit"] == 1
            assert one["messages"] == sent[-1:]
            assert one["total"] == 103 and one["has_more"] is True

        many = await history(alice, limit=500)
        assert many["limit"] == 100
        assert many["messages"] == sent[3:]
        assert many["total"] == 103 and many["has_more"] is True

        default = await history(alice)
        assert default["limit"] == 50 and default["messages"] == sent[-50:]


async def test_negative_offset_is_invalid_format(server):
    async with connect(server) as alice:
        err = await alice.request(
            "room_history", {"room": "general", "offset": -1}, request_id="neg"
        )
        assert err["type"] == "error" and err["request_id"] == "neg"
        assert err["data"]["code"] == "INVALID_FORMAT"
        assert err["data"]["details"]["field"] == "data.offset"
        await alice.nothing_pending()


async def test_private_room_history_needs_membership(server):
    async with connect(server, 1, "alice") as alice, connect(server, 3, "mallory") as mallory:
        await alice.join("staff")
        sent = await post(alice, "staff", ["staff only"])

        err = await mallory.request("room_history", {"room": "staff"}, request_id="peek")
        assert err["type"] == "error" and err["request_id"] == "peek"
        assert err["data"]["code"] == "PERMISSION_DENIED"
        assert err["data"]["details"] == {"room": "staff"}
        await mallory.nothing_pending()

        err = await mallory.request("room_history", {"room": "nope"})
        assert err["data"]["code"] == "ROOM_NOT_FOUND"

    async with connect(server, 2, "bob") as bob:  # a member who never joined
        data = await history(bob, room="staff")
        assert data["messages"] == sent
    async with connect(server, 3, "mallory") as mallory:  # public: no join needed
        data = await history(mallory, room="general")
        assert data["total"] == 0


async def test_history_right_after_a_send_sees_it(server):
    async with connect(server) as alice:
        await alice.join("general")
        for i in range(5):
            # No wait for the message's echo: the history request goes right behind it.
            await alice.send("room_message", {"room": "general", "content": f"w{i}"}, "m")
            await alice.send("room_history", {"room": "general", "limit": 100}, "h")
            frames = [await alice.recv(), await alice.recv()]
            by_rid = {f["request_id"]: f for f in frames}
            assert set(by_rid) == {"m", "h"}, frames
            data = by_rid["h"]["data"]
            assert data["total"] == i + 1
            assert data["messages"][-1] == by_rid["m"]["data"]
            assert data["messages"][-1]["content"] == f"w{i}"


async def test_reads_have_their_own_rate_limit(make_config, slow_autojump_clock):
    config = make_config(
        limits={"reads_per_minute": 3, "messages_per_minute": 1000, "messages_per_hour": 10000}
    )
    async with running(config) as server:
        async with connect(server, 1, "alice") as alice:
            await alice.join("general")
            await history(alice)
            assert (await alice.request("dm_history", {"with_user": 1}))[
                "type"
            ] == "message_history"
            # Messages are not reads: still allowed.
            sent = await alice.request("room_message", {"room": "general", "content": "hi"})
            assert sent["type"] == "room_message"

            for kind, data in (
                ("room_history", {"room": "general"}),
                ("join_room", {"room": "random"}),
                ("dm_history", {"with_user": 1}),
            ):
                err = await alice.request(kind, data, request_id=kind)
                assert err["type"] == "error" and err["request_id"] == kind
                assert err["data"]["code"] == "RATE_LIMITED"
                retry_after = err["data"]["details"]["retry_after"]
                assert isinstance(retry_after, int) and retry_after >= 1
            await alice.nothing_pending()

            # The limit is per user: another connection of alice shares it.
            async with connect(server, 1, "alice") as tab2:
                err = await tab2.request("join_room", {"room": "general"})
                assert err["data"]["code"] == "RATE_LIMITED"

            await trio.sleep(retry_after)
            ack = await alice.request("join_room", {"room": "random"})
            assert ack["type"] == "join_room_ack"
            err = await alice.request("room_history", {"room": "general"})
            assert err["data"]["code"] == "RATE_LIMITED"
