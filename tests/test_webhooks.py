"""Webhooks to the application's backend, end to end: a real chatd (real
SQLite), real sockets, and a real HTTP receiver (tests/helpers/receiver.py)
that records each delivery and answers as scripted. Signatures are checked
with the Standard Webhooks library a backend would use.

Retries wait on Trio's clock (``slow_autojump_clock``), and so does the
server's wall clock here (``wall``): a backoff of minutes passes at once.
"""

from __future__ import annotations

import base64
import itertools
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from chatd.config import Config
from tests.helpers.clients import Client, connect
from tests.helpers.http_client import http_request
from tests.helpers.receiver import Receiver, receiving
from tests.helpers.servers import chatd_process, config_text, free_port, running, wait_healthy
from tests.test_edits import answer

standardwebhooks = pytest.importorskip("standardwebhooks")

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
OLD_SECRET = "whsec_" + base64.b64encode(b"fedcba9876543210fedcba9876543210").decode()


def trio_wall() -> Callable[[], float]:
    """The server's wall clock on Trio's (virtual) time, from now."""
    start = time.time() - trio.current_time()
    return lambda: start + trio.current_time()


def verified(request: Any, secret: str = SECRET, *, virtual: bool = False) -> Any:
    """The delivery's payload once its signature checks out. ``virtual``:
    the server's clock ran ahead (Trio's virtual time), so the library's
    check that the timestamp is recent is left out; the signature is the
    library's all the same."""
    hook = standardwebhooks.Webhook(secret)
    if not virtual:
        return hook.verify(request.body, request.headers)
    headers = request.headers
    when = datetime.fromtimestamp(int(headers["webhook-timestamp"]), tz=UTC)
    expected = hook.sign(headers["webhook-id"], when, request.body.decode())
    assert expected in headers["webhook-signature"].split(" "), headers
    return json.loads(request.body)


async def said(client: Client, content: str) -> dict[str, Any]:
    frame = await client.request("room_message", {"room": "general", "content": content}, content)
    while frame.get("request_id") != content:
        frame = await client.recv()
    assert frame["type"] == "room_message", frame
    return dict(frame["data"])


def hooks(url: str, **extra: Any) -> dict[str, Any]:
    return {"url": url, "secret": SECRET, "events": ["message.created"], **extra}


async def test_every_message_edit_and_deletion_is_delivered_signed_in_order(
    make_config: Callable[..., Config],
) -> None:
    async with receiving() as receiver:
        config = make_config(webhooks=hooks(receiver.url, previous_secret=OLD_SECRET))
        async with running(config) as server, connect(server, 1, "alice") as alice:
            await alice.join("general")
            first = await said(alice, "hello")
            second = await said(alice, "world")
            edited = await alice.request(
                "edit_message", {"message_id": first["id"], "content": "hello!"}, "e"
            )
            deleted = await alice.request("delete_message", {"message_id": second["id"]}, "d")
            with trio.fail_after(10):
                while sum(len(verified(r)["data"]["messages"]) for r in receiver.requests) < 4:
                    await receiver.wait_for(len(receiver.requests) + 1)
    items = []
    ids = []
    for request in receiver.requests:
        payload = verified(request)
        assert verified(request, OLD_SECRET) == payload  # both signatures, while rotating
        assert payload["type"] == "message.created" and payload["timestamp"].endswith("Z")
        ids.append(request.headers["webhook-id"])
        items += payload["data"]["messages"]
    assert len(set(ids)) == len(ids) and all(i.startswith("msg_") for i in ids)
    assert items == [
        {"type": "room_message", "data": first},
        {"type": "room_message", "data": second},
        {"type": "message_edited", "data": edited["data"]},
        {"type": "message_deleted", "data": deleted["data"]},
    ]


