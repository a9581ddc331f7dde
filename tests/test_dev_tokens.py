"""POST /dev/token: development tokens for any name, off by default, and
refused by the config on a non-loopback host."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import jwt
import pytest

from chatd.config import Config, from_dict
from chatd.errors import ConfigError
from chatd.server import ChatServer
from tests.helpers.clients import connect
from tests.helpers.http_client import HttpReply, http_request
from tests.helpers.servers import running
from tests.helpers.tokens import SECRET

pytestmark = pytest.mark.usefixtures("collect_garbage")


async def dev_token(port: int, body: Any) -> HttpReply:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await http_request(
        port, "POST", "/dev/token", raw, [("content-type", "application/json")]
    )


@pytest.fixture
async def dev_server(make_config: Callable[..., Config]) -> AsyncIterator[ChatServer]:
    async with running(make_config(server={"dev_tokens": True})) as srv:
        yield srv


async def test_off_by_default_is_404(server: ChatServer) -> None:
    reply = await dev_token(server.port, {"username": "zoe"})
    assert reply.status == 404
    assert "token" not in reply.json()


async def test_token_connects_as_that_user(dev_server: ChatServer) -> None:
    reply = await dev_token(dev_server.port, {"username": "zoe"})
    assert reply.status == 200, reply
    assert reply.headers["content-type"] == "application/json"
    body = reply.json()
    assert set(body) == {"token", "user_id", "username"}
    assert body["username"] == "zoe"
    assert isinstance(body["user_id"], int) and body["user_id"] >= 1
    claims = jwt.decode(body["token"], SECRET, algorithms=["HS256"])
    assert claims["user_id"] == body["user_id"]
    assert claims["username"] == "zoe"
    assert claims["exp"] > claims.get("iat", 0)

    async with connect(dev_server, token=body["token"]) as zoe:
        await zoe.join("general")
        sent = await zoe.request("room_message", {"room": "general", "content": "hi"})
        assert sent["type"] == "room_message", sent
        assert sent["data"]["user_id"] == body["user_id"]
        assert sent["data"]["username"] == "zoe"
        assert sent["user_id"] == body["user_id"]


async def test_same_name_same_id_new_name_new_id(dev_server: ChatServer) -> None:
    # A user known from a real token first.
    async with connect(dev_server, 7, "grace") as grace:
        await grace.nothing_pending()
    first = (await dev_token(dev_server.port, {"username": "zoe"})).json()
    again = (await dev_token(dev_server.port, {"username": "zoe"})).json()
    other = (await dev_token(dev_server.port, {"username": "yann"})).json()
    assert again["user_id"] == first["user_id"]
    assert other["user_id"] != first["user_id"]
    assert 7 not in (first["user_id"], other["user_id"])
    # A known name gets its id.
    known = (await dev_token(dev_server.port, {"username": "grace"})).json()
    assert known["user_id"] == 7
    # The new users exist: one can write to the other.
    async with connect(dev_server, token=first["token"]) as zoe:
        sent = await zoe.request(
            "direct_message", {"to_user_id": other["user_id"], "content": "hello yann"}
        )
        assert sent["type"] == "direct_message", sent
        assert sent["data"]["from_user_id"] == first["user_id"]


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"",
        b"[]",
        {},
        {"username": ""},
        {"username": 5},
        {"username": "x" * 65},
        {"username": "bad\nname"},
        {"username": "tab\tname"},
    ],
    ids=[
        "bad-json",
        "empty-body",
        "not-an-object",
        "no-username",
        "empty-username",
        "number",
        "too-long",
        "newline",
        "tab",
    ],
)
async def test_bad_body_is_400(dev_server: ChatServer, body: Any) -> None:
    reply = await dev_token(dev_server.port, body)
    assert reply.status == 400, reply
    payload = reply.json()
    assert "error" in payload and "token" not in payload


async def test_longest_name_is_accepted(dev_server: ChatServer) -> None:
    reply = await dev_token(dev_server.port, {"username": "x" * 64})
    assert reply.status == 200
    async with connect(dev_server, token=reply.json()["token"]) as client:
        await client.nothing_pending()


async def test_dev_token_when_the_largest_user_id_is_taken_still_answers(
    dev_server: ChatServer,
) -> None:
    async with connect(dev_server, 2**63 - 1, "maximal") as client:
        await client.nothing_pending()
    reply = await dev_token(dev_server.port, {"username": "newcomer"})
    if reply.status == 200:
        assert reply.json()["user_id"] < 2**63 - 1
    else:
        assert reply.status >= 500
        assert "error" in reply.json()


async def test_get_is_405(dev_server: ChatServer) -> None:
    reply = await http_request(dev_server.port, "GET", "/dev/token")
    assert reply.status == 405


def _doc(**server: Any) -> dict[str, Any]:
    return {"server": server, "auth": {"jwt_secret": SECRET}}


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::"])
def test_config_refuses_dev_tokens_on_a_public_host(host: str) -> None:
    with pytest.raises(ConfigError, match=r"\[server\] dev_tokens"):
        from_dict(_doc(host=host, dev_tokens=True), source="chatd.toml")
    # The same host without dev tokens is fine.
    assert from_dict(_doc(host=host), source="chatd.toml").server.host == host


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_config_allows_dev_tokens_on_loopback(host: str) -> None:
    config = from_dict(_doc(host=host, dev_tokens=True), source="chatd.toml")
    assert config.server.dev_tokens is True
