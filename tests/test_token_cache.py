"""The cache of verified tokens (``auth.TokenCache``) and the HMAC secret
prepared once (``auth._PreparedHMAC``).

A token seen before is answered without pyjwt while pyjwt would still
accept it, and never after: its ``exp`` (with the leeway) is compared as
pyjwt compares it, a clock that goes back empties the cache (``nbf`` and
``iat`` count again), a token that failed for any reason is never kept, and
the cache holds at most its size. The property test runs random tokens and
clock moves through a verifier with the cache and one without, under one
fake wall clock (pyjwt's included): every answer is the same.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import jwt
import jwt.api_jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatd import auth
from chatd.auth import TokenCache, Verifier
from chatd.config import Config, from_dict
from chatd.errors import ChatError

SECRET = "token-cache-test-secret-" + "s" * 40
T0 = 1_800_000_000


def config(**auth_options: Any) -> Config:
    return from_dict({"auth": {"jwt_secret": SECRET, **auth_options}})


def sign(key: str = SECRET, **claims: Any) -> str:
    body: dict[str, Any] = {"user_id": 1, "username": "alice", "iat": T0, "exp": T0 + 100}
    body.update(claims)
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm="HS256")


class Clock:
    """One fake wall clock for chatd.auth and for pyjwt."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    fake = Clock(T0)

    class FakeDatetime(dt.datetime):
        @classmethod
        def now(cls, tz: dt.tzinfo | None = None) -> FakeDatetime:
            return cls.fromtimestamp(fake.now, tz)

    monkeypatch.setattr(auth, "time", SimpleNamespace(time=fake))
    monkeypatch.setattr(jwt.api_jwt, "datetime", FakeDatetime)
    yield fake


