"""Rooms, room messages, history, tokens and errors, end to end.

Every test runs the real server in-process and talks to it over TCP with
trio-websocket, as a browser would.
"""

from __future__ import annotations

import logging
import sqlite3
import time

import pytest
import trio

from tests.helpers.clients import closed_with, connect
from tests.helpers.clocks import WallClock
from tests.helpers.servers import running
from tests.helpers.tokens import SECRET, hand_made_token, make_token


async def test_two_users_see_each_others_messages_in_order(server):
    async with connect(server, 1, "alice") as alice, connect(server, 2, "bob") as bob:
        await alice.join("general")
        ack = await bob.join("general")
        assert {m["user_id"] for m in ack["data"]["members"]} == {1, 2}
        await alice.expect("user_connected")
        for i in range(20):
            await alice.send("room_message", {"room": "general", "content": f"a{i}"}, request_id=i)
        await bob.send("room_message", {"room": "general", "content": "from bob"}, request_id="b")

        seen_by_bob = [await bob.expect("room_message") for _ in range(21)]
        seen_by_alice = [await alice.expect("room_message") for _ in range(21)]

    ids = [f["data"]["id"] for f in seen_by_bob]
    assert ids == sorted(ids) and len(set(ids)) == 21
    assert [f["data"]["id"] for f in seen_by_alice] == ids
    alice_contents = [f["data"]["content"] for f in seen_by_bob if f["data"]["user_id"] == 1]
    assert alice_contents == [f"a{i}" for i in range(20)]
    first = seen_by_bob[0]
    assert first["user_id"] == 1
    assert first["data"]["room"] == "general"
    assert first["data"]["username"] == "alice"
    assert first["data"]["message_type"] == "text"
    assert first["data"]["created_at"].endswith("Z")
    assert first["timestamp"].endswith("Z")
    assert "request_id" not in first  # only the sender's copy echoes it
    own = [f for f in seen_by_alice if f["data"]["user_id"] == 1]
    assert [f["request_id"] for f in own] == list(range(20))
    bobs_own = [f for f in seen_by_bob if f["data"]["user_id"] == 2]
    assert bobs_own[0]["request_id"] == "b"


async def test_a_member_of_two_rooms_gets_every_message_in_commit_order(server):
    """Bursts into two rooms and direct messages, committed together in
    groups: a connection in both rooms gets them all in id (commit) order,
    each sender its own copies with their request_ids."""
    async with (
        connect(server, 1, "alice") as alice,
        connect(server, 2, "bob") as bob,
        connect(server, 3, "carol") as carol,
    ):
        await alice.join("general")
        await bob.join("random")
        await carol.join("general")
        await carol.join("random")
        await alice.expect("user_connected")
        await bob.expect("user_connected")
        for i in range(30):
            await alice.send("room_message", {"room": "general", "content": f"g{i}"}, request_id=i)
            await bob.send("room_message", {"room": "random", "content": f"r{i}"}, request_id=i)
            if i % 3 == 0:
                await alice.send("direct_message", {"to_user_id": 3, "content": f"d{i}"})
        frames = [await carol.recv() for _ in range(70)]
        mine = [await alice.recv() for _ in range(40)]
    assert all(f["type"] in ("room_message", "direct_message") for f in frames)
    ids = [f["data"]["id"] for f in frames]
    assert ids == sorted(ids) and len(set(ids)) == 70
    contents = [f["data"]["content"] for f in frames]
    for prefix in "grd":
        got = [int(c[1:]) for c in contents if c[0] == prefix]
        assert got == sorted(got)
    own = [f for f in mine if f["type"] == "room_message"]
    assert [f["request_id"] for f in own] == list(range(30))
    assert [f["data"]["id"] for f in mine] == sorted(f["data"]["id"] for f in mine)