async def test_a_failing_backend_is_retried_with_the_same_id_then_given_up(
    make_config: Callable[..., Config],
    slow_autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with receiving() as receiver:
        receiver.script.extend([500, 503, "close", (429, [("retry-after", "120")]), 200, 400])
        config = make_config(webhooks=hooks(receiver.url, max_attempts=5, timeout_seconds=2))
        async with running(config, wall=trio_wall()) as server:
            async with connect(server, 1, "alice") as alice:
                await alice.join("general")
                first = await said(alice, "retried")
                with trio.fail_after(600):
                    await receiver.wait_for(5)
                began = trio.current_time()
                second = await said(alice, "refused")
                with trio.fail_after(600):
                    await receiver.wait_for(6)
                # nothing more comes for the one given up
                await trio.sleep(60)
                assert len(receiver.requests) == 6
                assert trio.current_time() - began >= 60
    attempts = receiver.requests[:5]
    assert len({r.headers["webhook-id"] for r in attempts}) == 1  # one delivery, five tries
    gaps = [b.at - a.at for a, b in itertools.pairwise(attempts)]
    # backing off: 1, 2, 4 s less a jitter of up to half; then the 429's Retry-After
    assert gaps[0] >= 0.5 and gaps[1] >= 1.0 and gaps[2] >= 2.0 and gaps[3] >= 120, gaps
    assert gaps[2] < 120
    assert {r.body for r in attempts} == {attempts[0].body}
    assert verified(attempts[-1])["data"]["messages"][0]["data"] == first
    assert verified(receiver.requests[5])["data"]["messages"][0]["data"] == second
    assert any("given up" in r.getMessage() for r in caplog.records)
    metrics = server.metrics.exposition().decode()
    assert (
        'chatd_webhook_deliveries_total{event="message.created",outcome="delivered"} 1.0' in metrics
    )
    assert (
        'chatd_webhook_deliveries_total{event="message.created",outcome="given_up"} 1.0' in metrics
    )
    assert (
        'chatd_webhook_deliveries_total{event="message.created",outcome="retried"} 4.0' in metrics
    )


async def test_a_delivery_survives_sigkill_and_goes_out_after_restart(tmp_path: Path) -> None:
    """The backend stalls on the first attempt; chatd is killed (SIGKILL)
    with the delivery sent but not answered; started again, it delivers it
    with the same webhook-id."""
    port = free_port()
    config = tmp_path / "chatd.toml"
    log = tmp_path / "chatd.log"
    async with receiving() as receiver:
        receiver.script.append("stall")
        config.write_text(
            config_text(port, tmp_path / "chatd.db")
            + f'[webhooks]\nurl = "{receiver.url}"\nsecret = "{SECRET}"\n'
            'events = ["message.created"]\ntimeout_seconds = 60\n'
        )
        async with chatd_process(config, log) as proc:
            await wait_healthy(proc, port, log)
            async with connect(port, 1, "alice") as alice:
                await alice.join("general")
                sent = await said(alice, "kept through a kill")
                with trio.fail_after(10):
                    await receiver.wait_for(1)
            proc.kill()
            await proc.wait()
        async with chatd_process(config, log) as proc:
            await wait_healthy(proc, port, log)
            with trio.fail_after(20):
                await receiver.wait_for(2)
            proc.terminate()
            await proc.wait()
    first, again = receiver.requests
    assert first.headers["webhook-id"] == again.headers["webhook-id"]
    assert verified(again)["data"]["messages"] == [{"type": "room_message", "data": sent}]


async def test_a_dead_backend_never_slows_chat_and_gets_everything_later(
    make_config: Callable[..., Config], slow_autojump_clock: trio.testing.MockClock
) -> None:
    """Nothing listens at the backend's address for ten minutes while
    messages flow: every message is acknowledged as usual; once the backend
    listens, every delivery arrives, in order, each once."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/hooks"
    config = make_config(webhooks=hooks(url, max_attempts=1000, timeout_seconds=1))
    async with running(config, wall=trio_wall()) as server, connect(server, 1, "alice") as alice:
        await alice.join("general")
        sent = []
        with trio.fail_after(10):  # acknowledged as usual, the backend down
            for i in range(20):
                sent.append(await said(alice, f"m{i}"))
        await trio.sleep(120)
        retried = server.metrics.webhook_deliveries.labels("message.created", "retried")
        assert retried._value.get() >= 5
        assert (await http_request(server.port, "GET", "/readyz")).status == 200
        receiver = Receiver(port=port)
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(trio.serve_tcp, receiver.serve, port, host="127.0.0.1"))
            with trio.fail_after(1200):
                while (
                    sum(
                        len(verified(r, virtual=True)["data"]["messages"])
                        for r in receiver.requests
                    )
                    < 20
                ):
                    await receiver.wait_for(len(receiver.requests) + 1)
            await trio.sleep(60)  # and nothing twice
            nursery.cancel_scope.cancel()
    got = [
        m["data"] for r in receiver.requests for m in verified(r, virtual=True)["data"]["messages"]
    ]
    assert got == sent
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == len(receiver.requests)


async def test_a_user_away_gets_one_unread_notice_unless_they_read_meanwhile(
    make_config: Callable[..., Config], slow_autojump_clock: trio.testing.MockClock
) -> None:
    """bob gets two direct messages within the window and reads nothing:
    one message.unread, debounce_seconds after the first. carol is
    mentioned, and reads it before the window ends: nothing for her."""
    async with receiving() as receiver:
        events = {"events": ["message.unread"], "debounce_seconds": 60}
        config = make_config(webhooks=hooks(receiver.url, **events))
        async with running(config, wall=trio_wall()) as server:
            async with connect(server, 2, "bob"):
                pass  # bob is known (connected once), and away from now on
            async with connect(server, 1, "alice") as alice, connect(server, 3, "carol") as carol:
                await alice.join("general")
                await carol.join("general")
                started = trio.current_time()
                first = await answer(
                    alice, "direct_message", {"to_user_id": 2, "content": "hi"}, "1"
                )
                await trio.sleep(10)
                second = await answer(
                    alice, "direct_message", {"to_user_id": 2, "content": "?"}, "2"
                )
                data = {"room": "general", "content": "@carol", "mentions": [3]}
                mention = await answer(alice, "room_message", data, "3")
                read = {"room": "general", "message_id": mention["data"]["id"]}
                assert (await answer(carol, "mark_read", read, "m"))["type"] == "mark_read_ack"
                with trio.fail_after(600):
                    await receiver.wait_for(1)
                assert trio.current_time() - started >= 60
                await trio.sleep(120)  # nothing else comes (carol read hers)
    (request,) = receiver.requests
    payload = verified(request, virtual=True)
    assert payload["type"] == "message.unread"
    assert payload["data"] == {
        "user_id": 2,
        "username": "bob",
        "direct": [{"with_user": 1, "unread": 2, "last_message_id": second["data"]["id"]}],
        "mentions": [],
    }
    assert first["data"]["id"] < second["data"]["id"]
    read_count = server.metrics.webhook_deliveries.labels("message.unread", "read")._value.get()
    assert read_count == 1


async def test_an_unread_notice_to_a_stalling_backend_is_retried_then_given_up(
    make_config: Callable[..., Config],
    slow_autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The backend stalls past the timeout, then fails, then refuses:
    message.unread goes out three times under one webhook-id, is given up
    (logged, counted), and chat goes on meanwhile."""
    async with receiving() as receiver:
        receiver.script.extend(["stall", 500, 400])
        events = {"events": ["message.unread"], "debounce_seconds": 30}
        config = make_config(
            webhooks=hooks(receiver.url, max_attempts=5, timeout_seconds=2, **events)
        )
        async with running(config, wall=trio_wall()) as server:
            async with connect(server, 2, "bob"):
                pass  # bob is known, and away
            async with connect(server, 1, "alice") as alice:
                await alice.join("general")
                await answer(alice, "direct_message", {"to_user_id": 2, "content": "hi"}, "1")
                with trio.fail_after(600):
                    await receiver.wait_for(1)  # the stalled attempt
                with trio.fail_after(1):  # chat goes on while the backend stalls
                    await said(alice, "meanwhile")
                with trio.fail_after(600):
                    await receiver.wait_for(3)
                await trio.sleep(120)  # nothing more for the one given up
                assert len(receiver.requests) == 3
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 1
    payload = verified(receiver.requests[-1], virtual=True)
    assert payload["type"] == "message.unread" and payload["data"]["user_id"] == 2
    assert any("given up" in r.getMessage() for r in caplog.records)
    counted = server.metrics.webhook_deliveries.labels
    assert counted("message.unread", "given_up")._value.get() == 1
    assert counted("message.unread", "retried")._value.get() == 2


def test_httpx_is_not_imported_with_webhooks_off() -> None:
    """A node without webhooks does not load their HTTP client."""
    import subprocess
    import sys

    code = "import sys, chatd.cli, chatd.server; print('httpx' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    assert done.stdout == b"False\n"
