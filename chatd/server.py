"""The nursery tree: the store, the listener, and one task per connection.

``ChatServer.run`` opens the store (migrating it and declaring the config's
rooms), listens, reports ``started`` with itself (so tests and the CLI know
the port), and serves until ``stop()``. Stopping closes the listener, sends
every WebSocket client a 1001 close, gives them ``shutdown_timeout_seconds``
to go, then lets the store commit everything still queued before it returns.

This module is also the app the HTTP layer calls: routes for plain HTTP and
the WebSocket upgrade, where the token is checked and a session begins.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from urllib.parse import parse_qs, urlsplit

import h11
import msgspec
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request
from wsproto.extensions import Extension
from wsproto.utilities import RemoteProtocolError

from chatd import __version__
from chatd.auth import MIN_SECRET_BYTES, Identity, Verifier
from chatd.config import Config
from chatd.errors import ChatError, CloseCode
from chatd.session import Context, Session
from chatd.store.sqlite import SqliteStore, declare_rooms, open_sqlite_store
from chatd.transport.extensions import BoundedDeflate, SizeGuard
from chatd.transport.http import Response, serve_connection
from chatd.transport.websocket import WebSocketConnection

log = logging.getLogger("chatd")

WS_PATH = "/ws/chat"
#: Subprotocols echoed when a client offers them. The seed's compression
#: example passes "permessage-deflate" as a subprotocol; echoing it keeps
#: strict clients happy. Compression itself is the extension.
SUBPROTOCOLS = ("permessage-deflate",)
_ANONYMOUS = Identity(0, "", None)


class ChatServer:
    """One chatd node."""

    def __init__(self, config: Config, *, wall: Callable[[], float] = time.time) -> None:
        """``wall`` is the clock of timestamps and token expiry (tests pass
        their own to move time forward)."""
        self.config = config
        self._wall = wall
        self.handshake_timeout = config.server.handshake_timeout_seconds
        self.port = 0
        self.connections: set[WebSocketConnection] = set()
        self._stop = trio.Event()
        self._verifier = Verifier(config)
        self._ctx: Context | None = None
        self._http: dict[trio.SocketStream, trio.CancelScope] = {}

    def stop(self) -> None:
        """Begin a graceful shutdown (idempotent)."""
        self._stop.set()

    async def run(
        self, *, task_status: trio.TaskStatus[ChatServer] = trio.TASK_STATUS_IGNORED
    ) -> None:
        config = self.config
        async with open_sqlite_store(
            config.storage.sqlite_path, config.storage.synchronous
        ) as store:
            await store.write(partial(declare_rooms, rooms=config.rooms))
            self._ctx = self._context(store)
            listeners = await trio.open_tcp_listeners(config.server.port, host=config.server.host)
            self.port = listeners[0].socket.getsockname()[1]
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as accepting:
                    accepting.start_soon(
                        partial(
                            trio.serve_listeners,
                            self._serve_tcp,
                            listeners,
                            handler_nursery=connections,
                        )
                    )
                    log.info(
                        "chatd %s listening on %s:%d (ws://%s:%d%s), database %s",
                        __version__,
                        config.server.host,
                        self.port,
                        config.server.host,
                        self.port,
                        WS_PATH,
                        config.storage.sqlite_path,
                    )
                    if (
                        config.auth.jwt_secret
                        and len(config.auth.jwt_secret.encode()) < MIN_SECRET_BYTES
                    ):
                        log.warning(
                            "[auth] jwt_secret is shorter than %d bytes: use a long random secret",
                            MIN_SECRET_BYTES,
                        )
                    task_status.started(self)
                    await self._stop.wait()
                    accepting.cancel_scope.cancel()
                for listener in listeners:
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

    def _context(self, store: SqliteStore) -> Context:
        return Context.create(self.config, store, wall=self._wall, monotonic=trio.current_time)

    async def _serve_tcp(self, stream: trio.SocketStream) -> None:
        # Until it becomes a WebSocket, a connection is plain HTTP, which a
        # stop cancels at once (an idle keep-alive must not delay it).
        with trio.CancelScope() as scope:
            self._http[stream] = scope
            try:
                await serve_connection(stream, self)
            finally:
                self._http.pop(stream, None)

    # --- HTTP ---------------------------------------------------------------

    def http(self, request: h11.Request) -> Response:
        path = urlsplit(request.target.decode("latin-1")).path
        if path == "/healthz":
            if request.method not in (b"GET", b"HEAD"):
                return Response(
                    405, b'{"error":"method not allowed"}', headers=[("allow", "GET, HEAD")]
                )
            body = msgspec.json.encode(
                {"status": "ok", "version": __version__, "connections": len(self.connections)}
            )
            return Response(200, body)
        return Response(404, b'{"error":"not found"}')

    # --- WebSocket ------------------------------------------------------------

    async def websocket(
        self, stream: trio.SocketStream, request: h11.Request, trailing: bytes, remote: str
    ) -> None:
        ctx = self._ctx
        assert ctx is not None
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
        accept = ws.send(AcceptConnection(subprotocol=subprotocol, extensions=extensions))
        await stream.send_all(accept)
        if trailing:
            ws.receive_data(trailing)

        token = _token(target.query, list(request.headers))
        try:
            identity = self._verifier.verify(token)
        except ChatError as err:
            log.info("WS_AUTH_FAILED: IP=%s, Reason=%s", remote, err.message)
            conn = self._connection(stream, ws, _ANONYMOUS, deflate)
            session = Session(ctx, conn)
            session.refuse(err)
            await conn.run(session)
            return

        batch = parse_qs(target.query).get("batch") == ["1"]
        conn = self._connection(stream, ws, identity, deflate, batch=batch)
        session = Session(ctx, conn)
        started = ctx.monotonic()
        try:
            await ctx.store.upsert_user(identity.user_id, identity.username)
        except Exception:
            log.exception("store: cannot record user %d", identity.user_id)
            conn.close(CloseCode.INTERNAL_ERROR, "Storage unavailable")
            await conn.run(session)
            return
        log.info("WS_CONNECT: UserID=%d, IP=%s", identity.user_id, remote)
        self.connections.add(conn)
        session.start()
        try:
            await conn.run(session)
        finally:
            session.end()
            self.connections.discard(conn)
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
            wall=self._wall,
        )


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
