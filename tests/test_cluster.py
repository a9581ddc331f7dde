"""Several nodes look like one server, end to end.

Every test runs two or three real chatd nodes on one PostgreSQL database and
one Redis prefix (``tests/helpers/cluster.py``), with clients placed on chosen
nodes so that every path crosses from one node to another, and some through
the round-robin load balancer. Each node has its own SQLite path, so a node
that kept to SQLite or to its own process would fail these tests: nothing
here passes on one node's local state.

Waits are bounded with ``trio.fail_after``; nothing sleeps for real except
where a Redis restart or a presence lease (``lease_seconds = 1``) takes real
time. The scenarios at the end run twice, on one node and on two nodes behind
the balancer (``target``).
"""

from __future__ import annotations

import gc
import itertools
import json
import warnings
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed

from chatd.config import Config
from tests.helpers.clients import Client
from tests.helpers.cluster import Cluster, Follower, connect_to, running_cluster
from tests.helpers.http_client import HttpReply, http_request
from tests.helpers.proxies import dsn_via, redis_link, tcp_proxy
from tests.helpers.servers import running
from tests.helpers.services import own_redis

PRESENCE = ("user_connected", "user_disconnected")
KEY = "cluster-publish-key-0123456789"
#: Bound of every cross-node wait (a safety net, never a timing assertion).
WAIT = 10.0


@pytest.fixture
def cluster_of(
    make_config: Callable[..., Config], pg_dsn: str, redis: Any, redis_prefix: str
) -> Callable[..., Any]:
    """``cluster_of(nodes=2, **sections)``: a running_cluster on this test's
    database and Redis prefix."""

    def start(nodes: int = 2, **sections: Any) -> Any:
        return running_cluster(make_config, pg_dsn, redis.url, redis_prefix, nodes, **sections)

    return start


# --- helpers -------------------------------------------------------------------


async def next_frame(client: Client, types: tuple[str, ...], seen: list | None = None) -> dict:
    """The next frame of one of ``types``; presence frames on the way are
    skipped (kept in ``seen`` when given). Anything else is a failure."""
    while True:
        frame = await client.recv(WAIT)
        if frame["type"] in types:
            return frame
        assert frame["type"] in PRESENCE, frame
        if seen is not None:
            seen.append(frame)


async def room_messages(client: Client, count: int, seen: list | None = None) -> list[dict]:
    """The data of the next ``count`` room messages (presence skipped)."""
    return [(await next_frame(client, ("room_message",), seen))["data"] for _ in range(count)]


async def ask(
    client: Client, type_: str, data: Any, request_id: Any, log: list | None = None
) -> dict[str, Any]:
    """Send a request; return the reply that carries its request_id. Other
    frames arriving meanwhile (others' messages, presence) are skipped, and
    kept in ``log`` when given."""
    await client.send(type_, data, request_id=request_id)
    skipped: list[dict] = []
    while True:
        try:
            frame = await client.recv(WAIT)
        except trio.TooSlowError:
            raise AssertionError(
                f"no reply to {type_} {request_id!r} within {WAIT}s; came meanwhile: {skipped}"
            ) from None
        if frame.get("request_id") == request_id:
            return frame
        skipped.append(frame)
        if log is not None:
            log.append(frame)


async def say(
    client: Client,
    content: str,
    room: str = "general",
    request_id: Any = None,
    log: list | None = None,
) -> dict[str, Any]:
    """Send a room message; return the sender's own copy (or its error)."""
    rid = request_id if request_id is not None else f"say:{content}"
    frame = await ask(client, "room_message", {"room": room, "content": content}, rid, log)
    assert frame["type"] in ("room_message", "error"), frame
    return frame


async def said(
    client: Client, content: str, room: str = "general", log: list | None = None
) -> dict[str, Any]:
    """``say``, which must succeed; the message's data."""
    frame = await say(client, content, room, log=log)
    assert frame["type"] == "room_message", frame
    data: dict[str, Any] = frame["data"]
    return data


async def dm(client: Client, to: int, content: str, log: list | None = None) -> dict[str, Any]:
    """A text direct message, which must succeed; its data."""
    data = {"to_user_id": to, "content": content, "message_type": "text"}
    frame = await ask(client, "direct_message", data, f"dm:{content}", log)
    assert frame["type"] == "direct_message", frame
    out: dict[str, Any] = frame["data"]
    return out


async def until_content(client: Client, content: str, log: list | None = None) -> list[dict]:
    """Every frame up to and including the room message with ``content``."""
    frames = []
    while True:
        frame = await client.recv(WAIT)
        frames.append(frame)
        if log is not None:
            log.append(frame)
        if frame["type"] == "room_message" and frame["data"]["content"] == content:
            return frames


async def barrier(sender: Client, observers: list[Client], logs: list[list] | None = None) -> None:
    """``sender`` posts a marker; each observer reads up to it (into its log).
    The sender may be one of the observers."""
    barrier.count += 1  # type: ignore[attr-defined]
    marker = f"barrier-{barrier.count}"  # type: ignore[attr-defined]
    sender_log = None
    if logs is not None and sender in observers:
        sender_log = logs[observers.index(sender)]
    await said(sender, marker, log=sender_log)
    for i, observer in enumerate(observers):
        if observer is not sender:
            await until_content(observer, marker, None if logs is None else logs[i])


barrier.count = 0  # type: ignore[attr-defined]


def presence_of(log: list[dict], user_id: int) -> list[str]:
    return [f["type"] for f in log if f["type"] in PRESENCE and f["data"]["user_id"] == user_id]


async def join(client: Client, room: str = "general", **extra: Any) -> dict[str, Any]:
    ack = await client.request("join_room", {"room": room, **extra}, request_id=f"join:{room}")
    assert ack["type"] == "join_room_ack" and ack["request_id"] == f"join:{room}", ack
    data: dict[str, Any] = ack["data"]
    return data


def member_ids(ack: dict[str, Any]) -> set[int]:
    return {m["user_id"] for m in ack["members"]}


async def all_history(client: Client, *, room: str | None = None, with_user: int | None = None):
    """Every message of a room or conversation, paging 3 at a time from the
    newest, and each page as it came."""
    type_, key = (
        ("room_history", {"room": room}) if room else ("dm_history", {"with_user": with_user})
    )
    pages, offset = [], 0
    while True:
        reply = await ask(client, type_, {**key, "limit": 3, "offset": offset}, f"page{offset}")
        assert reply["type"] == "message_history", reply
        pages.append(reply["data"])
        offset += len(reply["data"]["messages"])
        if not reply["data"]["has_more"]:
            break
    messages = [m for page in reversed(pages) for m in page["messages"]]
    return messages, pages


async def publish(port: int, payload: dict[str, Any]) -> HttpReply:
    headers = [("content-type", "application/json"), ("authorization", f"Bearer {KEY}")]
    body = json.dumps(payload).encode()
    return await http_request(port, "POST", "/api/publish", body, headers)


def assert_increasing(ids: list[int]) -> None:
    assert all(a < b for a, b in itertools.pairwise(ids)), ids


# === 1. one cluster ==============================================================


