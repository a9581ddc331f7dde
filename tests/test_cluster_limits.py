"""RedisLimiter: Limiter's semantics, counted in Redis across nodes (real Redis)."""

from __future__ import annotations

import gc
import logging
from typing import Any

import coredis
import pytest
import trio

from chatd.cluster.limits import RedisLimiter
from chatd.ratelimit import Limiter
from tests.helpers.servers import free_port
from tests.helpers.services import own_redis
from tests.helpers.waits import wait_until

# coredis 6.9 leaves the anyio memory streams of a connection that failed to
# connect unclosed: they warn (ResourceWarning) when collected. Harmless, but
# the suite turns warnings into errors: tests that make connections fail
# ignore that one warning and collect the garbage before they end.
leaky_failed_connects = pytest.mark.filterwarnings("ignore:Unclosed <MemoryObject:ResourceWarning")


async def test_burst_allowed_then_refused_with_whole_seconds(
    client: coredis.Redis[Any], redis_prefix: str
) -> None:
    limiter = RedisLimiter(client, redis_prefix, [(5, 60.0)], "messages")
    assert [await limiter.take(7) for _ in range(5)] == [0.0] * 5
    wait = await limiter.take(7)
    assert wait >= 1 and wait == int(wait)
    assert 11 <= wait <= 12  # one token refills in 60 / 5 s, as Limiter says
    reference = Limiter([(5, 60.0)], now=0.0)
    assert [reference.take(0.0) for _ in range(6)][-1] == 12


async def test_refused_spends_nothing(client: coredis.Redis[Any], redis_prefix: str) -> None:
    limiter = RedisLimiter(client, redis_prefix, [(2, 60.0), (10, 3600.0)], "messages")
    assert await limiter.take(1) == 0
    assert await limiter.take(1) == 0
    key = f"{redis_prefix}:rl:messages:1"
    before = await client.hgetall(key)
    for _ in range(5):
        assert await limiter.take(1) >= 1
    # The refusals wrote nothing: the hour bucket still has its 8 tokens.
    assert await client.hgetall(key) == before
    assert float(before[b"10/3600.0:t"]) == pytest.approx(8, abs=0.01)


@pytest.mark.parametrize(
    ("limits", "allowed"),
    [
        ([(3, 60.0), (10, 3600.0)], 3),  # the minute bucket runs out first
        ([(10, 60.0), (3, 3600.0)], 3),  # the hour bucket runs out first
    ],
)
async def test_every_limit_is_enforced(
    client: coredis.Redis[Any],
    redis_prefix: str,
    limits: list[tuple[int, float]],
    allowed: int,
) -> None:
    limiter = RedisLimiter(client, redis_prefix, limits, "messages")
    reference = Limiter(limits, now=0.0)
    for _ in range(allowed):
        assert await limiter.take(42) == 0
        assert reference.take(0.0) == 0
    expected = reference.take(0.0)
    wait = await limiter.take(42)
    assert expected - 1 <= wait <= expected  # a little refill since, at most


async def test_tokens_refill(client: coredis.Redis[Any], redis_prefix: str) -> None:
    limiter = RedisLimiter(client, redis_prefix, [(2, 2.0)], "messages")
    assert await limiter.take(1) == 0
    assert await limiter.take(1) == 0
    assert await limiter.take(1) == 1.0

    async def allowed() -> bool:
        return await limiter.take(1) == 0

    await wait_until(allowed, "a token to refill")


async def test_keys_are_per_user_and_per_limiter_name(
    client: coredis.Redis[Any], redis_prefix: str
) -> None:
    messages = RedisLimiter(client, redis_prefix, [(1, 3600.0)], "messages")
    reads = RedisLimiter(client, redis_prefix, [(1, 3600.0)], "reads")
    other_cluster = RedisLimiter(client, redis_prefix + "x", [(1, 3600.0)], "messages")
    assert await messages.take(1) == 0
    assert await messages.take(1) >= 1
    assert await messages.take(2) == 0
    assert await reads.take(1) == 0
    assert await other_cluster.take(1) == 0


