"""From an upgrade request to a running session: the WebSocket handshake and
admission.

``Gate.websocket`` is the HTTP layer's handler for upgrade requests
(``transport.http.App``). It answers at once: a path other than
``/ws/chat`` is a 404 and a malformed upgrade a 400 (``Response``s, which
the HTTP layer writes); otherwise it negotiates the extensions
(permessage-deflate, bounded like every message by ``max_frame_bytes``) and
returns the connection's life, ``_serve``, which the HTTP layer awaits once
it has dropped its own state. A request the HTTP layer read directly
(``transport.upgrade``, the common case) is answered by ``open_direct``:
the 101 written here, the extensions agreed by wsproto's own function, the
frame parser made here; any other goes through wsproto's handshake
(``open_wsproto``). Both answer a request alike (tests/test_upgrade.py).

``_serve`` admits the connection, or completes the handshake and refuses it
with a frame and a close (browsers cannot read an HTTP error): a full server
or too many connections from one address is 1013; a missing, bad or expired
token is an ``AUTH_FAILED`` error and 4001. An admitted connection gets its
101 only once its user is stored and its session is in the hub, so a client
that sees the handshake complete misses nothing sent to it afterwards (a
direct message, say). The gate keeps the open connections (``connections``)
and their count per client address.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request
from wsproto.extensions import Extension
from wsproto.handshake import server_extensions_handshake
from wsproto.utilities import ProtocolError

from chatd import origins
from chatd.auth import Identity, bearer
from chatd.config import LOOPBACK_HOSTS, Config
from chatd.errors import ChatError, CloseCode
from chatd.session import Context, Session
from chatd.transport.extensions import BoundedDeflate, SizeGuard, choose_offers
from chatd.transport.fanout import Fanout
from chatd.transport.http import Response, UpgradeRequest, json_error
from chatd.transport.upgrade import Upgrade, response
from chatd.transport.websocket import WebSocketConnection
from chatd.transport.wire import Wire

log = logging.getLogger("chatd")

WS_PATH = "/ws/chat"
#: Subprotocols echoed when a client offers them. The protocol document's
#: compression example passes "permessage-deflate" as a subprotocol; echoing
#: it keeps strict clients happy. Compression itself is the extension.
SUBPROTOCOLS = ("permessage-deflate",)
_ANONYMOUS = Identity(0, "", None)

Conn = WebSocketConnection
#: An accepted upgrade: its frame parser, its 101 (written once the session
#: is ready), its deflate, and the request's query.
Opened = tuple[Wire, bytes, BoundedDeflate | None, str]


class Gate:
    """Admits WebSocket connections to one node."""

    def __init__(self, ctx: Context[Conn], fanout: Fanout[Conn], wall: Callable[[], float]) -> None:
        self._ctx = ctx
        self._fanout = fanout
        self._wall = wall
        #: The open, admitted connections.
        self.connections: set[Conn] = set()
        #: WebSocket connections open per client address (admitted or not).
        self.per_address: dict[str, int] = {}

    def websocket(
        self, stream: trio.SocketStream, request: UpgradeRequest, trailing: bytes, remote: str
    ) -> Response | Awaitable[None]:
        """Refuse the upgrade, or return the connection's life.

        A request read directly (``transport.upgrade.Upgrade``: the common
        case) is answered directly; any other (an ``h11.Request``) through
        wsproto's handshake. Both give the same answer to the same request
        (tests/test_upgrade.py)."""
        config = self._ctx.config
        if isinstance(request, Upgrade):
            opened = open_direct(config, request)
        else:
            opened = open_wsproto(config, request)
        if isinstance(opened, Response):
            return opened
        wire, accept, deflate, query = opened
        server = config.server
        client = client_address(remote, request.headers, server.trusted_proxies)
        if server.allowed_origins:
            origin = _header(request.headers, b"origin")
            if not origins.allowed(origin, server.allowed_origins, server.host in LOOPBACK_HOSTS):
                log.warning("WS_REJECT: Origin=%s, IP=%s", (origin or "")[:200], client)
                return json_error(403, "origin not allowed")
        params = parse_qs(query)
        token = _token(params, request.headers)
        batch = params.get("batch") == ["1"]
        # The coroutine keeps only what the session needs: not the request
        # or a handshake's state.
        return self._serve(stream, wire, accept, deflate, client, token, batch, trailing)

    async def _serve(
        self,
        stream: trio.SocketStream,
        wire: Wire,
        accept: bytes,
        deflate: BoundedDeflate | None,
        client: str,
        token: str | None,
        batch: bool,
        trailing: bytes,
    ) -> None:
        ctx = self._ctx
        counts = self.per_address
        counts[client] = counts.get(client, 0) + 1
        bits = deflate.window_bits if deflate is not None and deflate.enabled() else None
        try:
            full = self._full(client)
            identity = _ANONYMOUS
            refused: ChatError | None = None
            if full is None:
                try:
                    identity = ctx.verifier.verify(token)
                except ChatError as err:
                    log.info("WS_AUTH_FAILED: IP=%s, Reason=%s", client, err.message)
                    ctx.metrics.auth_failures.inc()
                    refused = err
            conn = self._connection(stream, wire, identity, bits, trailing, batch)
            del wire, trailing, token  # the connection keeps what it needs
            session = Session(ctx, conn)
            started = None
            if full is not None:
                log.warning("WS_REFUSED: IP=%s, Reason=%s", client, full)
                conn.send_raw(accept)
                conn.close(CloseCode.TRY_AGAIN_LATER, full)
            elif refused is not None:
                conn.send_raw(accept)
                session.refuse(refused)
            else:
                started = await self._admit(conn, session, accept, client)
            del accept
            # The run is awaited here, not in a helper: a coroutine frame
            # less held by every connection for its whole life.
            if started is None:
                await conn.run(session)
                return
            try:
                await conn.run(session)
            finally:
                self._leave(conn, session, started)
        finally:
            left = counts[client] - 1
            if left:
                counts[client] = left
            else:
                del counts[client]

    def _full(self, client: str) -> str | None:
        """Why this node takes no more connections from ``client`` (None:
        it does)."""
        server = self._ctx.config.server
        if len(self.connections) >= server.max_connections:
            return "Server full"
        if self.per_address[client] > server.max_connections_per_address:
            return "Too many connections from your address"
        return None

    async def _admit(
        self, conn: Conn, session: Session[Conn], accept: bytes, client: str
    ) -> float | None:
        """Store the user and start the session: when it started, or None
        (the store failed: the connection is closed, to be run all the same)."""
        ctx = self._ctx
        identity = conn.identity
        started = ctx.monotonic()
        try:
            await ctx.store.upsert_user(identity.user_id, identity.username)
        except Exception:
            log.exception("store: cannot record user %d", identity.user_id)
            conn.send_raw(accept)
            conn.close(CloseCode.INTERNAL_ERROR, "Storage unavailable")
            return None
        log.info("WS_CONNECT: UserID=%d, IP=%s", identity.user_id, client)
        self.connections.add(conn)
        ctx.metrics.connected(identity.user_id, started)
        conn.send_raw(accept)
        session.start()
        return started

    def _leave(self, conn: Conn, session: Session[Conn], started: float) -> None:
        """End an admitted connection's session."""
        ctx = self._ctx
        user_id = conn.identity.user_id
        session.end()
        self.connections.discard(conn)
        ctx.metrics.disconnected(user_id, ctx.monotonic())
        log.info(
            "WS_DISCONNECT: UserID=%d, Duration=%.1fs, Code=%s",
            user_id,
            ctx.monotonic() - started,
            conn.close_code,
        )

    def _connection(
        self,
        stream: trio.SocketStream,
        wire: Wire,
        identity: Identity,
        window_bits: int | None,
        received: bytes,
        batch: bool,
    ) -> Conn:
        config = self._ctx.config
        server = config.server
        return WebSocketConnection(
            stream,
            wire,
            identity,
            self._fanout,
            window_bits=window_bits,
            send_buffer_bytes=server.send_buffer_bytes,
            ping_interval=server.ping_interval_seconds,
            idle_timeout=server.idle_timeout_seconds,
            batch=batch,
            wall=self._wall,
            on_slow=self._ctx.metrics.slow_consumers.inc,
            max_message_bytes=config.limits.max_frame_bytes,
            received=received,
        )


