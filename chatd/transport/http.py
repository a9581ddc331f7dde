"""Every TCP connection starts here, as HTTP/1.1 parsed by h11.

A request that asks to upgrade to WebSocket is handed, with any bytes that
came after it, to the app's ``websocket`` handler. The common upgrade request
(whole in the connection's first read, in the form browsers and client
libraries send) is read directly by ``upgrade.read_upgrade``, without h11;
every other request, odd upgrades included, is h11's, and an upgrade read by
h11 is given to wsproto's handshake by the app. The handler answers at once: a
``Response`` refuses the upgrade (404, 400), written here like any other and
followed by the end of the connection; anything else is the WebSocket's
life, awaited once this module has dropped its h11 state. Any other request
is answered by the app's ``http`` handler; keep-alive is honoured. The whole
request must arrive within the handshake timeout, and its head may not pass
``MAX_HEAD_BYTES``, so a stalled or bloated client is cut off early. Whatever
a connection's handling raises (a bug) is logged and ends that connection,
never the node.

All HTTP that chatd writes is written here, by h11.
"""

from __future__ import annotations

import errno
import logging
import math
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol

import h11
import msgspec
import trio

from chatd.transport.upgrade import Upgrade, read_upgrade

log = logging.getLogger("chatd.transport")

MAX_HEAD_BYTES = 16384
MAX_BODY_BYTES = 65536
RECEIVE_SIZE = 65536
#: accept(2) errors that mean the process or the machine is out of something
#: (descriptors, memory): accept again after a pause (as trio.serve_listeners).
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_RETRY_SECONDS = 0.1


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


def json_response(status: int, body: Any, headers: list[tuple[str, str]] | None = None) -> Response:
    """``body`` as JSON."""
    return Response(status, msgspec.json.encode(body), headers=headers or [])


def json_error(status: int, message: str, **extra: Any) -> Response:
    """A one-line JSON error: ``{"error": message, ...extra}``."""
    return json_response(status, {"error": message, **extra})


#: An upgrade request: read directly (``upgrade.Upgrade``), or by h11.
UpgradeRequest = Upgrade | h11.Request


class App(Protocol):
    """What a listener serves: plain HTTP requests and WebSocket upgrades."""

    @property
    def handshake_timeout(self) -> float: ...

    def http(self, request: h11.Request, body: bytes, remote: str) -> Awaitable[Response]:
        """Answer one request."""

    def websocket(
        self, stream: trio.SocketStream, request: UpgradeRequest, trailing: bytes, remote: str
    ) -> Response | Awaitable[None]:
        """A refusal, or the WebSocket's life on ``stream`` (``trailing``:
        the bytes that came after the request). Both kinds of request get
        the same answer."""


def is_websocket_upgrade(request: h11.Request) -> bool:
    upgrade = b""
    connection = b""
    for name, value in request.headers:
        if name == b"upgrade":
            upgrade = value.lower()
        elif name == b"connection":
            connection = value.lower()
    return upgrade == b"websocket" and b"upgrade" in connection


def peer_address(stream: trio.SocketStream) -> str:
    try:
        host: str = stream.socket.getpeername()[0]
    except OSError:
        return "?"
    return host


async def serve_listener(
    listener: trio.SocketListener,
    nursery: trio.Nursery,
    handler: Callable[[trio.SocketStream], Awaitable[object]],
) -> None:
    """Accept connections on ``listener`` until cancelled, each served by
    ``handler(stream)`` in a task of its own in ``nursery``.

    ``trio.serve_listeners`` without the ``aclose_forcefully`` it awaits
    after each handler (a checkpoint in a cancelled scope: about 45 µs a
    connection); the handler closes its stream (``serve_connection`` does)."""
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                raise
            log.error(
                "accept returned %s (%s); retrying in %s seconds",
                errno.errorcode[exc.errno],
                os.strerror(exc.errno),
                ACCEPT_RETRY_SECONDS,
                exc_info=True,
            )
            await trio.sleep(ACCEPT_RETRY_SECONDS)
        else:
            nursery.start_soon(handler, stream)


async def serve_connection(
    stream: trio.SocketStream, app: App, phases: dict[trio.SocketStream, trio.CancelScope]
) -> None:
    """Serve one TCP connection: HTTP requests, or one WebSocket; then close
    its socket.

    While the connection is plain HTTP it runs in a cancel scope of its own,
    kept in ``phases`` meanwhile (a stopping server cancels them all: an idle
    keep-alive must not delay it), whose deadline is the handshake timeout
    while a request is awaited. A WebSocket's life runs after that scope, not
    in it: a drain closes it, and it has a scope of its own."""
    websocket = None
    try:
        with trio.CancelScope(deadline=trio.current_time() + app.handshake_timeout) as scope:
            phases[stream] = scope
            try:
                websocket = await _serve_http(stream, app, scope)
            finally:
                del phases[stream]
        if websocket is not None:
            # Run here, once _serve_http has returned: the h11 state and the
            # request are not kept for the WebSocket's whole life (the app's
            # handler keeps what it needs).
            await websocket
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    except Exception:  # a bug ends this connection, never the node
        log.exception("HTTP_ERROR: connection from %s", peer_address(stream))
    finally:
        # Closed at once, without a checkpoint: trio.aclose_forcefully would
        # raise and catch a Cancelled here (about 45 µs) for nothing.
        stream.socket.close()