async def test_request_id_is_echoed_on_every_reply(server):
    async with connect(server) as alice:
        ack = await alice.request("join_room", {"room": "general"}, request_id="join-1")
        assert ack["request_id"] == "join-1"
        pong = await alice.request("ping", {}, request_id=42)
        assert pong["type"] == "pong" and pong["request_id"] == 42
        assert pong["data"]["timestamp"].endswith("Z")
        err = await alice.request("join_room", {"room": "nope"}, request_id="j2")
        assert err["type"] == "error" and err["request_id"] == "j2"
        err = await alice.request("no_such_type", {}, request_id="t")
        assert err["data"]["code"] == "INVALID_FORMAT" and err["request_id"] == "t"


async def test_history_survives_a_restart(make_config):
    config = make_config()
    async with running(config) as server:
        async with connect(server) as alice:
            await alice.join("general")
            for i in range(5):
                await alice.send("room_message", {"room": "general", "content": f"m{i}"})
            sent = [(await alice.expect("room_message"))["data"] for _ in range(5)]

    async with running(config) as server:
        async with connect(server, 2, "bob") as bob:
            history = await bob.request("room_history", {"room": "general", "limit": 50})
    assert history["type"] == "message_history"
    data = history["data"]
    assert data["room"] == "general"
    assert data["total"] == 5 and data["has_more"] is False
    assert data["messages"] == sent


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(None, id="missing"),
        pytest.param("not-a-jwt", id="garbage"),
        pytest.param(make_token(1, "alice")[:-4], id="truncated"),
        pytest.param(make_token(1, "alice", ttl=-3600), id="expired"),
        pytest.param(make_token(1, "alice", nbf=int(time.time()) + 3600), id="not-yet-valid"),
        pytest.param(make_token(None, "alice"), id="no-user-id"),
        pytest.param(make_token("7", "alice"), id="string-user-id"),
        pytest.param(make_token(-5, "alice"), id="negative-user-id"),
        pytest.param(make_token(2**70, "alice"), id="huge-user-id"),
        pytest.param(make_token(1, "alice", exp=None), id="no-exp"),
    ],
)
async def test_bad_tokens_get_auth_failed_then_4001(server, db_path, token):
    import jwt

    url_token = "" if token is None else token
    async with connect(server, token=url_token) as client:
        frame = await client.expect("error")
        assert frame["data"]["code"] == "AUTH_FAILED"
        await closed_with(client, 4001)
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT count(*) FROM users WHERE id > 0").fetchone() == (0,)
    del jwt


async def test_wrong_signature_and_alg_none_are_refused(server):
    import jwt

    forged = jwt.encode({"user_id": 1, "exp": int(time.time()) + 60}, "x" * 32, algorithm="HS256")
    unsigned = hand_made_token(
        {"alg": "none", "typ": "JWT"}, {"user_id": 1, "exp": int(time.time()) + 60}, None
    )
    for token in (forged, unsigned):
        async with connect(server, token=token) as client:
            assert (await client.expect("error"))["data"]["code"] == "AUTH_FAILED"
            await closed_with(client, 4001)


async def test_sub_claim_names_the_user(server):
    async with connect(server, token=make_token(None, "carol", sub="33")) as carol:
        ack = await carol.join("general")
        assert ack["data"]["members"] == [{"user_id": 33, "username": "carol"}]


async def test_unknown_room_and_private_rooms(server):
    async with connect(server, 1, "alice") as alice, connect(server, 3, "mallory") as mallory:
        err = await alice.request("join_room", {"room": "nonexistent_room"})
        assert err["type"] == "error"
        assert err["data"]["code"] == "ROOM_NOT_FOUND"
        assert err["data"]["details"] == {"room": "nonexistent_room"}

        err = await mallory.request("join_room", {"room": "staff"})
        assert err["data"]["code"] == "PERMISSION_DENIED"
        err = await mallory.request("room_history", {"room": "staff"})
        assert err["data"]["code"] == "PERMISSION_DENIED"
        err = await mallory.request("room_message", {"room": "staff", "content": "let me in"})
        assert err["data"]["code"] == "PERMISSION_DENIED"

        ack = await alice.join("staff")
        assert ack["data"]["room"] == "staff" and ack["data"]["success"] is True
        await mallory.nothing_pending()  # nothing about staff leaked to mallory


