"""A webhook receiver for the tests: a real HTTP/1.1 server on a socket (h11)
in the test's Trio run, which records every request and answers each one
as the test scripted it: a status (and headers), or a stall, or a closed
connection."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import h11
import trio


@dataclass
class Request:
    headers: dict[str, str]
    body: bytes
    #: When it arrived (Trio's clock).
    at: float = 0.0

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    port: int = 0
    #: Every request received, in order.
    requests: list[Request] = field(default_factory=list)
    #: The answers to give, in order: a status, (status, headers), "stall"
    #: (no answer until the client gives up) or "close"; then 200 each time.
    script: deque[Any] = field(default_factory=deque)
    #: Set on each request.
    arrived: trio.Event = field(default_factory=trio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    async def wait_for(self, count: int) -> list[Request]:
        """Until ``count`` requests have come; all of them."""
        while len(self.requests) < count:
            self.arrived = trio.Event()
            await self.arrived.wait()
        return self.requests

    async def serve(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        async with stream:
            while True:
                request: h11.Request | None = None
                body = b""
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        conn.receive_data(data)
                        continue
                    if isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += bytes(event.data)
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        return
                assert request is not None
                headers = {k.decode().lower(): v.decode() for k, v in request.headers}
                self.requests.append(Request(headers, body, trio.current_time()))
                self.arrived.set()
                answer = self.script.popleft() if self.script else 200
                if answer == "stall":
                    await trio.sleep_forever()
                if answer == "close":
                    return
                status, extra = answer if isinstance(answer, tuple) else (answer, [])
                reply = [(b"content-length", b"0"), *((k.encode(), v.encode()) for k, v in extra)]
                await stream.send_all(conn.send(h11.Response(status_code=status, headers=reply)))
                await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()


@asynccontextmanager
async def receiving() -> AsyncIterator[Receiver]:
    """A receiver listening on 127.0.0.1 for the block."""
    receiver = Receiver()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, receiver.serve, 0, host="127.0.0.1")
        )
        receiver.port = listeners[0].socket.getsockname()[1]
        yield receiver
        nursery.cancel_scope.cancel()