async def test_three_nodes_started_at_once_on_an_empty_database_are_one_cluster(cluster_of):
    """A deployment starts its nodes together: they share one schema, one
    id sequence and one bus; a message from each node reaches the others."""
    async with cluster_of(3, concurrent_start=True) as cluster:
        async with (
            connect_to(cluster[0], 1, "alice") as alice,
            connect_to(cluster[1], 2, "bob") as bob,
            connect_to(cluster[2], 3, "carol") as carol,
        ):
            clients = [alice, bob, carol]
            for client in clients:
                await join(client)
            for i, client in enumerate(clients):
                data = {"room": "general", "content": f"from node {i}"}
                await client.send("room_message", data, request_id=i)
            seen = [
                [await next_frame(client, ("room_message",)) for _ in range(3)]
                for client in clients
            ]
            # Everyone sees the three in one order, each its own with its request id.
            datas = [[f["data"] for f in frames] for frames in seen]
            assert datas[0] == datas[1] == datas[2]
            assert_increasing([m["id"] for m in datas[0]])
            assert sorted(m["content"] for m in datas[0]) == [f"from node {i}" for i in range(3)]
            for i, frames in enumerate(seen):
                for frame in frames:
                    own = frame["data"]["content"] == f"from node {i}"
                    assert frame.get("request_id") == (i if own else None), frame


# === 2. room messages ============================================================


async def test_a_burst_from_two_nodes_reaches_everyone_in_one_order(cluster_of):
    """alice on node 0 and bob on node 1 send at once; members on both nodes
    (two of them through the balancer) see the same sequence, ids
    increasing; each sender's own copies carry its request ids, in order."""
    burst = 15
    async with cluster_of(2) as cluster:
        async with (
            connect_to(cluster[0], 1, "alice") as alice,
            connect_to(cluster[1], 2, "bob") as bob,
            connect_to(cluster, 3, "carol") as carol,
            connect_to(cluster, 4, "dave") as dave,
        ):
            assert cluster.lb.routed == [0, 1]  # carol on node 0, dave on node 1
            members = [alice, bob, carol, dave]
            for client in members:
                await join(client)
            # Everyone has seen everyone join before the burst starts.
            await barrier(dave, [alice, bob, carol])

            async def send(client: Client, name: str) -> None:
                for i in range(burst):
                    data = {"room": "general", "content": f"{name}{i}"}
                    await client.send("room_message", data, request_id=f"{name}-{i}")

            seen: dict[int, list[dict]] = {}

            async def read(index: int, client: Client) -> None:
                seen[index] = [
                    await next_frame(client, ("room_message",)) for _ in range(2 * burst)
                ]

            with trio.fail_after(WAIT * 2):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send, alice, "a")
                    nursery.start_soon(send, bob, "b")
                    for index, client in enumerate(members):
                        nursery.start_soon(read, index, client)

    ids = [f["data"]["id"] for f in seen[0]]
    assert len(set(ids)) == 2 * burst
    assert_increasing(ids)
    for index in range(1, 4):
        assert [f["data"] for f in seen[index]] == [f["data"] for f in seen[0]]
    for index, name in ((0, "a"), (1, "b")):
        own = [f for f in seen[index] if f["data"]["content"].startswith(name)]
        assert [f["data"]["content"] for f in own] == [f"{name}{i}" for i in range(burst)]
        assert [f.get("request_id") for f in own] == [f"{name}-{i}" for i in range(burst)]
        others = [f for f in seen[index] if not f["data"]["content"].startswith(name)]
        assert all("request_id" not in f for f in others)
    for index in (2, 3):
        assert all("request_id" not in f for f in seen[index])


# === 3. direct messages ==========================================================


async def test_a_direct_message_reaches_every_device_on_every_node(cluster_of):
    async with cluster_of(2) as cluster:
        async with (
            connect_to(cluster[0], 1, "alice") as alice0,
            connect_to(cluster[1], 1, "alice") as alice1,
            connect_to(cluster[0], 2, "bob") as bob0,
            connect_to(cluster[1], 2, "bob") as bob1,
            connect_to(cluster[0], 3, "carol") as carol0,
            connect_to(cluster[1], 3, "carol") as carol1,
        ):
            data = {"to_user_id": 2, "content": "psst", "message_type": "text"}
            own = await alice0.request("direct_message", data, request_id="dm-1")
            assert own["type"] == "direct_message" and own["request_id"] == "dm-1", own
            for other in (alice1, bob0, bob1):
                copy = await other.expect("direct_message", WAIT)
                assert copy["data"] == own["data"] and "request_id" not in copy
                assert copy["user_id"] == 1

            # The answer from bob's device on node 1.
            data = {"to_user_id": 1, "content": "yes?", "message_type": "text"}
            reply = await bob1.request("direct_message", data, request_id="dm-2")
            assert reply["type"] == "direct_message" and reply["request_id"] == "dm-2", reply
            assert reply["data"]["id"] > own["data"]["id"]
            for other in (alice0, alice1, bob0):
                copy = await other.expect("direct_message", WAIT)
                assert copy["data"] == reply["data"] and "request_id" not in copy

            # A user only on the other node.
            data = {"to_user_id": 3, "content": "carol?", "message_type": "text"}
            async with connect_to(cluster[0], 4, "dave") as dave:
                sent = await dave.request("direct_message", data)
                assert sent["type"] == "direct_message", sent
            for other in (carol0, carol1):
                assert (await other.expect("direct_message", WAIT))["data"] == sent["data"]
            for client in (alice0, alice1, bob0, bob1, carol0, carol1):
                await client.nothing_pending()


# === 4. history ==================================================================


async def test_history_is_the_same_from_every_node(cluster_of):
    async with cluster_of(2) as cluster:
        async with (
            connect_to(cluster[0], 1, "alice") as alice,
            connect_to(cluster[1], 2, "bob") as bob,
        ):
            await join(alice)
            await join(bob)
            sent = []
            for i in range(7):
                sent.append(await said(alice if i % 2 == 0 else bob, f"m{i}"))
            dms = [
                await dm(alice if i % 2 == 0 else bob, 2 if i % 2 == 0 else 1, f"d{i}")
                for i in range(5)
            ]
            assert_increasing([m["id"] for m in sent])

            room_a, pages_a = await all_history(alice, room="general")
            room_b, pages_b = await all_history(bob, room="general")
            assert room_a == room_b == sent
            assert pages_a == pages_b
            assert [p["total"] for p in pages_a] == [7, 7, 7]
            assert [p["has_more"] for p in pages_a] == [True, True, False]
            assert [len(p["messages"]) for p in pages_a] == [3, 3, 1]

            dm_a, dm_pages_a = await all_history(alice, with_user=2)
            dm_b, dm_pages_b = await all_history(bob, with_user=1)
            assert dm_a == dm_b == dms
            assert [p["total"] for p in dm_pages_a] == [5, 5]
            assert [p["has_more"] for p in dm_pages_b] == [True, False]

        # A newcomer on either node reads the same.
        for node in cluster.nodes:
            async with connect_to(node, 5, "eve") as eve:
                assert (await all_history(eve, room="general"))[0] == sent
            async with connect_to(node, 1, "alice") as alice:
                assert (await all_history(alice, with_user=2))[0] == dms


# === 5. recovery =================================================================