async def test_sending_to_a_room_not_joined_is_refused(server):
    async with connect(server) as alice:
        err = await alice.request("room_message", {"room": "general", "content": "hi"})
        assert err["data"]["code"] == "PERMISSION_DENIED"
        assert err["data"]["details"] == {"room": "general"}


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ("this is not json", None),
        ('{"type": "warp_drive", "data": {}}', "type"),
        ('{"data": {}}', None),
        ('{"type": "join_room", "data": {"room": 5}}', "data.room"),
        ('{"type": "join_room", "data": {}}', "data.room"),
        ('{"type": "join_room", "data": {"room": ""}}', "data.room"),
        ('{"type": "room_history", "data": {"room": "general", "offset": -1}}', "data.offset"),
        (
            '{"type": "room_message",'
            ' "data": {"room": "general", "content": "x", "message_type": "video"}}',
            "data.message_type",
        ),
        ("[" * 3000 + "]" * 3000, None),
    ],
)
async def test_invalid_frames_get_invalid_format_and_the_connection_stays_usable(
    server, raw, field
):
    async with connect(server) as alice:
        await alice.send_raw(raw)
        err = await alice.expect("error")
        assert err["data"]["code"] == "INVALID_FORMAT"
        if field is not None:
            assert err["data"]["details"]["field"] == field
        await alice.join("general")


async def test_unknown_fields_are_ignored(server):
    async with connect(server) as alice:
        ack = await alice.request("join_room", {"room": "general", "colour": "blue"})
        assert ack["type"] == "join_room_ack"


async def test_too_many_invalid_frames_close_1008(make_config):
    async with running(make_config(limits={"invalid_frames_per_minute": 3})) as server:
        async with connect(server) as alice:
            for _ in range(4):
                await alice.send_raw("nope")
            for _ in range(4):
                assert (await alice.expect("error"))["data"]["code"] == "INVALID_FORMAT"
            await closed_with(alice, 1008)


async def test_message_too_long(make_config):
    async with running(make_config(limits={"max_content_length": 10})) as server:
        async with connect(server) as alice:
            await alice.join("general")
            err = await alice.request("room_message", {"room": "general", "content": "x" * 11})
            assert err["data"]["code"] == "MESSAGE_TOO_LONG"
            assert err["data"]["details"] == {"max_length": 10}
            ok = await alice.request("room_message", {"room": "general", "content": "x" * 10})
            assert ok["type"] == "room_message"


async def test_rate_limit_refuses_and_recovers(make_config, db_path, slow_autojump_clock):
    config = make_config(limits={"messages_per_minute": 3, "messages_per_hour": 100})
    async with running(config) as server:
        async with connect(server, 1, "alice") as alice, connect(server, 2, "bob") as bob:
            await alice.join("general")
            await bob.join("general")
            await alice.expect("user_connected")
            for i in range(3):
                frame = await alice.request(
                    "room_message", {"room": "general", "content": f"ok{i}"}
                )
                assert frame["type"] == "room_message"
            err = await alice.request("room_message", {"room": "general", "content": "over"})
            assert err["data"]["code"] == "RATE_LIMITED"
            assert err["data"]["details"]["retry_after"] >= 1
            # The refused message was neither delivered nor stored.
            assert [(await bob.expect("room_message"))["data"]["content"] for _ in range(3)] == [
                "ok0",
                "ok1",
                "ok2",
            ]
            await bob.nothing_pending()
            # A second connection of the same user shares the limit.
            async with connect(server, 1, "alice") as alice2:
                await alice2.join("general")
                err = await alice2.request("room_message", {"room": "general", "content": "tab2"})
                assert err["data"]["code"] == "RATE_LIMITED"
            await trio.sleep(err["data"]["details"]["retry_after"])
            frame = await alice.request("room_message", {"room": "general", "content": "later"})
            assert frame["type"] == "room_message"
    with sqlite3.connect(db_path) as db:
        contents = [r[0] for r in db.execute("SELECT content FROM messages ORDER BY id")]
    assert contents == ["ok0", "ok1", "ok2", "later"]


