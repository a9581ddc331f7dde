"""Nothing acknowledged is lost when the process is killed with SIGKILL.

Several clients send to a real chatd process (``python -m chatd --config
FILE``, a free port, a database in ``tmp_path``), several messages in flight
each; mid-traffic the process gets ``kill -9``. It is started again on the
same database, and:

* every id any client received (its own copy, the acknowledgement, or
  another client's message, which is delivered only after its commit) is in
  the room's history;
* ids never repeat: not in the history, not across restarts (a message sent
  after the restart gets an id above every earlier one);
* ``PRAGMA integrity_check`` says ``ok``.

The short form (CI) kills once after about a second of traffic. ``CHATD_LONG=1``
kills five times, after eight seconds of traffic each, with more clients.
SIGTERM (a drain: nothing in flight is lost at all, exit 0) is
``tests/test_signals.py::test_sigterm_mid_traffic_exits_0_and_keeps_every_acknowledged_message``.
"""

from __future__ import annotations

import os
import signal
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from pathlib import Path

import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from tests.helpers.clients import Client, connect, room_history_ids, ws_url
from tests.helpers.servers import chatd_process, config_text, free_port, wait_healthy
from tests.helpers.tokens import make_token

LONG = os.environ.get("CHATD_LONG") == "1"
CYCLES = 5 if LONG else 1
TRAFFIC_SECONDS = 8.0 if LONG else 1.0
CLIENTS = 8 if LONG else 4
#: Messages a client keeps in flight (sent, not yet acknowledged).
WINDOW = 8


@asynccontextmanager
async def killable_client(port: int, user_id: int) -> AsyncIterator[Client]:
    """A client whose socket is closed however the connection ends (a killed
    server makes trio-websocket's own close raise before it closes it)."""
    stream = None
    try:
        async with open_websocket_url(ws_url(port, make_token(user_id, f"user{user_id}"))) as ws:
            stream = ws._stream
            yield Client(ws)
    finally:
        if stream is not None:
            await trio.aclose_forcefully(stream)


class Traffic:
    def __init__(self) -> None:
        #: Ids acknowledged to their sender (its own copy, with request_id).
        self.acked: list[int] = []
        #: Ids of other clients' messages seen live.
        self.seen: set[int] = set()
        self.per_client: dict[int, int] = {}


async def talker(port: int, user_id: int, traffic: Traffic, joined: trio.Event) -> None:
    """Send with ``WINDOW`` in flight until the connection dies."""
    try:
        async with killable_client(port, user_id) as client:
            await client.join("general")
            joined.set()
            window = trio.Semaphore(WINDOW)

            async def send() -> None:
                n = 0
                while True:
                    await window.acquire()
                    data = {"room": "general", "content": f"u{user_id}-{n}"}
                    await client.send("room_message", data, request_id=n)
                    n += 1

            async def receive() -> None:
                while True:
                    frame = await client.recv(wait=30)
                    if frame["type"] != "room_message":
                        assert frame["type"] in ("user_connected", "user_disconnected"), frame
                        continue
                    if frame["data"]["user_id"] == user_id and "request_id" in frame:
                        assert frame["data"]["content"] == f"u{user_id}-{frame['request_id']}"
                        traffic.acked.append(frame["data"]["id"])
                        traffic.per_client[user_id] = traffic.per_client.get(user_id, 0) + 1
                        window.release()
                    else:
                        traffic.seen.add(frame["data"]["id"])

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                await receive()
    except* (ConnectionClosed, HandshakeError, trio.BrokenResourceError, OSError):
        pass  # killed
    finally:
        joined.set()


def integrity(db: Path) -> str:
    with closing(sqlite3.connect(db)) as conn:
        (result,) = conn.execute("PRAGMA integrity_check").fetchone()
        return str(result)


async def test_sigkill_mid_traffic_loses_nothing_acknowledged(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "chatd.toml"
    db = tmp_path / "data" / "chatd.db"
    config.write_text(config_text(port, db))
    log = tmp_path / "chatd.log"
    traffic = Traffic()
    first_user = 1

    for cycle in range(CYCLES):
        async with chatd_process(config, log) as proc:
            await wait_healthy(proc, port, log)
            users = range(first_user, first_user + CLIENTS)
            first_user += CLIENTS
            before = len(traffic.acked)
            with trio.fail_after(TRAFFIC_SECONDS + 30):  # a safety bound only
                async with trio.open_nursery() as nursery:
                    joined = []
                    for user_id in users:
                        event = trio.Event()
                        joined.append(event)
                        nursery.start_soon(talker, port, user_id, traffic, event)
                    for event in joined:
                        await event.wait()
                    await trio.sleep(TRAFFIC_SECONDS)
                    # Every client has had some acknowledged before the kill.
                    while min(traffic.per_client.get(u, 0) for u in users) < 5:  # noqa: ASYNC110
                        await trio.sleep(0.01)
                    proc.send_signal(signal.SIGKILL)
                    assert await proc.wait() == -signal.SIGKILL
        assert len(traffic.acked) - before >= 5 * CLIENTS, f"cycle {cycle}: too little traffic"

    acked = traffic.acked
    assert len(acked) == len(set(acked)), "an id was acknowledged twice"
    assert "Traceback" not in log.read_text()

    async with chatd_process(config, log) as proc:
        await wait_healthy(proc, port, log)
        async with connect(port, 999, "reader") as reader:
            ids, total = await room_history_ids(reader, "general")
            assert len(ids) == total
            assert len(ids) == len(set(ids)), "an id repeats in the history"
            assert ids == sorted(ids)
            missing = set(acked) - set(ids)
            assert not missing, f"acknowledged, then lost: {sorted(missing)[:20]}"
            unseen = traffic.seen - set(ids)
            assert not unseen, f"delivered, then lost: {sorted(unseen)[:20]}"
            # After the restarts, new ids are above every earlier one.
            await reader.join("general")
            after = await reader.request("room_message", {"room": "general", "content": "after"})
            assert after["type"] == "room_message", after
            assert after["data"]["id"] > max(ids)
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await proc.wait() == 0
    assert integrity(db) == "ok"
