"""Search in both stores (``Store.search``, ``Store.backfill``): what
matches, in what order, for whom, how a page is cut, and how a database
stored before the index is indexed; each test against SQLite and
PostgreSQL (the ``store`` fixture).

The property test draws random rooms, memberships, bans and conversations
and checks each user's results against a model written here: a search
returns every matching message the user may read, and nothing else.
"""

from __future__ import annotations

import itertools
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio

pytest.importorskip("hypothesis", reason="hypothesis is not installed (requirements-test.txt)")

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from chatd.config import RoomsConfig
from chatd.errors import ChatError
from chatd.moderation import Moderation
from chatd.search import FIRST_WINDOW, Request, parse
from chatd.store import NewMessage, StoredMessage, dm_channel, room_channel
from chatd.store.schema import MIGRATIONS, connect, statements
from tests.helpers.store import CREATED, AnyStore, Backend, changed, open_store, stored

#: A search's time budget that never runs out here.
FOREVER = 60.0


def text(content: str, room: str | None = "general", user: int = 1, **kw: Any) -> NewMessage:
    return NewMessage(
        user_id=user,
        username=f"user{user}",
        content=content,
        message_type="text",
        created_at=CREATED,
        room=room,
        **kw,
    )


async def post(store: AnyStore, content: str, **kw: Any) -> int:
    result = await stored(store, text(content, **kw))
    assert isinstance(result, StoredMessage), result
    return result.id


async def find(
    store: AnyStore,
    query: str,
    user: int = 1,
    channel: str | None = None,
    before_id: int | None = None,
    limit: int = 20,
    budget: float = FOREVER,
) -> tuple[list[int], int | None]:
    page = await store.search(Request(user, parse(query), channel, before_id, limit, budget, 0.0))
    return [m.id for m in page.found], page.next_before_id


async def rooms(store: AnyStore, **private: tuple[int, ...]) -> None:
    """general (user 9 its owner) and random, public; ``private`` rooms."""
    await store.declare_rooms(
        RoomsConfig(public=("general", "random"), private=private, owners={"general": (9,)})
    )


async def test_words_match_whatever_their_case_and_accents(store: AnyStore) -> None:
    await rooms(store)
    cafe = await post(store, "Le Café est OUVERT, l'été")
    await post(store, "une caféine ou un cafetier")
    for query in ("cafe", "CAFÉ", "café ouvert", "ete", "ÉTÉ cafe", "l ete", "ouv*", "CAF* été"):
        assert (await find(store, query))[0][-1:] == [cafe], query
    # whole words only: a word is not a part of one
    assert (await find(store, "caf"))[0] == []
    assert (await find(store, "ouvert fermé"))[0] == []  # every word must match
    assert len((await find(store, "caf*"))[0]) == 2


async def test_newest_first_paged_by_before_id(store: AnyStore) -> None:
    await rooms(store)
    posted = [await post(store, f"rapport numéro {i}") for i in range(7)]
    await post(store, "autre chose")
    newest_first = posted[::-1]
    first, more = await find(store, "rapport", limit=3)
    assert first == newest_first[:3] and more == first[-1]
    second, more = await find(store, "rapport", before_id=more, limit=3)
    assert second == newest_first[3:6] and more == second[-1]
    last, more = await find(store, "rapport", before_id=more, limit=3)
    assert last == newest_first[6:] and more is None


async def test_deleted_never_match_and_edits_match_their_current_content(store: AnyStore) -> None:
    await rooms(store)
    gone = await post(store, "secret du déploiement")
    edited = await post(store, "réunion lundi")
    await changed(store, gone, None)
    await changed(store, edited, "réunion mardi")
    assert (await find(store, "secret"))[0] == []
    assert (await find(store, "lundi"))[0] == []
    assert (await find(store, "mardi"))[0] == [edited]
    await changed(store, edited, "réunion jeudi")
    assert (await find(store, "mardi"))[0] == []
    assert (await find(store, "jeudi réunion"))[0] == [edited]


async def test_only_what_the_user_may_read(store: AnyStore) -> None:
    await rooms(store, staff=(1, 2))
    public = await post(store, "budget public", user=3)
    staff = await post(store, "budget staff", room="staff", user=1)
    direct = await post(store, "budget direct", room=None, user=1, to_user_id=2)
    other = await post(store, "budget autre", room=None, user=4, to_user_id=5)
    found = {user: set((await find(store, "budget", user=user))[0]) for user in (1, 2, 3, 4, 5, 6)}
    assert found[1] == found[2] == {public, staff, direct}
    assert found[3] == found[6] == {public}
    assert found[4] == found[5] == {public, other}
    # one room, one conversation (the caller checked they may read it)
    assert (await find(store, "budget", user=1, channel=room_channel("staff")))[0] == [staff]
    assert (await find(store, "budget", user=2, channel=dm_channel(2, 1)))[0] == [direct]
    # a ban takes the room's messages out of the user's results while it lasts
    await store.upsert_user(3, "user3")
    await store.moderate(
        Moderation(action="ban", room="general", actor_id=9, user_id=3, until=None, at=1.0)
    )
    assert (await find(store, "budget", user=3))[0] == []


