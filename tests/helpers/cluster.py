"""Several chatd nodes as one cluster.

``running_cluster(make_config, dsn, redis_url, prefix, nodes=2, **sections)``
runs ``nodes`` chatd nodes on one PostgreSQL database and one Redis prefix,
each with its own port, its own ``node_id`` and its own SQLite path (so that
a node that ignored ``[storage] backend = "postgres"`` would not share its
history by accident), and a round-robin TCP load balancer in front of them.

Nodes run in this test's Trio run (``ChatServer``, fast, stopped gracefully)
or, with ``processes=True``, as real ``python -m chatd --config FILE``
processes: only those can be killed honestly (SIGKILL: no drain, no cleanup,
presence left in Redis until its lease expires).

The load balancer (``LoadBalancer``) is a ``tests.helpers.proxies.Forwarder``;
``tests.helpers.proxies`` also has what cuts PostgreSQL or Redis off from a
node and restores it.

``connect_to(target, user_id, username)`` opens a client on anything with a
``.port``: a node, the cluster (its load balancer) or a single ``ChatServer``;
a connection the server side dropped closes quietly at the end of the block.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from chatd.config import Config
from chatd.server import ChatServer
from tests.helpers.clients import Client, ws_url
from tests.helpers.proxies import Forwarder
from tests.helpers.servers import chatd_process, deep_merge, free_port, wait_healthy
from tests.helpers.tokens import make_token

#: What a dropped connection raises (the node died, the balancer cut it).
DROPPED = (
    ConnectionClosed,
    HandshakeError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    OSError,
)


# --- nodes --------------------------------------------------------------------


@dataclass(eq=False)
class Node:
    """One chatd node: in this Trio run (``server``) or a process (``process``)."""

    index: int
    node_id: str
    config: Config
    port: int = 0
    server: ChatServer | None = None
    process: trio.Process | None = None
    log: Path | None = None

    def __repr__(self) -> str:
        return f"<node {self.index} {self.node_id} :{self.port}>"

    def kill(self) -> None:
        """SIGKILL the node's process: no drain, nothing cleaned up."""
        assert self.process is not None, "only a node run with processes=True can be killed"
        self.process.send_signal(signal.SIGKILL)

    async def stop(self) -> None:
        """Stop gracefully (SIGTERM for a process) and wait for it."""
        if self.server is not None:
            self.server.stop()
            with trio.fail_after(20):
                await self._stopped.wait()
        elif self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                await self.process.wait()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log is not None else ""

    _stopped: trio.Event = field(default_factory=trio.Event, repr=False)


class LoadBalancer(Forwarder):
    """Round robin over the nodes, one TCP connection at a time. A node that
    refuses the connection (dead) is skipped, as a real balancer would."""

    def __init__(self, nursery: trio.Nursery, nodes: list[Node]) -> None:
        super().__init__(nursery)
        self.nodes = nodes
        self._next = 0
        #: The index of the node each accepted connection went to (-1: none).
        self.routed: list[int] = []

    async def upstream(self) -> trio.SocketStream | None:
        count = len(self.nodes)
        start = self._next
        self._next = (self._next + 1) % count
        for step in range(count):
            node = self.nodes[(start + step) % count]
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", node.port)
            except OSError:
                continue
            self.routed.append(node.index)
            return stream
        self.routed.append(-1)
        return None


@dataclass(eq=False)
class Cluster:
    nodes: list[Node]
    lb: LoadBalancer

    @property
    def port(self) -> int:
        """The load balancer's port."""
        return self.lb.port

    def __getitem__(self, index: int) -> Node:
        return self.nodes[index]


def to_toml(doc: dict[str, Any]) -> str:
    """A config document (tables of scalars and lists) as TOML. JSON's
    strings, numbers, booleans and arrays of them are valid TOML values."""
    lines: list[str] = []

    def table(name: str, body: dict[str, Any]) -> None:
        if name:
            lines.append(f"[{name}]")
        for key, value in body.items():
            if not isinstance(value, dict):
                lines.append(f"{json.dumps(key)} = {json.dumps(value)}")
        for key, value in body.items():
            if isinstance(value, dict):
                table(f"{name}.{json.dumps(key)}" if name else json.dumps(key), value)

    table("", doc)
    return "\n".join(lines) + "\n"


def node_sections(
    sections: dict[str, Any], index: int, dsn: str, redis_url: str, prefix: str, folder: Path
) -> dict[str, Any]:
    wiring = {
        "storage": {
            "backend": "postgres",
            "dsn": dsn,
            "sqlite_path": str(folder / f"node{index}.db"),
        },
        "bus": {"backend": "redis", "url": redis_url, "prefix": prefix, "node_id": f"n{index}"},
    }
    return deep_merge(wiring, sections)


