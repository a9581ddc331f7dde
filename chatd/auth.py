"""JWT verification: a token in, an ``Identity`` out, or ``AUTH_FAILED``.

pyjwt checks the signature against the configured algorithms only (never the
token's own ``alg`` alone, so ``alg: none`` and key confusion are refused),
then ``exp``/``nbf``/``iat`` with the leeway, and ``iss``/``aud`` when
configured. The claims then name the user: ``user_id`` (an integer), else
``sub`` when it is a decimal string; ``username`` is the display name.

``bearer`` reads an ``Authorization: Bearer`` header, for both the WebSocket
handshake (a token) and the publish API (an API key).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jwt
from jwt.warnings import InsecureKeyLengthWarning

from chatd.config import HMAC_ALGORITHMS, AuthConfig, Config
from chatd.errors import auth_failed

# chatd says this itself, once, at start (server.py), instead of per token.
warnings.filterwarnings("ignore", category=InsecureKeyLengthWarning)

MAX_TOKEN_LENGTH = 8192
#: HMAC secrets shorter than this are weak (RFC 7518 3.2).
MIN_SECRET_BYTES = 32
MAX_USERNAME_LENGTH = 64
MAX_USER_ID = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a connection speaks for, and until when."""

    user_id: int
    username: str
    #: The token's ``exp`` (seconds since the epoch), or None when it has none.
    expires_at: float | None


class Verifier:
    """Checks tokens against one config's key and rules."""

    def __init__(self, config: Config) -> None:
        auth: AuthConfig = config.auth
        self._algorithms = list(auth.algorithms)
        hmac = bool(set(auth.algorithms) & HMAC_ALGORITHMS)
        self._key: Any = auth.jwt_secret if hmac else config.public_key
        self._leeway = auth.leeway_seconds
        self._issuer = auth.issuer or None
        self._audience = auth.audience or None
        required = ["exp"] if auth.require_exp else []
        if self._issuer:
            required.append("iss")
        if self._audience:
            required.append("aud")
        self._options: Any = {"require": required, "verify_aud": bool(self._audience)}

    def verify(self, token: str | None) -> Identity:
        """The identity in ``token``; raise ``ChatError(AUTH_FAILED)``."""
        if not token:
            raise auth_failed("Missing token")
        if len(token) > MAX_TOKEN_LENGTH:
            raise auth_failed("Token too long")
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                leeway=self._leeway,
                issuer=self._issuer,
                audience=self._audience,
                options=self._options,
            )
        except jwt.ExpiredSignatureError:
            raise auth_failed("Token expired") from None
        except jwt.PyJWTError as exc:
            raise auth_failed(f"Invalid token: {exc}") from None
        return identity_from_claims(claims)

    def check_live(self, identity: Identity, now: float | None = None) -> None:
        """Raise ``AUTH_FAILED`` once the identity's token has expired."""
        if identity.expires_at is None:
            return
        if (time.time() if now is None else now) > identity.expires_at + self._leeway:
            raise auth_failed("Token expired")


def identity_from_claims(claims: dict[str, Any]) -> Identity:
    """Pick the user id and name out of verified claims."""
    user_id = claims.get("user_id")
    if user_id is None:
        sub = claims.get("sub")
        if isinstance(sub, str) and sub.isascii() and sub.isdecimal() and len(sub) <= 19:
            user_id = int(sub)
    if isinstance(user_id, bool) or not isinstance(user_id, int):
        raise auth_failed("Token has no integer user_id (or decimal sub)")
    if not 1 <= user_id <= MAX_USER_ID:
        raise auth_failed("Token user_id out of range")
    username = claims.get("username")
    if username is None:
        username = f"user{user_id}"
    if not isinstance(username, str) or not 1 <= len(username) <= MAX_USERNAME_LENGTH:
        raise auth_failed("Token username must be a string of 1 to 64 characters")
    if not username.isprintable():
        raise auth_failed("Token username has control characters")
    exp = claims.get("exp")
    expires_at = float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None
    return Identity(user_id, username, expires_at)


def issue(config: Config, user_id: int, username: str, ttl: float, now: float | None = None) -> str:
    """Sign a token with the config's HMAC secret (for ``chatd token``)."""
    hmac = [a for a in config.auth.algorithms if a in HMAC_ALGORITHMS]
    if not hmac:
        raise ValueError(
            "[auth] algorithms has no HS* algorithm; sign tokens with your private key"
        )
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "user_id": user_id,
        "sub": str(user_id),
        "username": username,
        "iat": issued,
        "exp": issued + int(ttl),
    }
    if config.auth.issuer:
        claims["iss"] = config.auth.issuer
    if config.auth.audience:
        claims["aud"] = config.auth.audience
    return jwt.encode(claims, config.auth.jwt_secret, algorithm=hmac[0])


def bearer(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The credentials of an ``Authorization: Bearer ...`` header (the
    scheme in any case), or None when there is none."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                return credentials.strip()
    return None
