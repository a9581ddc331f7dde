"""The upgrade request read directly (``transport.upgrade``) against h11 and
wsproto's handshake, which read every other one.

For every request ``read_upgrade`` takes, h11 must read the same request
(target, headers in order, the bytes after it), chatd's HTTP layer must see
an upgrade in it, and the gate must answer it exactly as through wsproto
(``handshake.open_direct`` against ``handshake.open_wsproto``): the same 101
byte for byte, the same permessage-deflate state and extensions in the frame
parser, the same query; or the same refusal. Checked for the requests of
browsers and client libraries, for odd ones, and for random ones
(hypothesis); and over a socket, where a request whose head comes in two
reads takes h11's path and must get the same 101 as when whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import h11
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatd.config import Config, from_dict
from chatd.handshake import open_direct, open_wsproto
from chatd.server import ChatServer
from chatd.transport import http
from chatd.transport.extensions import BoundedDeflate
from chatd.transport.http import MAX_HEAD_BYTES, Response, head_size, is_websocket_upgrade
from chatd.transport.upgrade import MAX_HEAD, read_upgrade
from tests.helpers.servers import running
from tests.helpers.tokens import SECRET, make_token

pytestmark = pytest.mark.usefixtures("collect_garbage")

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
CONFIGS = {
    "deflate": from_dict({"auth": {"jwt_secret": SECRET}}),
    "plain": from_dict({"auth": {"jwt_secret": SECRET}, "server": {"compression": False}}),
}


def head(*lines: bytes, target: bytes = b"/ws/chat?token=t", trailing: bytes = b"") -> bytes:
    return (
        b"GET "
        + target
        + b" HTTP/1.1\r\n"
        + b"".join(ln + b"\r\n" for ln in lines)
        + b"\r\n"
        + trailing
    )


BASE = (
    b"Host: localhost:8080",
    b"Upgrade: websocket",
    b"Connection: Upgrade",
    b"Sec-WebSocket-Key: " + KEY,
    b"Sec-WebSocket-Version: 13",
)

#: Requests as clients send them: each must be read directly.
COMMON = {
    "minimal": head(*BASE),
    "bench-client": (
        b"GET /ws/chat?token=abc HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: " + KEY + b"\r\n"
        b"Sec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n"
    ),
    "chrome": head(
        b"Host: chat.example.com",
        b"Connection: Upgrade",
        b"Pragma: no-cache",
        b"Cache-Control: no-cache",
        b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)"
        b" Chrome/120.0.0.0 Safari/537.36",
        b"Upgrade: websocket",
        b"Origin: https://chat.example.com",
        b"Sec-WebSocket-Version: 13",
        b"Accept-Encoding: gzip, deflate, br",
        b"Accept-Language: en-US,en;q=0.9",
        b"Cookie: session=abc; theme=dark",
        b"Sec-WebSocket-Key: " + KEY,
        b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
    ),
    "firefox": head(
        b"Host: chat.example.com",
        b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0",
        b"Accept: */*",
        b"Accept-Language: en-US,en;q=0.5",
        b"Accept-Encoding: gzip, deflate, br",
        b"Sec-WebSocket-Version: 13",
        b"Origin: https://chat.example.com",
        b"Sec-WebSocket-Extensions: permessage-deflate",
        b"Sec-WebSocket-Key: " + KEY,
        b"Connection: keep-alive, Upgrade",
        b"Sec-Fetch-Dest: empty",
        b"Sec-Fetch-Mode: websocket",
        b"Sec-Fetch-Site: same-origin",
        b"Pragma: no-cache",
        b"Cache-Control: no-cache",
        b"Upgrade: websocket",
    ),
    "node-ws": head(
        b"Sec-WebSocket-Version: 13",
        b"Sec-WebSocket-Key: " + KEY,
        b"Connection: Upgrade",
        b"Upgrade: websocket",
        b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
        b"Host: 127.0.0.1:8080",
    ),
    "python-websockets": head(
        b"Host: 127.0.0.1:8080",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Key: " + KEY,
        b"Sec-WebSocket-Version: 13",
        b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
        b"User-Agent: Python/3.11 websockets/12.0",
    ),
    "bearer-and-forwarded": head(
        *BASE,
        b"Authorization: Bearer abc.def.ghi",
        b"X-Forwarded-For: 203.0.113.7, 10.0.0.2",
        b"X-Real-IP: 203.0.113.7",
        target=b"/ws/chat?batch=1",
    ),
    "subprotocol-deflate": head(*BASE, b"Sec-WebSocket-Protocol: permessage-deflate"),
    "subprotocols-two-headers": head(
        *BASE, b"Sec-WebSocket-Protocol: chat", b"Sec-WebSocket-Protocol: permessage-deflate"
    ),
    "small-window": head(
        *BASE, b"Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=9"
    ),
    "no-context-takeover": head(
        *BASE,
        b"Sec-WebSocket-Extensions: permessage-deflate; client_no_context_takeover;"
        b" server_no_context_takeover; client_max_window_bits=12",
    ),
    "two-deflate-offers": head(
        *BASE,
        b"Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=10,"
        b" permessage-deflate",
    ),
    "offer-out-of-range": head(
        *BASE, b"Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=8"
    ),
    "offer-not-a-number": head(
        *BASE, b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits=abc"
    ),
    "declined-offer-then-plain": head(
        *BASE,
        b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits=9;"
        b" server_max_window_bits=8, permessage-deflate",
    ),
    "offer-unknown-parameter": head(
        *BASE, b"Sec-WebSocket-Extensions: permessage-deflate; x_extra=1, permessage-deflate"
    ),
    "offer-flag-with-a-value": head(
        *BASE, b"Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover=1"
    ),
    "offer-quoted-window": head(
        *BASE, b'Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits="10"'
    ),
    "other-extensions": head(
        *BASE, b"Sec-WebSocket-Extensions: x-webkit-deflate-frame, x-chatd-size-guard, ,"
    ),
    "odd-case-and-spaces": head(
        b"HOST:   localhost  ",
        b"upgrade:WebSocket",
        b"CONNECTION: keep-alive ,\tUPGRADE",
        b"sec-websocket-key:" + KEY,
        b"Sec-Websocket-Version: 13\t",
    ),
    "empty-key": head(*BASE[:3], b"Sec-WebSocket-Key:", BASE[4]),
    "frame-after-the-head": head(*BASE, trailing=b"\x81\x84abcd\x00\x00\x00\x00"),
    "other-path": head(*BASE, target=b"/ws/other"),
    "path-with-params": head(*BASE, target=b"/ws/chat;x=1?token=t"),
    "query-with-question-marks": head(*BASE, target=b"/ws/chat?token=a?b&batch=1"),
}

#: Requests left to h11 and wsproto (``read_upgrade`` says None).
LEFT = {
    "http-1.0": head(*BASE).replace(b"HTTP/1.1", b"HTTP/1.0", 1),
    "head-method": b"HEAD" + head(*BASE)[3:],
    "network-path": head(*BASE, target=b"//evil/ws/chat"),
    "fragment": head(*BASE, target=b"/ws/chat#x"),
    "ipv6-target": head(*BASE, target=b"//["),
    "two-keys": head(*BASE, b"Sec-WebSocket-Key: " + KEY),
    "two-hosts": head(*BASE, b"Host: other"),
    "two-connections": head(*BASE, b"Connection: close"),
    "no-host": head(*BASE[1:]),
    "no-key": head(*BASE[:3], BASE[4]),
    "no-version": head(*BASE[:4]),
    "version-8": head(*BASE[:4], b"Sec-WebSocket-Version: 8"),
    "not-websocket": head(BASE[0], b"Upgrade: h2c", *BASE[2:]),
    "no-upgrade-token": head(BASE[0], BASE[1], b"Connection: keep-alive", *BASE[3:]),
    "idna-host": head(b"Host: xn--zz", *BASE[1:]),
    "obs-text": head(*BASE, b"Cookie: caf\xe9"),
    "control-character": head(*BASE, b"X-Odd: a\x01b"),
    "non-ascii-connection": head(BASE[0], BASE[1], b"Connection: Upgrade, \xff", *BASE[3:]),
    "folded-line": head(*BASE, b"X-Long: a", b" b"),
    "content-length": head(*BASE, b"Content-Length: 0"),
    "chunked": head(*BASE, b"Transfer-Encoding: chunked"),
    "bare-lf": head(*BASE).replace(b"\r\n", b"\n"),
    "leading-crlf": b"\r\n" + head(*BASE),
    "space-before-colon": head(*BASE, b"X-Odd : a"),
    "incomplete": head(*BASE)[:-2],
    "too-large-here": head(*BASE, b"X-Pad: " + b"a" * MAX_HEAD),
}


def h11_read(data: bytes) -> tuple[h11.Request, bytes]:
    """The request as chatd's HTTP layer reads it with h11."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    conn.receive_data(data)
    event = conn.next_event()
    assert isinstance(event, h11.Request), event
    assert head_size(event) <= MAX_HEAD_BYTES
    trailing, _ = conn.trailing_data
    return event, bytes(trailing)


