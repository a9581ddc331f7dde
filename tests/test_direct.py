"""Direct messages and ``dm_history``, end to end over a real socket."""

from __future__ import annotations

import sqlite3
import sys
from typing import Any

import trio

from tests.helpers.clients import Client, closed_with, connect
from tests.helpers.clocks import WallClock
from tests.helpers.servers import REPO, running, write_config
from tests.helpers.tokens import make_token

DM_KEYS = {
    "id",
    "from_user_id",
    "from_username",
    "to_user_id",
    "content",
    "message_type",
    "created_at",
}


async def dm(client: Client, to: int, content: str, request_id: Any = None) -> dict[str, Any]:
    """Send a text DM; return the sender's own copy (or the error)."""
    data = {"to_user_id": to, "content": content, "message_type": "text"}
    return await client.request("direct_message", data, request_id)


async def test_dm_reaches_every_device_of_both_users_in_the_protocol_documents_shape(server):
    """A DM reaches every connection of both users (the request id on the
    sender's only), its data in the protocol document's outgoing shape."""
    async with (
        connect(server, 1, "alice") as alice1,
        connect(server, 1, "alice") as alice2,
        connect(server, 2, "bob") as bob1,
        connect(server, 2, "bob") as bob2,
        connect(server, 3, "carol") as carol,
    ):
        own = await dm(alice1, 2, "Salut, comment ça va ?", request_id="dm-1")
        assert own["type"] == "direct_message"
        assert own["request_id"] == "dm-1"
        copies = [await c.expect("direct_message") for c in (alice2, bob1, bob2)]

        data = own["data"]
        assert set(data) == DM_KEYS
        assert data["from_user_id"] == 1
        assert data["from_username"] == "alice"
        assert data["to_user_id"] == 2
        assert data["content"] == "Salut, comment ça va ?"
        assert data["message_type"] == "text"
        assert data["created_at"].endswith("Z")
        assert isinstance(data["id"], int) and data["id"] >= 1
        assert own["user_id"] == 1 and own["timestamp"].endswith("Z")
        for copy in copies:
            assert copy["data"] == data
            assert copy["user_id"] == 1
            assert "request_id" not in copy  # only the sending connection's copy

        for client in (alice1, alice2, bob1, bob2, carol):
            await client.nothing_pending()  # one copy each; nothing for carol


async def test_dm_to_unknown_user_is_user_not_found(server, db_path):
    async with connect(server, 1, "alice") as alice:
        err = await dm(alice, 999, "anyone there?", request_id="x")
        assert err["type"] == "error" and err["request_id"] == "x"
        assert err["data"]["code"] == "USER_NOT_FOUND"
        assert err["data"]["details"] == {"user_id": 999}
        await alice.nothing_pending()
        err = await alice.request("dm_history", {"with_user": 999})
        assert err["data"]["code"] == "USER_NOT_FOUND"
        assert err["data"]["details"] == {"user_id": 999}
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (0,)


async def test_dm_to_an_offline_known_user_is_stored_for_later(server):
    async with connect(server, 2, "bob") as bob:
        await bob.nothing_pending()  # bob is now known
    async with connect(server, 1, "alice") as alice:
        own = await dm(alice, 2, "read this later", request_id=1)
        assert own["type"] == "direct_message" and own["request_id"] == 1
    async with connect(server, 2, "bob") as bob:
        history = await bob.request("dm_history", {"with_user": 1}, request_id="h")
    assert history["type"] == "message_history" and history["request_id"] == "h"
    assert history["data"]["with_user"] == 1
    assert history["data"]["total"] == 1
    assert history["data"]["messages"] == [own["data"]]


async def test_a_user_added_with_the_cli_can_receive_dms_while_the_server_runs(
    make_config, tmp_path, db_path
):
    config_file = write_config(tmp_path, db_path)
    async with running(make_config()) as server:
        async with connect(server, 1, "alice") as alice:
            err = await dm(alice, 42, "too early")
            assert err["data"]["code"] == "USER_NOT_FOUND"

            argv = [sys.executable, "-m", "chatd", "user", "add", "--config", str(config_file)]
            argv += ["--user-id", "42", "--username", "zed"]
            done = await trio.run_process(argv, cwd=REPO, capture_stdout=True, capture_stderr=True)
            assert done.returncode == 0, done.stderr

            own = await dm(alice, 42, "welcome, zed", request_id="w")
            assert own["type"] == "direct_message" and own["request_id"] == "w"
            assert own["data"]["to_user_id"] == 42

        async with connect(server, 42, "zed") as zed:
            history = await zed.request("dm_history", {"with_user": 1})
    assert [m["content"] for m in history["data"]["messages"]] == ["welcome, zed"]


