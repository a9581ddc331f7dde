"""What an idle WebSocket connection keeps (the goal: 10,000 idle connections
at most 10 KiB each; ``bench/idle_memory.py`` measures the resident memory).

These pin the structure that keeps it small: nothing of the handshake is kept
while a session runs, an idle connection is one task (its heartbeat is a
timer in one shared heap, its writer runs only while the kernel's buffer is
full). That the ``Wire`` standing in for wsproto's ``Connection`` behaves
like it is tested in ``test_wire.py``.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import h11
import trio
import trio.testing
from wsproto import WSConnection
from wsproto.connection import Connection
from wsproto.handshake import H11Handshake

from chatd.server import ChatServer
from chatd.transport.fanout import Fanout
from chatd.transport.frames import OutFrame
from chatd.transport.timers import timers
from chatd.transport.websocket import WebSocketConnection
from tests.helpers.raw import (
    connection_pair,
    raw_ws,
)


def _server_handshake_state(obj: object) -> bool:
    """A server-side handshake object (the tests' clients have their own)."""
    if isinstance(obj, (WSConnection, H11Handshake, Connection)):
        return not obj.client
    return isinstance(obj, h11.Connection) and obj.our_role is h11.SERVER


async def test_open_sessions_keep_no_handshake_state(server: ChatServer) -> None:
    async with (
        raw_ws(server, user_id=1, username="alice") as alice,
        raw_ws(server, user_id=2, username="bob") as bob,
    ):
        for client in (alice, bob):
            await client.send_json("ping")
            await client.expect("pong")
        assert len(server.gate.connections) == 2
        gc.collect()
        kept = [type(o).__name__ for o in gc.get_objects() if _server_handshake_state(o)]
        assert kept == []


def _tasks() -> Iterator[trio.lowlevel.Task]:
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        assert task is not None
        yield task
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)


async def test_an_idle_connection_is_one_task(server: ChatServer) -> None:
    async with raw_ws(server, user_id=1, username="alice") as first:
        await first.send_json("ping")
        await first.expect("pong")
        before = len(list(_tasks()))
        async with (
            raw_ws(server, user_id=2, username="bob") as bob,
            raw_ws(server, user_id=3, username="carol") as carol,
            raw_ws(server, user_id=4, username="dave") as dave,
        ):
            for client in (bob, carol, dave):
                await client.send_json("ping")
                await client.expect("pong")
            await trio.testing.wait_all_tasks_blocked()
            assert len(list(_tasks())) == before + 3
            names = {t.name for t in _tasks()}
            assert "chatd.transport.writer" not in names
            assert "chatd.transport.timers" in names


def _awaiting(coro: object) -> list[str]:
    """The coroutines a task waits in, outermost first (chatd's only)."""
    names = []
    while coro is not None:
        code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
        if code is not None and "/chatd/" in code.co_filename:
            names.append(code.co_qualname)
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return names


async def test_an_idle_connection_waits_in_four_frames_of_chatd(server: ChatServer) -> None:
    """Each coroutine a connection waits in is a frame it holds all its life
    (about 300 bytes each): the accept loop starts ``serve_connection``
    itself, and the gate awaits the run without a helper in between."""
    async with raw_ws(server, user_id=1, username="alice") as alice:
        await alice.send_json("join_room", {"room": "general"})
        await alice.expect("join_room_ack")
        await trio.testing.wait_all_tasks_blocked()
        stacks = [_awaiting(t.coro) for t in _tasks()]
        [stack] = [s for s in stacks if s[:1] == ["serve_connection"]]
        assert stack == [
            "serve_connection",
            "Gate._serve",
            "WebSocketConnection.run",
            "WebSocketConnection._reader",
        ]


# --- the shared timers ------------------------------------------------------------


class _Every:
    def __init__(self, name: str, every: float, times: int, log: list[tuple[str, float]]) -> None:
        self.name, self.every, self.times, self.log = name, every, times, log

    def on_timer(self, now: float) -> float | None:
        self.log.append((self.name, round(now - START[0])))
        self.times -= 1
        return now + self.every if self.times else None


START = [0.0]


async def test_timers_fire_in_order_reschedule_and_cancel(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[tuple[str, float]] = []
    START[0] = start = trio.current_time()
    heap = timers()
    heap.schedule(start + 10, _Every("a", 10, 3, log))
    dropped = heap.schedule(start + 15, _Every("b", 1, 5, log))
    await trio.sleep(1)  # the task sleeps until 10 ...
    heap.schedule(start + 5, _Every("c", 100, 1, log))  # ... and is woken for 5
    heap.cancel(dropped)
    await trio.sleep(100)
    assert log == [("c", 5), ("a", 10), ("a", 20), ("a", 30)]
    assert len(heap) == 0


async def test_cancelled_timers_do_not_pile_up(autojump_clock: trio.testing.MockClock) -> None:
    """Connections come and go faster than a ping interval: the timers of
    the gone ones are dropped once they are half of the heap."""
    log: list[tuple[str, float]] = []
    START[0] = start = trio.current_time()
    heap = timers()
    live = [heap.schedule(start + 30, _Every(f"live{i}", 30, 1, log)) for i in range(100)]
    for i in range(1000):
        heap.cancel(heap.schedule(start + 30, _Every(f"gone{i}", 30, 1, log)))
    assert len(heap) <= 2 * len(live) + 1
    await trio.sleep(31)
    assert sorted(name for name, _ in log) == sorted(f"live{i}" for i in range(100))
    assert len(heap) == 0


# --- the writer exists only while the kernel's buffer is full -----------------------


async def test_writer_runs_only_while_the_buffer_is_full() -> None:
    conn, peer = connection_pair(1, "alice", send_buffer_bytes=1 << 22, sndbuf=4096)
    frame = OutFrame(b"x" * 60_000)
    total = 0
    for _ in range(20):
        conn.send(frame)
        total += len(frame.plain())
    assert conn._writing and conn._out
    received = 0
    with trio.fail_after(10):
        while received < total:
            received += len(await peer.receive_some(1 << 20))
        await trio.testing.wait_all_tasks_blocked()
    # the buffer is dropped once the kernel has taken it all
    assert not conn._writing and conn._out is None and conn._out_bytes == 0
    assert "chatd.transport.writer" not in {t.name for t in _tasks()}
    conn.send(OutFrame(b"small"))  # straight to the socket again
    assert not conn._writing
    assert await peer.receive_some(100) == OutFrame(b"small").plain()
    await peer.aclose()
    await conn._stream.aclose()


async def test_a_corked_write_leaves_no_buffer_behind() -> None:
    """A fan-out's cork buffers every member's frame until the group ends;
    once flushed, nothing is kept on the connection."""
    fanout: Fanout[WebSocketConnection] = Fanout()
    conn, peer = connection_pair(1, "alice", fanout)
    with fanout.corked():
        conn.send(OutFrame(b"one"))
        conn.send(OutFrame(b"two"))
        assert conn._out is not None and len(conn._out) == 2
    assert conn._out is None and conn._out_bytes == 0 and not conn._writing
    want = OutFrame(b"one").plain() + OutFrame(b"two").plain()
    got = b""
    with trio.fail_after(10):
        while len(got) < len(want):
            got += await peer.receive_some(100)
    assert got == want
    await peer.aclose()
    await conn._stream.aclose()
