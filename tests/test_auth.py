"""chatd.auth: JWT verification into an Identity, and token issuing.

Verifiers are built from real configs (``from_dict``). Every refusal must be
``ChatError(AUTH_FAILED)`` carrying close code 4001; tokens for the attack
cases (``alg: none``, HS256-with-the-public-key) are built by hand because
pyjwt refuses to make them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from chatd import auth
from chatd.auth import Identity, Verifier
from chatd.config import Config, from_dict
from chatd.errors import ChatError, CloseCode, ErrorCode
from tests.helpers.tokens import b64url, hand_made_token

SECRET = "auth-test-secret-" + "s" * 64  # >= 64 bytes: enough for HS512 too
OTHER_SECRET = "another-secret-that-is-at-least-32-bytes!!"


def config(**auth_options: Any) -> Config:
    return from_dict({"auth": {"jwt_secret": SECRET, **auth_options}})


def sign(claims: dict[str, Any], key: Any = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=algorithm)


def claims(**extra: Any) -> dict[str, Any]:
    """user 1 "alice", valid for an hour (``None`` values drop a claim)."""
    now = int(time.time())
    body: dict[str, Any] = {"user_id": 1, "username": "alice", "iat": now, "exp": now + 3600}
    body.update(extra)
    return {k: v for k, v in body.items() if v is not None}


def assert_refused(verifier: Verifier, token: str | None) -> ChatError:
    with pytest.raises(ChatError) as info:
        verifier.verify(token)
    err = info.value
    assert err.code is ErrorCode.AUTH_FAILED
    assert err.close is CloseCode.AUTH_FAILED
    assert int(err.close) == 4001
    return err


@pytest.fixture
def verifier() -> Verifier:
    return Verifier(config())


# --- accepted ---------------------------------------------------------------------


def test_valid_hs256(verifier: Verifier) -> None:
    body = claims()
    assert verifier.verify(sign(body)) == Identity(1, "alice", float(body["exp"]))


@pytest.mark.parametrize(
    ("sub", "user_id"), [("42", 42), ("1", 1), ("9223372036854775807", 2**63 - 1)]
)
def test_sub_fallback(verifier: Verifier, sub: str, user_id: int) -> None:
    identity = verifier.verify(sign(claims(user_id=None, sub=sub)))
    assert identity.user_id == user_id


def test_user_id_wins_over_sub(verifier: Verifier) -> None:
    assert verifier.verify(sign(claims(user_id=5, sub="6"))).user_id == 5


def test_username_defaults_to_user_id(verifier: Verifier) -> None:
    identity = verifier.verify(sign(claims(user_id=77, username=None)))
    assert identity.username == "user77"


@pytest.mark.parametrize("username", ["a", "b" * 64, "Zo\u00eb \U0001f600", "with space"])
def test_username_accepted(verifier: Verifier, username: str) -> None:
    assert verifier.verify(sign(claims(username=username))).username == username


def test_extra_claims_ignored(verifier: Verifier) -> None:
    assert verifier.verify(sign(claims(role="admin", nested={"a": [1]}))).user_id == 1


@pytest.mark.parametrize("algorithm", ["HS384", "HS512"])
def test_other_hmac_algorithms(algorithm: str) -> None:
    v = Verifier(config(algorithms=[algorithm]))
    assert v.verify(sign(claims(), algorithm=algorithm)).user_id == 1
    assert_refused(v, sign(claims(), algorithm="HS256"))


# --- claims refused ---------------------------------------------------------------


@pytest.mark.parametrize(
    "sub", ["abc", "+42", " 42", "42 ", "-1", "0", "4.2", "\u0664\u0662", "", "1" * 20]
)
def test_sub_not_a_positive_decimal_refused(verifier: Verifier, sub: str) -> None:
    assert_refused(verifier, sign(claims(user_id=None, sub=sub)))


def test_no_user_at_all_refused(verifier: Verifier) -> None:
    err = assert_refused(verifier, sign(claims(user_id=None)))
    assert err.message == "Token has no integer user_id (or decimal sub)"


@pytest.mark.parametrize(
    "user_id", [True, False, 1.0, 1.5, "1", [1], {"id": 1}, 0, -1, 2**63, 2**64]
)
def test_bad_user_id_refused(verifier: Verifier, user_id: Any) -> None:
    assert_refused(verifier, sign(claims(user_id=user_id, sub="1")))


@pytest.mark.parametrize(
    "username", ["", "x" * 65, 5, True, ["a"], "a\x00b", "tab\tname", "nl\n", "\x7f", "\u202e"]
)
def test_bad_username_refused(verifier: Verifier, username: Any) -> None:
    assert_refused(verifier, sign(claims(username=username)))


# --- time claims -----------------------------------------------------------------


def test_expired_beyond_leeway_refused(verifier: Verifier) -> None:
    now = int(time.time())
    err = assert_refused(verifier, sign(claims(iat=now - 100, exp=now - 30)))
    assert err.message == "Token expired"


def test_expired_within_leeway_accepted(verifier: Verifier) -> None:
    now = int(time.time())
    assert verifier.verify(sign(claims(iat=now - 100, exp=now - 3))).user_id == 1


def test_leeway_is_configurable() -> None:
    now = int(time.time())
    token = sign(claims(iat=now - 100, exp=now - 30))
    assert Verifier(config(leeway_seconds=60)).verify(token).user_id == 1
    assert_refused(Verifier(config(leeway_seconds=0)), sign(claims(exp=now - 2)))


def test_nbf_in_future_refused(verifier: Verifier) -> None:
    assert_refused(verifier, sign(claims(nbf=int(time.time()) + 120)))


def test_nbf_within_leeway_accepted(verifier: Verifier) -> None:
    assert verifier.verify(sign(claims(nbf=int(time.time()) + 3))).user_id == 1


def test_iat_in_future_refused(verifier: Verifier) -> None:
    assert_refused(verifier, sign(claims(iat=int(time.time()) + 600)))


def test_missing_exp_refused_when_required(verifier: Verifier) -> None:
    assert_refused(verifier, sign(claims(exp=None)))


def test_missing_exp_accepted_when_not_required() -> None:
    identity = Verifier(config(require_exp=False)).verify(sign(claims(exp=None)))
    assert identity == Identity(1, "alice", None)


@pytest.mark.parametrize("exp", ["tomorrow", None])
def test_non_numeric_exp_refused(verifier: Verifier, exp: Any) -> None:
    body = claims()
    body["exp"] = exp
    assert_refused(verifier, sign(body))


# --- signatures and algorithms ----------------------------------------------------------


def test_wrong_signature_refused(verifier: Verifier) -> None:
    assert_refused(verifier, sign(claims(), key=OTHER_SECRET))


def test_tampered_payload_refused(verifier: Verifier) -> None:
    header, _, signature = sign(claims()).split(".")
    forged = b64url(json.dumps(claims(user_id=2)).encode())
    assert_refused(verifier, f"{header}.{forged}.{signature}")


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_refused(verifier: Verifier, alg: str) -> None:
    token = hand_made_token({"alg": alg, "typ": "JWT"}, claims(), key=None)
    assert token.endswith(".")
    assert_refused(verifier, token)


def test_hand_made_hs256_is_valid(verifier: Verifier) -> None:
    """The hand-made builder is right: the same token with the real secret passes."""
    token = hand_made_token({"alg": "HS256", "typ": "JWT"}, claims(), key=SECRET.encode())
    assert verifier.verify(token).user_id == 1


@pytest.mark.parametrize(
    "token",
    ["", None, "abc", "a.b", "a.b.c", "a.b.c.d", "...", "\u00e9.\u00e9.\u00e9"],
)
def test_garbage_refused(verifier: Verifier, token: str | None) -> None:
    assert_refused(verifier, token)


def test_truncated_token_refused(verifier: Verifier) -> None:
    token = sign(claims())
    for cut in (1, 5, len(token) // 2, len(token) - 5):
        assert_refused(verifier, token[:-cut])


def test_token_length_limit(verifier: Verifier) -> None:
    def padded(size: int) -> str:
        return sign(claims(pad="x" * size))

    small = padded(100)
    pad = 100 + (auth.MAX_TOKEN_LENGTH - len(small)) * 3 // 4
    fits = padded(pad)
    while len(fits) > auth.MAX_TOKEN_LENGTH:
        pad -= 1
        fits = padded(pad)
    assert len(fits) <= auth.MAX_TOKEN_LENGTH
    assert verifier.verify(fits).user_id == 1
    too_long = padded(pad + 10)
    assert len(too_long) > auth.MAX_TOKEN_LENGTH
    err = assert_refused(verifier, too_long)
    assert err.message == "Token too long"


# --- issuer / audience ---------------------------------------------------------------


@pytest.fixture
def strict() -> Verifier:
    return Verifier(config(issuer="https://issuer.example", audience="chatd"))


def test_issuer_and_audience_accepted(strict: Verifier) -> None:
    token = sign(claims(iss="https://issuer.example", aud="chatd"))
    assert strict.verify(token).user_id == 1
    token = sign(claims(iss="https://issuer.example", aud=["other", "chatd"]))
    assert strict.verify(token).user_id == 1


@pytest.mark.parametrize(
    "extra",
    [
        {"aud": "chatd"},
        {"iss": "https://issuer.example"},
        {"iss": "https://evil.example", "aud": "chatd"},
        {"iss": "https://issuer.example", "aud": "other"},
        {"iss": "https://issuer.example", "aud": ["other"]},
    ],
)
def test_issuer_and_audience_refused(strict: Verifier, extra: dict[str, Any]) -> None:
    assert_refused(strict, sign(claims(**extra)))


def test_audience_ignored_when_not_configured(verifier: Verifier) -> None:
    assert verifier.verify(sign(claims(aud="anything", iss="anyone"))).user_id == 1


# --- RS256 -------------------------------------------------------------------------


@pytest.fixture
def rs_config(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> Config:
    pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path = tmp_path / "public.pem"
    path.write_bytes(pem)
    return from_dict({"auth": {"algorithms": ["RS256"], "public_key_file": str(path)}})


def test_rs256_accepted(rs_config: Config, rsa_key: rsa.RSAPrivateKey) -> None:
    v = Verifier(rs_config)
    body = claims(user_id=9, username="rsa")
    assert v.verify(sign(body, key=rsa_key, algorithm="RS256")) == Identity(
        9, "rsa", float(body["exp"])
    )


def test_rs256_other_key_refused(rs_config: Config) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert_refused(Verifier(rs_config), sign(claims(), key=other, algorithm="RS256"))


def test_rs256_key_confusion_refused(rs_config: Config) -> None:
    """An HS256 token whose HMAC key is the server's public PEM text."""
    assert rs_config.public_key.startswith("-----BEGIN PUBLIC KEY-----")
    token = hand_made_token(
        {"alg": "HS256", "typ": "JWT"}, claims(), key=rs_config.public_key.encode()
    )
    assert_refused(Verifier(rs_config), token)


