"""A slow consumer: a client that stops reading while its room is busy is
closed 1013 once ``[server] send_buffer_bytes`` is full; the others get every
message, in order, without waiting for it; what it did get is whole and in
order, and the server then forgets it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing
from wsproto.events import CloseConnection, TextMessage

from chatd.config import Config
from tests.helpers.clients import connect
from tests.helpers.raw import raw_ws
from tests.helpers.servers import running

pytestmark = pytest.mark.usefixtures("collect_garbage")


async def test_slow_consumer_is_closed_others_get_everything(
    make_config: Callable[..., Config],
) -> None:
    config = make_config(
        server={"send_buffer_bytes": 65536},
        limits={"messages_per_minute": 1_000_000, "messages_per_hour": 1_000_000},
    )
    batch = 20
    max_batches = 250  # 5000 messages of ~3 KB: 15 MB, far past any kernel buffer
    async with running(config) as srv:
        async with (
            raw_ws(srv, user_id=3, username="carol", rcvbuf=4096) as stalled,
            connect(srv, 2, "bob") as bob,
            connect(srv, 1, "alice") as alice,
        ):
            await stalled.send_json("join_room", {"room": "general"})
            # Read the ack only: from here on carol never reads again.
            await stalled.expect("join_room_ack")
            await bob.join("general")
            await alice.join("general")
            await bob.expect("user_connected")

            def stalled_conn() -> Any:
                return next((c for c in srv.gate.connections if c.identity.user_id == 3), None)

            sent = 0
            with trio.fail_after(120):
                for _ in range(max_batches):
                    for _ in range(batch):
                        content = f"{sent:06d}:" + "m" * 3000
                        await alice.send(
                            "room_message", {"room": "general", "content": content}, request_id=sent
                        )
                        sent += 1
                    # alice and bob read everything, in order.
                    for n in range(sent - batch, sent):
                        own = await alice.expect("room_message")
                        assert own["request_id"] == n
                        got = await bob.expect("room_message")
                        assert got["data"]["content"].startswith(f"{n:06d}:")
                    conn = stalled_conn()
                    if conn is None or conn.close_code is not None:
                        break
                else:
                    pytest.fail("the stalled client was never closed")

                conn = stalled_conn()
                assert conn is None or conn.close_code == 1013
                # The others were not held up, and still are not.
                await alice.nothing_pending()
                await bob.nothing_pending()

                # Now carol reads: a prefix of the messages, whole and in
                # order, then the 1013 close (or EOF).
                seen: list[int] = []
                parts: list[str] = []
                code: int | None = None
                while True:
                    event = await stalled.next_event(timeout=30)
                    if event is None:
                        break
                    if isinstance(event, CloseConnection):
                        code = event.code
                        await stalled.send(event.response())
                        break
                    if isinstance(event, TextMessage):
                        parts.append(event.data)
                        if event.message_finished:
                            frame = json.loads("".join(parts))
                            parts.clear()
                            if frame["type"] == "room_message":
                                seen.append(int(frame["data"]["content"][:6]))
                assert not parts, "a message was cut"
                assert code in (1013, None)
                assert seen == list(range(len(seen)))
                assert len(seen) < sent
                # The server then closes the TCP connection and forgets carol.
                assert await stalled.next_event() is None
                await trio.testing.wait_all_tasks_blocked()
                assert stalled_conn() is None
        assert code == 1013
