"""One chatd node: the composition root and its lifecycle.

``ChatServer.run`` wires the parts, each made once and handed to the parts
that use it (nothing is patched after it is made):

* ``Fanout`` (``transport/fanout.py``): the node's cork and runs, for the
  store, the hub and every connection;
* ``Hub``: rooms and presence, sending through the fan-out;
* the store and the bus the config asks for (``backends.py``), the store
  running each commit group's callbacks corked;
* ``Context``: what every session shares (with ``Messages``: commit, then
  deliver);
* ``Gate`` (``handshake.py``): upgrades, admission, the sessions.

It then listens, reports ``started`` with itself (so tests and the CLI know
the port), and serves until ``stop()``. The HTTP layer calls this node
(``transport.http.App``): plain HTTP goes to ``routes``, upgrades to the gate.

Stopping (SIGTERM) is a drain: ``/readyz`` answers 503 at once; after
``drain_grace_seconds`` the listeners close, every WebSocket client gets a
1001 close and ``shutdown_timeout_seconds`` to go, then the store commits
everything still queued and ``run`` returns. ``reload`` (SIGHUP) applies a new
config's rooms and limits without dropping a connection.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import h11
import msgspec
import trio

from chatd import __version__, routes, webhooks
from chatd.auth import MIN_SECRET_BYTES
from chatd.backends import open_bus, open_store
from chatd.backfill import backfill
from chatd.config import Config, split_address
from chatd.errors import CloseCode
from chatd.handshake import WS_PATH, Gate
from chatd.hub import Hub
from chatd.metrics import Metrics
from chatd.moderation import Role
from chatd.publish import delete, publish, set_role
from chatd.purger import Purger
from chatd.retention import Policy
from chatd.session import Context
from chatd.store import StoredEvent, StoredMessage
from chatd.transport.fanout import Fanout
from chatd.transport.http import (
    Response,
    UpgradeRequest,
    json_error,
    serve_connection,
    serve_listener,
)
from chatd.transport.websocket import WebSocketConnection
from chatd.web import load_assets

log = logging.getLogger("chatd")

#: Sections a reload cannot change: they need a restart.
_RESTART_SECTIONS = ("server", "auth", "storage", "retention")
#: Joins that replay missed messages at once (the others wait their turn,
#: holding nothing: a reconnect storm's memory stays bounded).
REPLAYS_AT_ONCE = 32
#: Seconds between two room_presence summaries of a big room.
PRESENCE_SUMMARY_INTERVAL = 1.0

Conn = WebSocketConnection


class ChatServer:
    """One chatd node."""

    def __init__(self, config: Config, *, wall: Callable[[], float] = time.time) -> None:
        """``wall`` is the clock of timestamps and token expiry (tests pass
        their own to move time forward)."""
        self.config = config
        self.wall = wall
        self.handshake_timeout = config.server.handshake_timeout_seconds
        self.port = 0
        self.metrics_port = 0
        self.metrics = Metrics(config.storage.backend, config.bus.backend)
        self.assets = load_assets()
        #: True from ``stop()`` on: /readyz says 503, the API refuses.
        self.draining = False
        self._stop = trio.Event()
        self._ctx: Context[Conn] | None = None
        self._gate: Gate | None = None
        #: Plain HTTP connections, each cancelled at once by a stop.
        self._http: dict[trio.SocketStream, trio.CancelScope] = {}

    @property
    def ctx(self) -> Context[Conn]:
        assert self._ctx is not None, "the server is not running"
        return self._ctx

    @property
    def gate(self) -> Gate:
        assert self._gate is not None, "the server is not running"
        return self._gate

    def stop(self) -> None:
        """Begin a graceful shutdown (idempotent)."""
        self.draining = True
        self._stop.set()

    async def run(
        self, *, task_status: trio.TaskStatus[ChatServer] = trio.TASK_STATUS_IGNORED
    ) -> None:
        config, metrics, wall = self.config, self.metrics, self.wall
        monotonic = trio.current_time
        fanout: Fanout[Conn] = Fanout()
        limits = config.limits
        hub: Hub[Conn] = Hub(
            fanout,
            metrics,
            presence_max_members=limits.presence_max_members,
            summary_members=limits.ack_members,
        )
        alarm = Alarm()
        async with (
            open_store(config, metrics, fanout) as store,
            open_bus(config, hub, store, wall, monotonic, metrics) as bus,
        ):
            metrics.store_queued.set_function(lambda: store.backlog)
            await store.declare_rooms(config.rooms)
            for blocker, blocked in await store.all_blocks():
                hub.blocks.set(blocker, blocked, True)
            ctx = Context.create(
                config,
                hub,
                store,
                bus,
                wall=wall,
                monotonic=monotonic,
                metrics=metrics,
                replays=trio.CapacityLimiter(REPLAYS_AT_ONCE),
                wake=alarm.ring,
            )
            self._ctx = ctx
            self._gate = Gate(ctx, fanout, wall)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._summarise_presence, hub)
                nursery.start_soon(self._keep_time, ctx, alarm)
                nursery.start_soon(backfill, store, metrics)
                policy = Policy(config.retention)
                if policy.on:
                    await nursery.start(Purger(policy, store, metrics, wall).run)
                hooks = config.webhooks
                if hooks.url and hooks.events:
                    # (httpx is imported only when webhooks are on)
                    from chatd.webhook_sender import WebhookSender

                    sender = WebhookSender(hooks, store, metrics, wall)
                    await nursery.start(sender.run)
                    store.outbox = webhooks.Deliveries(hooks).rows
                    store.outbox_wake = sender.wake
                await self._serve(task_status)
                with trio.CancelScope(shield=True):
                    await self._write_read_state(ctx)
                nursery.cancel_scope.cancel()
        log.info("chatd stopped")

    async def _serve(self, task_status: trio.TaskStatus[ChatServer]) -> None:
        """Listen, serve until ``stop()``, then drain and close."""
        config = self.config
        listeners = await trio.open_tcp_listeners(config.server.port, host=config.server.host)
        self.port = listeners[0].socket.getsockname()[1]
        extra: list[trio.SocketListener] = []
        if config.server.metrics_listen:
            host, port = split_address(config.server.metrics_listen)
            extra = await trio.open_tcp_listeners(port, host=host)
            self.metrics_port = extra[0].socket.getsockname()[1]
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as accepting:
                for listener in listeners:
                    # Until it becomes a WebSocket, a connection is plain
                    # HTTP, which a stop cancels at once (an idle keep-alive
                    # must not delay it): its scope is in self._http
                    # meanwhile. (A partial, not a method: a coroutine frame
                    # less on every connection's stack.)
                    handler = partial(serve_connection, app=self, phases=self._http)
                    accepting.start_soon(serve_listener, listener, connections, handler)
                for listener in extra:
                    handler = partial(serve_connection, app=_MetricsOnly(self), phases=self._http)
                    accepting.start_soon(serve_listener, listener, connections, handler)
                self._announce()
                task_status.started(self)
                await self._stop.wait()
                grace = config.server.drain_grace_seconds
                if grace:
                    log.info("chatd draining: /readyz says 503 for %gs", grace)
                    await trio.sleep(grace)
                accepting.cancel_scope.cancel()
            for listener in listeners + extra:
                await listener.aclose()
            for scope in self._http.values():
                scope.cancel()
            open_now = list(self.gate.connections)
            log.info("chatd stopping: closing %d connections", len(open_now))
            for conn in open_now:
                conn.close(CloseCode.GOING_AWAY, "Server shutting down")
            connections.cancel_scope.deadline = (
                trio.current_time() + config.server.shutdown_timeout_seconds
            )
        log.info("chatd stopped accepting; committing what is queued")

    @staticmethod
    async def _keep_time(ctx: Context[Conn], alarm: Alarm) -> None:
        """Run the read state's and the typing indicators' timed work (held
        receipts, marker writes, typing expiry) when due; asleep while
        neither has any."""
        work = (ctx.reads, ctx.typists)
        while True:
            dues = [due for due in (w.next_due() for w in work) if due is not None]
            if not dues:
                await alarm.wait()
                continue
            with trio.move_on_at(min(dues)):
                await alarm.wait()  # (earlier work may come meanwhile)
            for w in work:
                due = w.next_due()
                if due is not None and due <= trio.current_time():
                    await w.run_due()

    @staticmethod
    async def _write_read_state(ctx: Context[Conn]) -> None:
        """Every connection is closed: write the read markers and last-seen
        times still in memory."""
        try:
            await ctx.reads.flush()
        except Exception:
            log.exception("read markers of the last second not written")

    async def _summarise_presence(self, hub: Hub[Conn]) -> None:
        """Send big rooms' presence changes as summaries, once a second."""
        while True:
            await trio.sleep(PRESENCE_SUMMARY_INTERVAL)
            if hub.has_pending_presence():
                with hub.batch():
                    hub.flush_presence(self.wall())

    def _announce(self) -> None:
        config = self.config
        host = config.server.host
        log.info(
            "chatd %s listening on %s:%d (ws://%s:%d%s), database %s",
            __version__,
            host,
            self.port,
            host,
            self.port,
            WS_PATH,
            "PostgreSQL" if config.storage.backend == "postgres" else config.storage.sqlite_path,
        )
        if self.metrics_port:
            log.info("metrics on %s (port %d)", config.server.metrics_listen, self.metrics_port)
        if config.auth.jwt_secret and len(config.auth.jwt_secret.encode()) < MIN_SECRET_BYTES:
            log.warning(
                "[auth] jwt_secret is shorter than %d bytes: use a long random secret",
                MIN_SECRET_BYTES,
            )
        if config.server.dev_tokens:
            log.warning("[server] dev_tokens is on: anyone on this machine can get a token")

    async def reload(self, config: Config) -> None:
        """Apply a new config's rooms, limits and API settings; keep every
        connection. Changes that need a restart are logged and ignored."""
        old = self.config
        for section in _RESTART_SECTIONS:
            if getattr(old, section) != getattr(config, section):
                log.warning("reload: [%s] changed; it takes effect at the next restart", section)
        applied = msgspec.structs.replace(
            config,
            server=old.server,
            auth=old.auth,
            storage=old.storage,
            retention=old.retention,
            public_key=old.public_key,
        )
        await self.ctx.store.declare_rooms(applied.rooms)
        self.config = applied
        self.ctx.reload(applied)
        log.info("reload: rooms, limits and API settings applied from %s", config.source)

    # --- the HTTP layer's app --------------------------------------------------

    async def http(self, request: h11.Request, body: bytes, remote: str) -> Response:
        return await routes.handle(self, request, body, remote)

    def websocket(
        self, stream: trio.SocketStream, request: UpgradeRequest, trailing: bytes, remote: str
    ) -> Response | Awaitable[None]:
        # A WebSocket is closed by the drain, not cancelled: it runs outside
        # its HTTP scope (transport.http.serve_connection).
        return self.gate.websocket(stream, request, trailing, remote)

    # --- what the routes need (routes.Node) ------------------------------------

    def connection_count(self) -> int:
        return len(self.gate.connections)

    async def ready(self) -> None:
        await self.ctx.store.flush()

    def backlog(self) -> int:
        return self.ctx.store.backlog

    def shedding(self) -> bool:
        return self.ctx.messages.shedding()

    async def publish(
        self, content: str, room: str | None, user_id: int | None, data: dict[str, Any] | None
    ) -> StoredMessage:
        return await publish(self.ctx, content, room, user_id, data)

    async def delete_message(self, message_id: int) -> StoredEvent:
        return await delete(self.ctx, message_id)

    async def set_role(self, room: str, user_id: int, role: Role) -> None:
        await set_role(self.ctx, room, user_id, role)

    async def dev_user(self, username: str) -> int:
        return await self.ctx.store.dev_user(username)


class Alarm:
    """Wakes a sleeping task: ``ring`` (from anywhere on the Trio thread)
    ends its current or next ``wait``."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def ring(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = trio.Event()


class _MetricsOnly:
    """The app of the separate metrics listener: /metrics and nothing else."""

    def __init__(self, node: ChatServer) -> None:
        self.node = node
        self.handshake_timeout = node.handshake_timeout

    async def http(self, request: h11.Request, body: bytes, remote: str) -> Response:
        return await routes.handle(self.node, request, body, remote, metrics_only=True)

    def websocket(
        self, stream: trio.SocketStream, request: UpgradeRequest, trailing: bytes, remote: str
    ) -> Response | Awaitable[None]:
        return json_error(404, "not found")
