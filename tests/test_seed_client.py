"""The seed's JavaScript ``WebSocketClient``, unchanged, against chatd.

Runs the class from ``tests/js/seed-websocket-client.js`` (a verbatim copy of
the spec's) in Node.js with its built-in WebSocket: it connects with
``?token=``, joins ``general``, sends a message, sees it come back with an id,
and reads the history.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import trio

from tests.conftest import make_token

HARNESS = Path(__file__).parent / "js" / "run-seed-client.mjs"


def node_command() -> list[str]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed: the seed's JavaScript client cannot run")
    probe = subprocess.run(
        [node, "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"], check=False
    )
    if probe.returncode == 0:
        return [node]
    return [node, "--experimental-websocket", "--no-warnings"]


async def test_seed_websocket_client_works_unchanged(server):
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
