"""The pure part of search (``chatd.search``): a query's words, the
expressions each index is given, and the newest-first scan in windows."""

from __future__ import annotations

import pytest

from chatd.errors import ChatError
from chatd.search import FIRST_WINDOW, GROWTH, Interrupted, Word, fts5_match, parse, scan, tsquery


def test_words_are_runs_of_letters_and_digits() -> None:
    assert parse('l\'"été" NEAR(cafe) OR -x:y ca* foo_bar 3.14') == (
        Word("l"),
        Word("été"),
        Word("NEAR"),
        Word("cafe"),
        Word("OR"),
        Word("x"),
        Word("y"),
        Word("ca", prefix=True),
        Word("foo"),
        Word("bar"),
        Word("3"),
        Word("14"),
    )
    # a letter and its accent typed apart are one word; a word once
    assert parse("cafe\u0301 café") == (Word("café"),)


@pytest.mark.parametrize("query", ["", " ", "*", '"', "()", "-:", "x" * 201, "a*", "_"])
def test_queries_without_a_word_are_refused(query: str) -> None:
    with pytest.raises(ChatError) as refused:
        parse(query)
    assert refused.value.code == "INVALID_FORMAT"
    assert refused.value.details == {"field": "data.query"}


def test_each_index_gets_quoted_words_only() -> None:
    words = parse('a" OR NEAR(b) caf*')
    assert fts5_match(words) == '"a" "OR" "NEAR" "b" "caf"*'
    assert tsquery(words) == "'a' & 'OR' & 'NEAR' & 'b' & 'caf':*"


class Ids:
    """Matches at given ids; records the windows asked for."""

    def __init__(self, matches: list[int], interrupt_at: int = 0) -> None:
        self.matches = sorted(matches, reverse=True)
        self.windows: list[tuple[int, int]] = []
        self.interrupt_at = interrupt_at

    def __call__(self, low: int, high: int, n: int, interruptible: bool) -> list[int]:
        assert interruptible is (len(self.windows) > 0)  # never the first window
        self.windows.append((low, high))
        if len(self.windows) == self.interrupt_at:
            raise Interrupted
        return [m for m in self.matches if low <= m < high][:n]


def test_windows_grow_until_the_page_is_full() -> None:
    fetch = Ids([5, 100_000, 100_001, 100_002])
    page = scan(fetch, int, 200_000, 3, lambda: False)
    assert page.found == [100_002, 100_001, 100_000] and page.next_before_id == 100_000
    assert not page.cut
    top, size = 200_000, FIRST_WINDOW
    for low, high in fetch.windows:
        assert (low, high) == (max(1, top - size), top)
        top, size = low, size * GROWTH
    # the next page goes on below the last match, and ends with the ids
    rest = scan(Ids([5, 100_000, 100_001, 100_002]), int, 100_000, 3, lambda: False)
    assert rest.found == [5] and rest.next_before_id is None


def test_a_page_says_more_only_when_one_more_match_was_read() -> None:
    # (a page reads one match past its limit to know)
    page = scan(Ids([1, 2]), int, 10, 2, lambda: False)
    assert page.found == [2, 1] and page.next_before_id is None
    page = scan(Ids([1, 2, 3]), int, 10, 2, lambda: False)
    assert page.found == [3, 2] and page.next_before_id == 2


def test_time_up_cuts_between_windows_and_says_where() -> None:
    fetch = Ids([199_999, 10])
    page = scan(fetch, int, 200_000, 20, lambda: True)
    assert page.found == [199_999] and len(fetch.windows) == 1
    assert page.next_before_id == 200_000 - FIRST_WINDOW and page.cut


def test_an_interrupted_window_is_left_out() -> None:
    fetch = Ids([199_999, 190_000, 10], interrupt_at=2)
    page = scan(fetch, int, 200_000, 20, lambda: False)
    assert page.found == [199_999] and page.next_before_id == 200_000 - FIRST_WINDOW
    assert page.cut
