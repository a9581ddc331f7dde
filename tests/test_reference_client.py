"""The reference ``WebSocketClient`` (JavaScript) and its React hook
``useWebSocket``, unchanged, against chatd.

Runs the class from ``chatd/web/websocket-client.js`` and the hook from
``tests/js/use-websocket.mjs`` (verbatim copies of the protocol document's)
in Node.js with its built-in WebSocket; the hook is rendered with
react-test-renderer (``tests/js/package.json``, installed by ``./build.sh
test`` when npm is there).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import trio

from tests.helpers.clients import connect
from tests.helpers.tokens import make_token

JS = Path(__file__).parent / "js"
HARNESS = JS / "run-reference-client.mjs"
HOOK_HARNESS = JS / "run-reference-hook.mjs"


def node_command() -> list[str]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed: the reference JavaScript client cannot run")
    probe = subprocess.run(
        [node, "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"], check=False
    )
    if probe.returncode == 0:
        return [node]
    return [node, "--experimental-websocket", "--no-warnings"]


async def test_reference_websocket_client_works_unchanged(server):
    """The reference ``WebSocketClient`` joins, posts and reads the history."""
    command = [*node_command(), str(HARNESS)]
    env = {**os.environ, "CHATD_PORT": str(server.port), "CHATD_TOKEN": make_token(9, "zoe")}
    result = await trio.run_process(
        command, env=env, capture_stdout=True, capture_stderr=True, check=False
    )
    assert result.returncode == 0, (result.stdout, result.stderr)
    seen = json.loads(result.stdout.decode().strip().splitlines()[-1])
    assert seen["errors"] == []
    assert seen["acks"][0]["room"] == "general" and seen["acks"][0]["success"] is True
    message = seen["messages"][0]
    assert message["content"] == "Bonjour tout le monde !"
    assert message["user_id"] == 9 and message["username"] == "zoe"
    assert isinstance(message["id"], int)
    history = seen["history"]
    assert history["room"] == "general" and history["total"] == 1
    assert [m["id"] for m in history["messages"]] == [message["id"]]


async def test_reference_use_websocket_hook_works_unchanged(server):
    """The reference ``useWebSocket`` hook sends to a room and to a user and
    reads the history."""
    command = node_command()
    if not (JS / "node_modules" / "react-test-renderer").is_dir():
        pytest.skip("React is not installed in tests/js (./build.sh test installs it with npm)")
    async with connect(server, 8, "yann"):  # a known user to write to
        pass
    env = {
        **os.environ,
        "CHATD_PORT": str(server.port),
        "CHATD_TOKEN": make_token(9, "zoe"),
        "CHATD_PEER": "8",
    }
    result = await trio.run_process(
        [*command, str(HOOK_HARNESS)],
        env=env,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, (result.stdout, result.stderr)
    messages = json.loads(result.stdout.decode().strip().splitlines()[-1])["messages"]
    # The hook prepends history to what it has: [history..., live room, live DM].
    *history, live_room, live_dm = messages
    assert live_room["content"] == "hello from the hook" and live_room["room"] == "general"
    assert live_room["user_id"] == 9 and isinstance(live_room["id"], int)
    assert live_dm["content"] == "psst from the hook"
    assert live_dm["from_user_id"] == 9 and live_dm["to_user_id"] == 8
    assert [m["id"] for m in history] == [live_room["id"]]
