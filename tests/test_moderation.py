"""Room roles, kicks, bans and mutes, end to end on one real server (real
SQLite, real sockets): what the target, the room and the moderator see,
expiry on the server's clock, the rules of who may act on whom, the audit
log, the CLI and the HTTP API, and every refusal (nothing changed by one)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from chatd.config import Config
from chatd.server import ChatServer
from tests.helpers.clients import Client, connect, next_of
from tests.helpers.clocks import WallClock
from tests.helpers.http_client import http_request
from tests.helpers.servers import running
from tests.test_admin import chatd, ok
from tests.test_edits import answer, error_code, post

OWNER, MOD, MOD2, ANN, BOB = 1, 2, 3, 4, 5
KEY = "moderation-key-0123456789abcdef"
ROLES = {"owners": {"general": [OWNER]}, "moderators": {"general": [MOD, MOD2]}}
#: The audit's first lines: the config's roles, set at the start.
DECLARED = [("set_role", 0, OWNER), ("set_role", 0, MOD), ("set_role", 0, MOD2)]


def roles_config(make_config: Callable[..., Config], **extra: Any) -> Config:
    return make_config(rooms=ROLES, api={"keys": [KEY]}, **extra)


async def act(client: Client, action: str, request_id: str, **data: Any) -> dict[str, Any]:
    return await answer(client, action, {"room": "general", **data}, request_id)


def audit_lines(server: ChatServer) -> list[tuple[str, int, int]]:
    """The room's audit log as (action, actor, target), oldest first (read
    from the database file, after the server stopped)."""
    with closing(sqlite3.connect(server.config.storage.sqlite_path)) as db:
        rows = db.execute(
            "SELECT action, actor_id, user_id FROM moderation_log WHERE room = 'general'"
            " ORDER BY id"
        ).fetchall()
    return [(str(a), int(b), int(c)) for a, b, c in rows]


async def test_a_kick_takes_every_connection_out_and_they_may_come_back(
    make_config: Callable[..., Config],
) -> None:
    async with (
        running(roles_config(make_config)) as server,
        connect(server, MOD, "mod") as mod,
        connect(server, BOB, "bob") as bob,
        connect(server, BOB, "bob") as bob_phone,
        connect(server, ANN, "ann") as ann,
    ):
        roles = [(await client.join("general"))["data"]["role"] for client in (mod, bob, ann)]
        assert roles == ["moderator", "member", "member"]  # each joiner's own
        await bob_phone.join("general")
        ack = await act(mod, "kick", "k", user_id=BOB, reason="calm down")
        assert ack["type"] == "moderation_ack", ack
        assert ack["data"] == {"action": "kick", "room": "general", "user_id": BOB, "until": None}
        for device in (bob, bob_phone):
            kicked = await next_of(device, "kicked")
            assert kicked["data"] == {
                "room": "general",
                "by_user_id": MOD,
                "reason": "calm down",
                "until": None,
            }
        gone = await next_of(ann, "user_disconnected")
        assert gone["data"]["user_id"] == BOB
        # out of the room: sending there is refused, nothing of it arrives
        refused = await answer(bob, "room_message", {"room": "general", "content": "x"}, "r")
        assert error_code(refused) == "PERMISSION_DENIED"
        await post(ann, "without bob")
        await bob.nothing_pending()
        # a kick is not a ban: bob joins again
        assert (await bob.join("general"))["data"]["success"] is True
    assert audit_lines(server) == [*DECLARED, ("kick", MOD, BOB)]


async def test_a_ban_keeps_the_user_out_until_it_ends_by_itself(
    make_config: Callable[..., Config],
) -> None:
    clock = WallClock()
    async with (
        running(roles_config(make_config), wall=clock) as server,
        connect(server, MOD, "mod") as mod,
        connect(server, BOB, "bob") as bob,
    ):
        await mod.join("general")
        await bob.join("general")
        ack = await act(mod, "ban", "b", user_id=BOB, duration_seconds=3600, reason="spam")
        until = ack["data"]["until"]
        assert ack["type"] == "moderation_ack" and until.endswith("Z"), ack
        kicked = await next_of(bob, "kicked")
        assert kicked["data"] == {
            "room": "general",
            "by_user_id": MOD,
            "reason": "spam",
            "until": until,
        }
        refused = await answer(bob, "join_room", {"room": "general"}, "j1")
        assert error_code(refused) == "PERMISSION_DENIED"
        assert refused["data"]["details"] == {"room": "general", "banned_until": until}
        # the room's history is closed to a banned user too
        refused = await answer(bob, "room_history", {"room": "general"}, "h")
        assert error_code(refused) == "PERMISSION_DENIED"
        clock.offset += 3599
        assert error_code(await answer(bob, "join_room", {"room": "general"}, "j2")) == (
            "PERMISSION_DENIED"
        )
        clock.offset += 2  # over: nothing ran, the check compares with the clock
        back = await answer(bob, "join_room", {"room": "general"}, "j3")
        assert back["type"] == "join_room_ack", back
    assert audit_lines(server) == [*DECLARED, ("ban", MOD, BOB)]


async def test_a_ban_without_a_duration_lasts_until_unban(
    make_config: Callable[..., Config],
) -> None:
    clock = WallClock()
    async with (
        running(roles_config(make_config), wall=clock) as server,
        connect(server, MOD, "mod") as mod,
        connect(server, BOB, "bob") as bob,
    ):
        ack = await act(mod, "ban", "b", user_id=BOB)
        assert ack["data"]["until"] is None
        clock.offset += 1800  # (within the token's life)
        refused = await answer(bob, "join_room", {"room": "general"}, "j1")
        assert refused["data"]["details"] == {"room": "general", "banned_until": None}
        lifted = await act(mod, "unban", "u", user_id=BOB)
        assert lifted["data"] == {
            "action": "unban",
            "room": "general",
            "user_id": BOB,
            "until": None,
        }
        assert (await bob.join("general"))["data"]["success"] is True
    assert audit_lines(server) == [*DECLARED, ("ban", MOD, BOB), ("unban", MOD, BOB)]


async def test_a_muted_user_joins_and_reads_but_cannot_send(
    make_config: Callable[..., Config],
) -> None:
    clock = WallClock()
    async with (
        running(roles_config(make_config), wall=clock) as server,
        connect(server, MOD, "mod") as mod,
        connect(server, BOB, "bob") as bob,
    ):
        await mod.join("general")
        await bob.join("general")
        ack = await act(mod, "mute", "m", user_id=BOB, duration_seconds=60)
        until = ack["data"]["until"]
        refused = await answer(bob, "room_message", {"room": "general", "content": "hey"}, "s1")
        assert error_code(refused) == "PERMISSION_DENIED"
        assert refused["data"]["details"] == {"room": "general", "muted_until": until}
        await post(mod, "still reading?")
        assert (await next_of(bob, "room_message"))["data"]["content"] == "still reading?"
        left = await answer(bob, "leave_room", {"room": "general"}, "l")
        assert left["type"] == "leave_room_ack"
        assert (await bob.join("general"))["data"]["success"] is True  # joins as before
        clock.offset += 61  # over by itself
        assert (await answer(bob, "room_message", {"room": "general", "content": "back"}, "s2"))[
            "type"
        ] == "room_message"
        await act(mod, "mute", "m2", user_id=BOB)
        assert (
            error_code(await answer(bob, "room_message", {"room": "general", "content": "?"}, "s3"))
            == "PERMISSION_DENIED"
        )
        await act(mod, "unmute", "u", user_id=BOB)
        sent = await answer(bob, "room_message", {"room": "general", "content": "!"}, "s4")
        assert sent["type"] == "room_message"
        # muted in one room only
        await bob.join("random")
        await act(mod, "mute", "m3", user_id=BOB)
        other = await answer(bob, "room_message", {"room": "random", "content": "ok"}, "s5")
        assert other["type"] == "room_message"


@pytest.mark.parametrize(
    ("actor", "action", "data", "code"),
    [
        (ANN, "kick", {"user_id": BOB}, "PERMISSION_DENIED"),  # a member
        (MOD, "kick", {"user_id": OWNER}, "PERMISSION_DENIED"),  # nobody acts on an owner
        (OWNER, "ban", {"user_id": OWNER}, "PERMISSION_DENIED"),  # not even the owner
        (MOD, "ban", {"user_id": MOD2}, "PERMISSION_DENIED"),  # moderators on moderators
        (MOD, "mute", {"user_id": MOD}, "PERMISSION_DENIED"),  # (nor on themselves)
        (MOD, "ban", {"user_id": 999}, "USER_NOT_FOUND"),  # nobody by that id
        (MOD, "kick", {"user_id": BOB, "room": "nowhere"}, "ROOM_NOT_FOUND"),
        (MOD, "ban", {"user_id": BOB, "duration_seconds": -5}, "INVALID_FORMAT"),
        (MOD, "ban", {"user_id": BOB, "duration_seconds": 0}, "INVALID_FORMAT"),
        (MOD, "mute", {"user_id": BOB, "duration_seconds": 10**12}, "INVALID_FORMAT"),
        (MOD, "ban", {"user_id": BOB, "duration_seconds": 1.5}, "INVALID_FORMAT"),
        (MOD, "kick", {"user_id": BOB, "reason": "x" * 501}, "INVALID_FORMAT"),
        (MOD, "kick", {}, "INVALID_FORMAT"),
        (MOD, "unban", {"user_id": 0}, "INVALID_FORMAT"),
    ],
)
async def test_refusals_change_nothing(
    make_config: Callable[..., Config], actor: int, action: str, data: dict[str, Any], code: str
) -> None:
    async with running(roles_config(make_config)) as server:
        for uid in (OWNER, MOD, MOD2, ANN, BOB):
            async with connect(server, uid, f"user{uid}"):
                pass
        async with connect(server, actor, f"user{actor}") as client:
            refused = await act(client, action, "x", **data)
            assert error_code(refused) == code, refused
            assert refused["request_id"] == "x"
            # whoever it named still joins and sends as before
            target = data.get("user_id")
            if target in (OWNER, MOD, MOD2, ANN, BOB):
                async with connect(server, target, "t") as named:
                    await named.join("general")
                    await post(named, "unchanged")
    assert audit_lines(server) == DECLARED


async def test_an_owner_acts_on_moderators_and_roles_change_by_api(
    make_config: Callable[..., Config],
) -> None:
    async with (
        running(roles_config(make_config)) as server,
        connect(server, OWNER, "owner") as owner,
        connect(server, MOD2, "mod2") as mod2,
        connect(server, BOB, "bob") as bob,
    ):
        assert (await act(owner, "mute", "m", user_id=MOD2))["type"] == "moderation_ack"
        # the API makes bob a moderator, then mod2 a member again
        for uid, role in ((BOB, "moderator"), (MOD2, "member")):
            reply = await put_role(server.port, uid, {"role": role})
            assert reply.status == 200, reply.body
            assert json.loads(reply.body) == {"room": "general", "user_id": uid, "role": role}
        assert (await act(bob, "kick", "k", user_id=MOD2))["type"] == "moderation_ack"
        refused = await act(mod2, "kick", "k2", user_id=BOB)
        assert error_code(refused) == "PERMISSION_DENIED"
    assert audit_lines(server) == [
        *DECLARED,
        ("mute", OWNER, MOD2),
        ("set_role", 0, BOB),
        ("set_role", 0, MOD2),
        ("kick", BOB, MOD2),
    ]


async def put_role(
    port: int, user_id: int, body: Any, *, room: str = "general", key: str | None = KEY
) -> Any:
    headers = [("content-type", "application/json")]
    if key is not None:
        headers.append(("authorization", f"Bearer {key}"))
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await http_request(port, "PUT", f"/api/rooms/{room}/roles/{user_id}", raw, headers)


@pytest.mark.parametrize(
    ("path_room", "user", "body", "key", "status"),
    [
        ("general", "5", {"role": "admin"}, KEY, 400),
        ("general", "5", {"role": "moderator", "extra": 1}, KEY, 400),
        ("general", "5", b"not json", KEY, 400),
        ("general", "0", {"role": "moderator"}, KEY, 400),
        ("general", "5", {"role": "moderator"}, "wrong-key", 401),
        ("general", "5", {"role": "moderator"}, None, 401),
        ("nowhere", "5", {"role": "moderator"}, KEY, 404),
        ("bad%2Fname", "5", {"role": "moderator"}, KEY, 404),
    ],
)
async def test_bad_role_requests_get_a_clear_answer(
    make_config: Callable[..., Config],
    path_room: str,
    user: str,
    body: Any,
    key: str | None,
    status: int,
) -> None:
    async with running(roles_config(make_config)) as server:
        headers = [("content-type", "application/json")]
        if key is not None:
            headers.append(("authorization", f"Bearer {key}"))
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        path = f"/api/rooms/{path_room}/roles/{user}"
        reply = await http_request(server.port, "PUT", path, raw, headers)
        assert reply.status == status, reply.body
        assert "error" in json.loads(reply.body)
        wrong_method = await http_request(server.port, "GET", path, b"", headers)
        assert wrong_method.status == 405
    assert audit_lines(server) == DECLARED


async def test_a_kick_from_a_private_room_ends_the_membership(
    make_config: Callable[..., Config],
) -> None:
    rooms = {"private": {"staff": [OWNER, BOB]}, "owners": {"staff": [OWNER]}}
    async with (
        running(make_config(rooms=rooms)) as server,
        connect(server, OWNER, "owner") as owner,
        connect(server, BOB, "bob") as bob,
    ):
        await bob.join("staff")
        ack = await answer(owner, "kick", {"room": "staff", "user_id": BOB}, "k")
        assert ack["type"] == "moderation_ack", ack
        await next_of(bob, "kicked")
        refused = await answer(bob, "join_room", {"room": "staff"}, "j")
        assert error_code(refused) == "PERMISSION_DENIED"
        assert "member" in refused["data"]["message"]


async def test_moderators_delete_others_messages_and_read_their_versions(
    make_config: Callable[..., Config],
) -> None:
    async with (
        running(roles_config(make_config)) as server,
        connect(server, MOD, "mod") as mod,
        connect(server, BOB, "bob") as bob,
        connect(server, ANN, "ann") as ann,
    ):
        for client in (mod, bob, ann):
            await client.join("general")
        first = await post(bob, "rude")
        await answer(bob, "edit_message", {"message_id": first, "content": "ruder"}, "e")
        versions = await answer(mod, "message_versions", {"message_id": first}, "v")
        assert [v["content"] for v in versions["data"]["versions"]] == ["rude", "ruder"]
        refused = await answer(ann, "delete_message", {"message_id": first}, "d0")
        assert error_code(refused) == "PERMISSION_DENIED"
        deleted = await answer(mod, "delete_message", {"message_id": first}, "d")
        assert deleted["type"] == "message_deleted", deleted
        assert deleted["data"]["deleted_by"] == MOD
        seen = await next_of(ann, "message_deleted")
        assert seen["data"]["message_id"] == first
        # a moderator of one room is nobody in another
        await answer(bob, "join_room", {"room": "random"}, "jr")
        other = await post(bob, "elsewhere", room="random")
        refused = await answer(mod, "delete_message", {"message_id": other}, "d2")
        assert error_code(refused) == "PERMISSION_DENIED"


async def test_set_role_and_audit_from_the_cli(config_file: Path) -> None:
    out = ok(await chatd(config_file, "room", "set-role", "general", "7", "moderator"))
    assert out == "room general: user 7 is moderator\n"
    ok(await chatd(config_file, "room", "set-role", "general", "7", "member"))
    lines = ok(await chatd(config_file, "room", "audit", "general")).splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("set_role moderator  user 7  by config/CLI/API")
    assert lines[1].endswith("set_role member  user 7  by config/CLI/API")
    missing = await chatd(config_file, "room", "set-role", "nowhere", "7", "owner")
    assert missing.returncode != 0 and missing.stdout == b""
    assert missing.stderr.decode().count("\n") == 1 and "nowhere" in missing.stderr.decode()
    bad = await chatd(config_file, "room", "set-role", "general", "7", "admin")
    assert bad.returncode != 0 and b"invalid choice" in bad.stderr
