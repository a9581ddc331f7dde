"""POST /api/publish: a backend's notifications to a room or to a user, end
to end: HTTP in (raw h11 client, and curl), WebSocket ``notification``
frames out, and the stored history.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio
import trio.testing

from chatd.config import Config
from chatd.server import ChatServer
from tests.helpers.clients import Client, connect
from tests.helpers.http_client import HttpReply, http_request
from tests.helpers.servers import running

pytestmark = pytest.mark.usefixtures("collect_garbage")

KEY = "publish-key-0123456789abcdef"
OTHER_KEY = "second-key-fedcba9876543210"


async def publish(
    port: int,
    payload: Any,
    *,
    key: str | None = KEY,
    authorization: str | None = None,
    time_limit: float | None = 10.0,
) -> HttpReply:
    """POST /api/publish with ``payload`` (bytes as they are, else JSON)."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = [("content-type", "application/json")]
    if authorization is not None:
        headers.append(("authorization", authorization))
    elif key is not None:
        headers.append(("authorization", f"Bearer {key}"))
    return await http_request(port, "POST", "/api/publish", body, headers, time_limit=time_limit)


async def history_total(client: Client, room: str = "general") -> int:
    reply = await client.request("room_history", {"room": room, "limit": 100})
    assert reply["type"] == "message_history", reply
    total: int = reply["data"]["total"]
    return total


@pytest.fixture
async def api_server(make_config: Callable[..., Config]) -> AsyncIterator[ChatServer]:
    async with running(make_config(api={"keys": [KEY, OTHER_KEY]})) as srv:
        yield srv


# === 1. off, and authentication =================================================


async def test_api_off_without_keys_is_404(server: ChatServer) -> None:
    async with connect(server, 1, "alice") as alice:
        await alice.join("general")
        reply = await publish(server.port, {"room": "general", "content": "hi"})
        assert reply.status == 404
        assert "error" in reply.json()
        await alice.nothing_pending()
        assert await history_total(alice) == 0


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer wrong-key-0123456789abcdef",
        f"Basic {KEY}",
        KEY,
        "Bearer",
        f"Bearer {KEY}x",
        f"Bearer {KEY[:-1]}",
    ],
    ids=["missing", "wrong", "basic", "no-scheme", "empty", "longer", "shorter"],
)
async def test_missing_or_wrong_key_is_401_and_nothing_happens(
    api_server: ChatServer, authorization: str | None
) -> None:
    async with connect(api_server, 1, "alice") as alice:
        await alice.join("general")
        before = await history_total(alice)
        reply = await publish(
            api_server.port,
            {"room": "general", "content": "sneaky"},
            key=None,
            authorization=authorization,
        )
        assert reply.status == 401
        assert reply.headers["www-authenticate"] == "Bearer"
        assert "error" in reply.json()
        await alice.nothing_pending()
        assert await history_total(alice) == before


@pytest.mark.parametrize("key", [KEY, OTHER_KEY])
async def test_every_configured_key_works_and_scheme_is_case_insensitive(
    api_server: ChatServer, key: str
) -> None:
    reply = await publish(
        api_server.port, {"room": "general", "content": "ok"}, authorization=f"bearer {key}"
    )
    assert reply.status == 200, reply


# === 2. a room notification =====================================================


async def test_room_notification_reaches_every_member_and_is_stored(
    api_server: ChatServer,
) -> None:
    port = api_server.port
    async with (
        connect(api_server, 1, "alice") as alice,
        connect(api_server, 2, "bob") as bob,
        connect(api_server, 3, "carol") as carol,
    ):
        await alice.join("general")
        await bob.join("general")
        await alice.expect("user_connected")
        await carol.join("random")
        body = {"room": "general", "content": "Deploy finished", "data": {"build": 42}}
        reply = await publish(port, body)
        assert reply.status == 200, reply
        assert reply.headers["content-type"] == "application/json"
        answer = reply.json()
        assert set(answer) == {"id", "created_at"}
        assert isinstance(answer["id"], int) and answer["id"] > 0
        expected = {
            "id": answer["id"],
            "room": "general",
            "content": "Deploy finished",
            "data": {"build": 42},
            "created_at": answer["created_at"],
        }
        for member in (alice, bob):
            frame = await member.expect("notification")
            assert frame["data"] == expected
            assert frame["timestamp"].endswith("Z")
            await member.nothing_pending()
        # Not a member of general: nothing.
        await carol.nothing_pending()

        history = await alice.request("room_history", {"room": "general"})
        messages = history["data"]["messages"]
        assert history["data"]["total"] == 1
        stored = messages[-1]
        assert stored["id"] == answer["id"]
        assert stored["message_type"] == "notification"
        assert stored["user_id"] == 0
        assert stored["username"] == "system"
        assert stored["content"] == "Deploy finished"
        assert stored["data"] == {"build": 42}
        assert stored["created_at"] == answer["created_at"]
        assert stored["room"] == "general"

        # Ids are shared with chat messages: the next one is larger.
        sent = await alice.request("room_message", {"room": "general", "content": "nice"})
        assert sent["type"] == "room_message"
        assert sent["data"]["id"] > answer["id"]


