"""Retention end to end on one real server (real SQLite, real sockets, the
purge task on Trio's clock and the server's wall moved forward): old
messages go in batches, history counts what is kept, a recovery from
before the horizon says ``recovered: false``, rooms keep their own number
of days, and the metrics say what was purged."""

from __future__ import annotations

from collections.abc import Callable

import trio
import trio.testing

from chatd.config import Config
from tests.helpers.clients import connect, next_of
from tests.helpers.clocks import WallClock
from tests.helpers.servers import running
from tests.helpers.tokens import make_token
from tests.test_edits import answer, history, post

DAY = 86400
#: Tokens that outlive the wall clock's jumps.
LONG = 400 * DAY


async def test_old_messages_are_purged_and_recovery_past_them_says_so(
    make_config: Callable[..., Config], slow_autojump_clock: trio.testing.MockClock
) -> None:
    clock = WallClock()
    retention = {"room_days": 30, "rooms": {"random": 0}, "interval_seconds": 60, "batch_size": 2}
    config = make_config(retention=retention)
    alice_token = make_token(1, "alice", ttl=LONG)
    async with (
        running(config, wall=clock) as server,
        connect(server, token=alice_token) as alice,
    ):
        await alice.join("general")
        await alice.join("random")
        old = [await post(alice, f"old {i}") for i in range(5)]
        kept_forever = await post(alice, "random keeps it", room="random")
        clock.offset += 31 * DAY
        new = [await post(alice, f"new {i}") for i in range(2)]
        purged = server.metrics.purged.labels("room")
        with trio.fail_after(600):
            while purged._value.get() < 5:  # noqa: ASYNC110 - the purge's own pace
                await trio.sleep(30)
        page = await history(alice)
        assert page["total"] == 2
        assert [m["id"] for m in page["messages"]] == new
        assert (await history(alice, offset=2))["messages"] == []
        kept = await history(alice, room="random")
        assert [m["id"] for m in kept["messages"]] == [kept_forever]
        # a client last here before the purge: not recovered, then what is kept
        async with connect(server, 2, "bob", token=make_token(2, "bob", ttl=LONG)) as bob:
            data = {"room": "general", "since_id": old[1]}
            ack = await answer(bob, "join_room", data, "j")
            assert ack["type"] == "join_room_ack" and ack["data"]["recovered"] is False
            replayed = [(await next_of(bob, "room_message"))["data"]["id"] for _ in new]
            assert replayed == new
            ack = await answer(bob, "join_room", {"room": "general", "since_id": new[0]}, "j2")
            assert ack["data"]["recovered"] is True
    exposition = server.metrics.exposition().decode()
    assert 'chatd_retention_purged_messages_total{kind="room"} 5.0' in exposition
    batches = [
        line
        for line in exposition.splitlines()
        if line.startswith("chatd_retention_batch_seconds_count")
    ]
    assert batches and float(batches[0].split()[-1]) >= 3  # 2 + 2 + 1, then passes with none
