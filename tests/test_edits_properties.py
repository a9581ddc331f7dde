"""Random interleavings of messages, edits, deletions and reconnects
(hypothesis), against one real server: a client that applies what it gets,
in order, and comes back with ``since_id`` after every absence, always ends
with exactly what history shows.

Two authors post, edit and delete (their own messages, or ones already
deleted: refused, which changes nothing); a reader leaves (after reading
whatever had arrived, as a tab closed at any moment does) and comes back
with the last id it applied. At the end it comes back if away, reads up to
a last message, and its copy of the room must equal the history, message
for message, for every message since the example began.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio

pytest.importorskip("hypothesis", reason="hypothesis is not installed (requirements-test.txt)")

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from chatd.config import Config
from tests.helpers.clients import Client, connect
from tests.test_edits import LIVE, answer, apply
from tests.test_session_properties import ServerThread

EXAMPLES = 25
ROOM = "general"
AUTHORS = (1, 2)
READER = 3

Step = tuple[str, int, int]

steps = st.one_of(
    st.tuples(st.just("send"), st.sampled_from(AUTHORS), st.just(0)),
    st.tuples(st.just("edit"), st.sampled_from(AUTHORS), st.integers(0, 7)),
    st.tuples(st.just("delete"), st.sampled_from(AUTHORS), st.integers(0, 7)),
    st.tuples(st.just("away"), st.just(READER), st.just(0)),
    st.tuples(st.just("back"), st.just(READER), st.just(0)),
)


@pytest.fixture
def server_thread(make_config: Callable[..., Config]) -> Iterator[ServerThread]:
    limits = {"messages_per_minute": 1_000_000, "messages_per_hour": 1_000_000}
    thread = ServerThread(make_config(limits={**limits, "reads_per_minute": 1_000_000}))
    thread.start()
    try:
        yield thread
    finally:
        thread.stop()


async def history(client: Client) -> list[dict[str, Any]]:
    """Every message of the room, oldest first, paging from the newest."""
    pages: list[list[dict[str, Any]]] = []
    offset = 0
    while True:
        reply = await answer(
            client, "room_history", {"room": ROOM, "limit": 7, "offset": offset}, f"h{offset}"
        )
        pages.append(reply["data"]["messages"])
        offset += len(pages[-1])
        if not reply["data"]["has_more"]:
            break
    return [m for page in reversed(pages) for m in page]


async def example(port: int, plan: list[Step]) -> None:
    async with (
        connect(port, 1, "ann") as ann,
        connect(port, 2, "ben") as ben,
        connect(port, 9, "mark") as marker,
    ):
        authors = {1: ann, 2: ben}
        for client in (ann, ben, marker):
            await answer(client, "join_room", {"room": ROOM}, "j")
        start = (await answer(marker, "room_message", {"room": ROOM, "content": "start"}, "s"))[
            "data"
        ]["id"]
        view: dict[int, dict[str, Any]] = {}
        last = start
        sent: dict[int, list[int]] = {1: [], 2: []}
        reader: Client | None = None
        opened: Any = None

        async def come_back() -> None:
            nonlocal reader, opened
            opened = connect(port, READER, "reader")
            reader = await opened.__aenter__()
            ack = await answer(reader, "join_room", {"room": ROOM, "since_id": last}, "back")
            assert ack["type"] == "join_room_ack" and ack["data"]["recovered"] is True, ack

        async def take(frame: dict[str, Any]) -> None:
            nonlocal last
            if frame["type"] in LIVE and frame["data"]["id"] > start:
                assert frame["data"]["id"] > last, (frame, last)  # in id order, never twice
                last = apply(view, frame)

        await come_back()
        for n, (kind, who, index) in enumerate(plan):
            if kind == "send":
                frame = await answer(
                    authors[who], "room_message", {"room": ROOM, "content": f"m{n}"}, f"s{n}"
                )
                sent[who].append(frame["data"]["id"])
            elif kind in ("edit", "delete") and sent[who]:
                target = sent[who][index % len(sent[who])]
                data: dict[str, Any] = {"message_id": target}
                if kind == "edit":
                    data["content"] = f"edit {n}"
                frame = await answer(authors[who], f"{kind}_message", data, f"c{n}")
                assert frame["type"] != "error" or frame["data"]["code"] == "MESSAGE_NOT_FOUND"
            elif kind == "away" and reader is not None:
                with trio.move_on_after(0.05):  # whatever has arrived: a tab closed now
                    while True:
                        await take(await reader.recv())
                await opened.__aexit__(None, None, None)
                reader = None
            elif kind == "back" and reader is None:
                await come_back()
        if reader is None:
            await come_back()
        assert reader is not None
        end = (await answer(marker, "room_message", {"room": ROOM, "content": "end"}, "e"))["data"]
        while last != end["id"]:
            await take(await reader.recv())
        shown = [m for m in await history(reader) if m["id"] > start]
        await opened.__aexit__(None, None, None)
    assert [view.get(m["id"]) for m in shown] == shown


def test_random_edits_deletions_and_reconnects_converge_to_history(
    server_thread: ServerThread,
) -> None:
    port = server_thread.port

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
        report_multiple_bugs=False,
    )
    @given(st.lists(steps, min_size=1, max_size=25))
    def run(plan: list[Step]) -> None:
        assert server_thread.error is None
        trio.run(example, port, plan)

    run()
    assert server_thread.error is None, server_thread.error