def counting(verifier: Verifier, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tokens pyjwt decodes for ``verifier`` from now on."""
    calls: list[str] = []
    decode = verifier._jwt.decode

    def spy(token: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(token)
        return decode(token, *args, **kwargs)

    monkeypatch.setattr(verifier._jwt, "decode", spy)
    return calls


def outcome(verify: Callable[[str], Any], token: str) -> Any:
    try:
        return verify(token)
    except ChatError as err:
        return ("refused", err.message)


def test_a_token_seen_before_skips_pyjwt(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = Verifier(config())
    calls = counting(verifier, monkeypatch)
    token = sign()
    first = verifier.verify(token)
    clock.now += 50
    again = verifier.verify(token)
    assert again is first and first.user_id == 1
    assert calls == [token]
    assert len(verifier.cache) == 1


def test_expiry_is_pyjwts_to_the_second(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """exp T0+100, leeway 10: valid while now - 10 < T0 + 100."""
    verifier = Verifier(config(leeway_seconds=10))
    calls = counting(verifier, monkeypatch)
    token = sign()
    verifier.verify(token)
    clock.now = T0 + 109.999
    assert verifier.verify(token).user_id == 1
    assert len(calls) == 1  # from the cache
    clock.now = T0 + 110
    with pytest.raises(ChatError, match="Token expired"):
        verifier.verify(token)
    assert len(calls) == 2  # the cache let pyjwt decide, and pyjwt refused
    assert len(verifier.cache) == 0


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(
            lambda: sign(key="another-secret-that-is-at-least-32-bytes!!"), id="signature"
        ),
        pytest.param(lambda: sign(user_id=None), id="no-user-id"),
        pytest.param(lambda: sign(username="a\x00b"), id="control-in-username"),
        pytest.param(lambda: sign(exp=T0 - 100), id="expired"),
        pytest.param(lambda: sign(nbf=T0 + 100), id="not-yet-valid"),
        pytest.param(lambda: sign(exp=None), id="no-exp"),
        pytest.param(lambda: "not.a.token", id="garbage"),
    ],
)
def test_a_token_that_failed_is_never_kept(
    clock: Clock, monkeypatch: pytest.MonkeyPatch, bad: Callable[[], str]
) -> None:
    verifier = Verifier(config())
    calls = counting(verifier, monkeypatch)
    token = bad()
    for _ in range(3):
        with pytest.raises(ChatError):
            verifier.verify(token)
    assert calls == [token] * 3
    assert len(verifier.cache) == 0


@pytest.mark.parametrize("exp", [T0 + 100.5, str(T0 + 100)], ids=["float", "string"])
def test_an_exp_pyjwt_converts_is_not_kept(
    clock: Clock, monkeypatch: pytest.MonkeyPatch, exp: Any
) -> None:
    """pyjwt takes int() of a float or numeric-string exp; the cache does
    not guess: such a token goes to pyjwt every time."""
    verifier = Verifier(config())
    calls = counting(verifier, monkeypatch)
    token = sign(exp=exp)
    assert verifier.verify(token).user_id == 1
    assert verifier.verify(token).user_id == 1
    assert len(calls) == 2
    assert len(verifier.cache) == 0


def test_no_exp_allowed_is_kept_for_good(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = Verifier(config(require_exp=False))
    calls = counting(verifier, monkeypatch)
    token = sign(exp=None)
    verifier.verify(token)
    clock.now += 10 * 365 * 86400
    verifier.verify(token)
    assert len(calls) == 1


def test_a_clock_gone_back_empties_the_cache(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """Verified at T0 (iat T0); at T0 - 100 pyjwt says "not yet valid (iat)"."""
    verifier = Verifier(config(leeway_seconds=10))
    calls = counting(verifier, monkeypatch)
    token = sign(iat=T0)
    verifier.verify(token)
    clock.now = T0 - 100
    with pytest.raises(ChatError, match="iat"):
        verifier.verify(token)
    assert len(calls) == 2
    clock.now = T0 + 1
    verifier.verify(token)
    verifier.verify(token)
    assert len(calls) == 3


def test_the_cache_is_bounded_and_keeps_the_newer(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    verifier = Verifier(config(), cache_size=8)
    calls = counting(verifier, monkeypatch)
    tokens = [sign(user_id=n) for n in range(1, 101)]
    for token in tokens:
        verifier.verify(token)
        assert len(verifier.cache) <= 8
    calls.clear()
    verifier.verify(tokens[-1])
    assert calls == []
    verifier.verify(tokens[0])
    assert calls == [tokens[0]]


def test_size_defaults_to_max_connections_and_zero_is_off(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = from_dict({"auth": {"jwt_secret": SECRET}, "server": {"max_connections": 1234}})
    assert Verifier(cfg).cache.size == 1234
    verifier = Verifier(config(), cache_size=0)
    calls = counting(verifier, monkeypatch)
    token = sign()
    verifier.verify(token)
    verifier.verify(token)
    assert len(calls) == 2 and len(verifier.cache) == 0


def test_tokens_are_kept_by_a_digest_not_by_their_text(clock: Clock) -> None:
    verifier = Verifier(config())
    token = sign(username="x" * 64, padding="p" * 4000)
    verifier.verify(token)
    (key,) = verifier.cache._entries
    assert key == TokenCache.key(token) and len(key) == 16


# --- equal answers with and without the cache ------------------------------------

# Mostly tokens that pass (so that there is something to cache), times
# around T0, the clock mostly moving on.
_IAT_NBF = st.one_of(st.none(), st.integers(T0 - 60, T0 + 30))
_EXP = st.one_of(
    st.integers(T0, T0 + 150),
    st.integers(T0, T0 + 150),
    st.integers(T0 - 50, T0 + 300),
    st.none(),
    st.just(T0 + 50.5),
    st.just(str(T0 + 60)),
)


@st.composite
def _tokens(draw: st.DrawFn) -> str:
    body = {
        "user_id": draw(st.sampled_from([1, 1, 1, 2, 0, None, "3"])),
        "username": draw(st.sampled_from(["alice", "alice", "bob", None, ""])),
        "iat": draw(_IAT_NBF),
        "nbf": draw(_IAT_NBF),
        "exp": draw(_EXP),
    }
    wrong = "x-wrong-secret-of-at-least-32-bytes!!"
    key = draw(st.sampled_from([SECRET] * 7 + [wrong]))
    return sign(key=key, **body)


_MOVES = st.one_of(st.floats(0, 40), st.floats(0, 40), st.floats(0, 40), st.floats(-60, 0))
_STEPS = st.lists(st.tuples(st.integers(0, 5), _MOVES), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tokens=st.lists(_tokens(), min_size=1, max_size=6),
    steps=_STEPS,
    leeway=st.sampled_from([0, 10, 2.5]),
    require_exp=st.booleans(),
    size=st.integers(1, 4),
)
def test_the_cache_never_changes_an_answer(
    tokens: list[str],
    steps: list[tuple[int, float]],
    leeway: float,
    require_exp: bool,
    size: int,
) -> None:
    fake = Clock(T0)

    class FakeDatetime(dt.datetime):
        @classmethod
        def now(cls, tz: dt.tzinfo | None = None) -> FakeDatetime:
            return cls.fromtimestamp(fake.now, tz)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(auth, "time", SimpleNamespace(time=fake))
        mp.setattr(jwt.api_jwt, "datetime", FakeDatetime)
        cfg = config(leeway_seconds=leeway, require_exp=require_exp)
        cached, plain = Verifier(cfg, cache_size=size), Verifier(cfg, cache_size=0)
        for pick, move in steps:
            fake.now += move
            token = tokens[pick % len(tokens)]
            assert outcome(cached.verify, token) == outcome(plain.verify, token)


# --- the HMAC secret prepared once ------------------------------------------------


def test_the_secret_is_prepared_once(monkeypatch: pytest.MonkeyPatch) -> None:
    prepared: list[Any] = []
    original = jwt.algorithms.HMACAlgorithm.prepare_key

    def spy(self: Any, key: Any) -> Any:
        prepared.append(key)
        return original(self, key)

    now = int(time.time())
    tokens = [
        jwt.encode({"user_id": n, "iat": now, "exp": now + 60}, SECRET, algorithm="HS256")
        for n in range(1, 6)
    ]
    monkeypatch.setattr(jwt.algorithms.HMACAlgorithm, "prepare_key", spy)
    verifier = Verifier(config(), cache_size=0)
    for n, token in enumerate(tokens, 1):
        assert verifier.verify(token).user_id == n
    assert prepared == [SECRET]  # HS256's, when the verifier was made; none per token


def test_a_secret_pyjwt_refuses_still_refuses_every_token() -> None:
    """A PEM public key given as an HMAC secret: pyjwt refuses to use it;
    not prepared once, it is refused for every token, as before."""
    pem = (
        "-----BEGIN PUBLIC KEY-----\n"
        "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEd0AyIQKe3l8oDEyqGBtxcHt9Rl+Q\n"
        "-----END PUBLIC KEY-----\n"
    )
    verifier = Verifier(from_dict({"auth": {"jwt_secret": pem}}), cache_size=0)
    now = int(time.time())
    token = jwt.encode({"user_id": 1, "iat": now, "exp": now + 60}, "k" * 40, algorithm="HS256")
    for _ in range(2):
        with pytest.raises(ChatError, match="asymmetric key"):
            verifier.verify(token)
