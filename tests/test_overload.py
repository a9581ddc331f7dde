"""A saturated node (``store.SATURATED`` writes waiting for the store, here
4 with the writer held): new messages, edits and notifications are refused
with ``RATE_LIMITED`` and ``retry_after`` 1, nothing of them stored, the
sender's own message limit untouched; what was taken before is committed
and acknowledged once the writer goes on, and the node takes messages
again. ``/readyz`` saying so is in test_http.py; what clients see at three
times a node's rate is ``bench/overload.py``."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio.lowlevel

import chatd.messages
from chatd.config import Config
from tests.helpers.clients import connect
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