async def _serve_http(
    stream: trio.SocketStream, app: App, scope: trio.CancelScope
) -> Awaitable[None] | None:
    """Answer HTTP requests until the connection ends (None), or return the
    app's WebSocket handler for an upgrade request, to be awaited. The
    handshake timeout (``scope``'s deadline, set by the caller for the first
    request) bounds the arrival of each request's head, and then of its
    body; nothing else."""
    remote = peer_address(stream)
    timeout = app.handshake_timeout
    data = await _receive(stream)
    direct = read_upgrade(data)
    if direct is not None:
        upgraded = app.websocket(stream, direct[0], direct[1], remote)
        if not isinstance(upgraded, Response):
            return upgraded
        # A refusal: h11 reads the same bytes, and the request is answered
        # like any other.
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    conn.receive_data(data)
    try:
        while True:
            request = await _next_request(stream, conn)
            if request is None:
                return None
            if is_websocket_upgrade(request):
                trailing, _ = conn.trailing_data
                upgraded = app.websocket(stream, request, bytes(trailing), remote)
                if not isinstance(upgraded, Response):
                    return upgraded
                scope.deadline = math.inf
                upgraded.headers.append(("connection", "close"))
                await _respond(stream, conn, request, upgraded)
                return None
            scope.deadline = trio.current_time() + timeout
            body = await _read_body(stream, conn)
            scope.deadline = math.inf
            await _respond(stream, conn, request, await app.http(request, body, remote))
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return None
            conn.start_next_cycle()
            scope.deadline = trio.current_time() + timeout
    except h11.RemoteProtocolError as exc:
        scope.deadline = math.inf
        await _send_error(stream, conn, exc.error_status_hint)
    return None


async def _receive(stream: trio.SocketStream) -> bytes:
    """The first bytes of a connection (b"" at its end): ``receive_some``
    without a schedule point when they are there already, as a request
    usually is by the time its connection's task runs."""
    sock = stream.socket
    while True:
        try:
            return os.read(sock.fileno(), RECEIVE_SIZE)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
        except OSError as exc:
            raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc


async def _next_request(stream: trio.SocketStream, conn: h11.Connection) -> h11.Request | None:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(RECEIVE_SIZE)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            # h11 bounds only a head still incomplete; one that arrived
            # whole in a single read is measured here.
            if head_size(event) > MAX_HEAD_BYTES:
                raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
            return event
        return None  # ConnectionClosed or PAUSED


def head_size(request: h11.Request) -> int:
    """About the size of a request's head on the wire."""
    return len(request.target) + sum(len(n) + len(v) + 4 for n, v in request.headers) + 16


async def _read_body(stream: trio.SocketStream, conn: h11.Connection) -> bytes:
    """The request's body, at most ``MAX_BODY_BYTES`` (413 past that)."""
    parts: list[bytes] = []
    total = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(RECEIVE_SIZE))
        elif isinstance(event, h11.Data):
            total += len(event.data)
            if total > MAX_BODY_BYTES:
                raise h11.RemoteProtocolError("request body too large", error_status_hint=413)
            parts.append(bytes(event.data))
        else:
            return b"".join(parts)


async def _respond(
    stream: trio.SocketStream, conn: h11.Connection, request: h11.Request, response: Response
) -> None:
    headers = [
        ("content-type", response.content_type),
        ("content-length", str(len(response.body))),
        ("server", "chatd"),
        *response.headers,
    ]
    head = h11.Response(
        status_code=response.status, headers=headers, reason=_reason(response.status)
    )
    data = conn.send(head) or b""
    if request.method != b"HEAD":
        data += conn.send(h11.Data(data=response.body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)


async def _send_error(stream: trio.SocketStream, conn: h11.Connection, status: int) -> None:
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    body = b'{"error":"bad request"}'
    try:
        data = (
            conn.send(
                h11.Response(
                    status_code=status,
                    reason=_reason(status),
                    headers=[
                        ("content-type", "application/json"),
                        ("content-length", str(len(body))),
                        ("connection", "close"),
                    ],
                )
            )
            or b""
        )
        data += conn.send(h11.Data(data=body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        with trio.move_on_after(1.0):
            await stream.send_all(data)
    except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""
