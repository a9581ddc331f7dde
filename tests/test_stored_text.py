"""Stored text stays text: SQL-injection strings, HTML and script tags,
right-to-left and zero-width marks, emoji, NUL and the like, in room
messages, direct messages and usernames (from tokens), are stored and come
back byte-for-byte, live, in ``room_history`` / ``dm_history`` and in the
database itself; lone surrogates (sent as JSON escapes, since they cannot be
UTF-8) are refused with ``INVALID_FORMAT``. No query is changed by any of
them: afterwards the tables, rooms and message counts are exactly those
expected.

Room names are restricted by a pattern (1 to 64 letters, digits or
``_ . : @ -``; letters include non-ASCII ones): an injection-like name, a
mark or a NUL in a room name is ``INVALID_FORMAT`` on the wire, and such a
room cannot be created (config or CLI). Usernames must be printable: a
token whose username holds a control or format character (NUL, RLO, ZWJ) is
refused with ``AUTH_FAILED``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from chatd import cli
from chatd.config import Config, from_dict
from chatd.errors import ConfigError
from tests.helpers.clients import Client, closed_with, connect
from tests.helpers.servers import running
from tests.helpers.store import sqlite_rows
from tests.helpers.tokens import SECRET, make_token

HOSTILE = [
    "'; DROP TABLE messages; --",
    "Robert'); DROP TABLE users;--",
    '" OR "1"="1',
    "1; DELETE FROM messages WHERE 1=1",
    "%' UNION SELECT id, username, created_at FROM users --",
    "<script>alert('x')</script>",
    "<img src=x onerror=alert(1)>",
    "</textarea><svg/onload=alert(1)>",
    "\u202egnp.exe",  # right-to-left override
    "\u200f\u200eab",  # right-to-left and left-to-right marks
    "a\u200db",  # zero-width joiner
    "\u200b",  # zero-width space (not white space to str.strip)
    "👨\u200d👩\u200d👧\u200d👦",
    "😀🇫🇷👍🏽",
    "\u0000",
    "a\u0000b\u0000",
    "\\x00 \\u0000 \\",
    '{"type":"ping"}',
    "Ω≈ç√∫ 日本語テキスト ﷺ",
    "Z\u0364\u0314\u0351a\u0308\u0347l\u036e\u0312g\u0301o",
    "\ufeffBOM",
    "\U0010ffff\U0001f4a9",
    "line1\nline2\r\n\tend",
]

#: Printable hostile usernames: accepted and stored as they are.
PRINTABLE_NAMES = [
    "Robert'); DROP TABLE users;--",
    "' OR '1'='1",
    "<script>alert(1)</script>",
    "日本語の名前",
    "😀 émoji",
]
#: Usernames with control or format characters: refused.
UNPRINTABLE_NAMES = ["\u202eevil", "a\u200db", "a\u0000b", "\u200f", "tab\there"]


def assert_untouched(db_path: Path, messages: int) -> None:
    """Every table is there and the counts are those expected."""
    tables = {name for (name,) in sqlite_rows(db_path, "SELECT name FROM sqlite_master")}
    assert {"users", "rooms", "room_members", "messages"} <= tables
    assert sqlite_rows(db_path, "SELECT count(*) FROM messages") == [(messages,)]
    rooms = {name for (name,) in sqlite_rows(db_path, "SELECT name FROM rooms")}
    assert rooms == {"general", "random", "staff", "général", "日本"}
    assert sqlite_rows(db_path, "SELECT count(*) FROM users WHERE id > 0")[0][0] >= 1


@pytest.fixture
def config(make_config: Callable[..., Config]) -> Config:
    return make_config(rooms={"public": ["general", "random", "général", "日本"]})


async def history(client: Client, type_: str, data: dict[str, Any]) -> list[dict[str, Any]]:
    reply = await client.request(type_, {**data, "limit": 100})
    assert reply["type"] == "message_history", reply
    messages: list[dict[str, Any]] = reply["data"]["messages"]
    return messages


async def test_room_messages_come_back_byte_for_byte(config: Config, db_path: Path) -> None:
    async with running(config) as srv:
        async with connect(srv, 1, "alice") as alice, connect(srv, 2, "bob") as bob:
            await alice.join("general")
            await bob.join("general")
            await alice.expect("user_connected")
            for n, text in enumerate(HOSTILE):
                await alice.send("room_message", {"room": "general", "content": text}, n)
                own = await alice.expect("room_message")
                assert own["request_id"] == n
                assert own["data"]["content"] == text
                assert (await bob.expect("room_message"))["data"]["content"] == text
            stored = await history(bob, "room_history", {"room": "general"})
    assert [m["content"] for m in stored] == HOSTILE
    in_db = [c for (c,) in sqlite_rows(db_path, "SELECT content FROM messages ORDER BY id")]
    assert [c.encode("utf-8") for c in in_db] == [t.encode("utf-8") for t in HOSTILE]
    assert_untouched(db_path, len(HOSTILE))


async def test_direct_messages_come_back_byte_for_byte(config: Config, db_path: Path) -> None:
    async with running(config) as srv:
        async with connect(srv, 1, "alice") as alice, connect(srv, 2, "bob") as bob:
            for n, text in enumerate(HOSTILE):
                await alice.send("direct_message", {"to_user_id": 2, "content": text}, n)
                own = await alice.expect("direct_message")
                assert own["request_id"] == n and own["data"]["content"] == text
                assert (await bob.expect("direct_message"))["data"]["content"] == text
            from_alice = await history(bob, "dm_history", {"with_user": 1})
            from_bob = await history(alice, "dm_history", {"with_user": 2})
    assert [m["content"] for m in from_alice] == HOSTILE
    assert from_bob == from_alice
    in_db = [c for (c,) in sqlite_rows(db_path, "SELECT content FROM messages ORDER BY id")]
    assert [c.encode("utf-8") for c in in_db] == [t.encode("utf-8") for t in HOSTILE]
    assert_untouched(db_path, len(HOSTILE))


@pytest.mark.parametrize("name", PRINTABLE_NAMES)
async def test_usernames_from_tokens_are_stored_as_they_are(
    config: Config, db_path: Path, name: str
) -> None:
    async with running(config) as srv:
        async with connect(srv, 7, name) as client:
            ack = await client.join("général")
            assert ack["data"]["members"] == [{"user_id": 7, "username": name}]
            sent = await client.request("room_message", {"room": "général", "content": name})
            assert sent["data"]["username"] == name and sent["data"]["room"] == "général"
            (message,) = await history(client, "room_history", {"room": "général"})
            assert message["username"] == name
    assert sqlite_rows(db_path, "SELECT username FROM users WHERE id = 7") == [(name,)]
    assert sqlite_rows(db_path, "SELECT username FROM messages") == [(name,)]
    assert_untouched(db_path, 1)


@pytest.mark.parametrize("name", UNPRINTABLE_NAMES)
async def test_usernames_with_control_or_format_characters_are_refused(
    config: Config, db_path: Path, name: str
) -> None:
    async with running(config) as srv:
        async with connect(srv, token=make_token(7, name)) as client:
            assert (await client.expect("error"))["data"]["code"] == "AUTH_FAILED"
            await closed_with(client, 4001)
    assert sqlite_rows(db_path, "SELECT count(*) FROM users WHERE id > 0") == [(0,)]


LONE_SURROGATES = [
    '{"type":"room_message","data":{"room":"general","content":"\\ud800"}}',
    '{"type":"room_message","data":{"room":"general","content":"a\\udfffb"}}',
    '{"type":"room_message","data":{"room":"general","content":"\\ude00\\ud83d"}}',
    '{"type":"direct_message","data":{"to_user_id":2,"content":"\\udc00"}}',
    '{"type":"join_room","data":{"room":"gen\\ud800"}}',
    '{"type":"room_history","data":{"room":"\\udbff"}}',
    '{"type":"message_batch","data":{"messages":[{"type":"room_message",'
    '"data":{"room":"general","content":"\\ud800"}}]}}',
]


async def test_lone_surrogates_are_refused_and_nothing_is_stored(
    config: Config, db_path: Path
) -> None:
    async with running(config) as srv:
        async with connect(srv, 1, "alice") as alice, connect(srv, 2, "bob"):
            await alice.join("general")
            for raw in LONE_SURROGATES:
                await alice.send_raw(raw)
                err = await alice.expect("error")
                assert err["data"]["code"] == "INVALID_FORMAT", (raw, err)
                await alice.nothing_pending()
            # A proper surrogate pair is one character, stored as such.
            await alice.send_raw(
                '{"type":"room_message","data":{"room":"general","content":"\\ud83d\\ude00"}}'
            )
            assert (await alice.expect("room_message"))["data"]["content"] == "😀"
            (message,) = await history(alice, "room_history", {"room": "general"})
            assert message["content"] == "\U0001f600"
    assert sqlite_rows(db_path, "SELECT content FROM messages") == [("😀",)]
    assert_untouched(db_path, 1)


BAD_ROOM_NAMES = [
    "general'; DROP TABLE rooms;--",
    "general' OR '1'='1",
    "general OR 1=1",
    "<script>alert(1)</script>",
    "gen\u200deral",
    "\u202egeneral",
    "general\u0000",
    "general\n",
    "general%",
    "general/../staff",
    "x" * 65,
    "",
]


@pytest.mark.parametrize("room", BAD_ROOM_NAMES)
async def test_room_names_outside_the_pattern_are_invalid_format(
    config: Config, db_path: Path, room: str
) -> None:
    async with running(config) as srv:
        async with connect(srv, 1, "alice") as alice:
            for type_, data in [
                ("join_room", {"room": room}),
                ("room_history", {"room": room}),
                ("leave_room", {"room": room}),
                ("room_message", {"room": room, "content": "x"}),
            ]:
                err = await alice.request(type_, data, request_id=type_)
                assert err["type"] == "error", err
                assert err["data"]["code"] == "INVALID_FORMAT", err
                assert err["data"]["details"] == {"field": "data.room"}, err
                assert err["request_id"] == type_
            await alice.join("general")  # still usable
    assert_untouched(db_path, 0)


async def test_non_ascii_room_names_come_back_byte_for_byte(config: Config) -> None:
    async with running(config) as srv:
        async with connect(srv, 1, "alice") as alice:
            for room in ("général", "日本"):
                assert (await alice.join(room))["data"]["room"] == room
                sent = await alice.request("room_message", {"room": room, "content": room})
                assert sent["data"]["room"] == room
                reply = await alice.request("room_history", {"room": room})
                assert reply["data"]["room"] == room
                assert [m["room"] for m in reply["data"]["messages"]] == [room]


@pytest.mark.parametrize("room", BAD_ROOM_NAMES[:6])
def test_a_room_named_like_an_injection_cannot_be_created(
    tmp_path: Path, db_path: Path, room: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Neither in the config nor with ``chatd room create``."""
    with pytest.raises(ConfigError):
        from_dict({"auth": {"jwt_secret": SECRET}, "rooms": {"public": [room]}})
    with pytest.raises(ConfigError):
        from_dict({"auth": {"jwt_secret": SECRET}, "rooms": {"private": {room: [1]}}})
    config_file = tmp_path / "chatd.toml"
    config_file.write_text(
        f'[auth]\njwt_secret = "{SECRET}"\n[storage]\nsqlite_path = {json.dumps(str(db_path))}\n'
    )
    with pytest.raises(SystemExit) as info:
        cli.main(["room", "create", room, "--config", str(config_file)])
    assert info.value.code == 2
    assert "a room name is 1 to 64" in capsys.readouterr().err
    assert (
        not db_path.exists()
        or sqlite_rows(db_path, "SELECT name FROM rooms WHERE name = ?", room) == []
    )
