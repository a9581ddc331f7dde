"""The real process's signals: ``python -m chatd --config FILE`` as a
subprocess, talked to over TCP. SIGTERM mid-traffic drains and exits 0,
keeping every acknowledged message; a second SIGTERM during the drain stops
at once; SIGHUP reloads rooms, limits and API keys without dropping a
connection, and a broken file is logged once and leaves the last good
config in place.

SIGKILL (nothing acknowledged is lost either) is ``tests/test_kill.py``.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed

from tests.helpers.clients import Client, closed_with, connect, room_history_ids
from tests.helpers.http_client import HttpReply, http_request
from tests.helpers.servers import chatd_process, config_text, free_port, wait_for_log, wait_healthy

pytestmark = pytest.mark.usefixtures("collect_garbage")


async def test_sigterm_mid_traffic_exits_0_and_keeps_every_acknowledged_message(
    tmp_path: Path,
) -> None:
    port = free_port()
    shutdown_timeout = 3.0
    config = tmp_path / "chatd.toml"
    db = tmp_path / "data" / "chatd.db"
    config.write_text(config_text(port, db, shutdown_timeout=shutdown_timeout))
    log = tmp_path / "chatd.log"

    acked: list[list[int]] = [[], [], []]
    codes: list[int | None] = []
    joined = [trio.Event() for _ in range(3)]
    enough = [trio.Event() for _ in range(3)]

    async def talker(i: int) -> None:
        async with connect(port, i + 1, f"user{i + 1}") as client:
            await client.join("general")
            joined[i].set()
            n = 0
            try:
                while True:
                    content = f"c{i}-{n}"
                    await client.send(
                        "room_message", {"room": "general", "content": content}, request_id=n
                    )
                    while True:
                        frame = await client.recv(wait=15)
                        assert frame["type"] != "error", frame
                        if frame["type"] == "room_message" and frame.get("request_id") == n:
                            break
                    assert frame["data"]["content"] == content
                    acked[i].append(frame["data"]["id"])
                    if len(acked[i]) >= 10:
                        enough[i].set()
                    n += 1
            except ConnectionClosed as exc:
                codes.append(exc.reason.code if exc.reason is not None else None)

    async with chatd_process(config, log) as proc:
        await wait_healthy(proc, port, log)
        with trio.fail_after(shutdown_timeout + 10):
            async with trio.open_nursery() as nursery:
                for i in range(3):
                    nursery.start_soon(talker, i)
                for event in joined + enough:
                    await event.wait()
                proc.send_signal(signal.SIGTERM)
                signalled = trio.current_time()
                with trio.fail_after(shutdown_timeout + 3):
                    status = await proc.wait()
                took = trio.current_time() - signalled
        assert status == 0, log.read_text()
        assert took < shutdown_timeout + 3
    assert len(codes) == 3
    # The server's close frame (1001), or at worst the connection's end.
    assert all(code in (1001, 1006, None) for code in codes), codes
    assert codes.count(1001) >= 1, codes
    all_acked = [i for a in acked for i in a]
    assert len(all_acked) == len(set(all_acked)), "an id was acknowledged twice"
    log_text = log.read_text()
    assert "SIGTERM: shutting down" in log_text
    assert "Traceback" not in log_text

    # Start again on the same database: every acknowledged id is there.
    async with chatd_process(config, log) as proc:
        await wait_healthy(proc, port, log)
        async with connect(port, 9, "reader") as reader:
            ids, total = await room_history_ids(reader, "general")
        assert len(ids) == total
        assert len(ids) == len(set(ids)), "an id repeats in the history"
        assert ids == sorted(ids)
        missing = set(all_acked) - set(ids)
        assert not missing, f"acknowledged but not stored: {sorted(missing)}"
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(shutdown_timeout + 3):
            assert await proc.wait() == 0


async def test_sigterm_drains_then_second_sigterm_stops_at_once(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "chatd.toml"
    db = tmp_path / "data" / "chatd.db"
    config.write_text(config_text(port, db, drain_grace=30.0))
    log = tmp_path / "chatd.log"
    async with chatd_process(config, log) as proc:
        await wait_healthy(proc, port, log)
        with trio.fail_after(15):
            async with connect(port, 1, "alice") as alice:
                await alice.join("general")
                proc.send_signal(signal.SIGTERM)
                await wait_for_log(log, "SIGTERM: shutting down")
                ready = await http_request(port, "GET", "/readyz")
                assert ready.status == 503
                assert ready.json() == {"status": "draining"}
                # Still serving during the grace.
                sent = await alice.request("room_message", {"room": "general", "content": "x"})
                assert sent["type"] == "room_message", sent
                message_id = sent["data"]["id"]
                assert proc.poll() is None
                # A second SIGTERM: stop now, not after 30 s.
                proc.send_signal(signal.SIGTERM)
                with trio.fail_after(8):
                    status = await proc.wait()
                assert status == 0, await trio.Path(log).read_text()
                with pytest.raises(ConnectionClosed):
                    while True:
                        await alice.recv(wait=5)
        assert "second SIGTERM: stopping now" in await trio.Path(log).read_text()

    config.write_text(config_text(port, db))
    async with chatd_process(config, log) as proc:
        await wait_healthy(proc, port, log)
        async with connect(port, 2, "bob") as bob:
            ids, _ = await room_history_ids(bob, "general")
        assert ids == [message_id]
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(8):
            assert await proc.wait() == 0


KEY = "reload-key-0123456789abcdef"


async def publish(port: int, content: str) -> HttpReply:
    body = json.dumps({"room": "general", "content": content}).encode()
    headers = [("authorization", f"Bearer {KEY}"), ("content-type", "application/json")]
    return await http_request(port, "POST", "/api/publish", body, headers)


async def test_sighup_reloads_rooms_and_limits_and_keeps_connections(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "chatd.toml"
    db = tmp_path / "data" / "chatd.db"
    config.write_text(config_text(port, db, public=("general",), max_content_length=100))
    log = tmp_path / "chatd.log"
    applied = "reload: rooms, limits and API settings applied"

    async def post(client: Client, length: int) -> dict[str, Any]:
        return await client.request("room_message", {"room": "general", "content": "x" * length})

    async with chatd_process(config, log) as proc:
        await wait_healthy(proc, port, log)
        with trio.fail_after(20):
            async with connect(port, 1, "alice") as alice:
                # Before: no room "news"; at most 100 characters.
                refused = await alice.request("join_room", {"room": "news"})
                assert refused["type"] == "error"
                assert refused["data"]["code"] == "ROOM_NOT_FOUND"
                await alice.join("general")
                assert (await publish(port, "before")).status == 404  # API off
                too_long = await post(alice, 150)
                assert too_long["type"] == "error", too_long
                assert too_long["data"]["code"] == "MESSAGE_TOO_LONG"
                assert too_long["data"]["details"]["max_length"] == 100

                # Reload: a new public room, a longer limit.
                good = config_text(
                    port, db, public=("general", "news"), max_content_length=200, api_keys=(KEY,)
                )
                config.write_text(good)
                proc.send_signal(signal.SIGHUP)
                await wait_for_log(log, applied)
                assert proc.poll() is None

                ack = await alice.join("news")
                assert ack["data"]["room"] == "news"
                accepted = await post(alice, 150)
                assert accepted["type"] == "room_message", accepted
                too_long = await post(alice, 250)
                assert too_long["type"] == "error", too_long
                assert too_long["data"]["code"] == "MESSAGE_TOO_LONG"
                assert too_long["data"]["details"]["max_length"] == 200
                # The publish API is on now.
                assert (await publish(port, "after")).status == 200
                notified = await alice.expect("notification")
                assert notified["data"]["content"] == "after"

                # A broken file: logged once, naming the key; the last good
                # config stays.
                config.write_text(
                    good.replace("max_content_length = 200", 'max_content_length = "lots"')
                )
                proc.send_signal(signal.SIGHUP)
                await wait_for_log(log, "config not reloaded")
                await alice.nothing_pending()
                assert proc.poll() is None
                lines = [ln for ln in log.read_text().splitlines() if "config not reloaded" in ln]
                assert len(lines) == 1, lines
                assert "max_content_length" in lines[0]
                assert log.read_text().count(applied) == 1
                assert (await http_request(port, "GET", "/healthz")).status == 200
                assert (await publish(port, "still")).status == 200
                assert (await alice.expect("notification"))["data"]["content"] == "still"

                assert (await post(alice, 150))["type"] == "room_message"
                too_long = await post(alice, 250)
                assert too_long["data"]["code"] == "MESSAGE_TOO_LONG"
                assert too_long["data"]["details"]["max_length"] == 200
                async with connect(port, 2, "bob") as bob:
                    assert (await bob.join("news"))["data"]["room"] == "news"
                    joined = await alice.expect("user_connected")
                    assert joined["data"] == {"user_id": 2, "username": "bob", "room": "news"}
                # alice, connected before both reloads, is still served.
                left = await alice.expect("user_disconnected")
                assert left["data"]["room"] == "news"
                await alice.nothing_pending()

                proc.send_signal(signal.SIGTERM)
                await closed_with(alice, 1001, wait=10, skip=True)
            with trio.fail_after(8):
                assert await proc.wait() == 0