async def test_recovery_on_the_other_node_gets_exactly_what_was_missed(cluster_of):
    async with cluster_of(2) as cluster:
        async with connect_to(cluster[1], 2, "bob") as bob:
            await join(bob)
            await join(bob, "random")
            async with connect_to(cluster[0], 1, "alice") as alice:
                await join(alice)
                seen = await said(bob, "seen")
                assert await room_messages(alice, 1) == [seen]
            missed = [await said(bob, f"missed{i}") for i in range(4)]
            await said(bob, "elsewhere", room="random")

            # Back on node 1, where the messages were sent.
            async with connect_to(cluster[1], 1, "alice") as alice:
                ack = await join(alice, since_id=seen["id"])
                assert ack["recovered"] is True
                assert await room_messages(alice, 4) == missed
                live = await said(bob, "live")
                assert await room_messages(alice, 1) == [live]
                await alice.nothing_pending()


async def test_recovery_while_both_nodes_send_has_no_gap_and_no_duplicate(cluster_of):
    """alice comes back again and again (through the balancer, so on either
    node) while carol on node 0 and dave on node 1 keep sending; each time she
    rejoins with the last id she saw and reads a few messages. Together, the
    replays and the live messages after them are every message after her
    first since_id, once each, in order."""
    count, rounds, per_round = 30, 5, 3
    async with cluster_of(2) as cluster:
        async with (
            connect_to(cluster[0], 3, "carol") as carol,
            connect_to(cluster[1], 4, "dave") as dave,
        ):
            await join(carol)
            await join(dave)
            async with connect_to(cluster[1], 1, "alice") as alice:
                await join(alice)
                last = await said(carol, "last seen")
                assert (await room_messages(alice, 1))[0]["id"] == last["id"]

            started = trio.Event()
            sent: list[dict] = []

            async def send(client: Client, name: str) -> None:
                for i in range(count):
                    sent.append(await said(client, f"{name}{i}"))
                    if i == 2:
                        started.set()

            got: list[dict] = []
            with trio.fail_after(WAIT * 3):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send, carol, "c")
                    nursery.start_soon(send, dave, "d")
                    await started.wait()
                    for _ in range(rounds):
                        async with connect_to(cluster, 1, "alice") as alice:
                            since = got[-1]["id"] if got else last["id"]
                            await join(alice, since_id=since)
                            got += await room_messages(alice, per_round)
                    async with connect_to(cluster, 1, "alice") as alice:
                        await join(alice, since_id=got[-1]["id"])
                        wanted = {f"c{count - 1}", f"d{count - 1}"} - {m["content"] for m in got}
                        while wanted:
                            data = (await next_frame(alice, ("room_message",)))["data"]
                            got.append(data)
                            wanted.discard(data["content"])
                        history = (await all_history(alice, room="general"))[0]
                        # Nothing more than what the history has.
                        await alice.nothing_pending()

    assert set(cluster.lb.routed) == {0, 1}
    ids = [m["id"] for m in got]
    assert len(ids) == len(set(ids)), f"duplicates: {ids}"
    assert_increasing(ids)
    assert got == [m for m in history if m["id"] > last["id"]]
    assert len(got) == 2 * count


async def test_recovery_while_the_bus_lags_replays_each_message_once(
    make_config: Callable[..., Config], pg_dsn: str, redis: Any, redis_prefix: str
) -> None:
    """Node 0's pub/sub link to Redis lags (held back, then released): dave's
    messages on node 1 are committed, and so in alice's replay when she rejoins
    node 0 with since_id, before node 0 hears of them. When it does, alice
    must not get them a second time; carol, on node 0 all along, gets each
    once."""
    async with redis_link(redis.host, redis.port) as link:
        per_node = [{"bus": {"url": link.url}}, {}]
        async with running_cluster(
            make_config, pg_dsn, redis.url, redis_prefix, 2, per_node=per_node
        ) as cluster:
            async with (
                connect_to(cluster[0], 3, "carol") as carol,
                connect_to(cluster[1], 4, "dave") as dave,
            ):
                await join(carol)
                await join(dave)
                async with connect_to(cluster[0], 1, "alice") as alice:
                    await join(alice)
                    seen = await said(dave, "seen")
                    assert await room_messages(alice, 1) == [seen]
                assert await room_messages(carol, 1) == [seen]

                link.hold()
                missed = [await said(dave, f"missed{i}") for i in range(3)]
                async with connect_to(cluster[0], 1, "alice") as alice:
                    ack = await join(alice, since_id=seen["id"])
                    assert ack["recovered"] is True
                    assert await room_messages(alice, 3) == missed
                    link.release()
                    assert await room_messages(carol, 3) == missed
                    live = await said(dave, "live")
                    assert await room_messages(carol, 1) == [live]
                    frames = await until_content(alice, "live")
                    again = [f["data"]["id"] for f in frames if f["type"] == "room_message"]
                    assert again == [live["id"]], f"alice got {again} after her replay"


# === 6. presence =================================================================


async def test_presence_counts_a_user_once_across_nodes(cluster_of):
    """xavier has a tab on each node: the others hear of him once when his
    first tab joins, and that he left only when his last tab (on the other
    node) leaves. join_room_ack lists members on every node."""
    async with cluster_of(2) as cluster:
        async with (
            connect_to(cluster[0], 10, "yves") as yves,
            connect_to(cluster[1], 11, "zoe") as zoe,
        ):
            logs: list[list] = [[], []]
            assert member_ids(await join(yves)) == {10}
            assert member_ids(await join(zoe)) == {10, 11}  # yves is on node 0
            first = await yves.expect("user_connected", WAIT)
            assert first["data"]["user_id"] == 11
            assert first["data"]["username"] == "zoe"

            async with connect_to(cluster[0], 12, "xavier") as tab0:
                assert member_ids(await join(tab0)) == {10, 11, 12}
                async with connect_to(cluster[1], 12, "xavier") as tab1:
                    assert member_ids(await join(tab1)) == {10, 11, 12}
                    await barrier(zoe, [yves, zoe], logs)
                    assert [presence_of(log, 12) for log in logs] == [["user_connected"]] * 2
                    await tab0.ws.aclose()  # the tab on node 0 leaves; one remains
                    await barrier(yves, [yves, zoe], logs)
                    assert [presence_of(log, 12) for log in logs] == [["user_connected"]] * 2
                    async with connect_to(cluster[0], 13, "walt") as walt:
                        assert member_ids(await join(walt)) == {10, 11, 12, 13}
                        await barrier(walt, [yves, zoe], logs)
                # The last tab (node 1) is gone: both hear it, once.
                for log, client in zip(logs, (yves, zoe), strict=True):
                    while presence_of(log, 12) != ["user_connected", "user_disconnected"]:
                        log.append(await next_frame(client, PRESENCE))
                await barrier(zoe, [yves, zoe], logs)
            for log in logs:
                assert presence_of(log, 12) == ["user_connected", "user_disconnected"]
            async with connect_to(cluster[1], 14, "uma") as uma:
                assert member_ids(await join(uma)) == {10, 11, 14}