def open_direct(config: Config, request: Upgrade) -> Response | Opened:
    """The upgrade as wsproto's handshake would answer it, without its second
    reading of the request: ``read_upgrade`` checked what wsproto checks,
    and the extensions are agreed by wsproto's own function."""
    if request.path != WS_PATH:
        return json_error(404, "not found")
    extensions, deflate = _extensions(config)
    offers = choose_offers(list(request.extensions), config.limits.max_frame_bytes)
    agreed = server_extensions_handshake(offers, extensions)
    subprotocol = next((s for s in request.subprotocols if s in SUBPROTOCOLS), None)
    accept = response(request.key, subprotocol, agreed)
    return Wire(extensions), accept, deflate, request.query


def open_wsproto(config: Config, request: h11.Request) -> Response | Opened:
    """The upgrade through wsproto's handshake (``initiate_upgrade_connection``)."""
    try:
        target = urlsplit(request.target.decode("latin-1"))
    except ValueError:  # "//[": an unclosed IPv6 host
        return json_error(400, "bad request")
    if target.path != WS_PATH:
        return json_error(404, "not found")
    ws = WSConnection(ConnectionType.SERVER)
    headers = _offers_chosen(list(request.headers), config.limits.max_frame_bytes)
    try:
        ws.initiate_upgrade_connection(headers, request.target)
        upgrade = next(ws.events())
    except (ProtocolError, h11.ProtocolError, ValueError, StopIteration):
        # Beside its own errors, wsproto lets through h11's (it writes the
        # request again as HTTP/1.1: an HTTP/1.0 one without Host) and
        # UnicodeError (a non-ASCII Connection, extension or protocol list,
        # a Host that is not IDNA): each a malformed upgrade.
        return json_error(400, "bad request")
    assert isinstance(upgrade, Request)
    extensions, deflate = _extensions(config)
    subprotocol = next((s for s in upgrade.subprotocols if s in SUBPROTOCOLS), None)
    accept = ws.send(AcceptConnection(subprotocol=subprotocol, extensions=extensions))
    # Only the frame parser is kept: the handshake's h11 state and request
    # go with the WSConnection (see wire.py).
    return Wire.take(ws), accept, deflate, target.query


