"""The nursery tree: the store, the listeners, and one task per connection.

``ChatServer.run`` opens the store (migrating it and declaring the config's
rooms), listens, reports ``started`` with itself (so tests and the CLI know
the port), and serves until ``stop()``.

Stopping (SIGTERM) is a drain: ``/readyz`` answers 503 at once; after
``drain_grace_seconds`` the listeners close, every WebSocket client gets a
1001 close and ``shutdown_timeout_seconds`` to go, then the store commits
everything still queued and ``run`` returns. ``reload`` (SIGHUP) applies a new
config's rooms and limits without dropping a connection.

This module is also the app the HTTP layer calls: plain HTTP goes to
``routes``; the WebSocket upgrade is handled here, where the token is checked
and a session begins. ``publish`` is the backend API's way in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import msgspec
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request
from wsproto.extensions import Extension
from wsproto.utilities import RemoteProtocolError

from chatd import __version__, routes
from chatd.auth import MIN_SECRET_BYTES, Identity
from chatd.bus import Bus, Limits, open_bus
from chatd.config import Config, split_address
from chatd.errors import ChatError, CloseCode, ErrorCode, invalid_format
from chatd.hub import Hub
from chatd.metrics import Metrics
from chatd.protocol import rfc3339
from chatd.session import Context, Session
from chatd.store import NewMessage, Store, StoredMessage
from chatd.store.sqlite import open_sqlite_store
from chatd.transport.extensions import BoundedDeflate, SizeGuard
from chatd.transport.http import Response, serve_connection
from chatd.transport.websocket import WebSocketConnection, broadcast, corked
from chatd.web import load_assets

log = logging.getLogger("chatd")

WS_PATH = "/ws/chat"
#: Subprotocols echoed when a client offers them. The seed's compression
#: example passes "permessage-deflate" as a subprotocol; echoing it keeps
#: strict clients happy. Compression itself is the extension.
SUBPROTOCOLS = ("permessage-deflate",)
_ANONYMOUS = Identity(0, "", None)
#: The sender of notifications from the publish API (a user row of its own).
SYSTEM_USER = Identity(0, "system", None)
#: Sections a reload cannot change: they need a restart.
_RESTART_SECTIONS = ("server", "auth", "storage")


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
        self.connections: set[WebSocketConnection] = set()
        self.metrics = Metrics()
        self.assets = load_assets()
        #: True from ``stop()`` on: /readyz says 503, the API refuses.
        self.draining = False
        self._stop = trio.Event()
        self._ctx: Context | None = None
        self._http: dict[trio.SocketStream, trio.CancelScope] = {}
        #: WebSocket connections open per client address.
        self._per_address: dict[str, int] = {}
        self._api_limits: Limits | None = None

    @property
    def ctx(self) -> Context:
        assert self._ctx is not None, "the server is not running"
        return self._ctx

    @property
    def store(self) -> Store:
        return self.ctx.store

    def stop(self) -> None:
        """Begin a graceful shutdown (idempotent)."""
        self.draining = True
        self._stop.set()

    async def run(
        self, *, task_status: trio.TaskStatus[ChatServer] = trio.TASK_STATUS_IGNORED
    ) -> None:
        config = self.config
        # (ignore: the hub types its peers as Peer; this server's are all
        # WebSocketConnections, which the transport's broadcast takes)
        hub = Hub(self.metrics, broadcast=broadcast, batch=corked)  # type: ignore[arg-type]
        async with (
            open_store(config, self.metrics) as store,
            open_bus(config, hub, store, self.wall, trio.current_time, self.metrics) as bus,
        ):
            await store.declare_rooms(config.rooms)
            self._ctx = Context.create(
                config,
                hub,
                store,
                bus,
                wall=self.wall,
                monotonic=trio.current_time,
                metrics=self.metrics,
            )
            self._api_limits = _api_limits(config, bus)
            listeners = await trio.open_tcp_listeners(config.server.port, host=config.server.host)
            self.port = listeners[0].socket.getsockname()[1]
            if config.server.metrics_listen:
                host, port = split_address(config.server.metrics_listen)
                extra = await trio.open_tcp_listeners(port, host=host)
                self.metrics_port = extra[0].socket.getsockname()[1]
            else:
                extra = []
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as accepting:
                    serve = partial(trio.serve_listeners, handler_nursery=connections)
                    accepting.start_soon(serve, self._serve_tcp, listeners)
                    if extra:
                        accepting.start_soon(serve, self._serve_metrics, extra)
                    self._announce()
                    task_status.started(self)
                    await self._stop.wait()
                    grace = self.config.server.drain_grace_seconds
                    if grace:
                        log.info("chatd draining: /readyz says 503 for %gs", grace)
                        await trio.sleep(grace)
                    accepting.cancel_scope.cancel()
                for listener in listeners + extra:
                    await listener.aclose()
                for scope in self._http.values():
                    scope.cancel()
                log.info("chatd stopping: closing %d connections", len(self.connections))
                for conn in list(self.connections):
                    conn.close(CloseCode.GOING_AWAY, "Server shutting down")
                connections.cancel_scope.deadline = (
                    trio.current_time() + config.server.shutdown_timeout_seconds
                )
            log.info("chatd stopped accepting; committing what is queued")
        log.info("chatd stopped")

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
        if config.bus.backend == "redis":
            node = getattr(self.ctx.bus, "node_id", "?")
            log.info("cluster %r over Redis, this node is %s", config.bus.prefix, node)
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
            config, server=old.server, auth=old.auth, storage=old.storage, public_key=old.public_key
        )
        await self.ctx.store.declare_rooms(applied.rooms)
        self.config = applied
        self.ctx.reload(applied)
        if (old.api.messages_per_minute, old.api.messages_per_hour) != (
            applied.api.messages_per_minute,
            applied.api.messages_per_hour,
        ):
            self._api_limits = _api_limits(applied, self.ctx.bus)
        log.info("reload: rooms, limits and API settings applied from %s", config.source)

    async def _serve_tcp(self, stream: trio.SocketStream) -> None:
        # Until it becomes a WebSocket, a connection is plain HTTP, which a
        # stop cancels at once (an idle keep-alive must not delay it).
        with trio.CancelScope() as scope:
            self._http[stream] = scope
            try:
                await serve_connection(stream, self)
            finally:
                self._http.pop(stream, None)

    async def _serve_metrics(self, stream: trio.SocketStream) -> None:
        with trio.CancelScope() as scope:
            self._http[stream] = scope
            try:
                await serve_connection(stream, _MetricsOnly(self))
            finally:
                self._http.pop(stream, None)

    # --- HTTP ---------------------------------------------------------------

    async def http(self, request: h11.Request, body: bytes, remote: str) -> Response:
        return await routes.handle(self, request, body, remote)

    async def publish(
        self, content: str, room: str | None, user_id: int | None, data: dict[str, Any] | None
    ) -> StoredMessage:
        """Commit a notification from the system sender, then deliver it to
        the room or to every connection of the user. Raises ``ChatError``."""
        ctx = self.ctx
        limits, api = self.config.limits, self.config.api
        if (room is None) == (user_id is None):
            raise invalid_format("Give exactly one of room and user_id", "room")
        if len(content) > limits.max_content_length:
            raise ChatError(
                ErrorCode.MESSAGE_TOO_LONG,
                f"Content is longer than {limits.max_content_length} characters",
                {"max_length": limits.max_content_length},
            )
        raw = msgspec.json.encode(data) if data is not None else None
        if raw is not None and len(raw) > api.max_data_bytes:
            raise invalid_format(f"data is larger than {api.max_data_bytes} bytes", "data")
        if room is not None:
            if await ctx.store.room_access(room, SYSTEM_USER.user_id) is None:
                raise ChatError(ErrorCode.ROOM_NOT_FOUND, "Room not found", {"room": room})
        elif user_id is not None and not await ctx.store.user_exists(user_id):
            raise ChatError(ErrorCode.USER_NOT_FOUND, "User not found", {"user_id": user_id})
        assert self._api_limits is not None
        wait = await self._api_limits.take(SYSTEM_USER.user_id)
        if wait > 0:
            self.metrics.rate_limited.inc()
            raise ChatError(
                ErrorCode.RATE_LIMITED, "Too many notifications", {"retry_after": int(wait)}
            )
        message = NewMessage(
            user_id=SYSTEM_USER.user_id,
            username=SYSTEM_USER.username,
            content=content,
            message_type="notification",
            created_at=rfc3339(self.wall()),
            room=room,
            to_user_id=user_id,
            data=raw,
        )
        done = trio.Event()
        box: list[StoredMessage | Exception] = []

        def committed(result: StoredMessage | Exception) -> None:
            if not isinstance(result, Exception):
                ctx.bus.message(result)
                self.metrics.published.inc()
            box.append(result)
            done.set()

        await ctx.store.append(message, committed)
        with trio.CancelScope(shield=True):
            await done.wait()
        result = box[0]
        if isinstance(result, ChatError):
            raise result
        if isinstance(result, Exception):
            raise ChatError(ErrorCode.INTERNAL_ERROR, "The notification could not be stored")
        return result

    async def dev_user_id(self, username: str) -> int:
        """The id of the user with this name, made up if there is none."""
        return await self.ctx.store.dev_user(username)

    # --- WebSocket ------------------------------------------------------------

    async def websocket(
        self, stream: trio.SocketStream, request: h11.Request, trailing: bytes, remote: str
    ) -> None:
        self._http.pop(stream, None)
        target = urlsplit(request.target.decode("latin-1"))
        ws = WSConnection(ConnectionType.SERVER)
        if target.path != WS_PATH:
            await _reject(stream, 404)
            return
        try:
            ws.initiate_upgrade_connection(list(request.headers), request.target)
            upgrade = next(ws.events())
        except (RemoteProtocolError, StopIteration):
            await _reject(stream, 400)
            return
        assert isinstance(upgrade, Request)
        limits = self.config.limits
        extensions: list[Extension] = [SizeGuard(limits.max_frame_bytes)]
        deflate = BoundedDeflate(limits.max_frame_bytes) if self.config.server.compression else None
        if deflate is not None:
            extensions.insert(0, deflate)
        subprotocol = next((s for s in upgrade.subprotocols if s in SUBPROTOCOLS), None)
        # The 101 is written by the connection itself, first, once chatd is
        # ready to deliver to it (see _session).
        accept = ws.send(AcceptConnection(subprotocol=subprotocol, extensions=extensions))
        # Bytes that came with the upgrade request go to the connection's
        # reader, which parses frames before wsproto sees them.
        client = client_address(remote, request.headers, self.config.server.trusted_proxies)
        counts = self._per_address
        counts[client] = counts.get(client, 0) + 1
        # The session outlives the handshake: this frame keeps none of it
        # (the request, wsproto's handshake state) while the session runs.
        session = self._session(
            stream, ws, accept, deflate, target.query, request, client, trailing
        )
        del request, ws, upgrade, target, extensions, accept, trailing
        try:
            await session
        finally:
            left = counts[client] - 1
            if left:
                counts[client] = left
            else:
                del counts[client]

    async def _session(
        self,
        stream: trio.SocketStream,
        ws: WSConnection,
        accept: bytes,
        deflate: BoundedDeflate | None,
        query: str,
        request: h11.Request,
        remote: str,
        trailing: bytes = b"",
    ) -> None:
        """Check limits and the token, then serve one session.

        A refused connection still completes the handshake (browsers cannot
        read an HTTP error), then gets its error and close. An accepted one
        gets its 101 only once its user is stored and its session is in the
        hub: a client that sees the handshake complete misses nothing sent
        to it afterwards (a direct message, say)."""
        ctx = self.ctx
        server = self.config.server
        full = None
        if len(self.connections) >= server.max_connections:
            full = "Server full"
        elif self._per_address[remote] > server.max_connections_per_address:
            full = "Too many connections from your address"
        if full is not None:
            log.warning("WS_REFUSED: IP=%s, Reason=%s", remote, full)
            conn = self._connection(stream, ws, _ANONYMOUS, deflate, trailing)
            conn.send_raw(accept)
            conn.close(CloseCode.TRY_AGAIN_LATER, full)
            await conn.run(Session(ctx, conn))
            return

        token = _token(query, list(request.headers))
        try:
            identity = ctx.verifier.verify(token)
        except ChatError as err:
            log.info("WS_AUTH_FAILED: IP=%s, Reason=%s", remote, err.message)
            self.metrics.auth_failures.inc()
            conn = self._connection(stream, ws, _ANONYMOUS, deflate, trailing)
            conn.send_raw(accept)
            session = Session(ctx, conn)
            session.refuse(err)
            await conn.run(session)
            return

        batch = parse_qs(query).get("batch") == ["1"]
        conn = self._connection(stream, ws, identity, deflate, trailing, batch=batch)
        session = Session(ctx, conn)
        started = ctx.monotonic()
        try:
            await ctx.store.upsert_user(identity.user_id, identity.username)
        except Exception:
            log.exception("store: cannot record user %d", identity.user_id)
            conn.send_raw(accept)
            conn.close(CloseCode.INTERNAL_ERROR, "Storage unavailable")
            await conn.run(session)
            return
        log.info("WS_CONNECT: UserID=%d, IP=%s", identity.user_id, remote)
        self.connections.add(conn)
        self.metrics.connected(identity.user_id, started)
        conn.send_raw(accept)
        session.start()
        del ws, accept, request, query, token, trailing  # see websocket()
        try:
            await conn.run(session)
        finally:
            session.end()
            self.connections.discard(conn)
            self.metrics.disconnected(identity.user_id, ctx.monotonic())
            log.info(
                "WS_DISCONNECT: UserID=%d, Duration=%.1fs, Code=%s",
                identity.user_id,
                ctx.monotonic() - started,
                conn.close_code,
            )

    def _connection(
        self,
        stream: trio.SocketStream,
        ws: WSConnection,
        identity: Identity,
        deflate: BoundedDeflate | None,
        received: bytes = b"",
        *,
        batch: bool = False,
    ) -> WebSocketConnection:
        server = self.config.server
        bits = deflate.window_bits if deflate is not None and deflate.enabled() else None
        return WebSocketConnection(
            stream,
            ws,
            identity,
            window_bits=bits,
            send_buffer_bytes=server.send_buffer_bytes,
            ping_interval=server.ping_interval_seconds,
            idle_timeout=server.idle_timeout_seconds,
            batch=batch,
            wall=self.wall,
            on_slow=self.metrics.slow_consumers.inc,
            max_message_bytes=self.config.limits.max_frame_bytes,
            received=received,
        )


def client_address(remote: str, headers: Any, trusted: tuple[str, ...]) -> str:
    """The client's address: the TCP peer, or, when that peer is a trusted
    proxy, the nearest untrusted address in its X-Forwarded-For (else its
    X-Real-IP)."""
    if remote not in trusted:
        return remote
    forwarded: list[str] = []
    real = None
    for name, value in headers:
        if name == b"x-forwarded-for":
            forwarded += [part.strip() for part in value.decode("latin-1").split(",")]
        elif name == b"x-real-ip":
            real = value.decode("latin-1").strip()
    for hop in reversed(forwarded):
        if hop and hop not in trusted:
            return hop[:64]
    return real[:64] if real else remote


def _token(query: str, headers: list[tuple[bytes, bytes]]) -> str | None:
    """``?token=`` wins over ``Authorization: Bearer``."""
    values = parse_qs(query).get("token")
    if values:
        return values[0]
    for name, value in headers:
        if name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                return credentials.strip()
    return None


async def _reject(stream: trio.SocketStream, status: int) -> None:
    """Refuse an upgrade with a plain HTTP status."""
    body = b'{"error":"not found"}' if status == 404 else b'{"error":"bad request"}'
    head = (
        f"HTTP/1.1 {status} {'Not Found' if status == 404 else 'Bad Request'}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    ).encode()
    with trio.move_on_after(1.0):
        await stream.send_all(head + body)


@asynccontextmanager
async def open_store(config: Config, metrics: Metrics) -> AsyncIterator[Store]:
    """The store the config asks for, open for the block."""
    storage = config.storage
    if storage.backend == "postgres":
        from chatd.store.postgres import open_postgres_store

        async with open_postgres_store(storage.dsn, storage.pool_size, metrics, corked) as pg:
            yield pg
    else:
        async with open_sqlite_store(
            storage.sqlite_path, storage.synchronous, metrics, corked
        ) as db:
            yield db


class _MetricsOnly:
    """The app of the separate metrics listener: /metrics and nothing else."""

    def __init__(self, node: ChatServer) -> None:
        self.node = node
        self.handshake_timeout = node.handshake_timeout

    async def http(self, request: h11.Request, body: bytes, remote: str) -> Response:
        return await routes.handle(self.node, request, body, remote, metrics_only=True)

    async def websocket(
        self, stream: trio.SocketStream, request: h11.Request, trailing: bytes, remote: str
    ) -> None:
        await _reject(stream, 404)


def _api_limits(config: Config, bus: Bus) -> Limits:
    """The system sender's limits: per node alone, cluster-wide with Redis."""
    api = config.api
    return bus.limits("api", [(api.messages_per_minute, 60.0), (api.messages_per_hour, 3600.0)])