async def test_a_page_cut_by_its_time_says_where_to_go_on(store: AnyStore) -> None:
    """Budget 0: the first window runs, then the scan stops; asking again
    from ``next_before_id`` finds the rest, nothing twice."""
    await rooms(store)
    old = await post(store, "ancien projet")
    # one window of other messages between it and the newest
    await store.write(lambda conn: None)
    for start in range(0, FIRST_WINDOW, 512):
        for i in range(start, min(FIRST_WINDOW, start + 512)):
            await store.append(text(f"bruit {i}"), lambda result: None)
        await store.flush()
    new = await post(store, "nouveau projet")
    found, more = await find(store, "projet", budget=0.0)
    assert found == [new] and more is not None and more > old
    rest, more = await find(store, "projet", before_id=more, budget=FOREVER)
    assert rest == [old] and more is None


async def test_nothing_found_when_no_message_yet(store: AnyStore) -> None:
    await rooms(store)
    assert await find(store, "rien") == ([], None)


# --- a database stored before the index ---------------------------------------


def old_database(backend: Backend, contents: list[str]) -> None:
    """A database at the schema before search, with messages in general."""
    kind, where = backend
    rows = [(seq, content, CREATED) for seq, content in enumerate(contents, 1)]
    insert = (
        "INSERT INTO messages (channel, seq, user_id, username, message_type, content,"
        " created_at) VALUES ('r:general', {0}, 1, 'user1', 'text', {0}, {0})"
    )
    if kind == "postgres":
        import psycopg

        from chatd.store.pgschema import MIGRATIONS as PG_MIGRATIONS

        with psycopg.connect(where, autocommit=True) as pg:
            with pg.transaction():
                pg.execute("CREATE TABLE schema_version (version integer NOT NULL)")
                for migration in PG_MIGRATIONS[:7]:
                    pg.execute(migration)
                pg.execute("INSERT INTO schema_version VALUES (7)")
                pg.execute(
                    "INSERT INTO rooms (name, created_at) VALUES ('general', %s)", (CREATED,)
                )
                pg.execute(
                    "INSERT INTO channels (name, seq, pos) VALUES ('r:general', %s, %s)",
                    (len(rows), len(rows)),
                )
                pg.cursor().executemany(insert.format("%s"), rows)
        return
    path = Path(where)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = connect(where)
    for number, migration in enumerate(MIGRATIONS[:8]):
        for statement in statements(migration):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {number + 1}")
    conn.execute(
        "INSERT INTO rooms (name, private, created_at) VALUES ('general', 0, ?)", (CREATED,)
    )
    conn.executemany(insert.format("?"), rows)
    conn.close()


async def test_an_older_database_is_indexed_in_batches_newest_first(backend: Backend) -> None:
    old_database(backend, [f"archive {i}" for i in range(1, 1201)])
    async with open_store(backend) as older:
        # not indexed yet; what comes now is
        assert (await find(older, "archive"))[0] == []
        new = await post(older, "archive nouvelle")
        assert (await find(older, "archive"))[0] == [new]
        # changed before being indexed: indexed as it is now, never twice
        await changed(older, 1000, "archive modifiée")
        await changed(older, 1100, None)
        assert await older.backfill(500) == 700
        found = (await find(older, "archive", limit=1000))[0]
        assert found == [new, *[i for i in range(1200, 700, -1) if i != 1100]]
        assert await older.backfill(500) == 200
        assert await older.backfill(500) == 0
        assert await older.backfill(500) == 0
        found = (await find(older, "archive", limit=2000))[0]
        assert found == [new, *[i for i in range(1200, 0, -1) if i != 1100]]
        assert (await find(older, "modifiee"))[0] == [1000]
    if backend[0] == "sqlite":
        check = sqlite3.connect(backend[1])
        check.execute("INSERT INTO messages_search (messages_search) VALUES ('integrity-check')")
        check.close()


# --- SQLite: new messages indexed a batch at a time -------------------------------