def deflate_state(deflate: BoundedDeflate | None) -> Any:
    if deflate is None:
        return None
    return (
        deflate.enabled(),
        deflate.client_max_window_bits,
        deflate.server_max_window_bits,
        deflate.client_no_context_takeover,
        deflate.server_no_context_takeover,
    )


def answer(opened: Any) -> Any:
    """What a client and the connection get from an ``open_*`` result."""
    if isinstance(opened, Response):
        return ("refused", opened.status, opened.body, opened.headers)
    wire, accept, deflate, query = opened
    extensions = [
        (type(e).__name__, deflate_state(e) if e is deflate else None)
        for e in wire._parser().extensions  # (the parser it makes when needed)
    ]
    return ("accepted", accept, deflate_state(deflate), extensions, query, wire.state)


def assert_read_alike(data: bytes) -> None:
    """``data`` is read directly; h11 and wsproto read it and answer it alike."""
    direct = read_upgrade(data)
    assert direct is not None
    request, trailing = direct
    reference, reference_trailing = h11_read(data)
    assert request.target == reference.target
    assert request.headers == list(reference.headers)
    assert trailing == reference_trailing
    assert is_websocket_upgrade(reference)
    for config in CONFIGS.values():
        assert answer(open_direct(config, request)) == answer(open_wsproto(config, reference))