async def test_a_missed_notification_is_replayed_as_a_notification(
    api_server: ChatServer,
) -> None:
    """Recovery replays a notification in its live shape, not as a chat message."""
    async with connect(api_server, 1, "alice") as alice:
        sent = await alice.request("room_message", {"room": "general", "content": "x"})
        assert sent["type"] == "error"  # not joined yet: nothing stored
        await alice.join("general")
        first = await alice.request("room_message", {"room": "general", "content": "before"})
        since = first["data"]["id"]
    reply = await publish(api_server.port, {"room": "general", "content": "while away"})
    assert reply.status == 200, reply
    async with connect(api_server, 1, "alice") as alice:
        await alice.send("join_room", {"room": "general", "since_id": since})
        ack = await alice.expect("join_room_ack")
        assert ack["data"]["recovered"] is True
        frame = await alice.expect("notification")
        assert frame["data"]["id"] == reply.json()["id"]
        assert frame["data"]["content"] == "while away"
        assert "user_id" not in frame  # caused by no user
        await alice.nothing_pending()


async def test_notification_without_data_has_no_data(api_server: ChatServer) -> None:
    async with connect(api_server, 1, "alice") as alice:
        await alice.join("general")
        reply = await publish(api_server.port, {"room": "general", "content": "plain"})
        assert reply.status == 200
        frame = await alice.expect("notification")
        assert frame["data"]["content"] == "plain"
        assert "data" not in frame["data"]


async def test_private_room_notification_reaches_its_members(api_server: ChatServer) -> None:
    async with connect(api_server, 1, "alice") as alice:
        await alice.join("staff")
        reply = await publish(api_server.port, {"room": "staff", "content": "staff only"})
        assert reply.status == 200
        assert (await alice.expect("notification"))["data"]["room"] == "staff"


# === 3. a user notification =====================================================


async def test_user_notification_reaches_every_tab_of_the_user_only(
    api_server: ChatServer,
) -> None:
    port = api_server.port
    async with (
        connect(api_server, 2, "bob") as tab1,
        connect(api_server, 2, "bob") as tab2,
        connect(api_server, 1, "alice") as alice,
    ):
        for client in (tab1, tab2, alice):
            await client.join("general")
        await tab1.expect("user_connected")
        await tab2.expect("user_connected")
        body = {"user_id": 2, "content": "Your report is ready", "data": {"url": "/r/1"}}
        reply = await publish(port, body)
        assert reply.status == 200, reply
        answer = reply.json()
        expected = {
            "id": answer["id"],
            "to_user_id": 2,
            "content": "Your report is ready",
            "data": {"url": "/r/1"},
            "created_at": answer["created_at"],
        }
        for tab in (tab1, tab2):
            frame = await tab.expect("notification")
            assert frame["data"] == expected
            await tab.nothing_pending()
        await alice.nothing_pending()

        history = await tab1.request("dm_history", {"with_user": 0})
        assert history["type"] == "message_history", history
        assert history["data"]["with_user"] == 0
        assert history["data"]["total"] == 1
        (stored,) = history["data"]["messages"]
        assert stored["id"] == answer["id"]
        assert stored["message_type"] == "notification"
        assert stored["from_user_id"] == 0
        assert stored["from_username"] == "system"
        assert stored["to_user_id"] == 2
        assert stored["content"] == "Your report is ready"
        assert stored["data"] == {"url": "/r/1"}
        # Not alice's, and not in any room.
        other = await alice.request("dm_history", {"with_user": 0})
        assert other["data"]["total"] == 0
        assert await history_total(alice) == 0


async def test_user_notification_to_offline_user_is_kept(api_server: ChatServer) -> None:
    async with connect(api_server, 5, "eve") as eve:
        await eve.nothing_pending()
    reply = await publish(api_server.port, {"user_id": 5, "content": "while you were away"})
    assert reply.status == 200
    async with connect(api_server, 5, "eve") as eve:
        await eve.nothing_pending()
        history = await eve.request("dm_history", {"with_user": 0})
    assert [m["content"] for m in history["data"]["messages"]] == ["while you were away"]


# === 4. refusals ================================================================


async def test_unknown_room_is_404_room_not_found(api_server: ChatServer) -> None:
    reply = await publish(api_server.port, {"room": "nowhere", "content": "hi"})
    assert reply.status == 404
    body = reply.json()
    assert body["code"] == "ROOM_NOT_FOUND"
    assert body["details"] == {"room": "nowhere"}


