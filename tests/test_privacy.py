"""A user's export and erasure (``chatd user export`` / ``erase``) as a real
subprocess on the database of a running server (real SQLite, real
sockets): what the other party sees after an erasure, in history and in
their own export, and every refusal."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from chatd.config import Config
from tests.helpers.clients import connect, next_of
from tests.helpers.servers import running
from tests.test_admin import chatd, ok
from tests.test_edits import answer, error_code, history, post

ALICE, BOB = 1, 2


async def test_an_erased_users_messages_are_tombstones_for_everyone(
    make_config: Callable[..., Config], config_file: Path, tmp_path: Path
) -> None:
    async with running(make_config()) as server, connect(server, ALICE, "alice") as alice:
        await alice.join("general")
        async with connect(server, BOB, "bob") as bob:
            await bob.join("general")
            said = await post(bob, "hello @alice", mentions=[ALICE])
            await answer(bob, "edit_message", {"message_id": said, "content": "hi @alice"}, "e")
            data = {"to_user_id": ALICE, "content": "psst"}
            secret = await answer(bob, "direct_message", data, "d")
            data = {"to_user_id": BOB, "content": "yes?"}
            reply = await answer(alice, "direct_message", data, "r")
            await next_of(bob, "direct_message")
        await answer(alice, "block_user", {"user_id": BOB}, "b")
        mine = await post(alice, "alice stays")
        await server.ctx.reads.flush()  # (bob's last-seen time, written a second later)

        # erased while the server runs (bob gone: docs/privacy.md)
        out = ok(await chatd(config_file, "user", "erase", "--user-id", str(BOB)))
        assert out == f"user {BOB} erased: 2 messages are tombstones now\n"

        page = await history(alice)
        by_id = {m["id"]: m for m in page["messages"]}
        assert page["total"] == 2
        assert by_id[said]["deleted"] is True and by_id[said]["content"] == ""
        assert by_id[said]["username"] == f"deleted user {BOB}"
        assert "mentions" not in by_id[said] and "edited_at" in by_id[said]
        assert by_id[mine]["content"] == "alice stays"
        versions = await answer(alice, "message_versions", {"message_id": said}, "v")
        assert error_code(versions) == "MESSAGE_NOT_FOUND"
        dms = await answer(alice, "dm_history", {"with_user": BOB}, "h")
        shapes = {m["id"]: m for m in dms["data"]["messages"]}
        assert shapes[secret["data"]["id"]]["deleted"] is True
        assert shapes[secret["data"]["id"]]["content"] == ""
        assert shapes[reply["data"]["id"]]["content"] == "yes?"  # what alice wrote stays
        blocks = await answer(alice, "block_list", {}, "l")
        assert blocks["data"]["user_ids"] == []  # blocks of the erased user go too

    # alice's export: her messages, and bob's to her as tombstones
    target = tmp_path / "alice.json"
    out = ok(
        await chatd(config_file, "user", "export", "--user-id", str(ALICE), "--to", str(target))
    )
    assert out == f"user {ALICE} exported to {target} (3 messages)\n"
    data = json.loads(target.read_text())
    assert data["user"]["user_id"] == ALICE and data["user"]["username"] == "alice"
    kinds = [(m["type"], m["data"]["id"]) for m in data["messages"]]
    assert kinds == [
        ("direct_message", secret["data"]["id"]),
        ("direct_message", reply["data"]["id"]),
        ("room_message", mine),
    ]
    from_bob = data["messages"][0]["data"]
    assert from_bob["deleted"] is True and from_bob["content"] == ""
    assert from_bob["from_username"] == f"deleted user {BOB}"
    assert {m["channel"] for m in data["read_markers"]} >= {"r:general"}
    assert data["blocks"] == []

    # bob's own export: a name, tombstones, nothing else of his left
    bobs = tmp_path / "bob.json"
    ok(await chatd(config_file, "user", "export", "--user-id", str(BOB), "--to", str(bobs)))
    erased = json.loads(bobs.read_text())
    assert erased["user"]["username"] == f"deleted user {BOB}"
    assert erased["user"]["last_seen"] is None
    assert erased["read_markers"] == [] and erased["roles"] == [] and erased["blocks"] == []
    sent_by_bob = [m["data"] for m in erased["messages"] if m["data"].get("from_user_id") == BOB]
    assert sent_by_bob and all(m["deleted"] for m in sent_by_bob)


async def test_export_and_erase_refuse_clearly(config_file: Path, tmp_path: Path) -> None:
    ok(await chatd(config_file, "user", "add", "--user-id", "5", "--username", "eve"))
    existing = tmp_path / "there.json"
    existing.write_text("keep me")
    for args, words in (
        (("export", "--user-id", "5", "--to", str(existing)), "exists"),
        (("export", "--user-id", "404", "--to", str(tmp_path / "x.json")), "no user 404"),
        (("erase", "--user-id", "404"), "no user 404"),
    ):
        done = await chatd(config_file, "user", *args)
        assert done.returncode != 0 and done.stdout == b""
        err = done.stderr.decode()
        assert err.count("\n") == 1 and words in err, err
    assert existing.read_text() == "keep me"
    assert not (tmp_path / "x.json").exists()
    bad = await chatd(config_file, "user", "erase", "--user-id", "0")
    assert bad.returncode != 0 and b"Traceback" not in bad.stderr