async def test_read_state_receipts_and_typing_cross_nodes(cluster_of):
    """alice reads on node 0: her tab on node 1 clears its badge, bob on
    node 1 gets her receipt, and node 1's counts agree once node 0 has
    written her marker (within a second). Typing crosses nodes, in rooms
    and conversations, and presence_query sees users online on any node."""
    async with cluster_of(2) as cluster:
        async with (
            connect_to(cluster[0], 1, "alice") as alice,
            connect_to(cluster[1], 1, "alice") as tab,
            connect_to(cluster[1], 2, "bob") as bob,
        ):
            for client in (alice, tab, bob):
                await join(client)
            sent = await said(bob, "read me")
            for client in (alice, tab):
                assert (await next_frame(client, ("room_message",)))["data"]["id"] == sent["id"]
            ack = await ask(alice, "mark_read", {"room": "general", "message_id": sent["id"]}, "m")
            assert ack["type"] == "mark_read_ack" and ack["data"]["unread"] == 0, ack
            marker = await next_frame(tab, ("read_marker",))
            assert marker["data"]["last_read_id"] == sent["id"]
            receipt = await next_frame(bob, ("read_receipt",))
            assert receipt["data"] == {
                "room": "general",
                "user_id": 1,
                "username": "alice",
                "last_read_id": sent["id"],
            }
            with trio.fail_after(WAIT):
                while True:
                    counts = await ask(tab, "unread", {}, "u")
                    [general] = [r for r in counts["data"]["rooms"] if r["room"] == "general"]
                    if general["last_read_id"] == sent["id"]:
                        break
                    await trio.sleep(0.2)
            assert general["unread"] == 0

            await alice.send("typing", {"room": "general", "state": "start"})
            typing = await next_frame(bob, ("typing",))
            assert typing["data"] == {
                "room": "general",
                "user_id": 1,
                "username": "alice",
                "state": "start",
            }
            await bob.send("typing", {"to_user_id": 1, "state": "start"})
            for client in (alice, tab):
                frame = await next_frame(client, ("typing",))
                assert frame["data"]["with_user"] == 2 and frame["data"]["state"] == "start"

            reply = await ask(bob, "presence_query", {"user_ids": [1, 3]}, "q")
            assert reply["data"]["users"] == [
                {"user_id": 1, "online": True, "last_seen": None},
                {"user_id": 3, "online": False, "last_seen": None},
            ]
            await alice.ws.aclose()  # alice's tab on node 1 is still there
            reply = await ask(bob, "presence_query", {"user_ids": [1]}, "q2")
            assert reply["data"]["users"][0]["online"] is True
        async with connect_to(cluster[0], 3, "carol") as carol:
            with trio.fail_after(WAIT):
                while True:
                    reply = await ask(carol, "presence_query", {"user_ids": [1, 2]}, "q")
                    users = reply["data"]["users"]
                    if not any(u["online"] for u in users) and all(u["last_seen"] for u in users):
                        break
                    await trio.sleep(0.2)


async def test_a_big_room_is_counted_and_summarised_across_nodes(cluster_of):
    """Above presence_max_members the cluster's rooms are summarised on every
    node, by the cluster's count (from Redis): the ack and room_members count
    and list members wherever they are connected."""
    async with cluster_of(2, limits={"presence_max_members": 2, "ack_members": 2}) as cluster:
        async with (
            connect_to(cluster[0], 21, "ann") as ann,
            connect_to(cluster[1], 22, "bob") as bob,
        ):
            await join(ann)
            assert (await join(bob))["member_count"] == 2
            assert (await next_frame(ann, PRESENCE))["data"]["user_id"] == 22  # small: at once
            async with (
                connect_to(cluster[1], 23, "cat") as cat,
                connect_to(cluster[0], 24, "dan") as dan,
            ):
                ack = await join(cat)
                assert ack["member_count"] == 3 and member_ids(ack) == {21, 22}
                ack = await join(dan)
                assert ack["member_count"] == 4 and member_ids(ack) == {21, 22}
                page = await ask(dan, "room_members", {"room": "general", "after_user_id": 22}, "m")
                assert [m["user_id"] for m in page["data"]["members"]] == [23, 24]
                # Each node sums up the joins of both nodes for its own members.
                for observer in (ann, bob):
                    joined: set[int] = set()
                    while joined != {23, 24}:
                        frame = await observer.recv(WAIT)
                        assert frame["type"] == "room_presence", frame
                        assert frame["data"]["member_count"] in (3, 4)
                        joined |= {m["user_id"] for m in frame["data"]["joined"]}


# === 7. rate limits ==============================================================


async def test_the_rate_limit_counts_a_user_once_across_nodes(cluster_of):
    async with cluster_of(2, limits={"messages_per_minute": 3, "messages_per_hour": 100}) as c:
        async with (
            connect_to(c[0], 1, "alice") as alice0,
            connect_to(c[1], 1, "alice") as alice1,
            connect_to(c[1], 2, "bob") as bob,
        ):
            for client in (alice0, alice1, bob):
                await join(client)
            oks = [
                await say(alice0, "one"),
                await say(alice1, "two"),
                await say(alice0, "three"),
            ]
            assert [f["type"] for f in oks] == ["room_message"] * 3, oks
            for client, content in ((alice1, "four"), (alice0, "five")):
                err = await say(client, content)
                assert err["type"] == "error", err
                assert err["data"]["code"] == "RATE_LIMITED"
                assert err["data"]["details"]["retry_after"] >= 1
            # Refused messages went nowhere: bob sees the three, then his own.
            seen = await room_messages(bob, 3)
            assert [m["content"] for m in seen] == ["one", "two", "three"]
            await said(bob, "bob's")
            await bob.nothing_pending()
            history = (await all_history(bob, room="general"))[0]
            assert [m["content"] for m in history] == ["one", "two", "three", "bob's"]


# === 8. the publish API ==========================================================


async def test_publish_on_one_node_reaches_members_on_another(cluster_of):
    async with cluster_of(2, api={"keys": [KEY]}) as cluster:
        async with (
            connect_to(cluster[0], 1, "alice") as alice,
            connect_to(cluster[1], 2, "bob") as bob,
        ):
            await join(alice)
            await join(bob)
            reply = await publish(cluster[0].port, {"room": "general", "content": "deployed"})
            assert reply.status == 200, reply
            answer = reply.json()
            for client in (alice, bob):
                frame = await next_frame(client, ("notification",))
                assert frame["data"]["id"] == answer["id"]
                assert frame["data"]["content"] == "deployed"
                assert frame["data"]["room"] == "general"

            # Through the balancer, which sends it to node 0.
            reply = await publish(cluster.port, {"user_id": 2, "content": "for bob"})
            assert cluster.lb.routed == [0]
            assert reply.status == 200, reply
            frame = await next_frame(bob, ("notification",))
            assert frame["data"]["id"] == reply.json()["id"]
            assert frame["data"]["to_user_id"] == 2
            await alice.nothing_pending()
            await bob.nothing_pending()


async def test_the_publish_api_limit_counts_calls_on_every_node(cluster_of):
    """The system sender's limit ([api] messages_per_minute) is one budget for
    the cluster: two calls on node 0 and one on node 1 make three."""
    api = {"keys": [KEY], "messages_per_minute": 2, "messages_per_hour": 100}
    async with cluster_of(2, api=api) as cluster:
        for node in (cluster[0], cluster[0]):
            reply = await publish(node.port, {"room": "general", "content": "ok"})
            assert reply.status == 200, reply
        reply = await publish(cluster[1].port, {"room": "general", "content": "one too many"})
        assert reply.status == 429, reply