async def test_unknown_user_is_404_user_not_found(api_server: ChatServer) -> None:
    reply = await publish(api_server.port, {"user_id": 424242, "content": "hi"})
    assert reply.status == 404
    body = reply.json()
    assert body["code"] == "USER_NOT_FOUND"
    assert body["details"] == {"user_id": 424242}


@pytest.mark.parametrize(
    "payload",
    [
        {"room": "general", "user_id": 1, "content": "both"},
        {"content": "neither"},
        b"{not json",
        b"",
        b"[1, 2]",
        {"room": "general", "content": "hi", "priority": "high"},
        {"room": "general", "content": ""},
        {"room": "general"},
        {"room": "general", "content": 5},
        {"room": "general", "content": "hi", "data": [1, 2]},
        {"room": "bad room!", "content": "hi"},
        {"user_id": 0, "content": "hi"},
    ],
    ids=[
        "both",
        "neither",
        "bad-json",
        "empty-body",
        "not-an-object",
        "unknown-field",
        "empty-content",
        "no-content",
        "content-not-a-string",
        "data-not-an-object",
        "bad-room-name",
        "user-0",
    ],
)
async def test_bad_request_is_400_and_nothing_is_sent(api_server: ChatServer, payload: Any) -> None:
    async with connect(api_server, 1, "alice") as alice:
        await alice.join("general")
        reply = await publish(api_server.port, payload)
        assert reply.status == 400, reply
        assert "error" in reply.json()
        await alice.nothing_pending()
        assert await history_total(alice) == 0
        dms = await alice.request("dm_history", {"with_user": 0})
        assert dms["data"]["total"] == 0


async def test_content_over_max_content_length_is_413(
    make_config: Callable[..., Config],
) -> None:
    config = make_config(api={"keys": [KEY]}, limits={"max_content_length": 50})
    async with running(config) as srv, connect(srv, 1, "alice") as alice:
        await alice.join("general")
        reply = await publish(srv.port, {"room": "general", "content": "x" * 51})
        assert reply.status == 413
        body = reply.json()
        assert body["code"] == "MESSAGE_TOO_LONG"
        assert body["details"] == {"max_length": 50}
        await alice.nothing_pending()
        assert (await publish(srv.port, {"room": "general", "content": "x" * 50})).status == 200
        assert (await alice.expect("notification"))["data"]["content"] == "x" * 50


async def test_data_over_max_data_bytes_is_400(make_config: Callable[..., Config]) -> None:
    config = make_config(api={"keys": [KEY], "max_data_bytes": 32})
    async with running(config) as srv, connect(srv, 1, "alice") as alice:
        await alice.join("general")
        big = {"k": "x" * 40}
        reply = await publish(srv.port, {"room": "general", "content": "hi", "data": big})
        assert reply.status == 400
        assert reply.json()["code"] == "INVALID_FORMAT"
        await alice.nothing_pending()
        assert await history_total(alice) == 0
        small = {"k": "x" * 10}
        reply = await publish(srv.port, {"room": "general", "content": "hi", "data": small})
        assert reply.status == 200
        assert (await alice.expect("notification"))["data"]["data"] == small


async def test_third_call_over_the_api_rate_limit_is_429_with_retry_after(
    make_config: Callable[..., Config],
) -> None:
    config = make_config(api={"keys": [KEY], "messages_per_minute": 2, "messages_per_hour": 100})
    async with running(config) as srv, connect(srv, 1, "alice") as alice:
        await alice.join("general")
        for n in range(2):
            reply = await publish(srv.port, {"room": "general", "content": f"n{n}"})
            assert reply.status == 200, reply
            assert (await alice.expect("notification"))["data"]["content"] == f"n{n}"
        reply = await publish(srv.port, {"room": "general", "content": "n2"})
        assert reply.status == 429
        retry_after = int(reply.headers["retry-after"])
        assert 1 <= retry_after <= 60
        body = reply.json()
        assert body["code"] == "RATE_LIMITED"
        assert body["details"] == {"retry_after": retry_after}
        # The refused one is neither delivered nor stored.
        await alice.nothing_pending()
        assert await history_total(alice) == 2
        # The limit is the API's, not a user's: users still chat.
        sent = await alice.request("room_message", {"room": "general", "content": "me"})
        assert sent["type"] == "room_message"
        metrics = (await http_request(srv.port, "GET", "/metrics")).body.decode()
        assert "chatd_api_published_total 2.0" in metrics
        assert "chatd_rate_limited_total 1.0" in metrics


