"""The session under random frames (hypothesis), over a real socket, against
one real in-process server per test.

The server runs in a thread of its own (its own ``trio.run``) for the whole
test; each hypothesis example is one WebSocket connection that sends a short
random sequence of frames: frames of every type with mutated fields (the
strategies of ``tests/helpers/fuzzing.py``), valid frames that really join, post, read and
re-authenticate, raw text that is not JSON, and binary frames. After each
frame a ping (the barrier) must get its pong: the connection is still usable
after any error that does not close it. Every frame that carried a request id
gets a reply echoing it, and every frame the server sends is a well-formed
server frame. The only close allowed is 4001 after an ``AUTH_FAILED`` (an
``auth`` frame with a bad token). At the end the server's log has no
traceback and no error, and the server thread ended cleanly (a crashed
connection task would have taken the server's nursery down).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed

pytest.importorskip("hypothesis", reason="hypothesis is not installed (requirements-test.txt)")

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from chatd.config import Config
from chatd.errors import ErrorCode
from chatd.server import ChatServer
from tests.helpers.clients import ws_open
from tests.helpers.fuzzing import json_values, mutated_frames
from tests.helpers.tokens import make_token

LONG = os.environ.get("CHATD_LONG") == "1"
EXAMPLES = 2000 if LONG else 100

SERVER_TYPES = {
    "join_room_ack",
    "leave_room_ack",
    "room_message",
    "direct_message",
    "message_history",
    "pong",
    "auth_ack",
    "error",
    "user_connected",
    "user_disconnected",
    "notification",
}
ENVELOPE = {"type", "data", "timestamp", "user_id", "request_id"}
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")
ERROR_CODES = {code.value for code in ErrorCode}


class ServerThread:
    """A ``ChatServer`` in a thread with its own Trio loop."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.ready = threading.Event()
        self.server: ChatServer | None = None
        self.error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread = threading.Thread(target=self._run, name="chatd-server", daemon=True)

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    def start(self) -> None:
        self._thread.start()
        assert self.ready.wait(10), "the server did not start"
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self.server = await nursery.start(ChatServer(self.config).run)
            self.ready.set()

    def stop(self) -> None:
        if self.server is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self.server.stop, trio_token=self._token)
        self._thread.join(15)
        assert not self._thread.is_alive(), "the server did not stop"


@pytest.fixture
def server_thread(make_config: Callable[..., Config]) -> Iterator[ServerThread]:
    config = make_config(
        limits={
            "messages_per_minute": 1_000_000,
            "messages_per_hour": 1_000_000,
            "reads_per_minute": 1_000_000,
            "invalid_frames_per_minute": 1_000_000,
        }
    )
    thread = ServerThread(config)
    thread.start()
    try:
        yield thread
    finally:
        thread.stop()


# --- what the client sends ----------------------------------------------------------

USER = 1
GOOD_TOKEN = make_token(USER, "alice")
valid_frames = st.one_of(
    st.builds(lambda: {"type": "join_room", "data": {"room": "general"}}),
    st.builds(
        lambda since: {"type": "join_room", "data": {"room": "general", "since_id": since}},
        st.integers(min_value=0, max_value=50),
    ),
    st.builds(lambda: {"type": "leave_room", "data": {"room": "general"}}),
    st.builds(
        lambda text: {"type": "room_message", "data": {"room": "general", "content": text}},
        st.text(min_size=1, max_size=30),
    ),
    st.builds(
        lambda to, text: {"type": "direct_message", "data": {"to_user_id": to, "content": text}},
        st.sampled_from([1, 2, 3]),
        st.text(min_size=1, max_size=30),
    ),
    st.builds(
        lambda limit, offset: {
            "type": "room_history",
            "data": {"room": "general", "limit": limit, "offset": offset},
        },
        st.integers(min_value=-5, max_value=200),
        st.integers(min_value=0, max_value=5),
    ),
    st.builds(
        lambda with_user: {"type": "dm_history", "data": {"with_user": with_user}},
        st.sampled_from([0, 1, 2, 3]),
    ),
    st.builds(lambda: {"type": "ping", "data": {}}),
    st.builds(
        lambda token: {"type": "auth", "data": {"token": token}},
        st.sampled_from([GOOD_TOKEN, make_token(2, "bob"), "not.a.token", GOOD_TOKEN[:-3]]),
    ),
    st.builds(
        lambda entries: {"type": "message_batch", "data": {"messages": entries}},
        st.lists(mutated_frames(), max_size=4),
    ),
)