def indexed(path: str, word: str) -> list[int]:
    """The ids FTS5 itself has for ``word`` (not through a search, which
    indexes what is waiting first)."""
    conn = connect(path, readonly=True)
    try:
        rows = conn.execute(
            "SELECT rowid FROM messages_search WHERE messages_search MATCH ? ORDER BY rowid",
            (f'"{word}"',),
        ).fetchall()
        return [r[0] for r in rows]
    finally:
        conn.close()


def check_index(path: str) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.execute("INSERT INTO messages_search (messages_search) VALUES ('integrity-check')")
    finally:
        conn.close()


async def test_sqlite_indexes_new_messages_later_and_a_search_finds_them_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stored messages wait to be indexed (a commit of their own for the
    index costs as much as the message); a search indexes what waits
    first, so it finds every message stored before it, in its current
    content: changed or deleted while waiting, indexed as it is."""
    from chatd.store import sqlite as lite

    monkeypatch.setattr(lite, "INDEX_DELAY", 3600.0)
    path = str(tmp_path / "chatd.db")
    async with open_store(("sqlite", path)) as store:
        await rooms(store)
        first = await post(store, "attente une")
        second = await post(store, "attente deux")
        third = await post(store, "attente trois")
        await changed(store, second, "changée deux")
        await changed(store, third, None)
        assert indexed(path, "attente") == []  # waiting
        assert (await find(store, "attente"))[0] == [first]
        assert (await find(store, "changee"))[0] == [second]
        assert indexed(path, "attente") == [first] and indexed(path, "changee") == [second]
        # changed once indexed: the triggers keep the index right
        await changed(store, first, "plus rien")
        assert (await find(store, "attente"))[0] == []
        last = await post(store, "attente finale")
    # what waits at a clean stop is indexed before the file is closed
    assert indexed(path, "attente") == [last]
    check_index(path)


async def test_sqlite_writer_indexes_waiting_messages_by_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past ``INDEX_DELAY`` the writer indexes what waits, between groups,
    ``INDEX_BATCH`` ids at a time, with no search to ask it; and what a
    crash left waiting is indexed after the next start."""
    from chatd.store import sqlite as lite

    monkeypatch.setattr(lite, "INDEX_DELAY", 0.0)
    monkeypatch.setattr(lite, "INDEX_BATCH", 2)
    path = str(tmp_path / "chatd.db")
    async with open_store(("sqlite", path)) as store:
        # each message's group followed by a batch (of 2 ids: enough)
        ids = [await post(store, f"lot {i}") for i in range(5)]
        await store.flush()
        assert indexed(path, "lot") == ids
    check_index(path)
    # a crash: messages stored, never indexed
    conn = connect(path)
    conn.execute("BEGIN IMMEDIATE")
    crashed = [lite.insert_message(conn, text(f"perdu {i}"), {}) for i in range(3)]
    conn.execute("COMMIT")
    conn.close()
    assert indexed(path, "perdu") == []
    async with open_store(("sqlite", path)) as store:
        # two batches: one at the start, one after the first group
        await store.flush()
        await store.flush()
        assert indexed(path, "perdu") == [m.id for m in crashed if isinstance(m, StoredMessage)]
        assert len(indexed(path, "perdu")) == 3
    check_index(path)


# --- property: exactly what each user may read ---------------------------------

USERS = (1, 2, 3, 4)


@st.composite
def worlds(draw: st.DrawFn) -> dict[str, Any]:
    """Rooms (private or not, their members), bans, and messages in rooms
    and conversations, some deleted, some with a second word."""
    rooms = draw(
        st.lists(
            st.tuples(st.booleans(), st.frozensets(st.sampled_from(USERS))), min_size=1, max_size=4
        )
    )
    bans = draw(st.frozensets(st.tuples(st.integers(0, len(rooms) - 1), st.sampled_from(USERS))))
    room_message = st.tuples(
        st.just("room"), st.integers(0, len(rooms) - 1), st.sampled_from(USERS), st.booleans(),
        st.booleans(),
    )  # fmt: skip
    direct = st.tuples(
        st.just("dm"), st.sampled_from(USERS), st.sampled_from(USERS), st.booleans(), st.booleans()
    ).filter(lambda m: m[1] != m[2])
    messages = draw(st.lists(st.one_of(room_message, direct), max_size=16))
    return {"rooms": rooms, "bans": bans, "messages": messages}


_examples = itertools.count()


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
@given(world=worlds())
def test_search_finds_exactly_what_each_user_may_read(
    backend: Backend, world: dict[str, Any]
) -> None:
    trio.run(_check_world, backend, world, next(_examples))