@pytest.mark.parametrize("data", COMMON.values(), ids=COMMON.keys())
def test_common_requests_are_read_directly_and_answered_as_wsproto_does(data: bytes) -> None:
    assert_read_alike(data)


@pytest.mark.parametrize("data", LEFT.values(), ids=LEFT.keys())
def test_odd_requests_are_left_to_h11_and_wsproto(data: bytes) -> None:
    assert read_upgrade(data) is None


def test_the_101_is_wsprotos_byte_for_byte() -> None:
    """RFC 6455's own example key, and every header the 101 can carry."""
    data = head(
        *BASE,
        b"Sec-WebSocket-Protocol: chat, permessage-deflate",
        b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
    )
    read = read_upgrade(data)
    assert read is not None
    opened = open_direct(CONFIGS["deflate"], read[0])
    assert not isinstance(opened, Response)
    assert opened[1] == (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
        b"Sec-WebSocket-Protocol: permessage-deflate\r\n"
        b"Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover;"
        b" client_max_window_bits=15\r\n"
        b"\r\n"
    )
    assert_read_alike(data)


# --- random requests ------------------------------------------------------------


def _cases(*values: bytes) -> st.SearchStrategy[bytes]:
    return st.sampled_from(values)


def _mostly(good: bytes, *odd: bytes) -> st.SearchStrategy[bytes]:
    """``good`` nine times in ten, else one of ``odd``."""
    return st.sampled_from([good] * 9 * max(1, len(odd)) + list(odd))


# Each request is mostly well formed, with now and then one odd part or two:
# enough of them are read directly to compare, and the odd parts meet the
# direct reading's refusals and wsproto's quirks.
_VALUES: dict[str, st.SearchStrategy[bytes]] = {
    "Host": _mostly(
        b"127.0.0.1:8080",
        b"chat.example.com",
        b"xn--bcher-kva.example",
        b"xn--zz",
        b"XN--x",
        b"",
        b"h\xffst",
    ),
    "Upgrade": _mostly(b"websocket", b"WebSocket", b"websocket2", b"h2c", b"websocket, h2c"),
    "Connection": _mostly(
        b"Upgrade",
        b"upgrade",
        b"keep-alive, Upgrade",
        b"keep-alive,upgrade",
        b"close",
        b"Upgrade, \xff",
        b"upgradex",
        b",Upgrade,",
    ),
    "Sec-WebSocket-Key": _mostly(KEY, b"", b"x", b"abc def"),
    "Sec-WebSocket-Version": _mostly(b"13", b"8", b"13, 8", b""),
    "Sec-WebSocket-Extensions": _cases(
        b"permessage-deflate",
        b"permessage-deflate; client_max_window_bits",
        b"permessage-deflate; server_max_window_bits=9",
        b"permessage-deflate; client_max_window_bits=abc",
        b"permessage-deflate; server_max_window_bits=8",
        b"permessage-deflate; client_no_context_takeover; server_no_context_takeover",
        b"permessage-deflate;client_max_window_bits=10;server_max_window_bits=12",
        b"permessage-deflate, permessage-deflate; client_max_window_bits=10",
        b"permessage-deflate; server_max_window_bits=10, permessage-deflate",
        b"permessage-deflate ; client_max_window_bits = 11",
        b"x-webkit-deflate-frame",
        b"x-chatd-size-guard",
        b",",
        b"permessage-deflate; caf\xe9",
    ),
    "Sec-WebSocket-Protocol": _cases(
        b"chat", b"permessage-deflate", b"chat, permessage-deflate", b"", b"\xe9"
    ),
    "Authorization": _cases(b"Bearer abc.def.ghi", b"bearer x", b"Basic dXNlcjpwYXNz"),
    "X-Forwarded-For": _cases(b"203.0.113.7", b"203.0.113.7, 10.0.0.2"),
    "Origin": _cases(b"https://chat.example.com"),
    "Cookie": _mostly(b"a=b", b"caf\xe9=1", b"a\x01b"),
    "Content-Length": _cases(b"0", b"5"),
    "Transfer-Encoding": _cases(b"chunked"),
}
_REQUIRED = ("Host", "Upgrade", "Connection", "Sec-WebSocket-Key", "Sec-WebSocket-Version")
_EXTRA = st.sampled_from(
    ["Sec-WebSocket-Extensions"] * 6
    + ["Sec-WebSocket-Protocol"] * 3
    + ["Authorization", "X-Forwarded-For", "Origin", "Cookie"] * 2
    + ["Content-Length", "Transfer-Encoding"]
    + list(_REQUIRED)  # a second one
)


