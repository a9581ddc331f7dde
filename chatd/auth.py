"""JWT verification: a token in, an ``Identity`` out, or ``AUTH_FAILED``.

pyjwt checks the signature against the configured algorithms only (never the
token's own ``alg`` alone, so ``alg: none`` and key confusion are refused),
then ``exp``/``nbf``/``iat`` with the leeway, and ``iss``/``aud`` when
configured. The claims then name the user: ``user_id`` (an integer), else
``sub`` when it is a decimal string; ``username`` is the display name.

A verified token is remembered (``TokenCache``): the same token again (a
client reconnecting: a storm of them after a network cut) is answered
without pyjwt for as long as pyjwt itself would accept it, that is until its
``exp`` passes (with the leeway). Everything else pyjwt checks does not
depend on the time (the key and the rules are fixed while the node runs),
and a token that failed is never remembered. An HMAC secret is prepared for
pyjwt once, not for every token (``_PreparedHMAC``).

``bearer`` reads an ``Authorization: Bearer`` header, for both the WebSocket
handshake (a token) and the publish API (an API key).
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice
from typing import Any

import jwt
from jwt.algorithms import HMACAlgorithm
from jwt.api_jws import PyJWS
from jwt.exceptions import InvalidKeyError
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
#: An ``exp`` the cache can compare as pyjwt does (an int a float holds exactly).
_EXACT = 2**53
_HASHES = {
    "HS256": HMACAlgorithm.SHA256,
    "HS384": HMACAlgorithm.SHA384,
    "HS512": HMACAlgorithm.SHA512,
}


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a connection speaks for, and until when."""

    user_id: int
    username: str
    #: The token's ``exp`` (seconds since the epoch), or None when it has none.
    expires_at: float | None


class TokenCache:
    """Identities of verified tokens, each kept while pyjwt would still
    accept its token, at most ``size`` of them (the newer half is kept when
    it is full).

    A token is known by a 16-byte digest of it (BLAKE2b), so an entry costs
    the same whatever the token's length (up to 8192 characters), about 80
    bytes; its ``Identity`` is the one the connection holds anyway.

    pyjwt refuses a token whose ``exp`` is at or before ``now - leeway``; an
    entry answers only while that is not so, compared the same way (so only
    tokens whose ``exp`` is an int a float holds exactly, or that have none,
    are kept). ``nbf`` and ``iat`` passed when the token was verified and
    stay passed as the clock moves on; should the wall clock go back, the
    cache is emptied."""

    __slots__ = ("_entries", "_latest", "_leeway", "size")

    def __init__(self, size: int, leeway: float) -> None:
        self.size = size
        self._leeway = leeway
        self._entries: dict[bytes, Identity] = {}
        #: The latest wall-clock time seen, every entry verified at or before it.
        self._latest = float("-inf")

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(token: str) -> bytes:
        return hashlib.blake2b(token.encode("utf-8", "surrogatepass"), digest_size=16).digest()

    def get(self, key: bytes, now: float) -> Identity | None:
        """The identity of a verified token still valid at ``now``."""
        entries = self._entries
        identity = entries.get(key)
        if identity is None:
            return None
        if now < self._latest:  # the clock went back: nbf and iat count again
            entries.clear()
            self._latest = now
            return None
        self._latest = now
        expires = identity.expires_at
        if expires is not None and expires <= now - self._leeway:
            del entries[key]
            return None
        return identity

    def put(self, key: bytes, claims: dict[str, Any], identity: Identity, now: float) -> None:
        """Remember a token pyjwt accepted at or before ``now``."""
        if self.size <= 0:
            return
        if "exp" in claims:
            exp = claims["exp"]
            if type(exp) is not int or not -_EXACT < exp < _EXACT:
                return  # pyjwt's int(exp) of a float or a string: not compared here
        entries = self._entries
        if now < self._latest:
            entries.clear()
        self._latest = now
        if len(entries) >= self.size:
            newer = islice(entries.items(), len(entries) // 2, None)
            self._entries = entries = dict(newer)
        entries[key] = identity


class _PreparedHMAC(HMACAlgorithm):
    """pyjwt's HMAC algorithm with the configured secret prepared once.

    pyjwt prepares the key again for every token (it makes sure that the
    secret is no PEM, SSH or DER key, nor a JWK: about 45 µs a token); the
    secret is the same for every token while the node runs. Those checks run
    here once, with pyjwt's own code: a secret they refuse is not kept (each
    token is then refused as before), and any other key is prepared as
    pyjwt does."""

    def __init__(self, hash_alg: Any, secret: str) -> None:
        super().__init__(hash_alg)
        self._secret = secret
        self._prepared: bytes | None = None
        self._length_warning: str | None = None
        try:
            self._prepared = super().prepare_key(secret)
        except InvalidKeyError:
            return
        self._length_warning = super().check_key_length(self._prepared)

    def prepare_key(self, key: str | bytes) -> bytes:
        if key is self._secret and self._prepared is not None:
            return self._prepared
        return super().prepare_key(key)

    def check_key_length(self, key: bytes) -> str | None:
        if key is self._prepared and key is not None:
            return self._length_warning
        return super().check_key_length(key)


def _pyjwt(algorithms: Iterable[str], secret: str) -> jwt.PyJWT:
    """A pyjwt decoder like ``jwt.decode``'s, with ``_PreparedHMAC`` for the
    HMAC algorithms in ``algorithms``."""
    decoder = jwt.PyJWT()
    jws = getattr(decoder, "_jws", None)
    if not isinstance(jws, PyJWS):  # pragma: no cover - another pyjwt: prepare per token
        return decoder
    for name in algorithms:
        if name in _HASHES:
            jws.unregister_algorithm(name)
            jws.register_algorithm(name, _PreparedHMAC(_HASHES[name], secret))
    return decoder


class Verifier:
    """Checks tokens against one config's key and rules.

    ``cache_size``: how many verified tokens ``TokenCache`` keeps (default
    the node's ``max_connections``: every connected client's token, for when
    they all come back at once; 0: none)."""

    def __init__(self, config: Config, *, cache_size: int | None = None) -> None:
        auth: AuthConfig = config.auth
        self._algorithms = list(auth.algorithms)
        hmac = bool(set(auth.algorithms) & HMAC_ALGORITHMS)
        self._key: Any = auth.jwt_secret if hmac else config.public_key
        self._jwt = _pyjwt(auth.algorithms, auth.jwt_secret) if hmac else jwt.PyJWT()
        self._leeway = auth.leeway_seconds
        self._issuer = auth.issuer or None
        self._audience = auth.audience or None
        required = ["exp"] if auth.require_exp else []
        if self._issuer:
            required.append("iss")
        if self._audience:
            required.append("aud")
        self._options: Any = {"require": required, "verify_aud": bool(self._audience)}
        size = config.server.max_connections if cache_size is None else cache_size
        self.cache = TokenCache(size, self._leeway)

    def verify(self, token: str | None) -> Identity:
        """The identity in ``token``; raise ``ChatError(AUTH_FAILED)``."""
        if not token:
            raise auth_failed("Missing token")
        if len(token) > MAX_TOKEN_LENGTH:
            raise auth_failed("Token too long")
        cache = self.cache
        key = cache.key(token)
        known = cache.get(key, time.time())
        if known is not None:
            return known
        try:
            claims = self._jwt.decode(
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
        identity = identity_from_claims(claims)
        # The time read after pyjwt's own: the token was valid then.
        cache.put(key, claims, identity, time.time())
        return identity

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
