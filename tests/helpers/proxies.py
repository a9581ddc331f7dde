"""One TCP forwarder, for putting a link of the test's own between a client
and a server, and its uses.

A ``Forwarder`` listens on 127.0.0.1 (a port of its own) and forwards each
connection it accepts to ``upstream()``, bytes unchanged both ways. The test
can ``cut()`` it (every connection closed, the port no longer listening) and
``restore()`` it (listening again on the same port): a server that becomes
unreachable, without stopping a server other tests share. Both act at once:
the sockets are closed before ``cut()`` returns.

* ``tcp_proxy(host, port)``: a ``TcpProxy`` to one server (PostgreSQL, Redis);
  ``dsn_via`` points a PostgreSQL DSN at it.
* ``redis_link(host, port)``: a ``RedisLink``, whose pub/sub deliveries can be
  held back and released (a bus link that lags, made deterministic).
* ``tests.helpers.cluster.LoadBalancer``: round robin over a cluster's nodes.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import trio


class Pipe:
    """One forwarded connection: the client's socket and the upstream one,
    closed together."""

    def __init__(self, forwarder: Forwarder, client: trio.SocketStream) -> None:
        self.forwarder = forwarder
        self.client = client
        self.upstream: trio.SocketStream | None = None
        self.scope = trio.CancelScope()

    def cut(self) -> None:
        """Close both ends now (tasks blocked on them wake up)."""
        self.client.socket.close()
        if self.upstream is not None:
            self.upstream.socket.close()
        self.scope.cancel()

    async def run(self) -> None:
        """Connect upstream, then forward both ways until either side ends;
        close both."""
        try:
            with self.scope:
                try:
                    self.upstream = await self.forwarder.upstream()
                except OSError:
                    return
                if self.upstream is None:
                    return
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, self.client, self.upstream, nursery.cancel_scope)
                    nursery.start_soon(self._pump, self.upstream, self.client, nursery.cancel_scope)
        finally:
            self.forwarder.pipes.discard(self)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.client)
                if self.upstream is not None:
                    await trio.aclose_forcefully(self.upstream)

    async def _pump(
        self, src: trio.SocketStream, dst: trio.SocketStream, done: trio.CancelScope
    ) -> None:
        down = src is self.upstream
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await src.receive_some(65536):
                await self.forwarder.passing(self, data, down=down)
                await dst.send_all(data)
        done.cancel()


class Forwarder:
    """Accepts on 127.0.0.1:``port``; forwards each connection to
    ``upstream()``. Tasks run in ``nursery``; nothing listens until the first
    ``restore()``."""

    def __init__(self, nursery: trio.Nursery) -> None:
        #: Where clients connect (fixed by the first ``restore()``).
        self.port = 0
        #: Connections accepted so far.
        self.accepted = 0
        #: The connections being forwarded.
        self.pipes: set[Pipe] = set()
        self._nursery = nursery
        self._listener: trio.socket.SocketType | None = None
        self._serving = trio.CancelScope()

    async def upstream(self) -> trio.SocketStream | None:
        """A new connection to where this forwards (None, or OSError: the
        client's connection is closed)."""
        raise NotImplementedError

    async def passing(self, pipe: Pipe, data: bytes, *, down: bool) -> None:
        """Called with each chunk before it is passed on (``down``: from
        upstream to the client); may wait to hold it back."""

    def cut(self) -> None:
        """Close every connection and stop listening."""
        self._serving.cancel()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for pipe in list(self.pipes):
            pipe.cut()

    def restore(self) -> None:
        """Listen (again, on the same port) and forward new connections."""
        if self._listener is not None:
            return
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(128)
        self.port = sock.getsockname()[1]
        self._listener = trio.socket.from_stdlib_socket(sock)
        self._serving = trio.CancelScope()
        self._nursery.start_soon(self._serve, self._listener, self._serving)

    async def _serve(self, listener: trio.socket.SocketType, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                try:
                    conn, _ = await listener.accept()
                except (OSError, trio.ClosedResourceError):  # closed by cut()
                    return
                self.accepted += 1
                pipe = Pipe(self, trio.SocketStream(conn))
                self.pipes.add(pipe)
                self._nursery.start_soon(pipe.run)


F = TypeVar("F", bound=Forwarder)


@contextlib.asynccontextmanager
async def forwarding(make: Callable[[trio.Nursery], F]) -> AsyncIterator[F]:
    """The forwarder ``make(nursery)`` makes, listening for the block; cut
    (every connection closed) at its end."""
    async with trio.open_nursery() as nursery:
        forwarder = make(nursery)
        forwarder.restore()
        try:
            yield forwarder
        finally:
            forwarder.cut()
            nursery.cancel_scope.cancel()


# --- to one server ------------------------------------------------------------------


class TcpProxy(Forwarder):
    """Forwards to ``host:port``."""

    def __init__(self, nursery: trio.Nursery, host: str, port: int) -> None:
        super().__init__(nursery)
        self.host = host
        self.target_port = port

    async def upstream(self) -> trio.SocketStream | None:
        return await trio.open_tcp_stream(self.host, self.target_port)


def tcp_proxy(host: str, port: int) -> contextlib.AbstractAsyncContextManager[TcpProxy]:
    """A ``TcpProxy`` to ``host:port`` for the block (listening at once)."""
    return forwarding(lambda nursery: TcpProxy(nursery, host, port))


def dsn_via(dsn: str, port: int) -> str:
    """``dsn`` with its host and port replaced by 127.0.0.1:``port``."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    info = conninfo_to_dict(dsn)
    info.update(host="127.0.0.1", port=str(port))
    return make_conninfo(**info)


class RedisLink(TcpProxy):
    """A node's way to Redis whose pub/sub deliveries can be held back: after
    ``hold()``, what Redis sends on a connection that subscribed waits (in
    order) until ``release()``; commands and their replies go on. A bus link
    that lags, made deterministic."""

    def __init__(self, nursery: trio.Nursery, host: str, port: int) -> None:
        super().__init__(nursery, host, port)
        self.held = False
        self._released = trio.Event()
        #: The connections on which the client subscribed (Redis pub/sub).
        self._subscribers: set[Pipe] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def hold(self) -> None:
        self.held = True
        self._released = trio.Event()

    def release(self) -> None:
        self.held = False
        self._released.set()

    async def passing(self, pipe: Pipe, data: bytes, *, down: bool) -> None:
        if not down and b"SUBSCRIBE" in data.upper():
            self._subscribers.add(pipe)
        if down and pipe in self._subscribers and self.held:
            await self._released.wait()


@contextlib.asynccontextmanager
async def redis_link(host: str, port: int) -> AsyncIterator[RedisLink]:
    """A ``RedisLink`` to the Redis at ``host:port`` for the block."""
    async with forwarding(lambda nursery: RedisLink(nursery, host, port)) as link:
        try:
            yield link
        finally:
            link.release()