def test_rs256_alg_none_refused(rs_config: Config) -> None:
    assert_refused(Verifier(rs_config), hand_made_token({"alg": "none"}, claims(), key=None))


def test_rs256_hs256_token_with_secret_refused(rs_config: Config) -> None:
    assert_refused(Verifier(rs_config), sign(claims()))


# --- check_live ----------------------------------------------------------------------


def test_check_live(verifier: Verifier) -> None:
    identity = Identity(1, "alice", expires_at=1000.0)
    verifier.check_live(identity, now=500.0)
    verifier.check_live(identity, now=1010.0)  # default leeway 10 s
    with pytest.raises(ChatError) as info:
        verifier.check_live(identity, now=1010.5)
    assert info.value.code is ErrorCode.AUTH_FAILED
    assert info.value.close is CloseCode.AUTH_FAILED
    assert info.value.message == "Token expired"


def test_check_live_without_expiry(verifier: Verifier) -> None:
    verifier.check_live(Identity(1, "alice", expires_at=None), now=1e12)


def test_check_live_uses_clock_by_default(verifier: Verifier) -> None:
    verifier.check_live(Identity(1, "a", expires_at=time.time() + 3600))
    with pytest.raises(ChatError):
        verifier.check_live(Identity(1, "a", expires_at=time.time() - 3600))


