"""chatd.ratelimit: token buckets and the limiter that combines them.

Time is always passed in explicitly, so every expectation below is exact.
Rates such as capacity 4 per 2 s (2 tokens a second) are chosen so that the
float arithmetic is exact too.
"""

from __future__ import annotations

import pytest

from chatd.ratelimit import Limiter, LimiterTable, TokenBucket

DEFAULT_LIMITS = [(10, 60.0), (100, 3600.0)]


# --- TokenBucket --------------------------------------------------------------------


@pytest.mark.parametrize(("capacity", "period"), [(0, 1.0), (-1, 1.0), (1, 0.0), (1, -5.0)])
def test_bucket_rejects_bad_parameters(capacity: int, period: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(capacity, period, now=0.0)


@pytest.mark.parametrize("capacity", [1, 4, 10, 100])
def test_bucket_starts_full_and_bursts_capacity(capacity: int) -> None:
    bucket = TokenBucket(capacity, 60.0, now=100.0)
    assert [bucket.take(100.0) for _ in range(capacity)] == [0.0] * capacity
    assert bucket.take(100.0) > 0.0


def test_bucket_wait_time_exact() -> None:
    bucket = TokenBucket(4, 2.0, now=0.0)  # 2 tokens per second
    assert bucket.rate == 2.0
    for _ in range(4):
        assert bucket.take(0.0) == 0.0
    assert bucket.wait_time(0.0) == 0.5
    assert bucket.wait_time(0.25) == 0.25  # half a token there
    assert bucket.take(0.25) == 0.25  # refused: nothing spent
    assert bucket.wait_time(0.5) == 0.0
    assert bucket.take(0.5) == 0.0
    assert bucket.wait_time(0.5) == 0.5


def test_bucket_refill_rate() -> None:
    bucket = TokenBucket(4, 2.0, now=0.0)
    for _ in range(4):
        bucket.take(0.0)
    # 1.5 s later: 3 tokens back.
    assert [bucket.take(1.5) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(1.5) == 0.5


def test_bucket_refill_capped_at_capacity() -> None:
    bucket = TokenBucket(4, 2.0, now=0.0)
    bucket.take(0.0)
    # A long idle spell refills to capacity, not beyond.
    assert [bucket.take(1000.0) for _ in range(4)] == [0.0] * 4
    assert bucket.take(1000.0) == 0.5


def test_bucket_refused_take_spends_nothing() -> None:
    bucket = TokenBucket(1, 1.0, now=0.0)
    assert bucket.take(0.0) == 0.0
    for _ in range(5):
        assert bucket.take(0.5) == 0.5
    assert bucket.take(1.0) == 0.0


def test_bucket_clock_going_backwards() -> None:
    bucket = TokenBucket(2, 2.0, now=10.0)  # 1 token per second
    bucket.take(10.0)
    bucket.take(10.0)
    assert bucket.wait_time(5.0) == 1.0  # no refill, no negative time
    assert bucket.wait_time(10.5) == 0.5


def test_bucket_default_minute_rate() -> None:
    bucket = TokenBucket(10, 60.0, now=0.0)
    for _ in range(10):
        bucket.take(0.0)
    assert bucket.wait_time(0.0) == pytest.approx(6.0)
    assert bucket.wait_time(3.0) == pytest.approx(3.0)
    assert bucket.take(6.0 + 1e-9) == 0.0


# --- Limiter ------------------------------------------------------------------------


def test_limiter_allows_burst_of_smallest_capacity() -> None:
    limiter = Limiter(DEFAULT_LIMITS, now=0.0)
    assert [limiter.take(0.0) for _ in range(10)] == [0.0] * 10
    assert limiter.take(0.0) == 6.0


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (0.0, 1.0),  # 0.5 s to wait -> 1
        (0.25, 1.0),  # 0.25 s -> at least 1
        (0.4999, 1.0),
    ],
)
def test_limiter_retry_after_at_least_one_second(now: float, expected: float) -> None:
    limiter = Limiter([(4, 2.0)], now=0.0)
    for _ in range(4):
        limiter.take(0.0)
    assert limiter.take(now) == expected


@pytest.mark.parametrize(
    ("now", "expected"),
    [(0.0, 10.0), (0.5, 10.0), (1.0, 9.0), (1.25, 9.0), (9.0, 1.0), (9.9, 1.0)],
)
def test_limiter_retry_after_rounds_up(now: float, expected: float) -> None:
    limiter = Limiter([(1, 10.0)], now=0.0)  # 0.1 token per second
    assert limiter.take(0.0) == 0.0
    assert limiter.take(now) == expected


