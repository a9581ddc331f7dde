"""Search: a query as words, and the newest-first scan both stores run.

Pure: no I/O, no clock reads (the scan is handed a function that says when
its time is up).

**Words.** A query is cut into words the way both stores' indexes cut text:
runs of letters and digits, after Unicode NFC (so a letter and an accent
typed apart stay one word). Everything else only separates words, so
nothing a user types reaches FTS5's or PostgreSQL's query syntax: ``"``,
``NEAR(``, ``-``, ``:``, parentheses and ``OR`` are plain words or nothing.
A word directly followed by ``*`` is a prefix (at least
``MIN_PREFIX`` characters: a one-letter prefix names half the vocabulary).
Every word must match; case and accents never count (the indexes fold
them). A query with no word at all, or over ``MAX_QUERY`` characters, is
``INVALID_FORMAT``.

**The scan** (``scan``) reads matches newest first in windows of ids: the
newest ``FIRST_WINDOW`` ids below ``before_id``, then windows ``GROWTH``
times larger, until the page is full, the ids run out, or the time budget
is spent. Each window is one indexed query bounded by its ids, so a common
word costs one small window and a rare one a handful of growing ones (a
million messages: at most eight), and the time budget is checked between
them. A page cut by the budget says where the scan stopped: asking again
from there goes on where it left off (``Page.next_before_id``).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from typing import Generic, NamedTuple, TypeVar

from chatd.errors import invalid_format

#: Longest query, in characters.
MAX_QUERY = 200
#: Shortest prefix (``ca*``), in characters.
MIN_PREFIX = 2
#: Ids in the first window of a scan, and how much larger each next one is.
FIRST_WINDOW = 4096
GROWTH = 4
#: The first window of a search with a prefix: an index without prefix
#: entries reads every word that begins with it for each window, whatever
#: the window's size, so such a search takes few windows.
PREFIX_WINDOW = 1 << 18

#: A word, and whether a ``*`` follows it directly.
_WORD = re.compile(r"([^\W_]+)(\*?)")


class Word(NamedTuple):
    text: str
    prefix: bool = False


class Request(NamedTuple):
    """One search, as a store runs it (``Store.search``)."""

    #: Who asks.
    user_id: int
    words: tuple[Word, ...]
    #: Only this channel (checked by the caller), or None: everything the
    #: user may read at ``now`` (Unix time).
    channel: str | None
    #: Only ids below this (None: any).
    before_id: int | None
    limit: int
    #: Seconds the scan may take (``scan``'s ``spent``).
    budget: float
    now: float


def parse(query: str) -> tuple[Word, ...]:
    """The words of a query (each once, in order); raises ``INVALID_FORMAT``."""
    if len(query) > MAX_QUERY:
        raise invalid_format(f"A search is at most {MAX_QUERY} characters", "data.query")
    words: dict[Word, None] = {}
    for match in _WORD.finditer(unicodedata.normalize("NFC", query)):
        word = Word(match.group(1), bool(match.group(2)))
        if word.prefix and len(word.text) < MIN_PREFIX:
            raise invalid_format(
                f"A prefix (a word ending in *) needs at least {MIN_PREFIX} characters",
                "data.query",
            )
        words[word] = None
    if not words:
        raise invalid_format("A search needs at least one word (letters or digits)", "data.query")
    return tuple(words)


def first_window(words: Sequence[Word]) -> int:
    """The first window of a search for these words (``scan``)."""
    return PREFIX_WINDOW if any(w.prefix for w in words) else FIRST_WINDOW


def fts5_match(words: Sequence[Word]) -> str:
    """An FTS5 MATCH expression: each word a quoted string (never syntax),
    the words ANDed."""
    return " ".join(f'"{w.text}"' + ("*" if w.prefix else "") for w in words)


def tsquery(words: Sequence[Word]) -> str:
    """A ``to_tsquery`` argument: each word quoted (letters and digits only,
    so never syntax), prefixes ``:*``, the words ANDed."""
    return " & ".join(f"'{w.text}'" + (":*" if w.prefix else "") for w in words)


T = TypeVar("T")


class Page(NamedTuple, Generic[T]):
    """A page of matches, newest first."""

    found: list[T]
    #: Where to go on from (the next ``before_id``); None: nothing older
    #: matches.
    next_before_id: int | None
    #: Whether the time budget cut the scan short.
    cut: bool = False


#: Read the matches with ids in [low, high), newest first, at most ``n``;
#: the last argument says whether the budget may stop this window midway
#: (never the first: a page always moves on).
Fetch = Callable[[int, int, int, bool], Sequence[T]]


def start(newest: int, before_id: int | None) -> int:
    """A scan's ``top``: below ``before_id``, and past the newest id."""
    return newest + 1 if before_id is None else min(before_id, newest + 1)


class Interrupted(Exception):
    """A store's query was stopped by the time budget: the window it was
    reading is left out of the page."""


def scan(
    fetch: Fetch[T],
    id_of: Callable[[T], int],
    top: int,
    limit: int,
    spent: Callable[[], bool],
    first: int = FIRST_WINDOW,
) -> Page[T]:
    """Up to ``limit`` matches with ids below ``top``, newest first, read
    window by window (``fetch``), the first one ``first`` ids; ``spent()``
    says when the time budget is over (checked after each window, so the
    first window always runs)."""
    found: list[T] = []
    high = top
    size = first
    while high > 1:
        low = max(1, high - size)
        try:
            found.extend(fetch(low, high, limit + 1 - len(found), size != first))
        except Interrupted:
            return Page(found, high, cut=True)
        if len(found) > limit:
            return Page(found[:limit], id_of(found[limit - 1]))
        high = low
        if high > 1 and spent():
            return Page(found, high, cut=True)
        size *= GROWTH
    return Page(found, None)
