"""A saturated node (``store.SATURATED`` writes waiting for the store, here
4 with the writer held): new messages, edits and notifications are refused
with ``RATE_LIMITED`` and ``retry_after`` 1, nothing of them stored, the
sender's own message limit untouched; what was taken before is committed
and acknowledged once the writer goes on, and the node takes messages
again. A connection that goes on sending into the saturated node is closed
1013 once what it sent before is acknowledged, and what it sent after is
never read (one that waits ``retry_after`` between tries is not:
test_session.py). ``/readyz`` saying so is in test_http.py; what clients
see at three times a node's rate is ``bench/overload.py``."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
import trio.lowlevel
from trio_websocket import ConnectionClosed

import chatd.messages
import chatd.session
from chatd.config import Config
from tests.helpers.clients import connect, next_of
from tests.helpers.http_client import http_request
from tests.helpers.servers import running
from tests.helpers.store import writer_held
from tests.test_edits import answer, error_code, history, post
from tests.test_publish import KEY, publish


async def test_a_saturated_node_refuses_new_writes_and_takes_them_again(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chatd.messages, "SATURATED", 4)  # (the held write is one)
    config = make_config(
        api={"keys": [KEY]}, limits={"messages_per_minute": 5, "messages_per_hour": 100}
    )
    async with running(config) as server, connect(server, 1, "alice") as alice:
        await alice.join("general")
        first = await post(alice, "déjà là")
        store = server.ctx.store
        async with writer_held(store):
            for i in range(3):  # taken: they wait for the writer
                await alice.send(
                    "room_message", {"room": "general", "content": f"pris {i}"}, f"p{i}"
                )
            while store.backlog < 4:
                await trio.lowlevel.checkpoint()
            refused = await answer(
                alice, "room_message", {"room": "general", "content": "non"}, "x"
            )
            assert error_code(refused) == "RATE_LIMITED"
            assert refused["data"]["details"] == {"retry_after": 1}
            edit = await answer(alice, "edit_message", {"message_id": first, "content": "?"}, "e")
            assert error_code(edit) == "RATE_LIMITED"
            api = await publish(server.port, {"room": "general", "content": "note"})
            assert api.status == 429 and api.headers["retry-after"] == "1"
        # the three taken are committed and acknowledged, in order
        acked = [(await alice.recv()) for _ in range(3)]
        assert [f.get("request_id") for f in acked] == ["p0", "p1", "p2"]
        # nothing refused was stored; the limit (5 a minute) was spent by
        # the four taken only, so one more goes through
        assert [m["content"] for m in (await history(alice))["messages"]] == [
            "déjà là", "pris 0", "pris 1", "pris 2",
        ]  # fmt: skip
        assert await post(alice, "encore") > 0
        get = server.metrics.registry.get_sample_value
        assert get("chatd_messages_shed_total") == 3


async def test_a_connection_that_goes_on_sending_into_a_saturated_node_is_closed(
    make_config: Callable[..., Config],
    monkeypatch: pytest.MonkeyPatch,
    slow_autojump_clock: trio.testing.MockClock,
) -> None:
    monkeypatch.setattr(chatd.messages, "SATURATED", 4)
    monkeypatch.setattr(chatd.session, "SHED_AFTER", 3)
    config = make_config(limits={"messages_per_minute": 100, "messages_per_hour": 1000})
    async with (
        running(config) as server,
        connect(server, 1, "alice") as alice,
        connect(server, 2, "bob") as bob,
    ):
        await alice.join("general")
        await bob.join("general")
        store = server.ctx.store
        async with writer_held(store):
            for i in range(3):  # taken: with the held write, the node is saturated
                await alice.send(
                    "room_message", {"room": "general", "content": f"pris {i}"}, f"p{i}"
                )
            while store.backlog < 4:
                await trio.lowlevel.checkpoint()
            for i in range(3):  # told to wait, three times
                refused = await answer(
                    alice, "room_message", {"room": "general", "content": "non"}, f"r{i}"
                )
                assert refused["data"]["details"] == {"retry_after": 1}
            # the fourth refusal closes it; what follows it is never read
            await alice.send("room_message", {"room": "general", "content": "non"}, "r3")
            for i in range(5):
                await alice.send("room_message", {"room": "general", "content": "après"}, f"a{i}")
        # what was taken first is committed and acknowledged, then the
        # refusal that closes, then the close
        frames = [await next_of(alice, "room_message") for _ in range(3)]
        assert [f["request_id"] for f in frames] == ["p0", "p1", "p2"]
        last = await alice.recv()
        assert error_code(last) == "RATE_LIMITED" and last["request_id"] == "r3"
        assert last["data"]["details"] == {"retry_after": 2}
        with pytest.raises(ConnectionClosed) as closed:
            await alice.recv()
        reason = closed.value.reason
        assert reason is not None and reason.code == 1013
        assert reason.reason == "The server is busy; reconnect in a few seconds"
        # a reader sees the three, and stays
        got = [(await next_of(bob, "room_message"))["data"]["content"] for _ in range(3)]
        assert got == ["pris 0", "pris 1", "pris 2"]
        assert [m["content"] for m in (await history(bob))["messages"]] == got
        await bob.nothing_pending()
        get = server.metrics.registry.get_sample_value
        assert get("chatd_busy_closes_total") == 1
        assert get("chatd_messages_shed_total") == 4
        # the node says it is saturated for a while after, though its
        # store's queue is empty, then ready again
        reply = await http_request(server.port, "GET", "/readyz")
        assert reply.status == 503 and reply.json() == {"status": "saturated", "queued": 0}
        await trio.sleep(chatd.messages.SHED_HOLD)
        assert (await http_request(server.port, "GET", "/readyz")).status == 200