async def test_a_node_stopped_gracefully_says_at_once_that_its_users_left(cluster_of):
    """A drain (SIGTERM) closes the node's connections: their users leave the
    cluster's presence at once, not when the node's lease (a minute here)
    runs out; the balancer then sends newcomers to the node still up."""
    async with cluster_of(2, bus={"lease_seconds": 60}) as cluster:
        async with (
            connect_to(cluster[1], 2, "bob") as bob,
            connect_to(cluster[0], 1, "alice") as alice,
        ):
            await join(bob)
            await join(alice)
            arrived = await bob.expect("user_connected", WAIT)
            assert arrived["data"]["user_id"] == 1
            await cluster[0].stop()
            with pytest.raises(ConnectionClosed) as info:
                await alice.recv(WAIT)
            assert info.value.reason.code == 1001
            left = await bob.expect("user_disconnected", WAIT)
            assert left["data"]["user_id"] == 1
            async with connect_to(cluster, 3, "carol") as carol:
                assert cluster.lb.routed == [1]
                assert member_ids(await join(carol)) == {2, 3}


# === 9. faults ===================================================================


#: coredis leaves the memory streams of a connection that failed to connect
#: unclosed (ResourceWarning when collected); chatd's publisher makes one per
#: retry while Redis is down. Reported by
#: test_a_redis_outage_leaves_no_unclosed_resource; ignored (and collected
#: before the test ends) in the other tests that stop Redis.
COREDIS_LEAK = (
    "ignore:Exception ignored in. <function MemoryObject:pytest.PytestUnraisableExceptionWarning"
)


@pytest.mark.filterwarnings(COREDIS_LEAK)
async def test_messages_committed_while_redis_is_down_reach_the_other_node(
    make_config: Callable[..., Config], pg_dsn: str, redis_prefix: str
) -> None:
    """Redis goes away while clients on both nodes talk: each sender still
    gets its own copy (the commit is PostgreSQL's), and once Redis is back
    every member on the other node gets every message, either live (the
    nodes catch up from the store) or by reconnecting with since_id. Then
    live messages cross again."""
    with own_redis() as bus:
        async with running_cluster(
            make_config, pg_dsn, bus.url, redis_prefix, 2, bus={"lease_seconds": 1}
        ) as cluster:
            readers = [Follower(cluster[0], 10, "reader0"), Follower(cluster[1], 11, "reader1")]
            async with (
                trio.open_nursery() as nursery,
                connect_to(cluster[0], 1, "alice") as alice,
                connect_to(cluster[1], 2, "bob") as bob,
            ):
                for reader in readers:
                    await nursery.start(reader.run)
                await join(alice)
                await join(bob)
                sent = [await said(alice, "before")]
                with trio.fail_after(WAIT):
                    for reader in readers:
                        await reader.wait_for([sent[0]["id"]])

                bus.stop()
                with trio.fail_after(WAIT):
                    for i in range(3):
                        sent.append(await said(alice, f"alice-outage{i}"))
                        sent.append(await said(bob, f"bob-outage{i}"))
                await trio.to_thread.run_sync(bus.start)

                with trio.fail_after(WAIT * 2):
                    for reader in readers:
                        await reader.wait_for([m["id"] for m in sent])
                    sent.append(await said(bob, "after"))
                    for reader in readers:
                        await reader.wait_for([sent[-1]["id"]])
                nursery.cancel_scope.cancel()

    gc.collect()  # the leak above is collected under this test's filter
    ids = sorted(m["id"] for m in sent)
    for reader in readers:
        assert reader.ids == ids, f"reader {reader.user_id}: {reader.ids} != {ids}"


@pytest.mark.filterwarnings(COREDIS_LEAK)
async def test_a_node_cut_off_from_redis_catches_up_from_the_store(
    make_config: Callable[..., Config], pg_dsn: str, redis: Any, redis_prefix: str
) -> None:
    """Only node 1 loses Redis, while node 0 keeps publishing: the events are
    gone for node 1 (its subscription was down), and nothing is sent after
    it comes back, so no later message reveals the gap. Node 1 must read the
    room from the store when its subscription returns, by itself."""
    async with tcp_proxy(redis.host, redis.port) as link:
        per_node = [{}, {"bus": {"url": f"redis://127.0.0.1:{link.port}/0"}}]
        async with running_cluster(
            make_config, pg_dsn, redis.url, redis_prefix, 2, per_node=per_node
        ) as cluster:
            async with (
                connect_to(cluster[0], 1, "alice") as alice,
                connect_to(cluster[1], 2, "bob") as bob,
            ):
                await join(alice)
                await join(bob)
                first = await said(alice, "before")
                assert (await room_messages(bob, 1))[0]["id"] == first["id"]
                link.cut()
                missed = [(await said(alice, f"missed{i}"))["id"] for i in range(3)]
                link.restore()
                with trio.fail_after(WAIT * 3):  # coredis reconnects with a backoff
                    got = [m["id"] for m in await room_messages(bob, 3)]
                assert got == missed
                await bob.nothing_pending()

                # the same for a direct message to bob
                link.cut()
                await alice.send("direct_message", {"to_user_id": 2, "content": "psst"}, "dm")
                with trio.fail_after(WAIT):
                    own = await next_frame(alice, ("direct_message",))
                assert own["request_id"] == "dm"
                link.restore()
                with trio.fail_after(WAIT * 3):
                    dm = await next_frame(bob, ("direct_message",))
                assert dm["data"]["id"] == own["data"]["id"]
                await bob.nothing_pending()

                # and edits, in the room and in the conversation
                link.cut()
                edits = []
                for target, content in ((missed[0], "edited"), (own["data"]["id"], "psst!")):
                    data = {"message_id": target, "content": content}
                    edited = await ask(alice, "edit_message", data, f"edit:{target}")
                    assert edited["type"] == "message_edited", edited
                    edits.append(edited["data"])
                link.restore()
                with trio.fail_after(WAIT * 3):
                    got = [(await next_frame(bob, ("message_edited",)))["data"] for _ in edits]
                assert got == edits
                await bob.nothing_pending()
    gc.collect()


@pytest.mark.xfail(
    strict=True,
    reason="coredis 6.9 bug, triggered by chatd's retries while Redis is down: a "
    "connection whose connect fails never closes the anyio memory streams its __init__ "
    "made (coredis/connection/_base.py); they are freed, with a ResourceWarning each. "
    "Upstream report to file; this test turns green when coredis closes them",
)
@pytest.mark.filterwarnings(COREDIS_LEAK)  # what is freed after the body: not counted twice
async def test_a_redis_outage_leaves_no_unclosed_resource(
    make_config: Callable[..., Config], pg_dsn: str, redis_prefix: str
) -> None:
    """One node sends while Redis is down; every ResourceWarning until the end
    (a last collection included) is counted."""
    gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with own_redis() as bus:
            async with running_cluster(make_config, pg_dsn, bus.url, redis_prefix, 1) as cluster:
                async with connect_to(cluster[0], 1, "alice") as alice:
                    await join(alice)
                    bus.stop()
                    await said(alice, "during")
                    await trio.to_thread.run_sync(bus.start)
                    await said(alice, "after")
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaks, f"{len(leaks)} unclosed: {leaks[:4]}"


@pytest.mark.filterwarnings(COREDIS_LEAK)
async def test_presence_is_whole_again_after_a_redis_restart(
    make_config: Callable[..., Config], pg_dsn: str, redis_prefix: str
) -> None:
    """A restarted Redis is empty: the nodes put their members back (at the
    latest when their leases renew), so a newcomer sees users on both nodes."""
    with own_redis() as bus:
        async with running_cluster(
            make_config, pg_dsn, bus.url, redis_prefix, 2, bus={"lease_seconds": 1}
        ) as cluster:
            async with (
                connect_to(cluster[0], 1, "alice") as alice,
                connect_to(cluster[1], 2, "bob") as bob,
            ):
                await join(alice)
                assert member_ids(await join(bob)) == {1, 2}
                bus.stop()
                await trio.to_thread.run_sync(bus.start)
                with trio.fail_after(WAIT):
                    while True:
                        async with connect_to(cluster[0], 3, "carol") as carol:
                            members = member_ids(await join(carol))
                        if members == {1, 2, 3}:
                            break
                        assert members <= {1, 2, 3}
                        await trio.sleep(0.2)
    gc.collect()  # what a retry during the restart leaked, under this test's filter


