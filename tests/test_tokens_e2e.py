"""Hostile tokens end to end, over a real socket, where the unit tests of
``tests/test_auth.py`` and the end-to-end cases of ``tests/test_chat.py``
(missing, garbage, truncated, expired, nbf, ill-typed/negative/huge ids, no
exp, wrong signature, alg none on HS256) leave off:

* an RS256 server (its key made in ``tmp_path``) refusing key confusion (an
  HS256 token whose HMAC key is the server's public PEM), ``alg: none``, an
  HS256 token with a shared secret, and another key's RS256 signature;
* ``[auth] issuer`` / ``audience`` configured: missing or wrong ``iss``/``aud``;
* an 8 KB token, validly signed (refused: ``MAX_TOKEN_LENGTH`` is 8192), next
  to one just under the limit with the same claims (accepted), so the length
  is what refuses it;
* a 1 MB token: refused at the HTTP layer with 431, since a request head is at
  most 16 KiB (``transport/http.py``), before any token is looked at.

Each refused one gets ``AUTH_FAILED`` then close 4001 (or the 431), and none
creates a user row.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from chatd.auth import MAX_TOKEN_LENGTH
from chatd.config import Config
from chatd.server import ChatServer
from chatd.transport.http import MAX_HEAD_BYTES
from tests.helpers.clients import closed_with, connect
from tests.helpers.http_client import RawHttp
from tests.helpers.servers import running
from tests.helpers.tokens import SECRET, hand_made_token


def user_rows(db_path: Path) -> list[tuple[int, str]]:
    with closing(sqlite3.connect(db_path)) as db:
        return db.execute("SELECT id, username FROM users WHERE id > 0").fetchall()


async def assert_refused(server: ChatServer, token: str) -> None:
    async with connect(server, token=token) as client:
        frame = await client.expect("error")
        assert frame["data"]["code"] == "AUTH_FAILED", frame
        await closed_with(client, 4001)


async def assert_accepted(server: ChatServer, token: str, user_id: int) -> None:
    async with connect(server, token=token) as client:
        ack = await client.join("general")
        assert [m["user_id"] for m in ack["data"]["members"]] == [user_id]


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    body: dict[str, Any] = {"user_id": 5, "username": "mallory", "iat": now, "exp": now + 600}
    body.update(extra)
    return {k: v for k, v in body.items() if v is not None}


# --- RS256 -------------------------------------------------------------------------


@pytest.fixture
async def rs_server(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, make_config: Callable[..., Config]
) -> AsyncIterator[ChatServer]:
    pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path = tmp_path / "public.pem"
    path.write_bytes(pem)
    config = make_config(auth={"algorithms": ["RS256"], "public_key_file": str(path)})
    async with running(config) as srv:
        yield srv


async def test_rs256_server_accepts_its_own_key(
    rs_server: ChatServer, rsa_key: rsa.RSAPrivateKey, db_path: Path
) -> None:
    await assert_accepted(rs_server, jwt.encode(claims(), rsa_key, algorithm="RS256"), 5)
    assert user_rows(db_path) == [(5, "mallory")]


@pytest.mark.parametrize(
    "forge",
    [
        "key-confusion",
        "key-confusion-no-newline",
        "alg-none",
        "alg-none-rs256-header",
        "hs256-shared-secret",
        "other-rsa-key",
    ],
)
async def test_rs256_server_refuses_forgeries(
    rs_server: ChatServer, db_path: Path, forge: str
) -> None:
    public_pem = rs_server.config.public_key.encode()
    assert public_pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    body = claims()
    if forge == "key-confusion":
        token = hand_made_token({"alg": "HS256", "typ": "JWT"}, body, public_pem)
    elif forge == "key-confusion-no-newline":
        token = hand_made_token({"alg": "HS256", "typ": "JWT"}, body, public_pem.strip())
    elif forge == "alg-none":
        token = hand_made_token({"alg": "none", "typ": "JWT"}, body, None)
    elif forge == "alg-none-rs256-header":
        token = hand_made_token({"alg": "RS256", "typ": "JWT"}, body, None)
    elif forge == "hs256-shared-secret":
        token = jwt.encode(body, SECRET, algorithm="HS256")
    else:
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        token = jwt.encode(body, other, algorithm="RS256")
    await assert_refused(rs_server, token)
    assert user_rows(db_path) == []


# --- issuer and audience --------------------------------------------------------------

ISSUER = "https://id.example.org"
AUDIENCE = "chatd"


@pytest.fixture
async def strict_server(make_config: Callable[..., Config]) -> AsyncIterator[ChatServer]:
    async with running(make_config(auth={"issuer": ISSUER, "audience": AUDIENCE})) as srv:
        yield srv


async def test_issuer_and_audience_accepted(strict_server: ChatServer, db_path: Path) -> None:
    token = jwt.encode(claims(iss=ISSUER, aud=AUDIENCE), SECRET, algorithm="HS256")
    await assert_accepted(strict_server, token, 5)
    token = jwt.encode(claims(iss=ISSUER, aud=["other", AUDIENCE]), SECRET, algorithm="HS256")
    await assert_accepted(strict_server, token, 5)
    # The hand-made signing of the refused cases below is a valid signature.
    token = hand_made_token(
        {"alg": "HS256", "typ": "JWT"}, claims(iss=ISSUER, aud=AUDIENCE), SECRET.encode()
    )
    await assert_accepted(strict_server, token, 5)
    assert user_rows(db_path) == [(5, "mallory")]


@pytest.mark.parametrize(
    "extra",
    [
        {"aud": AUDIENCE},
        {"iss": ISSUER},
        {"iss": "https://evil.example.org", "aud": AUDIENCE},
        {"iss": ISSUER, "aud": "other-service"},
        {"iss": ISSUER, "aud": ["other-service"]},
        {"iss": ISSUER.upper(), "aud": AUDIENCE},
        {"iss": [ISSUER], "aud": AUDIENCE},
    ],
    ids=[
        "no-iss",
        "no-aud",
        "wrong-iss",
        "wrong-aud",
        "aud-list-without-us",
        "iss-case",
        "iss-as-list",
    ],
)
async def test_wrong_issuer_or_audience_refused(
    strict_server: ChatServer, db_path: Path, extra: dict[str, Any]
) -> None:
    # Signed by hand: pyjwt will not encode some of these (an iss list).
    token = hand_made_token({"alg": "HS256", "typ": "JWT"}, claims(**extra), SECRET.encode())
    await assert_refused(strict_server, token)
    assert user_rows(db_path) == []


# --- sizes --------------------------------------------------------------------------------


def padded_token(length: int) -> str:
    """A validly signed HS256 token of exactly ``length`` characters."""
    pad = ""
    token = jwt.encode(claims(pad=pad), SECRET, algorithm="HS256")
    # Base64 turns 3 bytes into 4 characters: grow the claim until it fits.
    while len(token) < length:
        pad += "p" * max(1, (length - len(token)) * 3 // 4)
        token = jwt.encode(claims(pad=pad), SECRET, algorithm="HS256")
    while len(token) > length:
        pad = pad[:-1]
        token = jwt.encode(claims(pad=pad), SECRET, algorithm="HS256")
    return token


async def test_8kb_token_refused_and_one_under_the_limit_accepted(
    server: ChatServer, db_path: Path
) -> None:
    assert MAX_TOKEN_LENGTH == 8192
    over = padded_token(8 * 1024 + 64)
    assert MAX_TOKEN_LENGTH < len(over) < MAX_HEAD_BYTES - 1024  # the head itself fits
    await assert_refused(server, over)
    assert user_rows(db_path) == []
    under = padded_token(MAX_TOKEN_LENGTH - 4)
    assert len(under) <= MAX_TOKEN_LENGTH
    await assert_accepted(server, under, 5)
    assert user_rows(db_path) == [(5, "mallory")]


@pytest.mark.parametrize("where", ["query", "header"])
async def test_1mb_token_refused_with_431_at_the_http_layer(
    server: ChatServer, db_path: Path, where: str
) -> None:
    token = "eyJhbGciOiJIUzI1NiJ9." + "A" * (1 << 20) + ".sig"
    target = f"/ws/chat?token={token}" if where == "query" else "/ws/chat"
    auth = f"Authorization: Bearer {token}\r\n" if where == "header" else ""
    head = (
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\n{auth}\r\n"
    ).encode()
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        http = RawHttp(stream)

        async def send() -> None:
            try:
                await stream.send_all(head)
            except trio.BrokenResourceError:
                pass  # the server stopped reading at 16 KiB and closed

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                response = await http.response()
                assert response.status == 431, response
                assert await http.at_eof()
    assert user_rows(db_path) == []
    assert len(server.gate.connections) == 0
