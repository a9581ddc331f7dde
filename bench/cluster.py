"""What the second node costs: one room's messages on the sender's node and
on another node of a cluster (PostgreSQL + Redis), side by side.

Usage (from the repository root, with PostgreSQL and Redis installed; the
script starts throwaway servers of its own, as the tests do)::

    .venv/bin/python bench/cluster.py [--members 10] [--rate 200] [--seconds 5]

Two chatd processes share a fresh PostgreSQL database and a Redis prefix.
``--members`` clients join one room on each node; one publisher on node 0
sends ``--rate`` messages/s for ``--seconds``. Each message's latency is its
arrival at a member minus its send time (one monotonic clock, one process),
reported per node: node 0 is the sender's (commit, then local fan-out), node 1
gets it over Redis.

The clients are trio-websocket, in one Python process: the numbers are
indicative of the cross-node overhead (node 1 minus node 0), not of chatd's
maximum (docs/benchmarks.md measures that with bench/load.py). Each node's
own commit times (``chatd_store_commit_seconds`` from its /metrics, read
before it stops) are printed too: a stall of the store shows there whatever
the clients add.

The throwaway PostgreSQL runs without fsync (as in the tests). To measure a
durable one, start your own and point the script at it with
``CHATD_TEST_POSTGRES_DSN`` (``tests/helpers/services.py``), e.g. a default
``initdb`` with ``log_checkpoints`` and ``log_autovacuum_min_duration = 0`` to
line its log up with the tail.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers.servers import free_port  # noqa: E402
from tests.helpers.services import postgres_server, redis_server  # noqa: E402
from tests.helpers.tokens import SECRET, make_token  # noqa: E402


def node_config(tmp: Path, index: int, dsn: str, redis_url: str, prefix: str) -> tuple[Path, int]:
    port = free_port()
    path = tmp / f"node{index}.toml"
    path.write_text(
        f"[server]\nport = {port}\ncompression = false\n"
        "max_connections_per_address = 100000\n"
        f'[auth]\njwt_secret = "{SECRET}"\n'
        f'[storage]\nbackend = "postgres"\ndsn = "{dsn}"\n'
        f'[bus]\nbackend = "redis"\nurl = "{redis_url}"\nprefix = "{prefix}"\n'
        f'node_id = "node{index}"\n'
        "[limits]\nmessages_per_minute = 1000000000\nmessages_per_hour = 1000000000\n"
        "reads_per_minute = 1000000000\n"
        '[logging]\nlevel = "warning"\n'
    )
    return path, port


async def commit_times(port: int) -> str:
    """The node's commit-time histogram (its /metrics), as counts above each
    bound."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        body = b""
        while chunk := await stream.receive_some(65536):
            body += chunk
    buckets: dict[float, float] = {}
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("chatd_store_commit_seconds_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float(le)] = float(line.rsplit(" ", 1)[1])
    total = buckets.get(float("inf"), 0.0)
    over = [
        f"{total - n:.0f} over {le * 1000:g} ms"
        for le, n in sorted(buckets.items())
        if 0.001 <= le <= 0.025
    ]
    return f"{total:.0f} commits, " + ", ".join(over)


async def wait_ready(port: int) -> None:
    with trio.fail_after(30):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.1)
                continue
            await stream.aclose()
            return


async def member(port: int, uid: int, arrivals: dict[int, list[float]], ready: trio.Event,
                 joined: list[int], total: int) -> None:  # fmt: skip
    url = f"ws://127.0.0.1:{port}/ws/chat?token={make_token(uid, f'u{uid}')}"
    async with open_websocket_url(url) as ws:
        await ws.send_message(json.dumps({"type": "join_room", "data": {"room": "general"}}))
        while json.loads(await ws.get_message())["type"] != "join_room_ack":
            pass
        joined.append(uid)
        if len(joined) == total:
            ready.set()
        while True:
            frame = json.loads(await ws.get_message())
            if frame["type"] == "room_message":
                now = time.monotonic()
                content = frame["data"]["content"]
                if content.startswith("t"):
                    arrivals.setdefault(port, []).append(now - float(content[1:]))


async def drain(ws: WebSocketConnection) -> None:
    while True:
        await ws.get_message()


async def run(args: argparse.Namespace) -> None:
    pg, why = postgres_server()
    if pg is None:
        raise SystemExit(f"PostgreSQL: {why}")
    rd, why = redis_server()
    if rd is None:
        pg.stop()
        raise SystemExit(f"Redis: {why}")
    procs: list[trio.Process] = []
    try:
        dsn = pg.new_database()
        tmp = Path(tempfile.mkdtemp(prefix="chatd-cluster-bench-"))
        ports = []
        for index in range(2):
            path, port = node_config(tmp, index, dsn, rd.url, "bench")
            command = [sys.executable, "-m", "chatd", "--config", str(path)]
            procs.append(await trio.lowlevel.open_process(command, cwd=ROOT))
            ports.append(port)
            await wait_ready(port)
        arrivals: dict[int, list[float]] = {}
        ready = trio.Event()
        joined: list[int] = []
        total = 2 * args.members
        async with trio.open_nursery() as nursery:
            uid = 100
            for port in ports:
                for _ in range(args.members):
                    uid += 1
                    nursery.start_soon(member, port, uid, arrivals, ready, joined, total)
            await ready.wait()
            url = f"ws://127.0.0.1:{ports[0]}/ws/chat?token={make_token(1, 'pub')}"
            # The publisher reads (and drops) the room's messages too: unread,
            # they would fill its buffers, and chatd closes a reader that slow.
            async with open_websocket_url(url) as pub, trio.open_nursery() as reading:
                reading.start_soon(drain, pub)
                await pub.send_message(
                    json.dumps({"type": "join_room", "data": {"room": "general"}})
                )
                count = int(args.rate * args.seconds)
                start = time.monotonic()
                for i in range(count):
                    due = start + i / args.rate
                    await trio.sleep(max(0.0, due - time.monotonic()))
                    data = {"room": "general", "content": f"t{time.monotonic()!r}"}
                    frame = {"type": "room_message", "data": data}
                    await pub.send_message(json.dumps(frame))
                await trio.sleep(1.0)
                reading.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
        for index, port in enumerate(ports):
            lat = sorted(arrivals.get(port, []))
            if not lat:
                print(f"node {index}: nothing arrived")
                continue

            def pct(q: float, lat: list[float] = lat) -> float:
                return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000

            print(
                f"node {index} ({'sender' if index == 0 else 'over Redis'}): {len(lat)} deliveries,"
                f" p50 {statistics.median(lat) * 1000:.2f} ms, p99 {pct(0.99):.2f} ms,"
                f" p99.9 {pct(0.999):.2f} ms, max {lat[-1] * 1000:.2f} ms;"
                f" its store: {await commit_times(port)}"
            )
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            with trio.move_on_after(20):
                await proc.wait()
        rd.close()
        pg.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=10)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    trio.run(run, parser.parse_args())


if __name__ == "__main__":
    main()
