"""The heartbeat, on a virtual clock: the server pings every
``ping_interval_seconds`` and drops a client silent for
``idle_timeout_seconds``; a client that sends frames, or answers the pings
(as trio-websocket does by itself), stays connected.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
import trio.testing
from wsproto.events import Ping

from chatd.config import Config
from tests.helpers.clients import connect
from tests.helpers.raw import raw_ws
from tests.helpers.servers import running

pytestmark = pytest.mark.usefixtures("collect_garbage")


def heartbeat_config(make_config: Callable[..., Config]) -> Config:
    return make_config(server={"ping_interval_seconds": 30, "idle_timeout_seconds": 75})


async def test_server_pings_after_interval(
    slow_autojump_clock: trio.testing.MockClock, make_config: Callable[..., Config]
) -> None:
    async with running(heartbeat_config(make_config)) as srv:
        async with raw_ws(srv) as client:
            start = trio.current_time()
            event = await client.next_event(timeout=60)
            assert isinstance(event, Ping), event
            assert 29 <= trio.current_time() - start <= 31
            # A second one, one interval later.
            await client.send(event.response())
            event = await client.next_event(timeout=60)
            assert isinstance(event, Ping), event
            assert 59 <= trio.current_time() - start <= 61


async def test_silent_client_is_dropped_after_idle_timeout(
    slow_autojump_clock: trio.testing.MockClock, make_config: Callable[..., Config]
) -> None:
    async with running(heartbeat_config(make_config)) as srv:
        async with raw_ws(srv) as client:
            start = trio.current_time()
            pings = 0
            with trio.fail_after(300):
                while True:
                    event = await client.next_event(timeout=300)
                    if event is None:
                        break
                    assert isinstance(event, Ping), event  # never answered
                    pings += 1
            elapsed = trio.current_time() - start
    assert pings == 2  # at 30 s and 60 s
    assert 74 <= elapsed <= 77


async def test_client_sending_pings_stays_connected(
    slow_autojump_clock: trio.testing.MockClock, make_config: Callable[..., Config]
) -> None:
    async with running(heartbeat_config(make_config)) as srv:
        async with raw_ws(srv) as client:
            start = trio.current_time()
            n = 0
            while trio.current_time() - start < 160:
                await trio.sleep(20)
                # Server pings are read but never answered: only the
                # application pings show that the client is alive.
                await client.send_json("ping", request_id=n)
                pong = await client.expect("pong", timeout=30)
                assert pong["request_id"] == n
                n += 1
            assert not client.eof
            assert client.pings >= 4
            await client.send_json("join_room", {"room": "general"})
            await client.expect("join_room_ack")


async def test_client_answering_pings_stays_connected(
    slow_autojump_clock: trio.testing.MockClock, make_config: Callable[..., Config]
) -> None:
    async with running(heartbeat_config(make_config)) as srv:
        async with raw_ws(srv) as client:
            start = trio.current_time()
            pings = 0
            while trio.current_time() - start < 200:
                event = await client.next_event(timeout=60)
                assert isinstance(event, Ping), event
                await client.send(event.response())
                pings += 1
            assert pings >= 6
            await client.send_json("ping", request_id="alive")
            assert (await client.expect("pong"))["request_id"] == "alive"


async def test_trio_websocket_client_survives_heartbeat(
    slow_autojump_clock: trio.testing.MockClock, make_config: Callable[..., Config]
) -> None:
    """trio-websocket answers pings by itself: an idle but healthy client is
    never dropped."""
    async with running(heartbeat_config(make_config)) as srv:
        async with connect(srv) as client:
            await trio.sleep(300)
            await client.nothing_pending()