async def test_dm_history_is_symmetric_and_paged_like_rooms(server):
    async with connect(server, 1, "alice") as alice, connect(server, 2, "bob") as bob:
        sent = []
        for i in range(5):
            sender, other, to = (alice, bob, 2) if i % 2 == 0 else (bob, alice, 1)
            own = await dm(sender, to, f"m{i}")
            assert own["type"] == "direct_message"
            assert (await other.expect("direct_message"))["data"] == own["data"]
            sent.append(own["data"])
        ids = [m["id"] for m in sent]
        assert ids == sorted(ids)

        for me, other_id in ((alice, 2), (bob, 1)):
            first = await me.request("dm_history", {"with_user": other_id, "limit": 2})
            data = first["data"]
            assert first["type"] == "message_history"
            assert data["with_user"] == other_id and "room" not in data
            assert data["total"] == 5 and data["has_more"] is True
            assert data["messages"] == sent[3:5]  # the newest page, oldest first
            for m in data["messages"]:
                assert set(m) == DM_KEYS

            middle = await me.request(
                "dm_history", {"with_user": other_id, "limit": 2, "offset": 2}
            )
            assert middle["data"]["messages"] == sent[1:3]
            assert middle["data"]["has_more"] is True

            last = await me.request("dm_history", {"with_user": other_id, "limit": 2, "offset": 4})
            assert last["data"]["messages"] == sent[0:1]
            assert last["data"]["has_more"] is False and last["data"]["total"] == 5

    async with connect(server, 3, "carol") as carol:
        # carol's conversation with alice is empty: she does not see alice and bob's.
        other = await carol.request("dm_history", {"with_user": 1})
        assert other["data"]["total"] == 0 and other["data"]["messages"] == []


async def test_dms_share_the_message_rate_limit(make_config):
    config = make_config(limits={"messages_per_minute": 2, "messages_per_hour": 100})
    async with running(config) as server:
        async with connect(server, 1, "alice") as alice, connect(server, 2, "bob") as bob:
            await alice.join("general")
            assert (await alice.request("room_message", {"room": "general", "content": "r"}))[
                "type"
            ] == "room_message"
            assert (await dm(alice, 2, "first"))["type"] == "direct_message"
            err = await dm(alice, 2, "over the limit", request_id="over")
            assert err["type"] == "error" and err["request_id"] == "over"
            assert err["data"]["code"] == "RATE_LIMITED"
            assert err["data"]["details"]["retry_after"] >= 1

            assert (await bob.expect("direct_message"))["data"]["content"] == "first"
            await bob.nothing_pending()  # the refused DM was not delivered
            history = await bob.request("dm_history", {"with_user": 1})
            assert [m["content"] for m in history["data"]["messages"]] == ["first"]


async def test_dm_with_an_expired_token_is_auth_failed_then_4001(make_config, db_path):
    wall = WallClock()
    async with running(make_config(), wall=wall) as server:
        async with connect(server, 2, "bob") as bob:
            await bob.nothing_pending()
            async with connect(server, token=make_token(1, "alice", ttl=60)) as alice:
                assert (await dm(alice, 2, "in time"))["type"] == "direct_message"
                assert (await bob.expect("direct_message"))["data"]["content"] == "in time"
                wall.offset = 3600
                err = await dm(alice, 2, "too late", request_id="late")
                assert err["data"]["code"] == "AUTH_FAILED"
                assert err["request_id"] == "late"
                await closed_with(alice, 4001)
            await bob.nothing_pending()
    with sqlite3.connect(db_path) as db:
        contents = [r[0] for r in db.execute("SELECT content FROM messages")]
    assert contents == ["in time"]


async def test_dm_to_self_is_delivered_once_per_connection(server):
    async with connect(server, 1, "alice") as tab1, connect(server, 1, "alice") as tab2:
        own = await dm(tab1, 1, "note to self", request_id="self")
        assert own["type"] == "direct_message" and own["request_id"] == "self"
        assert own["data"]["from_user_id"] == 1 and own["data"]["to_user_id"] == 1
        other = await tab2.expect("direct_message")
        assert other["data"] == own["data"] and "request_id" not in other
        await tab1.nothing_pending()
        await tab2.nothing_pending()
        history = await tab2.request("dm_history", {"with_user": 1})
        assert history["data"]["total"] == 1
        assert history["data"]["messages"] == [own["data"]]


async def test_a_connection_misses_nothing_sent_once_its_handshake_is_done(server):
    """The 101 comes only after the user is stored and its session is in the
    hub: a direct message sent right after a first-ever connect (no other
    round trip) is accepted and delivered live."""
    async with connect(server, 1, "alice") as alice:
        for user_id in range(100, 120):  # each a brand-new user
            async with connect(server, user_id, f"new{user_id}") as newcomer:
                sent = await alice.request(
                    "direct_message", {"to_user_id": user_id, "content": "hi"}
                )
                assert sent["type"] == "direct_message", sent
                got = await newcomer.expect("direct_message")
                assert got["data"]["id"] == sent["data"]["id"]
