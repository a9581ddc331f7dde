"""RedisPresence: presence across nodes, with leases (real Redis, real time
only where leases must run out; leases of 1 s)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import coredis
import pytest
import trio

from chatd.cluster.presence import RedisPresence
from tests.helpers.waits import wait_until

LEASE = 1.0


@pytest.fixture
def node(client: coredis.Redis[Any], redis_prefix: str) -> Callable[..., RedisPresence]:
    def make(
        node_id: str, lease: float = LEASE, on: coredis.Redis[Any] | None = None
    ) -> RedisPresence:
        return RedisPresence(on or client, redis_prefix, node_id, lease)

    return make


async def keys(client: coredis.Redis[Any], prefix: str) -> set[bytes]:
    return set(await client.keys(f"{prefix}:*"))


async def who(n: RedisPresence, room: str) -> list[tuple[int, str]]:
    """Every member of ``room``, checked against the count ``members`` gives."""
    found, count = await n.members(room, 0, 1000)
    assert count == len(found)
    return found


async def test_first_and_last_across_three_nodes(
    node: Callable[..., RedisPresence], client: coredis.Redis[Any], redis_prefix: str
) -> None:
    a, b, c = node("a"), node("b"), node("host:8080:x1")
    assert await a.join("lobby", 1, "ann") == (True, 1)  # the room's count after
    assert await b.join("lobby", 1, "ann") == (False, 1)
    assert await c.join("lobby", 2, "bob") == (True, 2)
    assert await c.join("team:eng", 1, "ann") == (True, 1)
    assert await who(b, "lobby") == [(1, "ann"), (2, "bob")]
    assert await who(a, "nowhere") == []

    assert await a.leave("lobby", 1) == (False, 2)  # still on b
    assert await who(b, "lobby") == [(1, "ann"), (2, "bob")]
    assert await b.leave("lobby", 1) == (True, 1)  # the last one: announce
    assert await who(a, "lobby") == [(2, "bob")]
    assert await c.leave("lobby", 2) == (True, 0)
    assert await c.leave("lobby", 2) == (False, 0)  # already gone: not twice
    assert await a.leave("lobby", 7) == (False, 0)  # never there
    assert await who(a, "team:eng") == [(1, "ann")]
    assert await c.leave("team:eng", 1) == (True, 0)
    assert await keys(client, redis_prefix) == set()  # nothing left behind


async def test_join_again_on_the_same_node_only_renews(
    node: Callable[..., RedisPresence],
) -> None:
    a = node("a")
    assert (await a.join("lobby", 1, "ann"))[0] is True
    assert (await a.join("lobby", 1, "ann"))[0] is False
    assert await a.leave("lobby", 1) == (True, 0)


async def test_concurrent_joins_and_leaves_announce_once(
    node: Callable[..., RedisPresence], redis: Any
) -> None:
    firsts: list[bool] = []
    lasts: list[bool] = []
    async with (
        coredis.Redis.from_url(redis.url) as c1,
        coredis.Redis.from_url(redis.url) as c2,
    ):
        nodes = [node(f"n{i}", on=(c1, c2)[i % 2]) for i in range(8)]

        async def join(n: RedisPresence) -> None:
            firsts.append((await n.join("lobby", 5, "eve"))[0])

        async def leave(n: RedisPresence) -> None:
            lasts.append((await n.leave("lobby", 5))[0])

        for _ in range(3):
            firsts.clear()
            lasts.clear()
            async with trio.open_nursery() as nursery:
                for n in nodes:
                    nursery.start_soon(join, n)
            assert sorted(firsts) == [False] * 7 + [True]
            async with trio.open_nursery() as nursery:
                for n in nodes:
                    nursery.start_soon(leave, n)
            assert sorted(lasts) == [False] * 7 + [True]


async def test_a_dead_nodes_users_are_reaped_once(
    node: Callable[..., RedisPresence], redis: Any, client: coredis.Redis[Any], redis_prefix: str
) -> None:
    # the live node's lease is long: a stall of this (shared, loaded) machine
    # must not let its entries run out too
    dead, live = node("dead"), node("live", lease=60.0)
    await dead.join("lobby", 1, "ann")
    await dead.join("lobby", 2, "bob")
    await live.join("lobby", 2, "bob")  # bob is on both nodes
    await dead.join("team:eng", 3, "cat")
    await live.join("quiet", 4, "dan")

    reaped: list[tuple[str, int, str, int]] = []
    async with (
        coredis.Redis.from_url(redis.url) as c1,
        coredis.Redis.from_url(redis.url) as c2,
    ):
        reapers = [live, node("r1", on=c1), node("r2", on=c2)]

        async def reap(reaper: RedisPresence) -> None:
            # One reaper takes a room per script call, to go through batches.
            reaped.extend(await reaper.reap(batch=1 if reaper is live else 100))

        async def reap_all() -> None:
            async with trio.open_nursery() as nursery:
                for reaper in reapers:
                    nursery.start_soon(reap, reaper)

        async def dead_users_reaped() -> bool:
            # The live node renews as it should; the dead one does not.
            assert await live.renew([("lobby", 2), ("quiet", 4)]) == []
            await reap_all()
            return len(reaped) >= 2

        await wait_until(dead_users_reaped, "the dead node's entries to be reaped")
        await reap_all()
        await reap_all()
        # bob's entry on the dead node goes with the live node's next renewal
        # (reap leaves a user alone while it is live elsewhere); the last one
        # may have come just before that entry expired.
        assert await live.renew([("lobby", 2), ("quiet", 4)]) == []

    # Each user gone is returned once, to one reaper; bob is still on `live`.
    # (with the room's count after: bob is still in the lobby)
    assert Counter(reaped) == {("lobby", 1, "ann", 1): 1, ("team:eng", 3, "cat", 0): 1}
    assert await who(live, "lobby") == [(2, "bob")]
    assert await who(live, "team:eng") == []
    assert await who(live, "quiet") == [(4, "dan")]
    # The dead node's own bookkeeping went with its entries.
    assert f"{redis_prefix}:pr:node:dead".encode() not in await keys(client, redis_prefix)
    assert await live.leave("lobby", 2) == (True, 0)


async def test_renew_keeps_entries_alive_past_the_lease(
    node: Callable[..., RedisPresence],
) -> None:
    a, other = node("a"), node("other")
    await a.join("lobby", 1, "ann")
    with trio.move_on_after(LEASE * 2):
        while True:  # renewing far more often than lease / 3, for a margin
            assert await a.renew([("lobby", 1)]) == []
            assert await other.reap() == []
            await trio.sleep(0.1)
    assert await who(other, "lobby") == [(1, "ann")]
    assert await a.renew([("lobby", 1)]) == []

    async def reaped() -> bool:
        return await other.reap() == [("lobby", 1, "ann", 0)]

    await wait_until(reaped, "the entry to expire once no longer renewed")


async def test_an_expired_user_not_yet_reaped_is_not_announced_twice(
    node: Callable[..., RedisPresence],
) -> None:
    # the live node's lease is long: a stall of this (shared, loaded) machine
    # must not let its entries run out too
    dead, live = node("dead"), node("live", lease=60.0)
    await dead.join("lobby", 1, "ann")

    async def expired() -> bool:
        return await who(live, "lobby") == []  # members lists live entries only

    await wait_until(expired, "the entry to expire")
    # Nobody announced ann gone, so joining elsewhere announces nothing either.
    assert await live.join("lobby", 1, "ann") == (False, 1)
    assert await live.reap() == []
    assert await live.leave("lobby", 1) == (True, 0)
    assert await dead.leave("lobby", 1) == (False, 0)


async def test_a_node_cut_off_past_its_lease_learns_what_it_lost(
    node: Callable[..., RedisPresence],
) -> None:
    slow, other = node("slow"), node("other")
    await slow.join("lobby", 1, "ann")
    await slow.join("lobby", 2, "bob")

    gone: list[object] = []

    async def reaped() -> bool:
        # (the two entries expire a moment apart: one reap may take one)
        gone.extend(await other.reap())
        return len(gone) == 2

    await wait_until(reaped, "the slow node's entries to be reaped")
    # renew says what Redis no longer has; joining again announces them again.
    assert await slow.renew([("lobby", 1), ("lobby", 2)]) == [("lobby", 1), ("lobby", 2)]
    assert await slow.leave("lobby", 1) == (False, 0)  # its leaving was announced already
    assert await slow.join("lobby", 2, "bob") == (True, 1)
    assert await slow.renew([]) == []


async def test_forget_node_removes_this_nodes_entries(
    node: Callable[..., RedisPresence], client: coredis.Redis[Any], redis_prefix: str
) -> None:
    a, b = node("a"), node("b")
    await a.join("lobby", 1, "ann")
    await a.join("lobby", 2, "bob")
    await b.join("lobby", 2, "bob")
    await a.join("team:eng", 3, "cat")
    await b.join("quiet", 4, "dan")
    gone = await a.forget_node(batch=1)
    assert sorted(gone) == [("lobby", 1, "ann", 1), ("team:eng", 3, "cat", 0)]
    assert await who(b, "lobby") == [(2, "bob")]
    assert await who(b, "team:eng") == []
    assert await a.forget_node() == []
    assert await b.renew([("lobby", 2), ("quiet", 4)]) == []
    assert sorted(await b.forget_node()) == [("lobby", 2, "bob", 0), ("quiet", 4, "dan", 0)]
    assert await keys(client, redis_prefix) == set()


async def test_works_with_a_decoding_client(redis: Any, redis_prefix: str) -> None:
    async with coredis.Redis.from_url(redis.url, decode_responses=True) as text:
        a = RedisPresence(text, redis_prefix, "a", LEASE)
        assert await a.join("lobby", 1, "Zoë") == (True, 1)
        assert await who(a, "lobby") == [(1, "Zoë")]
        assert await a.renew([("lobby", 1), ("lobby", 2)]) == [("lobby", 2)]
        assert await a.forget_node() == [("lobby", 1, "Zoë", 0)]


async def test_arguments_are_checked(client: coredis.Redis[Any]) -> None:
    with pytest.raises(ValueError):
        RedisPresence(client, "p", "", LEASE)
    with pytest.raises(ValueError):
        RedisPresence(client, "p", "a", 0)
    assert RedisPresence(client, "p", "a", 3.0).renew_interval == 1.0


async def test_members_page_by_id_and_count_the_room(
    node: Callable[..., RedisPresence], client: coredis.Redis[Any], redis_prefix: str
) -> None:
    """Pages by id, whatever order the users joined in, on whichever node;
    each costs the page (a zset by id), never the whole room."""
    a, b = node("a"), node("b")
    for uid in (50, 7, 300, 12, 9, 100):
        await (a if uid % 2 else b).join("big", uid, f"u{uid}")
    assert await a.members("big", 0, 2) == ([(7, "u7"), (9, "u9")], 6)
    assert await b.members("big", 9, 3) == ([(12, "u12"), (50, "u50"), (100, "u100")], 6)
    assert await a.members("big", 100, 10) == ([(300, "u300")], 6)
    assert await a.members("big", 300, 10) == ([], 6)
    await b.leave("big", 12)
    assert await a.members("big", 9, 1) == ([(50, "u50")], 5)


async def test_a_page_skips_users_whose_entries_expired(
    node: Callable[..., RedisPresence],
) -> None:
    dead, live = node("dead"), node("live", lease=60.0)
    for uid in (1, 2, 3):
        await dead.join("lobby", uid, f"u{uid}")
    await live.join("lobby", 4, "u4")

    async def expired() -> bool:
        return await live.members("lobby", 0, 1) == ([(4, "u4")], 1)

    await wait_until(expired, "the dead node's entries to expire")


async def test_renew_indexes_users_a_join_did_not(
    node: Callable[..., RedisPresence], client: coredis.Redis[Any], redis_prefix: str
) -> None:
    """Entries made before the id index existed are indexed by the next
    renewal (a node upgraded in place)."""
    a = node("a")
    await a.join("lobby", 1, "ann")
    await client.delete([f"{redis_prefix}:pr:ids:lobby"])
    assert await a.members("lobby", 0, 10) == ([], 1)
    assert await a.renew([("lobby", 1)]) == []
    assert await a.members("lobby", 0, 10) == ([(1, "ann")], 1)