async def test_postgres_unreachable_is_an_error_never_a_false_acknowledgement(
    make_config: Callable[..., Config], pg_dsn: str, postgres: Any, redis: Any, redis_prefix: str
) -> None:
    async with tcp_proxy(postgres.host, postgres.port) as proxy:
        dsn = dsn_via(pg_dsn, proxy.port)
        async with running_cluster(make_config, dsn, redis.url, redis_prefix, 2) as cluster:
            async with (
                connect_to(cluster[0], 1, "alice") as alice,
                connect_to(cluster[1], 2, "bob") as bob,
            ):
                await join(alice)
                await join(bob)
                first = await said(alice, "before")
                assert await room_messages(bob, 1) == [first]

                proxy.cut()
                with trio.fail_after(WAIT * 3):
                    err = await say(alice, "lost", request_id="lost")
                assert err["type"] == "error", err
                assert err["data"]["code"] == "INTERNAL_ERROR", err
                data = {"to_user_id": 2, "content": "lost dm", "message_type": "text"}
                with trio.fail_after(WAIT * 3):
                    err = await alice.request("direct_message", data, request_id="lost-dm")
                assert err["type"] == "error", err
                assert err["data"]["code"] == "INTERNAL_ERROR", err

                proxy.restore()
                with trio.fail_after(WAIT * 3):
                    attempt = 0
                    while True:
                        attempt += 1
                        frame = await say(alice, "after", request_id=f"after-{attempt}")
                        if frame["type"] == "room_message":
                            break
                        assert frame["data"]["code"] == "INTERNAL_ERROR", frame
                        await trio.sleep(0.2)
                after = frame["data"]
                # bob never saw "lost": the next message he sees is "after".
                assert await room_messages(bob, 1) == [after]
                history = (await all_history(bob, room="general"))[0]
                assert [m["content"] for m in history] == ["before", "after"]
                dms = (await all_history(bob, with_user=1))[0]
                assert dms == []
                await alice.nothing_pending()
                await bob.nothing_pending()


async def test_a_killed_node_its_clients_recover_elsewhere_and_its_users_leave(cluster_of):
    """Node 0 is SIGKILLed. alice, who was on it, reconnects through the
    balancer (which now reaches node 1 only) with since_id and gets what was
    committed meanwhile. carol, who was only on node 0, is announced gone to
    bob on node 1 once the dead node's lease expires; alice, back on node 1,
    stays present."""
    async with cluster_of(2, processes=True, bus={"lease_seconds": 1}) as cluster:
        async with (
            connect_to(cluster[1], 2, "bob") as bob,
            connect_to(cluster[0], 1, "alice") as alice,
            connect_to(cluster[0], 3, "carol") as carol,
        ):
            bob_log: list[dict] = []
            await join(bob)
            await join(alice)
            await join(carol)
            before = await said(bob, "before", log=bob_log)
            for client in (alice, carol):
                assert await room_messages(client, 1) == [before]

            cluster[0].kill()
            for client in (alice, carol):
                with trio.fail_after(WAIT), pytest.raises(ConnectionClosed):
                    while True:
                        await client.recv(WAIT)
            missed = [await said(bob, f"missed{i}", log=bob_log) for i in range(3)]

            async with connect_to(cluster, 1, "alice") as alice:
                assert cluster.lb.routed[-1] == 1
                ack = await join(alice, since_id=before["id"])
                assert ack["recovered"] is True
                assert await room_messages(alice, 3) == missed
                live = await said(bob, "live", log=bob_log)
                assert await room_messages(alice, 1) == [live]

                with trio.fail_after(WAIT):
                    while presence_of(bob_log, 3) != ["user_connected", "user_disconnected"]:
                        frame = await bob.recv(WAIT)
                        if frame["type"] in PRESENCE:
                            bob_log.append(frame)
                        else:
                            assert frame["type"] == "room_message", frame
                async with connect_to(cluster, 4, "dave") as dave:
                    assert member_ids(await join(dave)) == {1, 2, 4}
                await said(bob, "end", log=bob_log)
                await until_content(alice, "end")
                # alice never left for good: whatever bob heard ends with her present.
                alice_events = presence_of(bob_log, 1)
                assert alice_events in (
                    ["user_connected"],
                    ["user_connected", "user_disconnected", "user_connected"],
                ), alice_events


# === 10. the single-node acceptance scenarios, on two nodes behind the balancer ==


@pytest.fixture(params=["single", "cluster"])
def target_kind(request: pytest.FixtureRequest) -> tuple[str, tuple[Any, ...]]:
    if request.param == "single":
        return "single", ()
    services = (
        request.getfixturevalue("pg_dsn"),
        request.getfixturevalue("redis").url,
        request.getfixturevalue("redis_prefix"),
    )
    return "cluster", services


@pytest.fixture
async def target(
    target_kind: tuple[str, tuple[Any, ...]], make_config: Callable[..., Config]
) -> AsyncIterator[Any]:
    """One node, or two behind the balancer: clients connecting one after the
    other land on alternate nodes."""
    kind, services = target_kind
    if kind == "single":
        async with running(make_config()) as server:
            yield server
    else:
        async with running_cluster(make_config, *services, 2) as cluster:
            yield cluster


def spread(target: Any) -> None:
    """On a cluster, the clients of a scenario landed on both nodes."""
    if isinstance(target, Cluster):
        assert set(target.lb.routed) == {0, 1}, target.lb.routed


async def test_scenario_chat_in_order_with_request_ids(target):
    async with connect_to(target, 1, "alice") as alice, connect_to(target, 2, "bob") as bob:
        spread(target)
        await join(alice)
        assert member_ids(await join(bob)) == {1, 2}
        assert (await alice.expect("user_connected", WAIT))["data"]["user_id"] == 2
        for i in range(20):
            await alice.send("room_message", {"room": "general", "content": f"a{i}"}, request_id=i)
        await bob.send("room_message", {"room": "general", "content": "from bob"}, request_id="b")
        seen_by_bob = [await bob.expect("room_message", WAIT) for _ in range(21)]
        seen_by_alice = [await alice.expect("room_message", WAIT) for _ in range(21)]
        await alice.nothing_pending()
        await bob.nothing_pending()
    ids = [f["data"]["id"] for f in seen_by_bob]
    assert len(set(ids)) == 21
    assert_increasing(ids)
    assert [f["data"] for f in seen_by_alice] == [f["data"] for f in seen_by_bob]
    alice_contents = [f["data"]["content"] for f in seen_by_bob if f["data"]["user_id"] == 1]
    assert alice_contents == [f"a{i}" for i in range(20)]
    own = [f for f in seen_by_alice if f["data"]["user_id"] == 1]
    assert [f["request_id"] for f in own] == list(range(20))
    assert all("request_id" not in f for f in seen_by_bob if f["data"]["user_id"] == 1)
    assert [f["request_id"] for f in seen_by_bob if f["data"]["user_id"] == 2] == ["b"]


