"""The per-room sequencer: in order, once, gaps reported and filled.

Pure logic: a few cases by hand, then a property: whatever order the live
copies arrive in, and whichever of them never arrive, offering them and
answering every reported gap from "the store" delivers each seq exactly once,
in order.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from chatd.sequencer import Sequencer


def test_in_order_passes_straight_through() -> None:
    seq: Sequencer[str] = Sequencer()
    seq.track("r", 3)
    assert seq.offer("r", 4, "m4") == (["m4"], None)
    assert seq.offer("r", 5, "m5") == (["m5"], None)
    assert seq.last("r") == 5


def test_untracked_rooms_and_old_seqs_are_dropped() -> None:
    seq: Sequencer[str] = Sequencer()
    assert seq.offer("r", 1, "m1") == ([], None)
    seq.track("r", 3)
    assert seq.offer("r", 3, "m3") == ([], None)
    assert seq.offer("r", 2, "m2") == ([], None)
    seq.track("r", 0)  # already followed: unchanged
    assert seq.last("r") == 3
    seq.forget("r")
    assert seq.last("r") is None


def test_an_early_message_waits_and_reports_the_gap() -> None:
    seq: Sequencer[str] = Sequencer()
    seq.track("r", 0)
    assert seq.offer("r", 3, "m3") == ([], (0, 2))
    # a later arrival behind the same gap asks for nothing more
    assert seq.offer("r", 2, "m2") == ([], None)
    assert seq.offer("r", 3, "m3-again") == ([], None)
    assert seq.offer("r", 1, "m1") == (["m1", "m2", "m3"], None)
    # the store's answer comes after: nothing more to deliver
    assert seq.fill("r", [(1, "s1"), (2, "s2")]) == []
    assert seq.fetch_done("r") is None


def test_the_store_fills_a_gap_and_the_live_copy_wins() -> None:
    seq: Sequencer[str] = Sequencer()
    seq.track("r", 10)
    assert seq.offer("r", 12, "live12") == ([], (10, 11))
    assert seq.offer("r", 14, "live14") == ([], (11, 13))
    assert seq.fill("r", [(11, "s11")]) == ["s11", "live12"]
    assert seq.fill("r", [(12, "s12"), (13, "s13")]) == ["s13", "live14"]
    assert seq.fetch_done("r") is None


def test_a_failed_fetch_is_asked_again() -> None:
    seq: Sequencer[str] = Sequencer()
    seq.track("r", 0)
    assert seq.offer("r", 2, "m2") == ([], (0, 1))
    assert seq.fill("r", []) == []
    assert seq.fetch_done("r") == (0, 1)
    assert seq.fill("r", [(1, "s1")]) == ["s1", "m2"]
    assert seq.fetch_done("r") is None


def test_tracked_lists_rooms_and_their_last_seq() -> None:
    seq: Sequencer[str] = Sequencer()
    seq.track("a", 1)
    seq.track("b", 7)
    seq.offer("a", 2, "x")
    assert seq.tracked() == {"a": 2, "b": 7}


@given(
    st.integers(min_value=0, max_value=5),
    st.permutations(list(range(1, 25))),
    st.sets(st.integers(min_value=1, max_value=24)),
)
def test_every_seq_once_in_order_whatever_arrives(
    start: int, arrival: list[int], lost: set[int]
) -> None:
    seq: Sequencer[int] = Sequencer()
    seq.track("r", start)
    delivered: list[int] = []
    pending: list[tuple[int, int]] = []

    def answer(gap: tuple[int, int]) -> None:
        after, upto = gap
        delivered.extend(seq.fill("r", [(s, s) for s in range(after + 1, upto + 1)]))
        again = seq.fetch_done("r")
        if again is not None:
            pending.append(again)

    for s in arrival:
        if s in lost:
            continue
        ready, gap = seq.offer("r", s, s)
        delivered.extend(ready)
        if gap is not None:
            pending.append(gap)
        # answer some gaps late, after more arrivals
        if pending and s % 3 == 0:
            answer(pending.pop(0))
    while pending:
        answer(pending.pop(0))
    # the newest seqs, if lost live with nothing after them, come only with
    # a resync; everything up to the newest that arrived must be there
    newest = max((s for s in arrival if s not in lost), default=0)
    expected = list(range(start + 1, newest + 1))
    assert delivered == expected
