"""Plain HTTP on chatd's port: health, readiness, metrics, the publish API,
development tokens, and the browser page.

Every route answers JSON (the page's static files aside) and none raises: a
bad request gets its status and a one-line ``{"error": ...}``. The routes see
the node through ``Node``, the few things they need of it; this module holds
no state.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Protocol
from urllib.parse import unquote, urlsplit

import h11
import msgspec
import trio
from msgspec import Meta

from chatd import __version__
from chatd.auth import bearer, issue
from chatd.config import ROOM_NAME_PATTERN, Config
from chatd.errors import ChatError, ErrorCode
from chatd.metrics import CONTENT_TYPE, Metrics
from chatd.moderation import Role
from chatd.protocol import Id, RoomName
from chatd.store import SATURATED, StoredEvent, StoredMessage
from chatd.transport.http import Response
from chatd.transport.http import json_error as _error
from chatd.transport.http import json_response as _json
from chatd.web import SECURITY_HEADERS

log = logging.getLogger("chatd")

#: How long /readyz waits for the store to accept a write.
READY_TIMEOUT = 2.0


class Node(Protocol):
    """What the routes need of the node they serve."""

    @property
    def config(self) -> Config: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def draining(self) -> bool:
        """From a stop on: /readyz says 503, the API refuses."""

    @property
    def assets(self) -> dict[str, tuple[str, bytes]]:
        """The page's static files by path: (content type, bytes)."""

    @property
    def wall(self) -> Callable[[], float]:
        """The clock of timestamps and token expiry."""

    def connection_count(self) -> int: ...

    def ready(self) -> Awaitable[None]:
        """Return once the store has committed a write (raise if it cannot)."""

    def backlog(self) -> int:
        """Writes waiting for the store (``Store.backlog``)."""

    def shedding(self) -> bool:
        """Whether the node has lately closed connections that sent on
        while it was busy (``Messages.shedding``)."""

    def publish(
        self, content: str, room: str | None, user_id: int | None, data: dict[str, Any] | None
    ) -> Awaitable[StoredMessage]:
        """The publish API's service (``publish.publish``)."""

    def delete_message(self, message_id: int) -> Awaitable[StoredEvent]:
        """The publish API's deletion (``publish.delete``)."""

    def dev_user(self, username: str) -> Awaitable[int]:
        """The id of the user with this name, made up if there is none."""

    def set_role(self, room: str, user_id: int, role: Role) -> Awaitable[None]:
        """The API's roles (``publish.set_role``)."""


async def handle(
    node: Node, request: h11.Request, body: bytes, remote: str, *, metrics_only: bool = False
) -> Response:
    """Answer one HTTP request."""
    try:
        path = urlsplit(request.target.decode("latin-1")).path
    except ValueError:  # "//[": an unclosed IPv6 host
        return _error(400, "bad request")
    method = request.method.decode("latin-1")
    if metrics_only:
        routes = {"/metrics": ("GET", _metrics)}
    else:
        routes = _ROUTES if node.config.server.metrics_listen == "" else _PUBLIC_ROUTES
    route = routes.get(path)
    if route is None and path.startswith(MESSAGES) and not metrics_only:
        route = ("DELETE", _delete_message)
    if route is None and path.startswith(ROOMS) and not metrics_only:
        route = ("PUT", _set_role)
    if route is None:
        asset = node.assets.get(path)
        if asset is None or metrics_only:
            return _error(404, "not found")
        if method not in ("GET", "HEAD"):
            return _error(405, "method not allowed", allow="GET, HEAD")
        content_type, data = asset
        return Response(200, data, content_type, list(SECURITY_HEADERS))
    allowed, handler = route
    if method != allowed and not (allowed == "GET" and method == "HEAD"):
        return _json(405, {"error": "method not allowed"}, [("allow", allowed)])
    try:
        response: Response = await handler(node, request, body, remote)
    except Exception:  # a bug or a failing store: an answer, never a dropped connection
        log.exception("HTTP %s %s failed", method, path)
        return _error(500, "internal error")
    return response