def _offers_chosen(headers: list[tuple[bytes, bytes]], max_bytes: int) -> list[tuple[bytes, bytes]]:
    """The request's headers with its extension offers as ``choose_offers``
    leaves them (one header; none when nothing is left)."""
    offers: list[str] = []
    rest: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        if name.lower() == b"sec-websocket-extensions":
            offers.extend(o.strip() for o in value.decode("latin-1").split(",") if o.strip())
        else:
            rest.append((name, value))
    chosen = choose_offers(offers, max_bytes)
    if chosen:
        rest.append((b"Sec-WebSocket-Extensions", ", ".join(chosen).encode("latin-1")))
    return rest


def _extensions(config: Config) -> tuple[list[Extension], BoundedDeflate | None]:
    """A new connection's extensions (permessage-deflate when the config
    allows it, first), and its deflate."""
    guard = SizeGuard(config.limits.max_frame_bytes)
    if not config.server.compression:
        return [guard], None
    deflate = BoundedDeflate(config.limits.max_frame_bytes)
    return [deflate, guard], deflate


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


def _header(headers: Any, name: bytes) -> str | None:
    """A request header's value (the first; names are in lower case), as
    text."""
    for key, value in headers:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _token(params: dict[str, list[str]], headers: Any) -> str | None:
    """``?token=`` (``params``: the query, parsed) wins over
    ``Authorization: Bearer``."""
    values = params.get("token")
    if values:
        return values[0]
    return bearer(headers)
