"""HTTP clients for the tests, both answering with an ``HttpReply``.

``http_request`` sends one well-formed request on a new connection and reads
the whole response through h11 (which also checks that the server's
response is valid HTTP/1.1). ``RawHttp`` (opened by ``raw_http``) writes
whatever bytes the test gives it (``request_bytes``, garbage, several
requests in one write, an endless head) on one kept-alive connection and
parses each response by hand, so tests can send what h11 never would and see
when the server closes.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import h11
import trio

from tests.helpers.clients import HasPort


@dataclass
class HttpReply:
    """A whole response: status, headers (lower-case names), body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes = b"",
    headers: list[tuple[str, str]] | None = None,
    *,
    time_limit: float | None = 10.0,
) -> HttpReply:
    """Send one request on a new connection (``Connection: close``) and read
    the whole response. ``time_limit`` None: no deadline (on an autojump clock,
    a deadline with nothing else pending is where time jumps to)."""
    conn = h11.Connection(h11.CLIENT)
    head = [("host", f"127.0.0.1:{port}"), ("connection", "close"), *(headers or [])]
    if body or method in ("POST", "PUT"):
        head.append(("content-length", str(len(body))))
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        with trio.fail_after(math.inf if time_limit is None else time_limit):
            out = conn.send(h11.Request(method=method, target=path, headers=head))
            if body:
                out += conn.send(h11.Data(data=body))
            out += conn.send(h11.EndOfMessage())
            await stream.send_all(out)
            response: h11.Response | None = None
            chunks: list[bytes] = []
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:  # pragma: no cover - ConnectionClosed before the end
                    raise AssertionError(f"unexpected {event!r}")
    assert response is not None
    hdrs = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers}
    return HttpReply(response.status_code, hdrs, b"".join(chunks))


def request_bytes(path: str, method: str = "GET", extra: str = "") -> bytes:
    """A request head (``extra``: more header lines, each ending in CRLF)."""
    return f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n".encode()


class RawHttp:
    """Raw bytes out, HTTP/1.1 responses parsed by hand on the way in."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    async def _more(self) -> bool:
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            data = b""
        self.buf += data
        return bool(data)

    async def response(self, *, head_request: bool = False, timeout: float = 5.0) -> HttpReply:  # noqa: ASYNC109
        with trio.fail_after(timeout):
            while b"\r\n\r\n" not in self.buf:
                assert await self._more(), f"EOF before a response: {self.buf!r}"
            head, _, self.buf = self.buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            version, status, *_ = lines[0].split(" ")
            assert version == "HTTP/1.1", lines[0]
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = 0 if head_request else int(headers.get("content-length", "0"))
            while len(self.buf) < length:
                assert await self._more(), "EOF inside a body"
            body, self.buf = self.buf[:length], self.buf[length:]
        return HttpReply(int(status), headers, body)

    async def at_eof(self, timeout: float = 5.0) -> bool:  # noqa: ASYNC109
        """True when the server closes the connection with nothing more to say."""
        with trio.fail_after(timeout):
            more = await self._more()
        return not more and not self.buf


@asynccontextmanager
async def raw_http(server: HasPort) -> AsyncIterator[RawHttp]:
    """A ``RawHttp`` on a new connection to ``server``."""
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        yield RawHttp(stream)