async def test_count_is_shared_by_nodes(client: coredis.Redis[Any], redis: Any) -> None:
    prefix = "shared-" + str(free_port())
    async with coredis.Redis.from_url(redis.url) as second:
        node_a = RedisLimiter(client, prefix, [(4, 3600.0)], "messages")
        node_b = RedisLimiter(second, prefix, [(4, 3600.0)], "messages")
        assert await node_a.take(5) == 0
        assert await node_b.take(5) == 0
        assert await node_a.take(5) == 0
        assert await node_b.take(5) == 0
        assert await node_a.take(5) >= 1
        assert await node_b.take(5) >= 1
        await client.delete([f"{prefix}:rl:messages:5"])


async def test_concurrent_takes_never_exceed_capacity(
    client: coredis.Redis[Any], redis: Any, redis_prefix: str
) -> None:
    capacity = 20
    results: list[float] = []
    async with coredis.Redis.from_url(redis.url) as second:
        nodes = [
            RedisLimiter(c, redis_prefix, [(capacity, 3600.0), (1000, 86400.0)], "messages")
            for c in (client, second)
        ]

        async def take(node: RedisLimiter) -> None:
            results.append(await node.take(9))

        async with trio.open_nursery() as nursery:
            for i in range(120):
                nursery.start_soon(take, nodes[i % 2])
    assert len(results) == 120
    assert results.count(0.0) == capacity
    assert all(r >= 1 for r in results if r != 0.0)


async def script_calls(client: coredis.Redis[Any]) -> int:
    stats = await client.info("commandstats")
    return sum(
        int(v["calls"]) for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval")
    )


async def test_the_takes_of_one_pass_share_one_script_call(
    client: coredis.Redis[Any], redis_prefix: str
) -> None:
    """Takes that arrive together (many sessions' messages in one pass of
    the scheduler) are answered by one call, each as if taken alone: same
    user, other users, allowed or refused."""
    limiter = RedisLimiter(client, redis_prefix, [(3, 3600.0)], "messages")
    await limiter.take(99)  # (the script loaded: its first call may be two)
    results: dict[int, list[float]] = {}

    async def take(user: int) -> None:
        results.setdefault(user, []).append(await limiter.take(user))

    before = await script_calls(client)
    async with trio.open_nursery() as nursery:
        for i in range(100):
            nursery.start_soon(take, i % 10)
    assert await script_calls(client) - before == 1
    assert sorted(results) == list(range(10))
    for user, got in results.items():
        assert got.count(0.0) == 3 and all(w >= 1 for w in got if w), (user, got)
    # and after it, one by one, as before
    assert await limiter.take(10) == 0.0
    assert await script_calls(client) - before == 2


async def test_keys_expire_once_the_buckets_are_full_again(
    client: coredis.Redis[Any], redis_prefix: str
) -> None:
    limiter = RedisLimiter(client, redis_prefix, [(2, 60.0), (100, 3600.0)], "messages")
    short = RedisLimiter(client, redis_prefix, [(2, 0.3)], "short")
    assert await limiter.take(3) == 0
    assert await short.take(3) == 0
    # The hour bucket is full again after 36 s (the minute one after 30 s).
    assert 30_000 < await client.pttl(f"{redis_prefix}:rl:messages:3") <= 36_000

    async def gone() -> bool:
        return await client.exists([f"{redis_prefix}:rl:short:3"]) == 0

    await wait_until(gone, "the idle key to expire")
    # An expired key is a full bucket.
    assert await short.take(3) == 0