async def test_expired_token_is_refused_on_join_and_send(make_config):
    wall = WallClock()
    async with running(make_config(), wall=wall) as server:
        async with connect(server, token=make_token(1, "alice", ttl=60)) as alice:
            await alice.join("general")
            wall.offset = 3600
            err = await alice.request("room_message", {"room": "general", "content": "late"})
            assert err["data"]["code"] == "AUTH_FAILED"
            await closed_with(alice, 4001)


async def test_auth_refresh_extends_the_connection(make_config):
    wall = WallClock()
    async with running(make_config(), wall=wall) as server:
        async with connect(server, token=make_token(1, "alice", ttl=60)) as alice:
            ack = await alice.request(
                "auth", {"token": make_token(1, "alice", ttl=7200)}, request_id="r"
            )
            assert ack["type"] == "auth_ack" and ack["request_id"] == "r"
            assert ack["data"]["user_id"] == 1 and ack["data"]["expires_at"].endswith("Z")
            wall.offset = 3600  # past the first token's expiry, within the second's
            await alice.join("general")
            frame = await alice.request(
                "room_message", {"room": "general", "content": "still here"}
            )
            assert frame["type"] == "room_message"

        async with connect(server, token=make_token(1, "alice")) as alice:
            err = await alice.request("auth", {"token": make_token(2, "bob")})
            assert err["data"]["code"] == "AUTH_FAILED"
            await closed_with(alice, 4001)


async def test_presence_counts_a_user_once_across_tabs(server):
    async with connect(server, 1, "alice") as alice:
        await alice.join("general")
        async with connect(server, 2, "bob") as bob_tab1:
            await bob_tab1.join("general")
            joined = await alice.expect("user_connected")
            assert joined["data"] == {"user_id": 2, "username": "bob", "room": "general"}
            async with connect(server, 2, "bob") as bob_tab2:
                ack = await bob_tab2.join("general")
                assert sorted(m["user_id"] for m in ack["data"]["members"]) == [1, 2]
                await alice.nothing_pending()  # a second tab is not a new presence
            await alice.nothing_pending()  # nor is one tab of two leaving
            left = await bob_tab1.request("leave_room", {"room": "general"})
            assert left["type"] == "leave_room_ack"
            gone = await alice.expect("user_disconnected")
            assert gone["data"] == {"user_id": 2, "username": "bob", "room": "general"}
            err = await bob_tab1.request("room_message", {"room": "general", "content": "x"})
            assert err["data"]["code"] == "PERMISSION_DENIED"
            await bob_tab1.nothing_pending()  # bob never got his own presence


async def test_logs_use_the_protocol_documents_format_and_never_show_tokens(make_config, caplog):
    """The log lines have the protocol document's format (``WS_CONNECT``,
    ``WS_MESSAGE``, ``WS_DISCONNECT``); no token, secret or content in them."""
    caplog.set_level(logging.DEBUG, logger="chatd")
    token = make_token(7, "grace")
    async with running(make_config()) as server:
        async with connect(server, token=token) as grace:
            await grace.join("general")
            await grace.request("room_message", {"room": "general", "content": "secret words"})
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "WS_CONNECT: UserID=7, IP=127.0.0.1" in text
    assert "WS_MESSAGE: Type=room_message, UserID=7, Room=general" in text
    assert "WS_DISCONNECT: UserID=7, Duration=" in text
    assert token not in text and token.split(".")[2] not in text
    assert "secret words" not in text
    assert SECRET not in text