def test_check_live_after_verify(verifier: Verifier) -> None:
    now = int(time.time())
    identity = verifier.verify(sign(claims(exp=now + 60)))
    verifier.check_live(identity, now=now + 65)
    with pytest.raises(ChatError):
        verifier.check_live(identity, now=now + 71)


# --- issue ---------------------------------------------------------------------------


def test_issue_round_trip() -> None:
    cfg = config()
    now = time.time()
    token = auth.issue(cfg, 7, "bob", ttl=120, now=now)
    identity = Verifier(cfg).verify(token)
    assert identity == Identity(7, "bob", float(int(now) + 120))
    body = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert body["sub"] == "7"
    assert body["iat"] == int(now)


def test_issue_with_issuer_and_audience() -> None:
    cfg = config(issuer="me", audience="you", algorithms=["HS512"])
    token = auth.issue(cfg, 3, "c", ttl=60)
    assert jwt.get_unverified_header(token)["alg"] == "HS512"
    assert Verifier(cfg).verify(token).user_id == 3
    assert_refused(Verifier(config(issuer="someone-else")), token)


def test_issued_token_expires() -> None:
    cfg = config()
    token = auth.issue(cfg, 7, "bob", ttl=1, now=time.time() - 3600)
    assert_refused(Verifier(cfg), token)


def test_issue_refuses_public_key_config(rs_config: Config) -> None:
    with pytest.raises(ValueError, match="no HS\\* algorithm"):
        auth.issue(rs_config, 1, "a", ttl=60)