def test_limiter_retry_after_is_whole_and_enough() -> None:
    limiter = Limiter([(3, 7.0)], now=0.0)
    for _ in range(3):
        limiter.take(0.0)
    retry = limiter.take(0.1)
    assert retry == int(retry) and retry >= 1
    assert limiter.take(0.1 + retry) == 0.0


def test_limiter_refusal_spends_from_no_bucket() -> None:
    # A fast bucket (1 per second) and a slow one (3 per hour).
    limiter = Limiter([(1, 1.0), (3, 3600.0)], now=0.0)
    assert limiter.take(0.0) == 0.0  # fast: 0, slow: 2
    for _ in range(50):
        assert limiter.take(0.0) == 1.0  # refused by the fast bucket only
    # Had the refusals spent from the slow bucket it would be empty now.
    assert limiter.take(1.0) == 0.0
    assert limiter.take(2.0) == 0.0
    # Now the slow bucket is the one that refuses, and says how long.
    retry = limiter.take(3.0)
    assert retry == 1197.0  # (1 - 3 * 3/3600) / (3/3600) = 1197 s
    assert limiter.take(1.0 + 1200.0) == 0.0


def test_limiter_takes_longest_wait() -> None:
    limiter = Limiter([(2, 2.0), (2, 20.0)], now=0.0)
    limiter.take(0.0)
    limiter.take(0.0)
    assert limiter.take(0.0) == 10.0


def test_limiter_default_ten_bursts_of_ten() -> None:
    """10/min + 100/h: 100 messages as a burst of 10 at each of 10 minutes pass;
    the hour bucket (refilled 1 token / 36 s meanwhile) is then what refuses."""
    limiter = Limiter(DEFAULT_LIMITS, now=0.0)
    for minute in range(10):
        now = 60.0 * minute
        assert [limiter.take(now) for _ in range(10)] == [0.0] * 10, minute
        assert limiter.take(now) > 0.0  # the 11th in the minute
    # 100 sent by t=540 s; the hour bucket got 540/36 = 15 tokens back.
    assert [limiter.take(600.0) for _ in range(10)] == [0.0] * 10
    # t=660: 6.67 + 1.67 hour tokens -> 8 more, then the hour bucket refuses
    # with 36 * (1 - 0.33) = 24 s, while the minute bucket still has 2.
    assert [limiter.take(660.0) for _ in range(8)] == [0.0] * 8
    assert limiter.take(660.0) == 24.0


def test_limiter_default_one_hour_greedy() -> None:
    """A client trying every second for an hour gets the 100-token burst
    plus one token per 36 s, never more than 10 in a row at once."""
    limiter = Limiter(DEFAULT_LIMITS, now=0.0)
    allowed = [t for t in range(3600) if limiter.take(float(t)) == 0.0]
    assert len(allowed) == 199
    assert allowed[:11] == list(range(11))
    # Sustained: one per 36 s once the hour bucket is drained.
    gaps = {b - a for a, b in zip(allowed[-20:-1], allowed[-19:], strict=True)}
    assert gaps == {36}
    # Never more than 10 + 10 in any 60-second window (burst + refill).
    assert max(sum(1 for t in allowed if s <= t < s + 60) for s in range(0, 3600, 10)) <= 20


def test_limiter_hourly_limit_alone() -> None:
    """With only 100/hour, 100 messages pass and the 101st waits 36 s."""
    limiter = Limiter([(100, 3600.0)], now=0.0)
    assert [limiter.take(0.0) for _ in range(100)] == [0.0] * 100
    assert limiter.take(0.0) == 36.0
    assert limiter.take(35.5) == 1.0
    assert limiter.take(36.0 + 1e-6) == 0.0
    assert limiter.take(36.0 + 1e-6) == 36.0


# --- LimiterTable ---------------------------------------------------------------


def test_table_keeps_one_limiter_per_key() -> None:
    table = LimiterTable([(2, 60.0)])
    assert table.take(1, 0.0) == 0.0
    assert table.take(1, 0.0) == 0.0
    assert table.take(1, 0.0) == 30.0  # user 1 is out of tokens
    assert table.take(2, 0.0) == 0.0  # user 2 has its own


def test_table_prunes_only_refilled_limiters() -> None:
    table = LimiterTable([(2, 60.0)])
    table.take(1, 0.0)
    table.take(1, 0.0)
    table.take(2, 0.0)
    table.prune(30.0)  # user 2 has refilled (1 token per 30 s), user 1 has not
    assert len(table) == 1
    assert table.take(1, 30.0) == 0.0  # one token back
    assert table.take(1, 30.0) == 30.0  # and only one: its state was kept


def test_table_prunes_by_itself_as_it_grows() -> None:
    table = LimiterTable([(1, 1.0)])
    for key in range(5000):
        table.take(key, float(key))  # each refills after 1 s
    assert len(table) < 2100