async def test_scenario_request_id_is_echoed_on_every_reply(target):
    async with connect_to(target, 1, "alice") as alice, connect_to(target, 2, "bob") as bob:
        spread(target)
        for client in (alice, bob):
            ack = await client.request("join_room", {"room": "general"}, request_id="join-1")
            assert ack["type"] == "join_room_ack" and ack["request_id"] == "join-1", ack
            pong = await client.request("ping", {}, request_id=42)
            assert pong["type"] == "pong" and pong["request_id"] == 42
            err = await client.request("join_room", {"room": "nope"}, request_id="j2")
            assert err["type"] == "error" and err["request_id"] == "j2"
            assert err["data"]["code"] == "ROOM_NOT_FOUND"
            hist = await client.request("room_history", {"room": "general"}, request_id="h")
            assert hist["type"] == "message_history" and hist["request_id"] == "h"
        dm = {"to_user_id": 1, "content": "hi", "message_type": "text"}
        sent = await bob.request("direct_message", dm, request_id="dm")
        # bob may first hear that alice joined; his reply is the DM's own copy.
        while sent["type"] in PRESENCE:
            sent = await bob.recv(WAIT)
        assert sent["type"] == "direct_message" and sent["request_id"] == "dm", sent


async def test_scenario_history_pages(target):
    async with connect_to(target, 1, "alice") as alice, connect_to(target, 2, "bob") as bob:
        spread(target)
        await join(alice)
        await join(bob)
        sent = [await said(alice if i % 2 == 0 else bob, f"m{i}") for i in range(6)]
        for reader in (alice, bob):
            for limit, offset, expected, more in (
                (3, 0, sent[3:6], True),
                (3, 3, sent[0:3], False),
                (4, 4, sent[0:2], False),
            ):
                query = {"room": "general", "limit": limit, "offset": offset}
                page = await ask(reader, "room_history", query, f"h{offset}")
                assert page["type"] == "message_history", page
                assert page["data"]["messages"] == expected
                assert page["data"]["total"] == 6
                assert page["data"]["has_more"] is more


async def test_scenario_kinds_are_delivered_and_kept(target):
    async with connect_to(target, 1, "alice") as alice, connect_to(target, 2, "bob") as bob:
        spread(target)
        await join(alice)
        await join(bob)
        text = await said(alice, "look")
        sent = [
            {
                "content": "photo",
                "message_type": "image",
                "media_url": "/uploads/p.png",
                "media_type": "image/png",
            },
            {
                "content": "voice",
                "message_type": "audio",
                "media_url": "https://cdn.example.com/v.mp3",
                "duration": 15.5,
            },
            {"content": "👍", "message_type": "reaction", "reply_to": text["id"]},
        ]
        own = []
        for i, data in enumerate(sent):
            frame = await alice.request("room_message", {"room": "general", **data}, i)
            while frame["type"] in PRESENCE:
                frame = await alice.recv(WAIT)
            assert frame["type"] == "room_message" and frame["request_id"] == i, frame
            own.append(frame["data"])
            for key, value in data.items():
                assert frame["data"][key] == value
        assert await room_messages(bob, 4) == [text, *own]
        history = await bob.request("room_history", {"room": "general"})
        assert history["data"]["messages"] == [text, *own]


async def test_scenario_batch_entries_run_in_order(target):
    async with connect_to(target, 1, "alice") as alice, connect_to(target, 2, "bob") as bob:
        spread(target)
        await join(bob)
        batch = [
            {"type": "join_room", "data": {"room": "general"}, "request_id": "j"},
            {
                "type": "room_message",
                "data": {"room": "general", "content": "hi"},
                "request_id": "m",
            },
            {"type": "ping", "data": {}, "request_id": "p"},
            {"type": "room_history", "data": {"room": "general"}, "request_id": "h"},
        ]
        await alice.send("message_batch", {"messages": batch}, request_id="whole")
        got = {}
        while len(got) < 4:
            frame = await alice.recv(WAIT)
            if frame["type"] in PRESENCE:
                continue
            got[frame["request_id"]] = frame
        assert got["j"]["type"] == "join_room_ack"
        assert got["m"]["type"] == "room_message" and got["m"]["data"]["content"] == "hi"
        assert got["p"]["type"] == "pong"
        assert got["h"]["data"]["messages"] == [got["m"]["data"]]
        assert (await bob.expect("user_connected", WAIT))["data"]["user_id"] == 1
        live = await bob.expect("room_message", WAIT)
        assert live["data"] == got["m"]["data"] and "request_id" not in live
        await bob.nothing_pending()


async def test_scenario_recovery_then_live(target):
    async with connect_to(target, 2, "bob") as bob:
        await join(bob)
        async with connect_to(target, 1, "alice") as alice:
            await join(alice)
            seen = await said(bob, "seen")
            assert await room_messages(alice, 1) == [seen]
        missed = [await said(bob, f"missed{i}") for i in range(3)]
        async with connect_to(target, 1, "alice") as alice:
            spread(target)
            ack = await join(alice, since_id=seen["id"])
            assert ack["recovered"] is True
            assert await room_messages(alice, 3) == missed
            live = await said(bob, "live")
            assert await room_messages(alice, 1) == [live]
            await alice.nothing_pending()


# === edits and deletions =========================================================

CHANGES = ("room_message", "message_edited", "message_deleted")


async def test_edits_and_deletions_from_two_nodes_reach_everyone_in_one_order(cluster_of):
    """alice on node 0 and bob on node 1 post, edit and delete at once;
    watchers on both nodes see one sequence of messages and events, ids
    increasing; eve, away for part of it, comes back on the other node with
    her last id and, applying what she gets in order, ends with exactly
    what history shows."""
    from tests.test_edits import apply

    rounds = 8
    async with cluster_of(2) as cluster:
        async with (
            connect_to(cluster[0], 1, "alice") as alice,
            connect_to(cluster[1], 2, "bob") as bob,
            connect_to(cluster[0], 3, "carol") as carol,
            connect_to(cluster[1], 4, "dave") as dave,
        ):
            for client in (alice, bob, carol, dave):
                await join(client)
            await barrier(dave, [alice, bob, carol])
            eve_view: dict[int, dict] = {}
            eve_last = 0
            async with connect_to(cluster[0], 5, "eve") as eve:
                await join(eve)
                first = await said(alice, "before eve left")
                eve_last = apply(eve_view, await next_frame(eve, CHANGES))
                assert eve_last == first["id"]
                for watcher in (carol, dave):
                    assert (await next_frame(watcher, CHANGES))["data"]["id"] == first["id"]

            async def work(client: Client, name: str) -> None:
                for i in range(rounds):
                    mine = await said(client, f"{name}{i}")
                    edited = await ask(
                        client,
                        "edit_message",
                        {"message_id": mine["id"], "content": f"{name}{i}!"},
                        f"e{i}",
                    )
                    assert edited["type"] == "message_edited", edited
                    if i % 3 == 1:
                        gone = await ask(
                            client, "delete_message", {"message_id": mine["id"]}, f"d{i}"
                        )
                        assert gone["type"] == "message_deleted", gone

            expected = 2 * (rounds * 2 + len([i for i in range(rounds) if i % 3 == 1]))
            seen: dict[str, list[dict]] = {}

            async def watch(name: str, client: Client) -> None:
                seen[name] = [await next_frame(client, CHANGES) for _ in range(expected)]

            with trio.fail_after(WAIT * 2):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(work, alice, "a")
                    nursery.start_soon(work, bob, "b")
                    nursery.start_soon(watch, "carol", carol)
                    nursery.start_soon(watch, "dave", dave)
            history = (await all_history(dave, room="general"))[0]
            # eve comes back on the other node
            async with connect_to(cluster[1], 5, "eve") as eve:
                ack = await ask(eve, "join_room", {"room": "general", "since_id": eve_last}, "j")
                assert ack["data"]["recovered"] is True
                ids = [apply(eve_view, await next_frame(eve, CHANGES)) for _ in range(expected)]
                await eve.nothing_pending()

    watched = [[f["data"]["id"] for f in frames] for frames in seen.values()]
    assert watched[0] == watched[1]
    assert_increasing(watched[0])
    assert ids == watched[0]
    for frames in seen.values():
        view: dict[int, dict] = {}
        for frame in frames:
            apply(view, frame)
        assert [view[m["id"]] for m in history if m["id"] in view] == [
            m for m in history if m["id"] in view
        ]
    since_eve = [m for m in history if m["id"] >= first["id"]]
    assert len(since_eve) == 1 + 2 * rounds
    assert [eve_view[m["id"]] for m in since_eve] == since_eve