@asynccontextmanager
async def running_cluster(
    make_config: Callable[..., Config],
    dsn: str,
    redis_url: str,
    prefix: str,
    nodes: int = 2,
    *,
    processes: bool = False,
    concurrent_start: bool = False,
    per_node: list[dict[str, Any]] | None = None,
    **sections: Any,
) -> AsyncIterator[Cluster]:
    """Run ``nodes`` nodes of one cluster and a load balancer in front.

    Nodes start one after the other (``concurrent_start``: all at once, as a
    deployment does). ``per_node[i]`` adds sections to node i's config only.
    On exit the balancer closes its connections and the nodes still running
    are stopped gracefully."""
    folder = Path(make_config().storage.sqlite_path).parent
    folder.mkdir(parents=True, exist_ok=True)
    members: list[Node] = []
    for index in range(nodes):
        merged = node_sections(sections, index, dsn, redis_url, prefix, folder)
        if per_node is not None:
            merged = deep_merge(merged, per_node[index])
        if processes:
            merged = deep_merge(merged, {"server": {"port": free_port()}})
        config = make_config(**merged)
        members.append(Node(index, config.bus.node_id, config))

    async with contextlib.AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        lb = LoadBalancer(nursery, members)
        cluster = Cluster(members, lb)
        if processes:
            for node in members:
                await stack.enter_async_context(_process_node(node, folder))
        else:

            async def serve(node: Node, *, task_status: trio.TaskStatus[None]) -> None:
                server = ChatServer(node.config)
                node.server = server
                try:
                    await server.run(task_status=_Started(node, task_status))
                finally:
                    node._stopped.set()

            if concurrent_start:
                async with trio.open_nursery() as starting:
                    for node in members:
                        starting.start_soon(nursery.start, serve, node)
            else:
                for node in members:
                    await nursery.start(serve, node)
        lb.restore()  # listening from now on
        try:
            yield cluster
        finally:
            lb.cut()
            with trio.CancelScope(shield=True):
                for node in members:
                    await node.stop()
            nursery.cancel_scope.cancel()


class _Started:
    """Passes ``task_status.started(server)`` on, noting the node's port."""

    def __init__(self, node: Node, task_status: trio.TaskStatus[None]) -> None:
        self.node = node
        self.task_status = task_status

    def started(self, server: ChatServer) -> None:
        self.node.port = server.port
        self.task_status.started()


@asynccontextmanager
async def _process_node(node: Node, folder: Path) -> AsyncIterator[Node]:
    doc = msgspec.to_builtins(node.config)
    for key in ("source", "public_key"):
        doc.pop(key, None)
    path = folder / f"node{node.index}.toml"
    path.write_text(to_toml(doc))
    node.log = folder / f"node{node.index}.log"
    node.port = node.config.server.port
    async with chatd_process(path, node.log) as proc:
        node.process = proc
        await wait_healthy(proc, node.port, node.log)
        yield node


# --- clients ------------------------------------------------------------------


@asynccontextmanager
async def connect_to(
    target: Any, user_id: int = 1, username: str = "alice", **kwargs: Any
) -> AsyncIterator[Client]:
    """A client on ``target`` (anything with ``.port``: a node, a cluster's
    balancer, a ChatServer). When the block itself ended well, a connection
    the other side dropped (a killed node) closes without an error."""
    token = kwargs.pop("token", None)
    if token is None:
        token = make_token(user_id, username)
    stream = None
    finished = False
    try:
        async with open_websocket_url(ws_url(target, token), **kwargs) as ws:
            stream = ws._stream
            yield Client(ws)
            finished = True
    except DROPPED:
        if not finished:
            raise
    finally:
        if stream is not None:
            await trio.aclose_forcefully(stream)


class Follower:
    """A client that stays in a room whatever happens to its connection: when
    it drops, it connects again (to ``target``) and rejoins with ``since_id``
    set to the last message it saw. ``ids`` is every message id it was given,
    in arrival order; duplicates are kept, so that tests can see them."""

    def __init__(self, target: Any, user_id: int, username: str, room: str = "general") -> None:
        self.target = target
        self.user_id = user_id
        self.username = username
        self.room = room
        self.ids: list[int] = []
        self.frames: list[dict[str, Any]] = []
        self.connections = 0
        self._changed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        while True:
            try:
                async with connect_to(self.target, self.user_id, self.username) as client:
                    self.connections += 1
                    data: dict[str, Any] = {"room": self.room}
                    if self.ids:
                        data["since_id"] = self.ids[-1]
                    ack = await client.request("join_room", data, request_id="follow")
                    assert ack["type"] == "join_room_ack", ack
                    if not started:
                        started = True
                        task_status.started()
                    while True:
                        frame = await client.recv(wait=math.inf)
                        self.frames.append(frame)
                        if frame["type"] in ("room_message", "notification"):
                            self.ids.append(frame["data"]["id"])
                            self._changed.set()
                            self._changed = trio.Event()
            except DROPPED:
                pass
            await trio.sleep(0.05)  # a real client's reconnect back-off

    async def wait_for(self, ids: Iterator[int] | list[int] | set[int]) -> None:
        """Until every id of ``ids`` has arrived (the caller sets a deadline)."""
        wanted = set(ids)
        while not wanted <= set(self.ids):
            await self._changed.wait()
