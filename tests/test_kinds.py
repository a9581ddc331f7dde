"""Message kinds (image, audio, reaction) and their refusals, end to end."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest

from tests.helpers.clients import Client, connect
from tests.helpers.servers import running


def msg(**fields: Any) -> dict[str, Any]:
    return {"room": "general", **fields}


async def refused(client: Client, data: dict[str, Any], code: str = "INVALID_FORMAT") -> dict:
    err = await client.request("room_message", data, request_id="bad")
    assert err["type"] == "error", err
    assert err["request_id"] == "bad"
    assert err["data"]["code"] == code, err
    details: dict = err["data"]["details"]
    return details


async def test_image_audio_and_reaction_are_delivered_and_kept_with_every_field(server):
    async with connect(server, 1, "alice") as alice, connect(server, 2, "bob") as bob:
        await alice.join("general")
        await bob.join("general")
        await alice.expect("user_connected")

        text = await alice.request("room_message", msg(content="look"), request_id="t")
        assert text["type"] == "room_message"
        target = text["data"]["id"]

        sent = [
            msg(
                content="Regardez cette photo !",
                message_type="image",
                media_url="/uploads/images/photo123.png",
                media_type="image/png",
            ),
            msg(
                content="Message vocal",
                message_type="audio",
                media_url="https://cdn.example.com/audio/voice123.mp3",
                duration=15.5,
            ),
            msg(content="👍", message_type="reaction", reply_to=target),
            msg(
                content="",
                message_type="image",
                media_url="http://cdn.example.com/x.jpg",
                media_type="image/jpeg",
                reply_to=target,
            ),
        ]
        own = []
        for i, data in enumerate(sent):
            frame = await alice.request("room_message", data, request_id=i)
            assert frame["type"] == "room_message", frame
            assert frame["request_id"] == i
            own.append(frame["data"])
        seen = [(await bob.expect("room_message"))["data"] for _ in range(5)]
        assert seen == [text["data"], *own]

        for data, out in zip(sent, own, strict=True):
            expected = {**data, "id": out["id"], "user_id": 1, "username": "alice"}
            expected["created_at"] = out["created_at"]
            assert out == expected
        assert own[1]["duration"] == 15.5
        assert own[2]["reply_to"] == target and own[2]["content"] == "👍"

        history = await bob.request("room_history", {"room": "general"})
        assert history["data"]["messages"] == [text["data"], *own]


@pytest.mark.parametrize(
    "url",
    [
        "javascript:alert(1)",
        "data:text/html,x",
        "//evil.example/x",
        "ftp://h/x",
        "http://",
        "/path with space",
        "https:///nohost",
        "uploads/relative.png",
        "/" + "a" * 2048,
    ],
)
@pytest.mark.parametrize("kind", ["image", "audio"])
async def test_bad_media_urls_are_refused(server, db_path, url, kind):
    extra = {"media_type": "image/png"} if kind == "image" else {"duration": 3.0}
    async with connect(server) as alice:
        await alice.join("general")
        details = await refused(alice, msg(message_type=kind, media_url=url, **extra))
        assert details["field"] == "data.media_url"
        await alice.nothing_pending()
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (0,)


@pytest.mark.parametrize("kind", ["text", "reaction"])
async def test_bad_media_url_is_refused_on_every_kind(server, kind):
    async with connect(server) as alice:
        await alice.join("general")
        ok = await alice.request("room_message", msg(content="target"))
        extra = {"reply_to": ok["data"]["id"]} if kind == "reaction" else {}
        data = msg(content="👍", message_type=kind, media_url="javascript:alert(1)", **extra)
        details = await refused(alice, data)
        assert details["field"] == "data.media_url"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"message_type": "image", "media_url": "/i.png"}, "data.media_type"),
        (
            {"message_type": "image", "media_url": "/i.png", "media_type": "text/html"},
            "data.media_type",
        ),
        (
            {"message_type": "image", "media_url": "/i.png", "media_type": "image/"},
            "data.media_type",
        ),
        ({"message_type": "image", "media_type": "image/png"}, "data.media_url"),
        ({"message_type": "audio", "media_url": "/a.mp3"}, "data.duration"),
        ({"message_type": "audio", "media_url": "/a.mp3", "duration": 0}, "data.duration"),
        ({"message_type": "audio", "media_url": "/a.mp3", "duration": -1}, "data.duration"),
        ({"message_type": "audio", "media_url": "/a.mp3", "duration": 99999}, "data.duration"),
        ({"message_type": "audio", "media_url": "/a.mp3", "duration": "15"}, "data.duration"),
        ({"message_type": "audio", "duration": 2.0}, "data.media_url"),
        ({"message_type": "reaction", "content": "👍"}, "data.reply_to"),
        ({"message_type": "reaction", "content": "👍", "reply_to": 0}, "data.reply_to"),
        ({"message_type": "reaction", "content": "", "reply_to": 1}, "data.content"),
        ({"message_type": "reaction", "content": "x" * 33, "reply_to": 1}, "data.content"),
        ({"message_type": "video", "content": "x"}, "data.message_type"),
        ({"message_type": "TEXT", "content": "x"}, "data.message_type"),
        ({"message_type": "text", "content": "   "}, "data.content"),
    ],
)
async def test_kind_rules_are_invalid_format_naming_the_field(server, db_path, fields, field):
    async with connect(server) as alice:
        await alice.join("general")
        details = await refused(alice, msg(**fields))
        assert details["field"] == field
        await alice.nothing_pending()
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (0,)


async def test_reply_to_must_name_a_message_of_the_same_room(server, db_path):
    async with connect(server, 1, "alice") as alice, connect(server, 2, "bob") as bob:
        await alice.join("random")
        elsewhere = await alice.request("room_message", {"room": "random", "content": "there"})
        dm = await alice.request("direct_message", {"to_user_id": 2, "content": "private"})
        assert dm["type"] == "direct_message"
        assert (await bob.expect("direct_message"))["data"] == dm["data"]

        await alice.join("general")
        await bob.join("general")
        await alice.expect("user_connected")
        for target in (elsewhere["data"]["id"], dm["data"]["id"], 10**9):
            for kind in ("reaction", "text"):
                details = await refused(
                    alice, msg(content="👍", message_type=kind, reply_to=target)
                )
                assert details["field"] == "data.reply_to"
        # A reaction in a DM cannot point at a room message either.
        err = await alice.request(
            "direct_message",
            {
                "to_user_id": 2,
                "content": "👍",
                "message_type": "reaction",
                "reply_to": elsewhere["data"]["id"],
            },
            request_id="dmr",
        )
        assert err["data"]["code"] == "INVALID_FORMAT" and err["request_id"] == "dmr"
        assert err["data"]["details"]["field"] == "data.reply_to"

        await bob.nothing_pending()  # nothing was delivered
        await alice.nothing_pending()
        history = await bob.request("room_history", {"room": "general"})
        assert history["data"]["total"] == 0
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (2,)


async def test_a_long_image_caption_is_message_too_long(make_config):
    async with running(make_config(limits={"max_content_length": 10})) as server:
        async with connect(server) as alice:
            await alice.join("general")
            image = msg(message_type="image", media_url="/i.png", media_type="image/png")
            details = await refused(alice, {**image, "content": "x" * 11}, "MESSAGE_TOO_LONG")
            assert details == {"max_length": 10}
            ok = await alice.request("room_message", {**image, "content": "x" * 10})
            assert ok["type"] == "room_message" and ok["data"]["content"] == "x" * 10


async def test_kinds_in_direct_messages_and_dm_history(server):
    async with connect(server, 1, "alice") as alice, connect(server, 2, "bob") as bob:
        first = await alice.request("direct_message", {"to_user_id": 2, "content": "hi"})
        assert first["type"] == "direct_message"
        sent = [
            {
                "to_user_id": 2,
                "content": "",
                "message_type": "image",
                "media_url": "/uploads/a.png",
                "media_type": "image/png",
            },
            {
                "to_user_id": 2,
                "content": "",
                "message_type": "audio",
                "media_url": "/uploads/a.ogg",
                "duration": 3600,
            },
            {
                "to_user_id": 2,
                "content": "❤️",
                "message_type": "reaction",
                "reply_to": first["data"]["id"],
            },
        ]
        own = []
        for data in sent:
            frame = await alice.request("direct_message", data)
            assert frame["type"] == "direct_message", frame
            own.append(frame["data"])
        for data, out in zip(sent, own, strict=True):
            expected = {k: v for k, v in data.items() if k != "to_user_id"}
            assert {k: out[k] for k in expected} == expected
            assert out["from_user_id"] == 1 and out["to_user_id"] == 2
        assert [(await bob.expect("direct_message"))["data"] for _ in range(4)] == [
            first["data"],
            *own,
        ]
        history = await bob.request("dm_history", {"with_user": 1})
        assert history["data"]["messages"] == [first["data"], *own]

        err = await alice.request(
            "direct_message",
            {"to_user_id": 2, "message_type": "audio", "media_url": "/a", "duration": 3600.5},
        )
        assert err["data"]["details"]["field"] == "data.duration"
        err = await alice.request(
            "direct_message",
            {
                "to_user_id": 2,
                "message_type": "image",
                "media_url": "data:image/png;base64,AA",
                "media_type": "image/png",
            },
        )
        assert err["data"]["details"]["field"] == "data.media_url"
        await bob.nothing_pending()