async def _healthz(node: Node, request: h11.Request, body: bytes, remote: str) -> Response:
    return _json(
        200, {"status": "ok", "version": __version__, "connections": node.connection_count()}
    )


async def _readyz(node: Node, request: h11.Request, body: bytes, remote: str) -> Response:
    """Ready: not draining, not saturated (the store's queue full, or
    connections shed lately because the node could not keep up), and the
    store commits a write within 2 s."""
    if node.draining:
        return _json(503, {"status": "draining"})
    queued = node.backlog()
    if queued >= SATURATED or node.shedding():  # (new messages are refused meanwhile)
        return _json(503, {"status": "saturated", "queued": queued})
    with trio.move_on_after(READY_TIMEOUT):
        try:
            await node.ready()
        except Exception as exc:
            return _json(503, {"status": "store unavailable", "error": str(exc)})
        return _json(200, {"status": "ready"})
    return _json(503, {"status": "store unavailable", "error": "write timed out"})


async def _metrics(node: Node, request: h11.Request, body: bytes, remote: str) -> Response:
    return Response(200, node.metrics.exposition(), CONTENT_TYPE)


# --- POST /api/publish --------------------------------------------------------


class PublishRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    content: Annotated[str, Meta(min_length=1)]
    room: RoomName | None = None
    user_id: Id | None = None
    data: dict[str, Any] | None = None


def _api_refusal(node: Node, request: h11.Request) -> Response | None:
    """The answer to an API request that may not go on (the API off, a
    missing or wrong key, the node draining); None when it may."""
    keys = node.config.api.keys
    if not keys:
        return _error(404, "the publish API is off: set [api] keys")
    given = bearer(request.headers)
    if given is None or not any(hmac.compare_digest(given, key) for key in keys):
        return _json(401, {"error": "missing or wrong API key"}, [("www-authenticate", "Bearer")])
    if node.draining:
        return _error(503, "draining")
    return None


def _chat_error(err: ChatError) -> Response:
    """A refusal of the API's service, as HTTP."""
    status = _STATUS.get(err.code, 400)
    headers = []
    if err.code is ErrorCode.RATE_LIMITED:
        headers.append(("retry-after", str(err.details.get("retry_after", 1))))
    reply = {"error": err.message, "code": err.code.value, "details": err.details}
    return _json(status, reply, headers)


async def _publish(node: Node, request: h11.Request, body: bytes, remote: str) -> Response:
    """A backend sends a notification to a room or a user."""
    refused = _api_refusal(node, request)
    if refused is not None:
        return refused
    try:
        publish = msgspec.json.decode(body, type=PublishRequest)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeError) as exc:
        return _error(400, f"invalid request: {exc}", code="INVALID_FORMAT")
    try:
        stored = await node.publish(publish.content, publish.room, publish.user_id, publish.data)
    except ChatError as err:
        return _chat_error(err)
    log.info(
        "API_PUBLISH: IP=%s, Id=%d, %s",
        remote,
        stored.id,
        f"Room={publish.room}" if publish.room else f"UserID={publish.user_id}",
    )
    return _json(200, {"id": stored.id, "created_at": stored.message.created_at})


# --- DELETE /api/messages/{id} ------------------------------------------------

MESSAGES = "/api/messages/"


async def _delete_message(node: Node, request: h11.Request, body: bytes, remote: str) -> Response:
    """A backend deletes a message (moderation): a tombstone in history,
    ``message_deleted`` to whoever gets the message's channel."""
    refused = _api_refusal(node, request)
    if refused is not None:
        return refused
    path = urlsplit(request.target.decode("latin-1")).path
    text = path[len(MESSAGES) :]
    if not (text.isdecimal() and text.isascii() and 0 < int(text) < 2**63):
        return _error(400, "the message id must be a positive integer", code="INVALID_FORMAT")
    try:
        event = await node.delete_message(int(text))
    except ChatError as err:
        return _chat_error(err)
    log.info("API_DELETE: IP=%s, Id=%d, MessageId=%d", remote, event.id, event.message_id)
    return _json(200, {"id": event.id, "message_id": event.message_id, "deleted_at": event.at})