@st.composite
def _requests(draw: st.DrawFn) -> bytes:
    method = draw(_mostly(b"GET", b"HEAD", b"POST", b"get"))
    target = draw(
        _mostly(
            b"/ws/chat?token=abc",
            b"/ws/chat",
            b"/ws/chat?token=a%20b&batch=1",
            b"/ws/chat?batch=1&token=x&token=y",
            b"/ws/chat?x#y",
            b"/ws/chat;p=1",
            b"//host/ws/chat",
            b"/other",
            b"/",
        )
    )
    version = draw(_mostly(b"HTTP/1.1", b"HTTP/1.0"))
    names = [n for n in _REQUIRED if draw(st.integers(0, 29))]  # each missing once in 30
    names += draw(st.lists(_EXTRA, max_size=3))
    names = draw(st.permutations(names))
    lines = []
    for name in names:
        spelled = draw(_cases(name.encode(), name.lower().encode(), name.upper().encode()))
        before = draw(_cases(b" ", b" ", b"", b"\t", b"  "))
        after = draw(_cases(b"", b"", b"", b" ", b"\t"))
        lines.append(spelled + b":" + before + draw(_VALUES[name]) + after)
    if lines and not draw(st.integers(0, 29)):
        lines.insert(draw(st.integers(0, len(lines))), b" folded")
    eol = draw(_mostly(b"\r\n", b"\n"))
    data = method + b" " + target + b" " + version + eol + b"".join(ln + eol for ln in lines) + eol
    return data + draw(_cases(b"", b"\x81\x80abcd", b"GET / HTTP/1.1\r\n\r\n"))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_requests())
def test_any_request_read_directly_is_read_and_answered_alike(data: bytes) -> None:
    if read_upgrade(data) is not None:
        assert_read_alike(data)


# --- over a socket: the same 101 either way -----------------------------------------


async def _handshake(server: ChatServer, request: bytes, split: int | None) -> bytes:
    """Send ``request`` (in two writes, the first ``split`` bytes, the
    server reading the first alone), read the response head, then check
    that the session runs (a ping gets its pong)."""
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        if split is None:
            await stream.send_all(request)
        else:
            await stream.send_all(request[:split])
            await trio.testing.wait_all_tasks_blocked()
            await stream.send_all(request[split:])
        data = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in data:
                more = await stream.receive_some(65536)
                assert more, data
                data += more
            response, _, frames = data.partition(b"\r\n\r\n")
            await stream.send_all(b"\x89\x80abcd")
            while b"\x8a" not in frames:
                more = await stream.receive_some(65536)
                assert more, frames
                frames += more
    return response


@pytest.mark.parametrize(
    "name", ["minimal", "chrome", "no-context-takeover", "subprotocol-deflate"]
)
async def test_a_head_in_two_reads_takes_h11s_path_to_the_same_101(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    direct: list[bool] = []

    def spy(data: bytes) -> Any:
        read = read_upgrade(data)
        direct.append(read is not None)
        return read

    monkeypatch.setattr(http, "read_upgrade", spy)
    request = COMMON[name].replace(b"token=t", b"token=" + make_token().encode(), 1)
    async with running(make_config()) as server:
        whole = await _handshake(server, request, None)
        halves = await _handshake(server, request, 40)
    assert direct == [True, False]  # whole: read directly; in two reads: h11's
    assert whole.startswith(b"HTTP/1.1 101 ")
    assert halves == whole
