"""Plain HTTP on the chat port, over a real socket: ``/healthz`` (JSON with
the connection count; HEAD; POST is 405), ``/readyz``, 404 elsewhere,
keep-alive and pipelining, ``Connection: close`` and HTTP/1.0, a garbage
request line, and the bounds on a request's head (16 KiB: 431 or 400) and
body (64 KiB: 413).

Well-formed requests go through ``http_request`` (h11); what h11 would not
send (pipelined requests, an endless head, garbage) goes through ``RawHttp``
(both in ``tests/helpers/http_client.py``). ``/readyz`` during a drain is in
``tests/test_shutdown.py``.
"""

from __future__ import annotations

import json

import pytest
import trio
import trio.lowlevel

from chatd.server import ChatServer
from tests.helpers.clients import connect
from tests.helpers.http_client import http_request, raw_http, request_bytes

pytestmark = pytest.mark.usefixtures("collect_garbage")


async def test_healthz_is_200_json_with_connection_count(server: ChatServer) -> None:
    reply = await http_request(server.port, "GET", "/healthz")
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    body = reply.json()
    assert body["status"] == "ok"
    assert isinstance(body["version"], str) and body["version"]
    assert body["connections"] == 0
    async with connect(server, 1, "alice") as alice:
        await alice.nothing_pending()
        assert (await http_request(server.port, "GET", "/healthz")).json()["connections"] == 1


async def test_healthz_head_has_no_body(server: ChatServer) -> None:
    async with raw_http(server) as http:
        await http.stream.send_all(request_bytes("/healthz", "HEAD"))
        resp = await http.response(head_request=True)
        assert resp.status == 200
        assert int(resp.headers["content-length"]) > 0  # the GET body's length
        # Nothing follows the head: a second request on the same connection
        # is answered by a response that starts right there.
        await http.stream.send_all(request_bytes("/healthz"))
        again = await http.response()
    assert again.status == 200
    assert json.loads(again.body)["status"] == "ok"


async def test_healthz_post_is_405(server: ChatServer) -> None:
    async with raw_http(server) as http:
        await http.stream.send_all(
            request_bytes("/healthz", "POST", "Content-Length: 2\r\n") + b"{}"
        )
        resp = await http.response()
    assert resp.status == 405
    assert "GET" in resp.headers["allow"]


async def test_readyz_is_200_ready(server: ChatServer) -> None:
    reply = await http_request(server.port, "GET", "/readyz")
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == {"status": "ready"}


async def test_readyz_post_is_405(server: ChatServer) -> None:
    reply = await http_request(server.port, "POST", "/readyz")
    assert reply.status == 405


async def test_unknown_path_is_404(server: ChatServer) -> None:
    async with raw_http(server) as http:
        await http.stream.send_all(request_bytes("/other"))
        resp = await http.response()
    assert resp.status == 404
    assert json.loads(resp.body) == {"error": "not found"}


async def test_keep_alive_answers_two_requests(server: ChatServer) -> None:
    async with raw_http(server) as http:
        await http.stream.send_all(request_bytes("/healthz"))
        first = await http.response()
        await http.stream.send_all(request_bytes("/other"))
        second = await http.response()
        # Pipelined: both requests in one write, both answered in order.
        await http.stream.send_all(request_bytes("/other") + request_bytes("/healthz"))
        third = await http.response()
        fourth = await http.response()
    assert (first.status, second.status, third.status, fourth.status) == (200, 404, 404, 200)


async def test_connection_close_is_honoured(server: ChatServer) -> None:
    async with raw_http(server) as http:
        await http.stream.send_all(request_bytes("/healthz", extra="Connection: close\r\n"))
        resp = await http.response()
        assert resp.status == 200
        assert await http.at_eof()


async def test_http_1_0_request_is_answered_then_closed(server: ChatServer) -> None:
    async with raw_http(server) as http:
        await http.stream.send_all(b"GET /healthz HTTP/1.0\r\n\r\n")
        resp = await http.response()
        assert resp.status == 200
        assert json.loads(resp.body)["status"] == "ok"
        assert await http.at_eof()


async def test_garbage_request_line_is_400(server: ChatServer) -> None:
    async with raw_http(server) as http:
        await http.stream.send_all(b"THIS IS NOT HTTP\r\n\r\n")
        resp = await http.response()
        assert resp.status == 400
        assert await http.at_eof()


async def test_oversized_incomplete_request_head_is_refused_and_closed(server: ChatServer) -> None:
    """20 KiB of head and still no blank line: refused without waiting for more."""
    partial = request_bytes("/healthz", extra="X-Big: " + "a" * 20000 + "\r\n")[:-2]
    async with raw_http(server) as http:
        await http.stream.send_all(partial)
        resp = await http.response()
        assert resp.status in (400, 431)
        assert await http.at_eof()


async def test_huge_request_head_is_refused_and_closed(server: ChatServer) -> None:
    big = "".join(f"X-Big-{n}: {'a' * 1000}\r\n" for n in range(200))
    async with raw_http(server) as http:
        try:
            await http.stream.send_all(request_bytes("/healthz", extra=big))
        except trio.BrokenResourceError:
            pass  # the server may stop reading (and close) before the end
        resp = await http.response()
        assert resp.status in (400, 431)
        assert await http.at_eof()


async def test_oversized_request_head_is_refused_and_closed(server: ChatServer) -> None:
    """A whole 20 KiB head in one write (so one read on the server): h11
    alone bounds only an incomplete head; the server must measure this one."""
    big = "X-Big: " + "a" * 20000 + "\r\n"
    async with raw_http(server) as http:
        await http.stream.send_all(request_bytes("/healthz", extra=big))
        resp = await http.response()
        assert resp.status in (400, 431)
        assert await http.at_eof()


async def test_oversized_request_body_is_refused(server: ChatServer) -> None:
    body = b"a" * 70000
    async with raw_http(server) as http:
        await http.stream.send_all(
            request_bytes("/healthz", "POST", f"Content-Length: {len(body)}\r\n") + body
        )
        resp = await http.response()
        assert resp.status == 413
        assert await http.at_eof()


async def test_readyz_says_saturated_while_writes_pile_up(
    server: ChatServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past ``SATURATED`` writes waiting for the store (here 5, with the
    writer held), /readyz is 503 "saturated" so a load balancer steers new
    connections elsewhere; once they are committed, ready again. The
    queue's length is a metric too."""
    import chatd.routes
    from tests.helpers.store import writer_held

    monkeypatch.setattr(chatd.routes, "SATURATED", 5)
    store = server.ctx.store
    async with connect(server, 1, "alice") as alice:
        await alice.join("general")
        async with writer_held(store):
            for i in range(6):
                await alice.send("room_message", {"room": "general", "content": f"m{i}"})
            while store.backlog < 6:  # the session's handlers queue them
                await trio.lowlevel.checkpoint()
            reply = await http_request(server.port, "GET", "/readyz")
            assert reply.status == 503
            assert reply.json() == {"status": "saturated", "queued": store.backlog}
            get = server.metrics.registry.get_sample_value
            assert get("chatd_store_queued") == store.backlog
        await store.flush()
        assert (await http_request(server.port, "GET", "/readyz")).status == 200