async def test_new_limits_restart_only_the_changed_buckets(
    client: coredis.Redis[Any], redis_prefix: str
) -> None:
    """A reload makes a new limiter of the same name (``Context.reload``):
    in Redis, a bucket whose limit changed starts full, the others keep
    counting."""

    def limiter(limits: list[tuple[int, float]]) -> RedisLimiter:
        return RedisLimiter(client, redis_prefix, limits, "messages")

    before = limiter([(1, 3600.0), (5, 86400.0)])
    assert await before.take(1) == 0
    assert await before.take(1) >= 1
    after = limiter([(2, 3600.0), (5, 86400.0)])
    assert await after.take(1) == 0  # the hour limit changed: a new bucket
    assert await after.take(1) == 0
    assert await after.take(1) >= 1
    # The unchanged day bucket kept counting: 3 of 5 spent.
    again = limiter([(10, 3600.0), (5, 86400.0)])
    takes = [await again.take(1) for _ in range(3)]
    assert takes[:2] == [0.0, 0.0] and takes[2] >= 1  # the third is the day's sixth
    with pytest.raises(ValueError):
        limiter([(0, 60.0)])


@leaky_failed_connects
async def test_unreachable_redis_falls_back_to_local_limits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="chatd")
    async with coredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0") as dead:
        limiter = RedisLimiter(dead, "x", [(3, 3600.0)], "messages", retry_interval=0)
        assert [await limiter.take(1) for _ in range(3)] == [0.0, 0.0, 0.0]
        assert await limiter.take(1) >= 1
        assert await limiter.take(2) == 0
        assert limiter.redis_down
    gc.collect()
    warnings = [r for r in caplog.records if r.name == "chatd.cluster"]
    assert len(warnings) == 1, warnings  # once per outage, not per call
    assert warnings[0].levelno == logging.WARNING
    assert "unreachable" in warnings[0].getMessage()


@leaky_failed_connects
async def test_takes_waiting_for_a_call_that_fails_count_locally() -> None:
    async with coredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0") as dead:
        limiter = RedisLimiter(dead, "x", [(3, 3600.0)], "messages", retry_interval=0)
        results: list[float] = []

        async def take() -> None:
            results.append(await limiter.take(1))

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(take)
        assert results.count(0.0) == 3 and len(results) == 10
        assert limiter.redis_down
    gc.collect()


@leaky_failed_connects
async def test_hung_redis_falls_back_after_the_timeout() -> None:
    # A listening socket that never answers: the connection is made, no reply.
    with trio.socket.socket() as listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        # No client timeouts: the limiter's own timeout is what ends the wait.
        async with coredis.Redis.from_url(f"redis://127.0.0.1:{port}/0") as hung:
            limiter = RedisLimiter(hung, "x", [(1, 3600.0)], "messages", timeout=0.2)
            assert await limiter.take(1) == 0
            assert limiter.redis_down
            assert await limiter.take(1) >= 1  # counted locally, without waiting
    gc.collect()


@leaky_failed_connects
async def test_falls_back_during_an_outage_and_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="chatd")
    with own_redis() as server:
        async with coredis.Redis.from_url(server.url) as client:
            limiter = RedisLimiter(client, "p", [(3, 3600.0)], "messages", retry_interval=0.05)
            assert await limiter.take(1) == 0
            assert await limiter.take(1) == 0
            assert not limiter.redis_down
            server.stop()
            # Local buckets start full: the chat goes on, limited per node.
            assert [await limiter.take(1) for _ in range(3)] == [0.0, 0.0, 0.0]
            assert await limiter.take(1) >= 1
            assert limiter.redis_down
            server.start()

            async def back() -> bool:
                await limiter.take(2)
                return not limiter.redis_down

            await wait_until(back, "the limiter to use Redis again")
            # Redis restarted empty (no persistence): user 1 counts afresh there.
            assert await limiter.take(1) == 0
            assert await client.exists(["p:rl:messages:1"]) == 1
    gc.collect()
    messages = [r.getMessage() for r in caplog.records if r.name == "chatd.cluster"]
    assert len(messages) == 2, messages
    assert "unreachable" in messages[0]
    assert "Redis is back" in messages[1]