@st.composite
def steps(draw: st.DrawFn) -> tuple[str, str | bytes, str | None]:
    """One thing to send: (kind, payload, the request id it carries)."""
    kind = draw(st.sampled_from(["valid", "valid", "mutated", "mutated", "json", "text", "bytes"]))
    if kind == "text":
        return kind, draw(st.text(max_size=60)), None
    if kind == "bytes":
        return kind, draw(st.binary(max_size=60)), None
    if kind == "json":
        return kind, json.dumps(draw(json_values)), None
    frame = draw(valid_frames if kind == "valid" else mutated_frames())
    rid = None
    if frame.get("type") != "message_batch" and draw(st.integers(0, 4)):
        rid = f"q{draw(st.integers(0, 10**9))}"
        frame["request_id"] = rid
    text = json.dumps(frame)
    if not strict_json(text):
        rid = None  # NaN or Infinity: not JSON, so its request id cannot be read back
    return kind, text, rid


def strict_json(text: str) -> bool:
    def refuse(word: str) -> Any:
        raise ValueError(word)

    try:
        json.loads(text, parse_constant=refuse)
    except ValueError:
        return False
    return True


def sent_request_ids(value: Any, into: set[Any]) -> None:
    """Every value sent under a ``request_id`` key, at any depth."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "request_id" and isinstance(item, (str, int)):
                into.add(item)
            sent_request_ids(item, into)
    elif isinstance(value, list):
        for item in value:
            sent_request_ids(item, into)


def assert_server_frame(frame: Any, rids: set[Any]) -> None:
    assert isinstance(frame, dict), frame
    assert set(frame) <= ENVELOPE, frame
    assert frame["type"] in SERVER_TYPES, frame
    assert isinstance(frame["data"], dict), frame
    assert TIMESTAMP.match(frame["timestamp"]), frame
    if "request_id" in frame:
        assert frame["request_id"] in rids, frame
    if "user_id" in frame:
        assert type(frame["user_id"]) is int and frame["user_id"] >= 1, frame
    if frame["type"] == "error":
        data = frame["data"]
        assert data["code"] in ERROR_CODES, frame
        assert isinstance(data["message"], str) and data["message"], frame
        assert isinstance(data["details"], dict), frame


async def exchange(port: int, plan: list[tuple[str, str | bytes, str | None]]) -> None:
    """One connection: send the plan, a barrier ping after each step."""
    rids: set[Any] = set()
    for _, payload, _ in plan:
        if isinstance(payload, str):
            try:
                sent_request_ids(json.loads(payload), rids)
            except ValueError:
                pass
    expected = {rid for _, _, rid in plan if rid is not None}
    answered: set[Any] = set()
    received: list[dict[str, Any]] = []

    async def read_until(done: Callable[[], bool]) -> None:
        while not done():
            frame = json.loads(await ws.get_message())
            assert_server_frame(frame, rids)
            received.append(frame)
            if "request_id" in frame:
                answered.add(frame["request_id"])

    url = f"ws://127.0.0.1:{port}/ws/chat?token={GOOD_TOKEN}"
    with trio.fail_after(5):  # a safety bound only
        async with ws_open(url) as ws:
            try:
                for n, (_, payload, _) in enumerate(plan):
                    await ws.send_message(payload)
                    barrier = f"barrier-{n}"
                    rids.add(barrier)
                    await ws.send_message(
                        json.dumps({"type": "ping", "data": {}, "request_id": barrier})
                    )
                    await read_until(lambda b=barrier: b in answered)  # type: ignore[misc]
                    pong = received[-1]
                    assert pong["type"] == "pong", pong
                # Message copies come after their commit: wait for every reply.
                await read_until(lambda: expected <= answered)
            except ConnectionClosed as exc:
                code = exc.reason.code if exc.reason is not None else None
                assert code == 4001, (code, received)
                assert received and received[-1]["type"] == "error", received
                assert received[-1]["data"]["code"] == "AUTH_FAILED", received


def test_random_frames_over_a_real_socket(
    server_thread: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="chatd")
    port = server_thread.port

    async def meet_bob() -> None:  # user 2 exists, so direct messages can reach it
        async with ws_open(f"ws://127.0.0.1:{port}/ws/chat?token={make_token(2, 'bob')}") as ws:
            await ws.send_message('{"type":"ping","request_id":"x"}')
            assert json.loads(await ws.get_message())["type"] == "pong"

    trio.run(meet_bob)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        # No shrinking: a failing example costs its safety bound in real
        # time; the first one found is reported as it is.
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
        report_multiple_bugs=False,
    )
    @given(st.lists(steps(), min_size=1, max_size=6))
    def run(plan: list[tuple[str, str | bytes, str | None]]) -> None:
        assert server_thread.error is None
        trio.run(exchange, port, plan)

    run()
    server_thread.stop()
    assert server_thread.error is None, server_thread.error
    bad = [
        r
        for r in caplog.records
        if r.exc_info or r.levelno >= logging.ERROR or "Traceback" in r.getMessage()
    ]
    assert not bad, [r.getMessage() for r in bad]
    # The log saw the traffic (the capture works): connects and disconnects.
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "WS_CONNECT: UserID=1" in text and "WS_DISCONNECT: UserID=1" in text