# === webhooks ====================================================================


async def test_webhooks_are_sent_by_one_node_and_another_takes_over(cluster_of):
    """Both nodes commit messages; every one reaches the backend once, each
    delivery sent by one node (the holder of the outbox lock). When that node
    stops, the other takes over and sends what follows."""
    from tests.helpers.receiver import receiving
    from tests.test_webhooks import hooks, verified

    async with receiving() as receiver:
        async with cluster_of(2, webhooks=hooks(receiver.url)) as cluster:
            sent = []
            async with (
                connect_to(cluster[0], 1, "alice") as alice,
                connect_to(cluster[1], 2, "bob") as bob,
            ):
                await join(alice)
                await join(bob)
                for i in range(5):
                    sent.append(await said(alice, f"a{i}"))
                    sent.append(await said(bob, f"b{i}"))

                def delivered() -> list[dict]:
                    return [
                        m["data"]
                        for r in receiver.requests
                        for m in verified(r)["data"]["messages"]
                    ]

                with trio.fail_after(WAIT * 2):
                    while len(delivered()) < len(sent):
                        await receiver.wait_for(len(receiver.requests) + 1)
                assert sorted(delivered(), key=lambda m: m["id"]) == sorted(
                    sent, key=lambda m: m["id"]
                )
                # the sender stops: the other node takes over
                before = len(receiver.requests)
                leader = next(n for n in cluster.nodes if n.server.ctx.store._leader is not None)
                other = cluster.nodes[1 - leader.index]
                await leader.stop()
                client = bob if other.index == 1 else alice
                after = await said(client, "after the stop")
                with trio.fail_after(WAIT * 2):
                    while after["id"] not in [m["id"] for m in delivered()]:
                        await receiver.wait_for(len(receiver.requests) + 1)
                assert other.server.ctx.store._leader is not None
    ids = [r.headers["webhook-id"] for r in receiver.requests]
    assert len(ids) == len(set(ids)), ids  # each delivery sent once
    assert len(receiver.requests) > before


async def test_a_ban_on_one_node_holds_on_the_other_and_kicks_there(cluster_of):
    """A moderator on node 0 bans a user connected to node 1 (twice, on
    both nodes): every connection leaves the room with ``kicked``, node 1
    refuses the rejoin at once (its cached access forgotten), and the
    others see the leave; an unban on node 1 lets the user back on node 0."""
    rooms = {"public": ["general"], "moderators": {"general": [1]}}
    async with cluster_of(2, rooms=rooms) as cluster:
        async with (
            connect_to(cluster[0], 1, "mod") as mod,
            connect_to(cluster[1], 2, "bob") as bob1,
            connect_to(cluster[0], 2, "bob") as bob0,
            connect_to(cluster[1], 3, "carol") as carol,
        ):
            for client in (mod, bob1, bob0, carol):
                await join(client)
            # (node 1 has read the room's access: it is cached there now)
            ban = {"room": "general", "user_id": 2, "duration_seconds": 600}
            await mod.send("ban", ban, request_id="b")
            ack = await next_frame(mod, ("moderation_ack",))
            for device in (bob1, bob0):
                kicked = await next_frame(device, ("kicked",))
                assert kicked["data"]["by_user_id"] == 1
                assert kicked["data"]["until"] == ack["data"]["until"]
            seen: list[dict] = []
            with trio.fail_after(WAIT):
                while not any(
                    f["type"] == "user_disconnected" and f["data"]["user_id"] == 2 for f in seen
                ):
                    seen.append(await carol.recv(WAIT))
            for device in (bob1, bob0):
                refused = await device.request("join_room", {"room": "general"}, request_id="j")
                assert refused["type"] == "error", refused
                assert refused["data"]["code"] == "PERMISSION_DENIED"
                assert refused["data"]["details"]["banned_until"] == ack["data"]["until"]
            # the moderator's role is read on node 1 too
            async with connect_to(cluster[1], 1, "mod") as mod1:
                await mod1.send("unban", {"room": "general", "user_id": 2}, request_id="u")
                await next_frame(mod1, ("moderation_ack",))
            # node 0 hears of it through Redis: a join there succeeds once it has
            with trio.fail_after(WAIT):
                while True:
                    again = await bob0.request("join_room", {"room": "general"}, request_id="j2")
                    if again["type"] == "join_room_ack":
                        break
                    assert again["data"]["code"] == "PERMISSION_DENIED", again
                    await trio.sleep(0.05)


async def test_a_block_on_one_node_filters_typing_on_the_other(cluster_of):
    """alice blocks bob through node 0; she is also connected to node 1,
    where bob's typing to her arrives: that node was told of the block
    (Bus.blocked), so neither of her connections gets it, while carol still
    does; bob's direct message to her is refused on either node."""
    async with cluster_of(2) as cluster:
        async with (
            connect_to(cluster[0], 1, "alice") as alice0,
            connect_to(cluster[1], 1, "alice") as alice1,
            connect_to(cluster[1], 2, "bob") as bob,
            connect_to(cluster[0], 3, "carol") as carol,
        ):
            await alice0.send("block_user", {"user_id": 2}, request_id="b")
            listed = await next_frame(alice0, ("block_list",))
            assert listed["data"]["user_ids"] == [2]
            for client in (alice0, alice1, bob, carol):
                await join(client)
            dm = {"to_user_id": 1, "content": "hi"}
            await bob.send("direct_message", dm, request_id="d")
            refused = await next_frame(bob, ("error",))
            assert refused["data"]["code"] == "PERMISSION_DENIED"
            # Redis carries the block to node 1 as it carries everything else:
            # once carol has bob's room typing, alice's copy would have come too
            await bob.send("typing", {"to_user_id": 1, "state": "start"})
            await bob.send("typing", {"room": "general", "state": "start"})
            typing = await next_frame(carol, ("typing",))
            assert typing["data"]["user_id"] == 2
            await trio.sleep(0.5)
            for alice in (alice0, alice1):  # (presence frames aside) nothing from bob
                await alice.send("ping", {}, request_id="p")
                assert (await next_frame(alice, ("pong", "typing")))["type"] == "pong"
