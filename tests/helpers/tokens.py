"""JWTs for the tests: ``make_token`` signs with the tests' ``SECRET`` (the one
every test config uses); ``hand_made_token`` assembles the forgeries pyjwt
refuses to make (``alg: none``, HS256 keyed with a public key).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt

SECRET = "test-secret-that-is-at-least-32-bytes-long"


def make_token(
    user_id: Any = 1, username: Any = "alice", *, ttl: float = 3600, **claims: Any
) -> str:
    """A token signed with the tests' secret (``claims`` override; ``None``
    values drop a claim)."""
    now = int(time.time())
    body: dict[str, Any] = {"user_id": user_id, "username": username, "iat": now, "exp": now + ttl}
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, SECRET, algorithm="HS256")


def b64url(data: bytes) -> str:
    """Base64url without padding, as in a JWT."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made_token(header: dict[str, Any], body: dict[str, Any], key: bytes | None) -> str:
    """A JWT assembled by hand: HMAC-SHA256 with ``key``, or no signature at
    all (``key`` None: the token ends with its last dot)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(body).encode())}"
    if key is None:
        return signing_input + "."
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"
