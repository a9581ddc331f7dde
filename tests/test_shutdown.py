"""Stopping the in-process server: every client gets 1001, new connections
are refused, every acknowledged message is in the database, and a client
that never answers the close is cut off after ``shutdown_timeout_seconds``.
With ``drain_grace_seconds``, ``/readyz`` answers 503 while the clients keep
working (new ones too) for the grace, then they get 1001.

The same on a real process, by signal, is ``tests/test_signals.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
import trio.testing
from wsproto.events import CloseConnection

from chatd.config import Config
from chatd.server import ChatServer
from tests.helpers.clients import closed_with, connect
from tests.helpers.http_client import http_request
from tests.helpers.raw import raw_ws
from tests.helpers.servers import running

pytestmark = pytest.mark.usefixtures("collect_garbage")


async def test_shutdown_closes_1001_and_keeps_acknowledged_messages(
    make_config: Callable[..., Config],
) -> None:
    config = make_config()
    async with running(config) as srv:
        async with connect(srv) as alice:
            await alice.join("general")
            await alice.send(
                "room_message", {"room": "general", "content": "last words"}, request_id=9
            )
            own = await alice.expect("room_message")
            assert own["request_id"] == 9
            message_id = own["data"]["id"]
            srv.stop()
            await closed_with(alice, 1001)

    async with running(make_config()) as srv:
        async with connect(srv, 2, "bob") as bob:
            history = await bob.request("room_history", {"room": "general"})
    assert history["type"] == "message_history"
    messages = history["data"]["messages"]
    assert [(m["id"], m["content"]) for m in messages] == [(message_id, "last words")]


async def test_shutdown_commits_a_burst_sent_before_stop(
    make_config: Callable[..., Config],
) -> None:
    """Every message acknowledged before the stop is in the database."""
    count = 30
    async with running(make_config()) as srv:
        async with connect(srv) as alice:
            await alice.join("general")
            for n in range(count):
                await alice.send(
                    "room_message", {"room": "general", "content": f"m{n}"}, request_id=n
                )
            ids = []
            for n in range(count):
                own = await alice.expect("room_message")
                assert own["request_id"] == n
                ids.append(own["data"]["id"])
            srv.stop()
            await closed_with(alice, 1001)

    async with running(make_config()) as srv:
        async with connect(srv, 2, "bob") as bob:
            history = await bob.request("room_history", {"room": "general", "limit": 100})
    messages = history["data"]["messages"]
    assert [m["id"] for m in messages] == ids
    assert [m["content"] for m in messages] == [f"m{n}" for n in range(count)]


async def test_shutdown_closes_every_client_and_refuses_new_ones(
    make_config: Callable[..., Config],
) -> None:
    async with running(make_config()) as srv:
        port = srv.port
        async with connect(srv, 1, "alice") as alice, connect(srv, 2, "bob") as bob:
            await alice.nothing_pending()
            await bob.nothing_pending()
            srv.stop()
            for client in (alice, bob):
                await closed_with(client, 1001)
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)


async def test_shutdown_does_not_wait_forever_for_a_silent_client(
    slow_autojump_clock: trio.testing.MockClock, make_config: Callable[..., Config]
) -> None:
    """A client that never answers the 1001 close is cut off by the server."""
    config = make_config(server={"shutdown_timeout_seconds": 5})
    with trio.fail_after(60):
        async with running(config) as srv:
            async with raw_ws(srv) as client:
                await client.send_json("ping")
                await client.expect("pong")
                srv.stop()
                stopped = trio.current_time()
                event = await client.next_event(timeout=30)
                assert isinstance(event, CloseConnection) and event.code == 1001
                # Not answered: the server closes the TCP connection anyway.
                assert await client.next_event(timeout=30) is None
                assert trio.current_time() - stopped <= 6


async def test_drain_readyz_503_clients_keep_working_then_1001(
    slow_autojump_clock: trio.testing.MockClock, make_config: Callable[..., Config]
) -> None:
    grace = 30.0
    config = make_config(server={"drain_grace_seconds": grace})
    returned = trio.Event()
    node = ChatServer(config)

    async def serve(*, task_status: trio.TaskStatus[ChatServer]) -> None:
        await node.run(task_status=task_status)
        returned.set()

    # No deadline while starting: on this clock, time would jump to it.
    async with trio.open_nursery() as nursery:
        srv: ChatServer = await nursery.start(serve)
        port = srv.port
        async with connect(srv, 1, "alice") as alice, connect(srv, 2, "bob") as bob:
            await alice.join("general")
            await bob.join("general")
            await alice.expect("user_connected")
            assert (await http_request(port, "GET", "/readyz")).status == 200

            with trio.fail_after(300):
                srv.stop()
                stopped = trio.current_time()
                reply = await http_request(port, "GET", "/readyz")
                assert reply.status == 503
                assert reply.json() == {"status": "draining"}
                # /healthz still answers: the process is alive.
                assert (await http_request(port, "GET", "/healthz")).status == 200

                # Existing clients keep working: a message round-trips.
                await alice.send(
                    "room_message", {"room": "general", "content": "still here"}, request_id=1
                )
                own = await alice.expect("room_message")
                assert own["request_id"] == 1
                got = await bob.expect("room_message")
                assert got["data"]["id"] == own["data"]["id"]
                assert got["data"]["content"] == "still here"

                # New connections are still accepted during the grace.
                async with connect(srv, 3, "carol") as carol:
                    await carol.join("general")
                    await alice.expect("user_connected")
                    await bob.expect("user_connected")
                    await carol.send(
                        "room_message", {"room": "general", "content": "late"}, request_id="c"
                    )
                    assert (await carol.expect("room_message"))["request_id"] == "c"
                    assert (await alice.expect("room_message"))["data"]["content"] == "late"
                    assert (await bob.expect("room_message"))["data"]["content"] == "late"
                    assert trio.current_time() - stopped < grace
                    assert not returned.is_set()

                    # After the grace every client gets 1001.
                    for client in (alice, bob, carol):
                        await closed_with(client, 1001, wait=2 * grace)
                    assert trio.current_time() - stopped >= grace
        # No deadline here either: the store commits on its thread while
        # run() finishes, and time would jump to the deadline.
        await returned.wait()
    assert returned.is_set()
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)
