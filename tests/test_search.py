"""The ``search`` frame end to end on one real server (real SQLite, real
sockets): accents, shapes, scopes and their refusals, bad input (always an
answer, never an internal error), the reads limit. What matches and for
whom in both stores is tests/test_search_store.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from chatd.config import Config
from tests.helpers.clients import connect
from tests.helpers.servers import running
from tests.test_edits import answer, error_code, post

ALICE, BOB, CAROL = 1, 2, 3


async def search(client: Any, request_id: str = "s", **data: Any) -> dict[str, Any]:
    return await answer(client, "search", data, request_id)


async def test_cafe_finds_cafe_in_rooms_and_conversations(server) -> None:
    async with connect(server, ALICE, "alice") as alice, connect(server, BOB, "bob") as bob:
        await alice.join("general")
        room = await post(alice, "Le Café est ouvert")
        await post(alice, "autre chose")
        sent = await answer(
            alice, "direct_message", {"to_user_id": BOB, "content": "un CAFÉ ?"}, "dm"
        )
        direct = sent["data"]["id"]
        found = await search(bob, query="cafe")
        assert found["type"] == "search_results" and found["request_id"] == "s"
        data = found["data"]
        assert data["query"] == "cafe" and data["has_more"] is False
        assert data["next_before_id"] is None
        dm, msg = data["messages"]
        # newest first, each in its live shape
        assert dm["id"] == direct and dm["from_user_id"] == ALICE and dm["to_user_id"] == BOB
        assert dm["content"] == "un CAFÉ ?" and "room" not in dm
        assert msg["id"] == room and msg["room"] == "general" and msg["user_id"] == ALICE
        assert msg["username"] == "alice" and msg["content"] == "Le Café est ouvert"
        # restricted to one room, or one conversation
        only_room = await search(bob, query="CAFÉ", room="general")
        assert [m["id"] for m in only_room["data"]["messages"]] == [room]
        only_dm = await search(bob, query="café", with_user=ALICE)
        assert [m["id"] for m in only_dm["data"]["messages"]] == [direct]


async def test_a_message_is_found_by_its_sender_as_soon_as_acknowledged(server) -> None:
    async with connect(server, ALICE, "alice") as alice:
        await alice.join("general")
        for i in range(5):
            await alice.send("room_message", {"room": "general", "content": f"tour {i} été"})
        # no wait for the copies: the search reads this connection's writes
        found = await search(alice, query="ete")
        assert len(found["data"]["messages"]) == 5, found


async def test_pages_go_back_with_before_id(server) -> None:
    async with connect(server, ALICE, "alice") as alice:
        await alice.join("general")
        ids = [await post(alice, f"note {i}") for i in range(5)]
        first = (await search(alice, query="note", limit=2))["data"]
        assert [m["id"] for m in first["messages"]] == ids[:2:-1][:2]
        assert first["has_more"] is True and first["next_before_id"] == ids[3]
        rest = await search(alice, query="note", limit=50, before_id=first["next_before_id"])
        assert [m["id"] for m in rest["data"]["messages"]] == ids[2::-1]
        assert rest["data"]["has_more"] is False
        # limit is clamped to 1..50
        one = (await search(alice, query="note", limit=0))["data"]
        assert len(one["messages"]) == 1 and one["has_more"] is True


async def test_scopes_are_checked_as_history_is(server) -> None:
    async with connect(server, CAROL, "carol") as carol, connect(server, ALICE, "alice") as alice:
        await alice.join("staff")
        await post(alice, "plan secret", room="staff")
        assert error_code(await search(carol, query="plan", room="staff")) == "PERMISSION_DENIED"
        assert error_code(await search(carol, query="plan", room="nowhere")) == "ROOM_NOT_FOUND"
        refused = await search(carol, query="plan", with_user=999)
        assert error_code(refused) == "USER_NOT_FOUND"
        both = await search(carol, query="plan", room="general", with_user=ALICE)
        assert error_code(both) == "INVALID_FORMAT"
        # and nothing of the private room anywhere else
        assert (await search(carol, query="plan secret"))["data"]["messages"] == []


BAD = [
    "",
    "   ",
    "x" * 201,
    '"',
    'NEAR("a" "b")',
    "NEAR(",
    "*",
    "-",
    ":",
    "(",
    ")",
    "()",
    "OR",
    "a OR b",
    "NOT x",
    "-secret",
    "content:secret",
    "secret^",
    '"unbalanced',
    "x*y*",
    "a*",
    "{a b}",
    "\u0000",
    "' OR 1=1 --",
    "%",
    "_",
    "\\",
]


async def test_bad_queries_get_invalid_format_or_plain_results(server) -> None:
    async with connect(server, ALICE, "alice") as alice:
        await alice.join("general")
        await post(alice, "secret content NEAR a b")
        for i, query in enumerate(BAD):
            reply = await search(alice, f"q{i}", query=query)
            if reply["type"] == "error":
                assert error_code(reply) == "INVALID_FORMAT", (query, reply)
                assert reply["data"]["details"] == {"field": "data.query"}, (query, reply)
            else:
                assert reply["type"] == "search_results", (query, reply)
        # the words of a query with syntax in it are plain words
        plain = await search(alice, query='NEAR("secret" content:)')
        assert [m["content"] for m in plain["data"]["messages"]] == ["secret content NEAR a b"]
        for query in ("", "x" * 201, "*", "a*"):
            assert error_code(await search(alice, query=query)) == "INVALID_FORMAT", query
        for data in (
            {},
            {"query": 5},
            {"query": "x", "limit": "2"},
            {"query": "x", "before_id": 0},
        ):
            assert error_code(await answer(alice, "search", data, "bad")) == "INVALID_FORMAT"


async def test_searches_count_against_the_reads_limit(make_config: Callable[..., Config]) -> None:
    config = make_config(limits={"reads_per_minute": 3})
    async with running(config) as server, connect(server, ALICE, "alice") as alice:
        for i in range(3):
            assert (await search(alice, f"q{i}", query="mot"))["type"] == "search_results"
        limited = await search(alice, "q3", query="mot")
        assert (
            error_code(limited) == "RATE_LIMITED" and limited["data"]["details"]["retry_after"] >= 1
        )


async def test_searches_are_counted_and_timed(server) -> None:
    async with connect(server, ALICE, "alice") as alice:
        await alice.join("general")
        for i in range(3):
            await post(alice, f"compte {i}")
        full = await search(alice, query="compte", limit=2)  # a full page: more, not cut
        assert full["data"]["has_more"] is True
        await search(alice, query="CAFÉ")
    get = server.metrics.registry.get_sample_value
    assert get("chatd_search_seconds_count") == 2
    assert get("chatd_searches_cut_total") == 0
    assert get("chatd_frames_in_total", {"type": "search"}) == 2
