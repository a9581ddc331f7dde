"""Running chatd for a test: in this Trio run (``running``), or as a real
``python -m chatd --config FILE`` process (``chatd_process``, then
``wait_healthy`` and ``wait_for_log``), with config files written for it
(``write_config``, ``config_text``) and a free port (``free_port``). ``REPO``
is the repository's root (the child's working directory and import path);
``one_line_failure`` checks what a failed ``chatd`` command printed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from chatd.config import Config
from chatd.server import ChatServer
from tests.helpers.http_client import http_request
from tests.helpers.tokens import SECRET

REPO = Path(__file__).resolve().parents[2]

#: ``max_frame_bytes`` of the ``small_server`` fixture.
SMALL_FRAME_BYTES = 2048


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` on top, tables merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


@asynccontextmanager
async def running(config: Config, **kwargs: Any) -> AsyncIterator[ChatServer]:
    """Run a server for the block; stop it gracefully after."""
    async with trio.open_nursery() as nursery:
        server: ChatServer = await nursery.start(ChatServer(config, **kwargs).run)
        try:
            yield server
        finally:
            server.stop()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the moment)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- config files -----------------------------------------------------------------


def write_config(tmp_path: Path, db_path: Path) -> Path:
    """A TOML config on the same database and secret as ``make_config``."""
    path = tmp_path / "chatd.toml"
    path.write_text(
        "[server]\n"
        'host = "127.0.0.1"\n'
        "port = 0\n"
        "[auth]\n"
        f'jwt_secret = "{SECRET}"\n'
        "[storage]\n"
        f'sqlite_path = "{db_path}"\n'
        "[rooms]\n"
        'public = ["general", "random"]\n'
        "[rooms.private]\n"
        "staff = [1, 2]\n"
    )
    return path


def config_text(
    port: int,
    db: Path,
    *,
    public: tuple[str, ...] = ("general", "random"),
    max_content_length: int | str = 4000,
    shutdown_timeout: float = 3.0,
    drain_grace: float = 0.0,
    api_keys: tuple[str, ...] = (),
) -> str:
    """The config of a served process: ``port``, the database ``db``, the
    tests' secret, limits high enough for heavy traffic."""
    rooms = ", ".join(json.dumps(r) for r in public)
    length = json.dumps(max_content_length)
    return (
        "[server]\n"
        'host = "127.0.0.1"\n'
        f"port = {port}\n"
        f"shutdown_timeout_seconds = {shutdown_timeout}\n"
        f"drain_grace_seconds = {drain_grace}\n"
        "[auth]\n"
        f'jwt_secret = "{SECRET}"\n'
        "[storage]\n"
        f"sqlite_path = {json.dumps(str(db))}\n"
        "[rooms]\n"
        f"public = [{rooms}]\n"
        "[limits]\n"
        "messages_per_minute = 100000\n"
        "messages_per_hour = 1000000\n"
        "reads_per_minute = 10000\n"
        f"max_content_length = {length}\n"
        "[api]\n"
        f"keys = {json.dumps(list(api_keys))}\n"
    )


# --- chatd as a process ----------------------------------------------------------------


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONWARNINGS", None)
    env["PYTHONPATH"] = str(REPO)
    return env


@asynccontextmanager
async def chatd_process(config: Path, log: Path) -> AsyncIterator[trio.Process]:
    """``python -m chatd --config config``, its stderr (the log) appended to
    ``log``; killed at the end if still running."""
    with log.open("ab") as err:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "chatd", "--config", str(config)],
            cwd=str(REPO),
            env=_child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()


async def wait_healthy(proc: trio.Process, port: int, log: Path) -> None:
    """Until ``/healthz`` answers 200 (10 s at most; fails if the process exits)."""
    with trio.fail_after(10):
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"chatd exited: {await trio.Path(log).read_text()}")
            try:
                if (await http_request(port, "GET", "/healthz")).status == 200:
                    return
            except OSError:
                pass
            await trio.sleep(0.05)


async def wait_for_log(log: Path, text: str, count: int = 1) -> None:
    """Until ``text`` is in the log ``count`` times (5 s at most)."""
    with trio.fail_after(5):
        while (await trio.Path(log).read_text()).count(text) < count:  # noqa: ASYNC110
            await trio.sleep(0.02)


def one_line_failure(done: subprocess.CompletedProcess[bytes], code: int = 1) -> str:
    """A ``chatd`` command that failed with ``code`` and said why in one line
    on stderr (no traceback, nothing on stdout); that line."""
    assert done.returncode == code, (done.stdout, done.stderr)
    err = done.stderr.decode()
    assert err.startswith("chatd: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert done.stdout == b""
    return err
