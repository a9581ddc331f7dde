"""Soak: many connections joining, chatting, reading history, leaving,
disconnecting (cleanly or by dropping the socket) and reconnecting with
``since_id``, against a real chatd process, while its resident memory
(``VmRSS`` in ``/proc/PID/status``) and open file descriptors
(``/proc/PID/fd``) are sampled.

The bounds, once warm (after the first third of the run):

* memory: the last samples (median of three) are at most 10 % + 5 MB above
  the first warm ones (median of three);
* file descriptors: once every client has gone, the sockets come back to
  the count before the first client, and the other descriptors to at most
  that count plus one per pooled SQLite reader (``READERS``, 4: each opens its
  WAL handle at its first read).

Short in CI (``SOAK_SECONDS`` = 8); ``CHATD_LONG=1`` runs five minutes, or
``CHATD_SOAK_SECONDS`` seconds when set.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from trio_websocket import open_websocket_url

from chatd.store.sqlite import READERS
from tests.helpers.clients import Client, ws_url
from tests.helpers.http_client import http_request
from tests.helpers.servers import chatd_process, config_text, free_port, wait_healthy
from tests.helpers.tokens import make_token

LONG = os.environ.get("CHATD_LONG") == "1"
SOAK_SECONDS = float(os.environ.get("CHATD_SOAK_SECONDS", "300" if LONG else "8"))
SAFETY = float(os.environ.get("CHATD_SOAK_SAFETY", "60"))
WORKERS = 40 if LONG else 16
SAMPLE_EVERY = 0.25
MB = 1024 * 1024

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="needs Linux /proc to sample the process"
)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_kinds(pid: int) -> tuple[int, int]:
    """(sockets, everything else) open in the process."""
    targets = fd_targets(pid)
    sockets = sum(t.startswith("socket:") for t in targets)
    return sockets, len(targets) - sockets


def fd_targets(pid: int) -> list[str]:
    targets = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except OSError:
            pass
    return sorted(targets)


@dataclass
class Stats:
    samples: list[tuple[float, int, int]] = field(default_factory=list)
    sessions: int = 0
    drops: int = 0
    messages: int = 0


@asynccontextmanager
async def session(port: int, user_id: int, *, drop: bool) -> AsyncIterator[Client]:
    """A client; ``drop``: the socket is closed without a closing handshake."""
    stream = None
    try:
        # A dropped socket cannot finish trio-websocket's closing handshake:
        # bound its wait for one (60 s by default). And the room's traffic
        # from others must never fill its queue: its reader would block, and
        # its close wait for that reader.
        address = ws_url(port, make_token(user_id, f"soak{user_id}"))
        async with open_websocket_url(
            address, disconnect_timeout=0.5, message_queue_size=1_000_000
        ) as ws:
            stream = ws._stream
            yield Client(ws)
            if drop:
                await trio.aclose_forcefully(stream)
    finally:
        if stream is not None:
            await trio.aclose_forcefully(stream)


async def reply_to(client: Client, request_id: str) -> dict[str, object]:
    """The reply to ``request_id``, past the room's traffic from others."""
    while True:
        frame = await client.recv(wait=30)
        assert frame["type"] != "error", frame
        if frame.get("request_id") == request_id:
            return frame


async def worker(port: int, n: int, deadline: float, stats: Stats) -> None:
    user_id = n + 1
    last_id: int | None = None
    cycle = 0
    while trio.current_time() < deadline:
        cycle += 1
        drop = cycle % 3 == 0
        try:
            async with session(port, user_id, drop=drop) as client:
                data: dict[str, object] = {"room": "general"}
                if last_id is not None:
                    data["since_id"] = last_id
                await client.send("join_room", data, "j")
                assert (await reply_to(client, "j"))["type"] == "join_room_ack"
                await client.send("join_room", {"room": "random"}, "r")
                assert (await reply_to(client, "r"))["type"] == "join_room_ack"
                for k in range(3):
                    await client.send(
                        "room_message",
                        {"room": "general", "content": f"w{n} c{cycle} m{k} " + "x" * 200},
                        request_id=k,
                    )
                got = 0
                while got < 3:
                    frame = await client.recv(wait=30)
                    assert frame["type"] != "error", frame
                    if frame["type"] == "room_message":
                        last_id = max(last_id or 0, frame["data"]["id"])
                        got += frame.get("request_id") in (0, 1, 2)
                stats.messages += 3
                await client.send("room_history", {"room": "general", "limit": 20}, "h")
                assert (await reply_to(client, "h"))["type"] == "message_history"
                await client.send("leave_room", {"room": "random"}, "l")
                assert (await reply_to(client, "l"))["type"] == "leave_room_ack"
        finally:
            stats.sessions += 1
            stats.drops += drop


async def sampler(pid: int, stats: Stats, stop: trio.Event) -> None:
    start = trio.current_time()
    while not stop.is_set():
        stats.samples.append((trio.current_time() - start, rss_bytes(pid), fd_count(pid)))
        with trio.move_on_after(SAMPLE_EVERY):
            await stop.wait()


async def test_soak_memory_and_descriptors_stay_bounded(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "chatd.toml"
    db = tmp_path / "data" / "chatd.db"
    config.write_text(config_text(port, db))
    log = tmp_path / "chatd.log"
    stats = Stats()
    async with chatd_process(config, log) as proc:
        await wait_healthy(proc, port, log)
        baseline_targets = fd_targets(proc.pid)
        base_sockets, base_files = fd_kinds(proc.pid)
        stop = trio.Event()
        with trio.fail_after(SOAK_SECONDS + SAFETY):  # a safety bound only
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sampler, proc.pid, stats, stop)
                deadline = trio.current_time() + SOAK_SECONDS
                async with trio.open_nursery() as workers:
                    for n in range(WORKERS):
                        workers.start_soon(worker, port, n, deadline, stats)
                stop.set()

        # Every client is gone: the sockets come back to the baseline, and
        # the files to at most one more each pooled reader and the event
        # loop's own (SQLite opens a reader's WAL handle at its first read).
        def settled() -> bool:
            sockets, files = fd_kinds(proc.pid)
            return sockets <= base_sockets and files <= base_files + READERS + 1

        # (/healthz first: the server closes that request's socket a moment
        # after the client has read the response.)
        health = (await http_request(port, "GET", "/healthz")).json()
        assert health["connections"] == 0, health
        with trio.move_on_after(10):
            while not settled():  # noqa: ASYNC110
                await trio.sleep(0.1)
        after = fd_targets(proc.pid)
        assert settled(), "\n".join(["before:", *baseline_targets, "after:", *after])
        assert proc.poll() is None, log.read_text()

    assert "Traceback" not in log.read_text()
    warm_from = SOAK_SECONDS / 3
    warm = [s for s in stats.samples if s[0] >= warm_from]
    assert len(warm) >= 6, stats.samples
    first = statistics.median(s[1] for s in warm[:3])
    last = statistics.median(s[1] for s in warm[-3:])
    bound = first * 1.10 + 5 * MB
    report = (
        f"{stats.sessions} sessions ({stats.drops} dropped), {stats.messages} messages; "
        f"RSS warm {first / MB:.1f} MB -> last {last / MB:.1f} MB (bound {bound / MB:.1f} MB); "
        f"fds baseline {base_sockets} sockets + {base_files} files, "
        f"peak {max(s[2] for s in stats.samples)} in all"
    )
    print(report)
    assert stats.sessions >= 10 * WORKERS * min(1.0, SOAK_SECONDS / 8), report
    assert last <= bound, report