# --- PUT /api/rooms/{room}/roles/{user_id} ------------------------------------

ROOMS = "/api/rooms/"
_ROLE_PATH = re.compile(r"/api/rooms/([^/]+)/roles/([0-9]+)")


class RoleRequest(msgspec.Struct, forbid_unknown_fields=True):
    role: Role


async def _set_role(node: Node, request: h11.Request, body: bytes, remote: str) -> Response:
    """A backend gives a user a role in a room."""
    refused = _api_refusal(node, request)
    if refused is not None:
        return refused
    path = urlsplit(request.target.decode("latin-1")).path
    match = _ROLE_PATH.fullmatch(path)
    room = unquote(match.group(1)) if match else ""
    if match is None or not re.fullmatch(ROOM_NAME_PATTERN, room) or len(room) > 64:
        return _error(404, "not found: PUT /api/rooms/{room}/roles/{user_id}")
    user_id = int(match.group(2))
    if not 0 < user_id < 2**63:
        return _error(400, "the user id must be a positive integer", code="INVALID_FORMAT")
    try:
        want = msgspec.json.decode(body, type=RoleRequest)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeError) as exc:
        return _error(400, f"invalid request: {exc}", code="INVALID_FORMAT")
    try:
        await node.set_role(room, user_id, want.role)
    except ChatError as err:
        return _chat_error(err)
    log.info("API_ROLE: IP=%s, Room=%s, UserID=%d, Role=%s", remote, room, user_id, want.role)
    return _json(200, {"room": room, "user_id": user_id, "role": want.role})


_STATUS = {
    ErrorCode.INVALID_FORMAT: 400,
    ErrorCode.PERMISSION_DENIED: 403,
    ErrorCode.MESSAGE_NOT_FOUND: 404,
    ErrorCode.MESSAGE_TOO_LONG: 413,
    ErrorCode.ROOM_NOT_FOUND: 404,
    ErrorCode.USER_NOT_FOUND: 404,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.INTERNAL_ERROR: 503,
}


# --- POST /dev/token ----------------------------------------------------------


class DevTokenRequest(msgspec.Struct, kw_only=True):
    username: Annotated[str, Meta(min_length=1, max_length=64)]


async def _dev_token(node: Node, request: h11.Request, body: bytes, remote: str) -> Response:
    """Development only: a token for any name, to loopback clients."""
    if not node.config.server.dev_tokens:
        return _error(404, "not found")
    try:
        if not ipaddress.ip_address(remote).is_loopback:
            return _error(403, "dev tokens are for loopback clients only")
    except ValueError:
        return _error(403, "dev tokens are for loopback clients only")
    try:
        want = msgspec.json.decode(body, type=DevTokenRequest)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeError) as exc:
        return _error(400, f"invalid request: {exc}")
    if not want.username.isprintable():
        return _error(400, "username has control characters")
    user_id = await node.dev_user(want.username)
    token = issue(node.config, user_id, want.username, 86400.0, node.wall())
    return _json(200, {"token": token, "user_id": user_id, "username": want.username})


Handler = Any
_ROUTES: dict[str, tuple[str, Handler]] = {
    "/healthz": ("GET", _healthz),
    "/readyz": ("GET", _readyz),
    "/metrics": ("GET", _metrics),
    "/api/publish": ("POST", _publish),
    "/dev/token": ("POST", _dev_token),
}
_PUBLIC_ROUTES = {k: v for k, v in _ROUTES.items() if k != "/metrics"}