async def test_api_rate_limit_refills(
    slow_autojump_clock: trio.testing.MockClock, make_config: Callable[..., Config]
) -> None:
    config = make_config(api={"keys": [KEY], "messages_per_minute": 2, "messages_per_hour": 100})
    async with running(config) as srv:
        # No request deadline: on this clock, time would jump to it.
        for n in range(2):
            reply = await publish(srv.port, {"room": "general", "content": f"{n}"}, time_limit=None)
            assert reply.status == 200
        reply = await publish(srv.port, {"room": "general", "content": "x"}, time_limit=None)
        assert reply.status == 429
        retry_after = int(reply.headers["retry-after"])
        await trio.sleep(retry_after - 1)
        reply = await publish(srv.port, {"room": "general", "content": "y"}, time_limit=None)
        assert reply.status == 429
        await trio.sleep(1)
        reply = await publish(srv.port, {"room": "general", "content": "z"}, time_limit=None)
        assert reply.status == 200


async def test_publish_while_draining_is_503(
    slow_autojump_clock: trio.testing.MockClock, make_config: Callable[..., Config]
) -> None:
    config = make_config(api={"keys": [KEY]}, server={"drain_grace_seconds": 30})
    async with running(config) as srv, connect(srv, 1, "alice") as alice:
        await alice.join("general")
        assert (await publish(srv.port, {"room": "general", "content": "before"})).status == 200
        await alice.expect("notification")
        with trio.fail_after(120):
            srv.stop()
            reply = await publish(srv.port, {"room": "general", "content": "during"})
            assert reply.status == 503
            assert "error" in reply.json()
            # The key is still checked first.
            wrong = await publish(srv.port, {"room": "general", "content": "x"}, key="y" * 20)
            assert wrong.status == 401
            await alice.nothing_pending()
            assert await history_total(alice) == 1


async def test_get_is_405(api_server: ChatServer) -> None:
    reply = await http_request(
        api_server.port, "GET", "/api/publish", headers=[("authorization", f"Bearer {KEY}")]
    )
    assert reply.status == 405
    assert reply.headers["allow"] == "POST"


# === 5. the documented curl command ================================================

CURL = shutil.which("curl")


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
async def test_curl_example_reaches_a_browser_like_client(api_server: ChatServer) -> None:
    port = api_server.port
    # The example: curl -sS -X POST http://127.0.0.1:PORT/api/publish
    #   -H "Authorization: Bearer KEY" -H "Content-Type: application/json"
    #   -d '{"room":"general","content":"hi"}'
    command = [
        "curl",
        "-sS",
        "-X",
        "POST",
        f"http://127.0.0.1:{port}/api/publish",
        "-H",
        f"Authorization: Bearer {KEY}",
        "-H",
        "Content-Type: application/json",
        "-d",
        '{"room":"general","content":"hi"}',
    ]
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    origin = [("Origin", "http://localhost")]
    async with connect(api_server, 7, "browser", extra_headers=origin) as browser:
        await browser.join("general")
        with trio.fail_after(10):
            done = await trio.run_process(command, capture_stdout=True, check=True, env=env)
        answer = json.loads(done.stdout)
        assert set(answer) == {"id", "created_at"}
        frame = await browser.expect("notification")
        assert frame["data"]["id"] == answer["id"]
        assert frame["data"]["content"] == "hi"
        assert frame["data"]["room"] == "general"


async def test_reload_with_unchanged_limits_keeps_users_rate_limits(
    make_config: Callable[..., Config],
) -> None:
    """The users' side, for contrast: a reload that leaves the limits alone
    keeps every bucket (``Context.reload``)."""
    limits = {"messages_per_minute": 2, "messages_per_hour": 100}
    async with running(make_config(limits=limits)) as srv, connect(srv, 1, "alice") as alice:
        await alice.join("general")
        for n in range(2):
            sent = await alice.request("room_message", {"room": "general", "content": f"{n}"})
            assert sent["type"] == "room_message"
        await srv.reload(make_config(limits={**limits, "max_content_length": 3000}))
        refused = await alice.request("room_message", {"room": "general", "content": "x"})
        assert refused["type"] == "error"
        assert refused["data"]["code"] == "RATE_LIMITED"


async def test_reload_with_unchanged_api_limits_keeps_the_api_rate_limit(
    make_config: Callable[..., Config],
) -> None:
    api = {"keys": [KEY], "messages_per_minute": 2, "messages_per_hour": 100}
    async with running(make_config(api=api)) as srv:
        for n in range(2):
            assert (await publish(srv.port, {"room": "general", "content": f"{n}"})).status == 200
        assert (await publish(srv.port, {"room": "general", "content": "x"})).status == 429
        # The same settings again (a SIGHUP after editing another section).
        await srv.reload(make_config(api=api, limits={"max_content_length": 3000}))
        assert srv.config.limits.max_content_length == 3000
        reply = await publish(srv.port, {"room": "general", "content": "y"})
        assert reply.status == 429, reply