async def _check_world(backend: Backend, world: dict[str, Any], n: int) -> None:
    """One example in the test's database: its own users, rooms and word."""
    base = 100 * (n + 1)
    users = [base + u for u in USERS]
    owner = base + 9
    names = [f"w{n}r{i}" for i in range(len(world["rooms"]))]
    word = f"mot{n}"
    async with open_store(backend) as store:
        for uid in (*users, owner):
            await store.upsert_user(uid, f"user{uid}")
        await store.declare_rooms(
            RoomsConfig(
                public=tuple(
                    n for n, (private, _) in zip(names, world["rooms"], strict=True) if not private
                ),
                private={
                    name: tuple(base + u for u in members)
                    for name, (private, members) in zip(names, world["rooms"], strict=True)
                    if private
                },
                owners={name: (owner,) for name in names},
            )
        )
        for index, user in world["bans"]:
            await store.moderate(
                Moderation(
                    action="ban", room=names[index], actor_id=owner, user_id=base + user,
                    until=None, at=1.0,
                )
            )  # fmt: skip
        readers: dict[int, set[int]] = {}
        second: set[int] = set()
        for kind, where, author, deleted, extra in world["messages"]:
            content = f"{word} extra" if extra else word
            if kind == "room":
                private, members = world["rooms"][where]
                message_id = await post(store, content, room=names[where], user=base + author)
                may = {
                    u for u in USERS
                    if (not private or u in members) and (where, u) not in world["bans"]
                }  # fmt: skip
            else:
                message_id = await post(
                    store, content, room=None, user=base + where, to_user_id=base + author
                )
                may = {where, author}
            if deleted:
                await changed(store, message_id, None, user=0)  # (the publish API's sender)
                continue
            readers[message_id] = may
            if extra:
                second.add(message_id)
        for u in USERS:
            expected = sorted((m for m, may in readers.items() if u in may), reverse=True)
            assert (await find(store, word, user=base + u, limit=50))[0] == expected
            both = [m for m in expected if m in second]
            assert (await find(store, f"EXTRA {word}", user=base + u, limit=50))[0] == both


async def test_a_window_running_past_the_budget_is_left_out(tmp_path: Path) -> None:
    """SQLite's progress handler stops the second window's query when the
    time is up (a clock that says so once the first window is read): the
    page holds the first window's matches, and goes on from the second's
    top. The matches the user may not read in between cost steps, not
    results."""
    from chatd.store import sqlite as lite

    path = str(tmp_path / "chatd.db")
    async with open_store(("sqlite", path)) as store:
        await rooms(store, staff=(1,))
        old = await post(store, "projet ancien")
        for start in range(0, 3 * FIRST_WINDOW, 512):
            for i in range(start, start + 512):
                await store.append(text(f"projet {i}", room="staff"), lambda result: None)
            await store.flush()
        new = await post(store, "projet nouveau")
    ticks = iter([0.0, 0.0])  # the deadline, then the look after the first window
    conn = connect(path, readonly=True)
    try:
        words = parse("projet")
        clock = lambda: next(ticks, 1e9)  # noqa: E731
        page = lite.search(conn, Request(3, words, None, None, 20, 1.0, 0.0), clock)
        assert page.found and [m.id for m in page.found] == [new]
        assert page.next_before_id == new + 1 - FIRST_WINDOW
        # and with time enough, everything
        page = lite.search(conn, Request(3, words, None, None, 20, FOREVER, 0.0))
        assert [m.id for m in page.found] == [new, old] and page.next_before_id is None
    finally:
        conn.close()


_SYNTAX = ['"', "NEAR(", "*", "-", ":", "(", ")", "OR", "AND", "NOT", "^", "+", "{", "}",
           "'", "\\", "&", "|", "!", "<->", ":*", "caf*", "x", "é", "²", "_", "\u0000"]  # fmt: skip


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
@given(query=st.text(max_size=60) | st.lists(st.sampled_from(_SYNTAX), max_size=8).map(" ".join))
def test_any_query_is_refused_or_searched_never_an_index_error(
    backend: Backend, query: str
) -> None:
    """Whatever the text, ``parse`` refuses it (INVALID_FORMAT) or both
    indexes take its words: no FTS5 or tsquery syntax error, ever."""
    try:
        words = parse(query)
    except ChatError as refused:
        assert refused.code == "INVALID_FORMAT"
        return
    trio.run(_search_once, backend, words)


async def _search_once(backend: Backend, words: Any) -> None:
    async with open_store(backend) as store:
        if not await store.user_exists(1):
            await rooms(store)
            await post(store, "un café, x ² é")
            await store.upsert_user(1, "user1")
        page = await store.search(Request(1, words, None, None, 20, FOREVER, 0.0))
        assert page.next_before_id is None
