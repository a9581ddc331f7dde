"""``[server] allowed_origins``: the pure check (``chatd.origins``), the
config's refusal of what is not an origin, and the handshake over a real
socket: a page of another origin gets 403 before the upgrade (and a log
line), a listed one, a request without ``Origin`` and, on a loopback
server, the server's own page are upgraded."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
from wsproto.events import AcceptConnection, RejectConnection

from chatd.config import Config, from_dict
from chatd.errors import ConfigError
from chatd.origins import allowed
from tests.helpers.raw import RawWS, tcp_connect
from tests.helpers.servers import running
from tests.helpers.tokens import SECRET, make_token

PATTERNS = ("https://chat.example.com", "https://*.example.org", "http://localhost:*")


@pytest.mark.parametrize(
    ("origin", "expected"),
    [
        (None, True),  # not a browser
        ("https://chat.example.com", True),
        ("HTTPS://Chat.Example.COM", True),
        ("https://chat.example.com:443", False),  # another origin (the port counts)
        ("http://chat.example.com", False),  # another scheme
        ("https://chat.example.com.evil.net", False),
        ("https://evil.net", False),
        ("https://a.example.org", True),
        ("https://a.b.example.org", True),
        ("https://example.org", False),  # "*." needs something before the dot
        ("https://evil.net/x.example.org", False),  # "*" never spans a "/"
        ("http://localhost:3000", True),
        ("http://localhost", False),
        ("null", False),
        ("", False),
    ],
)
def test_patterns(origin: str | None, expected: bool) -> None:
    assert allowed(origin, PATTERNS, loopback=False) is expected


def test_unset_lets_every_origin_through_and_star_too() -> None:
    assert allowed("https://evil.net", (), loopback=False)
    assert allowed("https://evil.net", ("*",), loopback=False)
    assert allowed("null", ("null",), loopback=False)


def test_a_loopback_server_lets_its_own_pages_through() -> None:
    for origin in ("http://127.0.0.1:8080", "http://localhost:5173", "http://[::1]:8080"):
        assert allowed(origin, ("https://chat.example.com",), loopback=True), origin
        assert not allowed(origin, ("https://chat.example.com",), loopback=False), origin
    assert not allowed("http://127.0.0.1.evil.net", ("https://x.y",), loopback=True)


@pytest.mark.parametrize(
    "bad", ["chat.example.com", "https://chat.example.com/", "ftp://x", "https://", "*.example.com"]
)
def test_the_config_refuses_what_is_not_an_origin(bad: str) -> None:
    doc: dict[str, Any] = {"auth": {"jwt_secret": SECRET}, "server": {"allowed_origins": [bad]}}
    with pytest.raises(ConfigError, match=r"\[server\] allowed_origins: .* is not an origin"):
        from_dict(doc, source="t.toml")


async def upgrade(port: int, origin: str | None) -> tuple[int, Any]:
    """An upgrade request with this ``Origin``: the status and wsproto's event."""
    headers = [] if origin is None else [(b"origin", origin.encode())]
    stream = await tcp_connect(port)
    async with stream:
        client = RawWS(stream)
        event = await client.handshake(
            port, f"/ws/chat?token={make_token(1, 'alice')}", extra_headers=headers
        )
        return client.status, event


async def test_the_handshake_refuses_other_origins_with_403(
    make_config: Callable[..., Config], caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(server={"host": "127.0.0.1", "port": 0, "allowed_origins": list(PATTERNS)})
    caplog.set_level(logging.WARNING, logger="chatd")
    async with running(config) as server:
        status, event = await upgrade(server.port, "https://evil.net")
        assert status == 403 and isinstance(event, RejectConnection)
        assert "WS_REJECT: Origin=https://evil.net, IP=127.0.0.1" in caplog.text
        for origin in ("https://chat.example.com", "https://a.example.org", None):
            status, event = await upgrade(server.port, origin)
            assert status == 101 and isinstance(event, AcceptConnection), origin
        # the server listens on loopback: its own page's origin is let through
        status, _ = await upgrade(server.port, f"http://127.0.0.1:{server.port}")
        assert status == 101
    # the four upgraded only
    assert server.metrics.registry.get_sample_value("chatd_connects_total") == 4


async def test_unset_every_origin_is_upgraded(server: Any) -> None:
    status, _ = await upgrade(server.port, "https://evil.net")
    assert status == 101
