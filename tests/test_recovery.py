"""Recovery after a reconnect: ``join_room {room, since_id}``, end to end."""

from __future__ import annotations

from typing import Any

import trio

from tests.helpers.clients import Client, connect
from tests.helpers.servers import running


async def post(client: Client, contents: list[str], room: str = "general") -> list[dict]:
    out = []
    for content in contents:
        frame = await client.request("room_message", {"room": room, "content": content})
        assert frame["type"] == "room_message", frame
        out.append(frame["data"])
    return out


async def rejoin(client: Client, since_id: int | None, room: str = "general") -> dict[str, Any]:
    data: dict[str, Any] = {"room": room}
    if since_id is not None:
        data["since_id"] = since_id
    ack = await client.request("join_room", data, request_id="rejoin")
    assert ack["type"] == "join_room_ack" and ack["request_id"] == "rejoin", ack
    return ack


async def test_missed_messages_are_replayed_then_live_ones_follow(server):
    async with connect(server, 1, "alice") as alice:
        await alice.join("general")
        await alice.join("random")
        await post(alice, ["before"])
        async with connect(server, 2, "bob") as bob:
            await bob.join("general")
            await alice.expect("user_connected")
            seen_too = await post(alice, ["seen"])
            assert (await bob.expect("room_message"))["data"] == seen_too[0]
        await alice.expect("user_disconnected")
        missed = await post(alice, [f"missed{i}" for i in range(4)])
        await post(alice, ["other room"], room="random")

        async with connect(server, 2, "bob") as bob:
            ack = await rejoin(bob, since_id=seen_too[0]["id"])  # the last bob saw
            assert ack["data"]["recovered"] is True
            assert ack["data"]["success"] is True
            replayed = [await bob.expect("room_message") for _ in range(4)]
            assert [f["data"] for f in replayed] == missed  # oldest first, this room only
            assert all("request_id" not in f and f["user_id"] == 1 for f in replayed)
            await alice.expect("user_connected")
            live = await post(alice, ["live"])
            assert (await bob.expect("room_message"))["data"] == live[0]
            await bob.nothing_pending()


async def test_a_gap_larger_than_the_cap_replays_the_newest(make_config):
    async with running(make_config(limits={"recovery_max_messages": 3})) as server:
        async with connect(server, 1, "alice") as alice:
            await alice.join("general")
            first = await post(alice, ["seen"])
            missed = await post(alice, [f"m{i}" for i in range(5)])
            async with connect(server, 2, "bob") as bob:
                ack = await rejoin(bob, since_id=first[0]["id"])
                assert ack["data"]["recovered"] is False
                replayed = [(await bob.expect("room_message"))["data"] for _ in range(3)]
                assert replayed == missed[2:]
                await bob.nothing_pending()

                # Exactly the cap is still complete.
                ack = await rejoin(bob, since_id=missed[1]["id"])
                assert ack["data"]["recovered"] is True
                replayed = [(await bob.expect("room_message"))["data"] for _ in range(3)]
                assert replayed == missed[2:]
                await bob.nothing_pending()


async def test_since_id_past_the_newest_replays_nothing(server):
    async with connect(server, 1, "alice") as alice:
        await alice.join("general")
        sent = await post(alice, ["a", "b"])
        async with connect(server, 2, "bob") as bob:
            for since_id in (sent[-1]["id"], sent[-1]["id"] + 1000):
                ack = await rejoin(bob, since_id=since_id)
                assert ack["data"]["recovered"] is True
                await bob.nothing_pending()
        async with connect(server, 3, "carol") as carol:
            ack = await rejoin(carol, since_id=0, room="random")  # an empty room
            assert ack["data"]["recovered"] is True
            await carol.nothing_pending()


async def test_no_since_id_means_no_recovered_key_and_no_replay(server):
    async with connect(server, 1, "alice") as alice:
        await alice.join("general")
        await post(alice, ["a", "b"])
        async with connect(server, 2, "bob") as bob:
            ack = await rejoin(bob, since_id=None)
            assert "recovered" not in ack["data"]
            await bob.nothing_pending()


async def test_rejoin_during_traffic_has_no_gap_and_no_duplicate(server):
    total = 200
    async with connect(server, 1, "alice") as alice, connect(server, 2, "bob") as bob:
        await alice.join("general")
        await bob.join("general")
        await alice.expect("user_connected")
        first = await post(alice, ["start"])
        assert (await bob.expect("room_message"))["data"] == first[0]
        last_seen = first[0]["id"]

        sent_ids: list[int] = []

        async def keep_sending() -> None:
            for i in range(total):
                await alice.send("room_message", {"room": "general", "content": f"t{i}"}, i)
                if i % 10 == 0:
                    await trio.lowlevel.checkpoint()
            while len(sent_ids) < total:
                frame = await alice.recv()
                if frame["type"] == "room_message" and frame.get("request_id") is not None:
                    sent_ids.append(frame["data"]["id"])

        received: list[dict[str, Any]] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_sending)
            async with connect(server, 2, "bob") as bob2:
                # bob's second device reconnects mid-stream from what bob saw.
                await bob2.send(
                    "join_room", {"room": "general", "since_id": last_seen}, request_id="r"
                )
                ack = await bob2.recv()
                assert ack["type"] == "join_room_ack" and ack["request_id"] == "r", ack
                assert ack["data"]["recovered"] is True
                while not received or received[-1]["data"]["content"] != f"t{total - 1}":
                    frame = await bob2.recv(wait=10)
                    assert frame["type"] == "room_message", frame
                    received.append(frame)
                await bob2.nothing_pending()

        ids = [f["data"]["id"] for f in received]
        assert ids == sorted(set(ids)), "out of order or doubled"
        assert len([await bob.expect("room_message") for _ in range(total)]) == total
        await bob.nothing_pending()
        history = await bob.request("room_history", {"room": "general", "limit": 100})
        stored = [m["id"] for m in history["data"]["messages"]]
        assert history["data"]["total"] == total + 1
        older = await bob.request("room_history", {"room": "general", "limit": 100, "offset": 100})
        stored = [m["id"] for m in older["data"]["messages"]] + stored
        assert ids == [i for i in stored if i > last_seen]
        assert sorted(sent_ids) == ids


async def test_a_since_id_beyond_the_newest_message_loses_no_live_message(server):
    """A client with a since_id no message has reached (a restored database,
    another deployment's ids) misses nothing said after it joins."""
    async with connect(server, 1, "alice") as alice, connect(server, 2, "bob") as bob:
        await alice.join("general")
        await post(alice, ["old"])
        ack = await rejoin(bob, since_id=1_000_000)
        assert ack["data"]["recovered"] is True
        await alice.expect("user_connected")
        live = await post(alice, ["new", "newer"])
        assert live[-1]["id"] < 1_000_000
        assert [(await bob.expect("room_message"))["data"] for _ in live] == live
        await bob.nothing_pending()
