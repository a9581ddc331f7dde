"""The Store contract: what the SQLite store and the PostgreSQL store both
promise, every test run against each (``store`` is parametrized over the two
backends; the PostgreSQL half skips, saying why, when no PostgreSQL can start).

Only the ``Store`` interface is used, plus ``write`` with an operation that
ignores its connection (to hold the writer thread while a group is queued, or
to fail), so each test says the same thing of both stores. What only one of
them does is tested beside it: SQLite's pragmas, query plans and files in
test_store.py, PostgreSQL's several nodes and lost connections in
test_store_postgres.py.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from typing import Any

import msgspec
import pytest
import trio
import trio.lowlevel

from chatd.config import RoomsConfig
from chatd.errors import ChatError, ErrorCode
from chatd.metrics import Metrics
from chatd.moderation import Moderated, Moderation
from chatd.store import (
    Change,
    ChannelMarkers,
    Missed,
    NewMessage,
    ReadPoint,
    RoomAccess,
    StoredEvent,
    StoredMessage,
    dm_channel,
    room_channel,
)
from tests.helpers.store import (
    CREATED,
    AnyStore,
    Backend,
    Recorder,
    fill,
    group_sizes,
    msg,
    open_store,
    stored,
    writer_held,
)

GENERAL = room_channel("general")
RANDOM = room_channel("random")


def ids(messages: list[StoredMessage]) -> list[int]:
    return [m.id for m in messages]


# --- append -------------------------------------------------------------------


async def test_appends_call_back_in_commit_order_with_ids_and_seqs(store: AnyStore) -> None:
    rec = Recorder()
    sent: dict[tuple[int, int], NewMessage] = {}

    async def sender(user: int) -> None:
        for i in range(60):
            if i % 3 == 2:
                m = msg(i, room=None, user=user, to_user_id=9)
            else:
                m = msg(i, room=("general", "random")[(i + user) % 2], user=user)
            sent[(user, i)] = m
            await store.append(m, rec)
            if i % 5 == 0:
                await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        for user in (1, 2, 3):
            nursery.start_soon(sender, user)
    await store.flush()

    assert len(rec.stored) == len(rec.results) == 180
    assert all(rec.in_trio)
    # Commit order is id order; each callback got the very message it was given.
    assert all(a < b for a, b in itertools.pairwise(ids(rec.stored)))
    assert {id(r.message) for r in rec.stored} == {id(m) for m in sent.values()}
    for user in (1, 2, 3):
        mine = [r.message for r in rec.stored if r.message.user_id == user]
        assert mine == [sent[(user, i)] for i in range(60)]
    # Each channel's seqs are 1..n in commit order, and its history is what
    # the callbacks said, field for field.
    channels = {GENERAL, RANDOM} | {dm_channel(user, 9) for user in (1, 2, 3)}
    for channel in channels:
        mine = [
            r
            for r in rec.stored
            if (r.message.room and room_channel(r.message.room)) == channel
            or (r.message.room is None and dm_channel(r.message.user_id, 9) == channel)
        ]
        assert [r.seq for r in mine] == list(range(1, len(mine) + 1))
        assert await store.history(channel, 1000, 0) == (mine, len(mine))


async def test_closing_commits_everything_queued(backend: Backend) -> None:
    rec = Recorder()
    async with open_store(backend) as store:
        for i in range(300):
            await store.append(msg(i), rec)
    assert len(rec.stored) == 300
    async with open_store(backend) as store:
        messages, total = await store.history(GENERAL, 1000, 0)
        assert (ids(messages), total) == (ids(rec.stored), 300)


async def test_flush_returns_after_earlier_appends_commit(store: AnyStore) -> None:
    rec = Recorder()
    async with writer_held(store) as gate:
        for i in range(20):
            await store.append(msg(i), rec)
        assert rec.results == []
        gate.set()
        await store.flush()
        assert len(rec.stored) == 20
        messages, total = await store.history(GENERAL, 100, 0)
        assert (ids(messages), total) == (ids(rec.stored), 20)


async def test_history_and_ids_survive_a_restart(backend: Backend) -> None:
    async with open_store(backend) as store:
        first = await fill(store, "general", 7)
        before = await store.history(GENERAL, 5, 0)
    async with open_store(backend) as store:
        assert await store.history(GENERAL, 5, 0) == before
        more = await fill(store, "general", 3)
        assert min(more) > max(first)
        messages, total = await store.history(GENERAL, 100, 0)
        assert (ids(messages), total) == (first + more, 10)
        assert [m.seq for m in messages] == list(range(1, 11))


# --- failures within a group ----------------------------------------------------


async def test_reply_to_across_channels_is_refused_and_the_rest_of_the_group_commits(
    backend: Backend,
) -> None:
    metrics = Metrics()
    async with open_store(backend, metrics=metrics) as store:
        g0 = await stored(store, msg(0, room="general"))
        r0 = await stored(store, msg(1, room="random"))
        d0 = await stored(store, msg(2, room=None, user=1, to_user_id=2))
        assert isinstance(g0, StoredMessage) and isinstance(r0, StoredMessage)
        assert isinstance(d0, StoredMessage)

        group = [
            msg(3, room="general", reply_to=g0.id),  # fine
            msg(4, room="general", reply_to=r0.id),  # another room
            msg(5, room="general", reply_to=r0.id + 10_000),  # no such message
            msg(6, room="general", reply_to=d0.id),  # a conversation's
            msg(7, room=None, user=2, to_user_id=1, reply_to=d0.id),  # fine
            msg(8, room=None, user=2, to_user_id=3, reply_to=d0.id),  # another one's
            NewMessage(
                user_id=2,
                username="bob",
                content="+1",
                message_type="reaction",
                created_at=CREATED,
                room="random",
                reply_to=r0.id,
            ),
            msg(9, room="general"),
        ]
        rec = Recorder()
        last = trio.Event()
        before = group_sizes(metrics)
        async with writer_held(store):
            for m in group[:-1]:
                await store.append(m, rec)
            await store.append(group[-1], lambda r: (rec(r), last.set()))
        await last.wait()
        groups, operations, small = (
            a - b for a, b in zip(group_sizes(metrics), before, strict=True)
        )
        # One group held the writer; the other eight were one group after it.
        assert (groups, operations, small) == (2, 9, 1)

        assert [type(r) for r in rec.results] == [
            StoredMessage,
            ChatError,
            ChatError,
            ChatError,
            StoredMessage,
            ChatError,
            StoredMessage,
            StoredMessage,
        ]
        for err in rec.results:
            if isinstance(err, ChatError):
                assert err.code is ErrorCode.INVALID_FORMAT
                assert err.details == {"field": "data.reply_to"}
        ok = rec.stored
        assert [r.message for r in ok] == [group[0], group[4], group[6], group[7]]
        # The refused ones take no seq: every channel stays dense.
        assert [r.seq for r in ok] == [2, 2, 2, 3]
        messages, total = await store.history(GENERAL, 100, 0)
        assert (ids(messages), total) == ([g0.id, ok[0].id, ok[3].id], 3)
        assert [m.message.reply_to for m in messages] == [None, g0.id, None]
        messages, total = await store.history(dm_channel(1, 2), 100, 0)
        assert (ids(messages), total) == ([d0.id, ok[1].id], 2)
        assert await store.history(dm_channel(2, 3), 100, 0) == ([], 0)


async def test_a_failing_operation_fails_only_itself(store: AnyStore) -> None:
    rec = Recorder()
    errors: list[Exception] = []

    def bad(conn: Any) -> None:
        raise ValueError("boom")

    async def run_bad() -> None:
        try:
            await store.write(bad)
        except ValueError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery, writer_held(store):
        for i in range(5):
            await store.append(msg(i), rec)
        nursery.start_soon(run_bad)
        await trio.testing.wait_all_tasks_blocked()  # run_bad has queued its op
        for i in range(5, 10):
            await store.append(msg(i), rec)
    await store.flush()
    assert [str(e) for e in errors] == ["boom"]
    assert [r.message.content for r in rec.stored] == [f"message {i}" for i in range(10)]
    assert [r.seq for r in rec.stored] == list(range(1, 11))
    messages, total = await store.history(GENERAL, 100, 0)
    assert (ids(messages), total) == (ids(rec.stored), 10)


# --- reading ------------------------------------------------------------------


async def test_history_pages_count_back_from_the_newest(store: AnyStore) -> None:
    assert await store.history(GENERAL, 10, 0) == ([], 0)
    assert await store.history(GENERAL, 10, 5) == ([], 0)
    general = await fill(store, "general", 25)
    random = await fill(store, "random", 3)

    async def page(limit: int, offset: int) -> tuple[list[int], int]:
        messages, total = await store.history(GENERAL, limit, offset)
        assert [m.seq for m in messages] == sorted(m.seq for m in messages)  # oldest first
        return ids(messages), total

    assert await page(10, 0) == (general[15:], 25)
    assert await page(10, 10) == (general[5:15], 25)
    assert await page(10, 20) == (general[:5], 25)
    assert await page(10, 25) == ([], 25)
    assert await page(10, 1000) == ([], 25)
    assert await page(5, 15) == (general[5:10], 25)
    assert await page(1, 0) == (general[-1:], 25)
    assert await page(100, 0) == (general, 25)
    messages, total = await store.history(RANDOM, 2, 0)
    assert (ids(messages), total) == (random[1:], 3)
    # A room whose name is a prefix of another is its own room.
    assert await store.history(room_channel("gen"), 10, 0) == ([], 0)


async def test_missed(store: AnyStore) -> None:
    assert await store.missed(GENERAL, 0, 10) == Missed(0, 0, True, 0)
    general = await fill(store, "general", 6)
    random = await fill(store, "random", 1)
    general += await fill(store, "general", 4)

    async def missed(since_id: int, cap: int) -> tuple[list[int], bool]:
        """The ids a replay reads (``after`` from where ``missed`` says), and
        whether that is all."""
        where = await store.missed(GENERAL, since_id, cap)
        assert where.newest_id == general[-1]  # the room's newest id, whatever was asked
        return ids(await store.after(GENERAL, where.after_seq, 100)), where.complete

    assert await missed(general[6], 100) == (general[7:], True)
    assert await missed(general[6], 3) == (general[7:], True)  # exactly the cap
    assert await missed(general[6], 2) == (general[8:], False)  # the newest two
    assert await missed(general[-1], 5) == ([], True)
    assert await missed(0, 100) == (general, True)
    assert await missed(0, 4) == (general[6:], False)
    assert await missed(general[-1], 0) == ([], True)
    assert await missed(general[-2], 0) == ([], False)
    # An id of another room counts as a point in time.
    assert await missed(random[0], 100) == (general[6:], True)
    assert await missed(general[-1] + 1000, 10) == ([], True)


async def test_after(store: AnyStore) -> None:
    assert await store.after(GENERAL, 0, 10) == []
    general = await fill(store, "general", 10)
    await fill(store, "random", 2)
    assert ids(await store.after(GENERAL, 0, 100)) == general
    assert ids(await store.after(GENERAL, 7, 100)) == general[7:]
    assert ids(await store.after(GENERAL, 2, 3)) == general[2:5]  # the oldest three
    assert [m.seq for m in await store.after(GENERAL, 2, 3)] == [3, 4, 5]
    assert await store.after(GENERAL, 10, 5) == []
    assert ids(await store.after(RANDOM, 1, 5)) == ids(await store.after(RANDOM, 0, 5))[1:]


async def test_direct_since(store: AnyStore) -> None:
    t1, t2, t3 = "2024-05-01T12:00:00.000Z", "2024-05-01T12:00:00.500Z", "2024-05-02T00:00:00.000Z"

    def dm(sender: int, to: int, at: str) -> NewMessage:
        return NewMessage(sender, f"user{sender}", f"{sender}>{to}", "text", at, to_user_id=to)

    sent = [
        dm(1, 2, t1),
        dm(3, 1, t2),
        dm(2, 3, t3),
        dm(4, 5, t2),
        NewMessage(1, "user1", "in a room", "text", t2, room="general"),
        NewMessage(0, "system", "", "notification", t3, to_user_id=1, data=b"{}"),
    ]
    rec = Recorder()
    for m in sent:
        await store.append(m, rec)
    await store.flush()
    by_content = {r.message.content: r.id for r in rec.stored}

    async def direct(users: list[int], since: str, cap: int) -> list[str]:
        found = await store.direct_since(users, since, cap)
        assert ids(found) == sorted(ids(found))
        return [m.message.content for m in found]

    assert await direct([1], t1, 10) == ["1>2", "3>1", ""]
    assert await direct([1], t2, 10) == ["3>1", ""]
    assert await direct([1], "2024-05-01T12:00:00.501Z", 10) == [""]
    assert await direct([1, 4], t1, 10) == ["1>2", "3>1", "4>5", ""]
    assert await direct([1, 4], t1, 2) == ["1>2", "3>1"]
    assert await direct([3], t1, 10) == ["3>1", "2>3"]
    assert await direct([6], t1, 10) == []
    assert await direct([], t1, 10) == []
    assert by_content["in a room"] not in ids(await store.direct_since([1], t1, 10))


async def test_room_access_and_private_membership(store: AnyStore) -> None:
    assert await store.room_access("general", 1) is None
    await store.declare_rooms(
        RoomsConfig(public=("general",), private={"staff": (1, 2), "secret": (9,)})
    )
    assert await store.room_access("general", 1) == RoomAccess("general", False, True)
    assert await store.room_access("staff", 1) == RoomAccess("staff", True, True)
    assert await store.room_access("staff", 2) == RoomAccess("staff", True, True)
    assert await store.room_access("staff", 3) == RoomAccess("staff", True, False)
    assert await store.room_access("secret", 1) == RoomAccess("secret", True, False)
    assert await store.room_access("nowhere", 1) is None
    await fill(store, "random", 2)  # not a declared room: no access row
    assert await store.room_access("random", 1) is None


async def test_moderation_is_checked_applied_and_logged_where_it_is_stored(
    store: AnyStore,
) -> None:
    await store.declare_rooms(
        RoomsConfig(
            public=("general",),
            private={"staff": (1, 5)},
            owners={"general": (1,), "staff": (1,)},
            moderators={"general": (2,)},
        )
    )
    for uid, name in ((1, "owner"), (2, "mod"), (5, "bob")):
        await store.upsert_user(uid, name)
    access = await store.room_access("general", 5)
    assert access is not None and access.rules.roles == {1: "owner", 2: "moderator"}

    def act(action: str, actor: int, user: int, **more: object) -> Moderation:
        return Moderation(action=action, room=more.pop("room", "general"), actor_id=actor,
                          user_id=user, at=1000.0, **more)  # type: ignore[arg-type]  # fmt: skip

    ban = act("ban", 2, 5, until=2000.0, reason="spam")
    assert await store.moderate(ban) == Moderated("ban", "general", 5, 2000.0)
    access = await store.room_access("general", 5)  # (the cache was forgotten)
    assert access is not None and access.rules.until(5, "ban", 1999.0) == 2000.0
    assert access.rules.until(5, "ban", 2000.0) is False
    for refused, code in (
        (act("kick", 2, 1), ErrorCode.PERMISSION_DENIED),  # on the owner
        (act("kick", 5, 2), ErrorCode.PERMISSION_DENIED),  # by a member
        (act("ban", 2, 77), ErrorCode.USER_NOT_FOUND),
        (act("ban", 2, 5, room="nowhere"), ErrorCode.ROOM_NOT_FOUND),
    ):
        with pytest.raises(ChatError) as answer:
            await store.moderate(refused)
        assert answer.value.code is code, (refused, answer.value)
    assert await store.moderate(act("unban", 2, 5)) == Moderated("unban", "general", 5, None)
    access = await store.room_access("general", 5)
    assert access is not None and access.rules.until(5, "ban", 1500.0) is False
    # a kick out of a private room ends the membership
    assert await store.moderate(act("kick", 1, 5, room="staff")) == Moderated(
        "kick", "staff", 5, None
    )
    staff = await store.room_access("staff", 5)
    assert staff is not None and not staff.allowed
    # roles: set, taken back, a room that does not exist
    assert await store.set_role("general", 5, "moderator", 0, 1001.0)
    assert await store.set_role("general", 5, "member", 0, 1002.0)
    assert not await store.set_role("nowhere", 5, "owner", 0, 1003.0)
    q = store.queries
    log = await store.read(lambda c: q.audit(c, "general", 100))
    assert [(e.action, e.role, e.actor_id, e.user_id) for e in log] == [
        ("set_role", "owner", 0, 1),
        ("set_role", "moderator", 0, 2),
        ("ban", None, 2, 5),
        ("unban", None, 2, 5),
        ("set_role", "moderator", 0, 5),
        ("set_role", "member", 0, 5),
    ]
    assert (log[2].until, log[2].reason, log[2].at) == (2000.0, "spam", 1000.0)
    assert [e.action for e in await store.read(lambda c: q.audit(c, "general", 2))] == [
        "set_role",
        "set_role",
    ]
    # the config's roles again (a restart): nothing changes, nothing logged
    await store.declare_rooms(
        RoomsConfig(public=("general",), owners={"general": (1,)}, moderators={"general": (2,)})
    )
    assert len(await store.read(lambda c: q.audit(c, "general", 100))) == len(log)


async def test_a_blocked_users_direct_messages_are_refused_where_they_are_stored(
    store: AnyStore,
) -> None:
    for uid in (1, 2, 3):
        await store.upsert_user(uid, f"user{uid}")
    assert await store.block(1, 2, True) == [2]
    assert await store.block(1, 3, True) == [2, 3]
    assert await store.block(1, 3, False) == [2]
    for refused, code in (((1, 1, True), ErrorCode.INVALID_FORMAT), ((1, 9, True), None)):
        with pytest.raises(ChatError) as err:
            await store.block(*refused)
        assert err.value.code is (code or ErrorCode.USER_NOT_FOUND)
    assert await store.blocks(1) == [2] and await store.blocks(2) == []
    assert await store.all_blocks() == [(1, 2)]
    # a group with both: the blocked pair's message refused, the rest stored
    rec = Recorder()
    await store.append(msg(0, room=None, user=2, to_user_id=1), rec)  # blocked
    await store.append(msg(1, room=None, user=1, to_user_id=2), rec)  # the other way
    await store.append(msg(2, room=None, user=3, to_user_id=1), rec)
    await store.append(msg(3, room="general", user=2), rec)  # rooms: not blocked
    await store.flush()
    refused, *kept = rec.results
    assert isinstance(refused, ChatError) and refused.code is ErrorCode.PERMISSION_DENIED
    assert all(isinstance(m, StoredMessage) for m in kept), kept
    history, total = await store.history(dm_channel(1, 2), 10, 0)
    assert total == 1 and history[0].message.user_id == 1


async def test_the_retention_purge_keeps_history_and_recovery_whole(store: AnyStore) -> None:
    """Five old messages and two new in a room, interleaved with a room kept
    for ever and a conversation: purged two rows at a time in id order,
    with their edits, versions and mentions; history counts what is kept,
    and a recovery from before the horizon is not whole."""
    await store.declare_rooms(RoomsConfig(public=("general", "random")))
    for uid in (1, 2):
        await store.upsert_user(uid, f"user{uid}")
    old, new = "2026-01-01T00:00:00.000Z", "2026-03-01T00:00:00.000Z"
    sent = []
    forever = []
    for i in range(7):
        m = msgspec.structs.replace(
            msg(i, mentions=(2,) if i == 1 else None), created_at=old if i < 5 else new
        )
        got = await stored(store, m)
        assert isinstance(got, StoredMessage)
        sent.append(got)
        kept = await stored(store, msgspec.structs.replace(msg(i, room="random"), created_at=old))
        forever.append(kept)
    assert isinstance(await change(store, sent[0].id, 1, "edited"), StoredEvent)
    dm = await stored(
        store, msgspec.structs.replace(msg(0, room=None, to_user_id=2), created_at=old)
    )
    assert isinstance(dm, StoredMessage)
    await store.save_read_state([(2, GENERAL, 0, 0)], [])
    assert dict(await store.unread(2))[GENERAL].mentions == 1
    cut = "2026-02-01T00:00:00.000Z"

    def cutoff(channel: str) -> str | None:
        return cut if channel == GENERAL else None  # random and conversations: for ever

    kept: set[str] = set()
    first = await store.purge(0, cutoff, cut, 2, kept)
    assert (first.rooms, first.direct, first.finished) == (
        1,
        0,
        False,
    )  # general's 1st, random's 1st
    assert first.cursor == forever[0].id and first.first_kept is None
    # recovery from before the horizon: not whole; from after it: whole
    assert not (await store.missed(GENERAL, 0, 100)).complete
    assert (await store.missed(GENERAL, sent[0].id, 100)).complete
    cursor, deleted = first.cursor, first.rooms
    while True:
        batch = await store.purge(cursor, cutoff, cut, 2, kept)
        deleted += batch.rooms + batch.direct
        cursor = batch.cursor
        if batch.finished:
            break
    assert deleted == 5 and batch.first_kept is None and batch.seconds >= 0
    assert "r:random" in kept and GENERAL not in kept
    page, total = await store.history(GENERAL, 10, 0)
    assert total == 2 and ids(page) == [sent[5].id, sent[6].id]
    page, total = await store.history(GENERAL, 10, 2)  # past the horizon: nothing
    assert (page, total) == ([], 2)
    page, _ = await store.history(GENERAL, 1, 1)
    assert ids(page) == [sent[5].id]
    missed = await store.missed(GENERAL, sent[2].id, 100)
    assert not missed.complete
    entries, _ = await store.replay(GENERAL, missed.after_seq, missed.after_id, 100)
    assert [e.id for e in entries] == [sent[5].id, sent[6].id]  # (the edit went with its message)
    assert (await store.missed(GENERAL, sent[5].id, 100)).complete
    assert dict(await store.unread(2))[GENERAL].mentions == 0  # the purged mention went
    # what is kept for ever stayed, and a second pass finds nothing more
    assert (await store.history(room_channel("random"), 10, 0))[1] == 7
    assert (await store.history(dm_channel(1, 2), 10, 0))[1] == 1
    again = await store.purge(0, cutoff, cut, 100, set())
    assert (again.rooms, again.direct, again.finished) == (0, 0, True)
    # a channel whose older message is kept keeps every later one too
    later = lambda channel: cut if channel == room_channel("random") else None  # noqa: E731
    stop = {room_channel("random")}
    assert (await store.purge(0, later, cut, 100, stop)).rooms == 0


async def test_history_pages_stay_whole_while_the_purge_runs_and_messages_come(
    store: AnyStore,
) -> None:
    """300 old messages purged 7 at a time while 200 new ones are written to
    the same room: after every batch, history is one unbroken run of seqs
    up to the newest that counts ``total``; at the end exactly the new ones
    are left."""
    await store.declare_rooms(RoomsConfig(public=("general",)))
    old, new = "2026-01-01T00:00:00.000Z", "2026-03-01T00:00:00.000Z"
    rec = Recorder()
    for i in range(300):
        await store.append(msgspec.structs.replace(msg(i), created_at=old), rec)
    await store.flush()
    cut = "2026-02-01T00:00:00.000Z"

    async def check_pages() -> None:
        # one page holding everything (one snapshot): every message kept, in
        # an unbroken run of seqs up to the newest, as many as ``total``;
        # and the same run paged back in 50s (a page is its own snapshot)
        everything, total = await store.history(GENERAL, 1000, 0)
        seqs = [m.seq for m in everything]
        assert len(seqs) == total and seqs == list(range(seqs[0], seqs[0] + total))
        page, _ = await store.history(GENERAL, 50, 0)
        assert [m.seq for m in page] == seqs[-50:] or page[0].seq > seqs[-50]

    async def write() -> None:
        for i in range(200):
            await store.append(msgspec.structs.replace(msg(1000 + i), created_at=new), rec)
            if i % 10 == 0:
                await trio.lowlevel.checkpoint()

    async def purge() -> None:
        cursor, kept = 0, set()
        while True:
            batch = await store.purge(cursor, lambda c: cut, cut, 7, kept)
            cursor = batch.cursor
            await check_pages()
            if batch.finished:
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        nursery.start_soon(purge)
    await store.flush()
    page, total = await store.history(GENERAL, 500, 0)
    assert total == 200 and [m.message.created_at for m in page] == [new] * 200
    assert [m.seq for m in page] == list(range(301, 501))


async def test_a_user_is_exported_and_erased_on_either_store(store: AnyStore) -> None:
    await store.declare_rooms(
        RoomsConfig(public=("general",), private={"staff": (2,)}, owners={"general": (2,)})
    )
    for uid in (1, 2):
        await store.upsert_user(uid, f"user{uid}")
    theirs = await stored(store, msg(0, user=2, mentions=(1,)))
    with_nul = msgspec.structs.replace(msg(1, room=None, user=2, to_user_id=1), content="a\x00b")
    nul = await stored(store, with_nul)
    mine = await stored(store, msg(2, room=None, user=1, to_user_id=2))
    assert isinstance(theirs, StoredMessage) and isinstance(nul, StoredMessage)
    assert isinstance(await change(store, theirs.id, 2, "edited"), StoredEvent)
    await store.block(2, 1, True)
    await store.save_read_state(
        [(2, GENERAL, theirs.id, theirs.seq), (1, GENERAL, 0, 0)], [(2, CREATED)]
    )
    assert dict(await store.unread(1))[GENERAL].mentions == 1
    q = store.queries
    before = await store.read(lambda c: q.export_user(c, 2))
    assert before.username == "user2" and before.last_seen == CREATED
    assert [m.id for m in before.messages] == [theirs.id, nul.id, mine.id]
    assert before.roles == [("general", "owner")] and before.memberships == ["staff"]
    assert before.blocks == [1]
    assert {GENERAL, dm_channel(1, 2)} <= {c for c, _, _ in before.markers}
    assert await store.write(lambda c: q.erase_user(c, 2)) == 2
    assert await store.write(lambda c: q.erase_user(c, 404)) is None
    after = await store.read(lambda c: q.export_user(c, 2))
    assert after.username == "deleted user 2" and after.last_seen is None
    assert (after.markers, after.roles, after.blocks) == ([], [], [])
    gone = [m for m in after.messages if m.message.user_id == 2]
    assert [m.message.content for m in gone] == ["", ""]
    assert all(m.message.username == "deleted user 2" and m.message.deleted for m in gone)
    page, _ = await store.history(dm_channel(1, 2), 10, 0)
    assert [m.message.content for m in page] == ["", mine.message.content]
    # its earlier versions are gone (the only edit was theirs), not just hidden
    (versions,) = await store.read(
        lambda c: c.execute("SELECT count(*) FROM message_versions").fetchone()
    )
    assert versions == 0
    assert dict(await store.unread(1))[GENERAL].mentions == 0  # their mention of 1 went
    assert await store.read(lambda c: q.export_user(c, 404)) is None


async def test_joins_at_once_read_a_rooms_access_once(
    store: AnyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many joins asking at once (a reconnect storm into one room) share the
    read under way: one for a public room; a private room's answer is each
    user's own, read for each user the shared one does not let in."""
    await store.declare_rooms(RoomsConfig(public=("general",), private={"staff": (1, 2)}))
    reads = counted_reads(store, monkeypatch)
    answers: dict[tuple[str, int], RoomAccess | None] = {}

    async def ask(room: str, user_id: int) -> None:
        answers[room, user_id] = await store.room_access(room, user_id)

    async with trio.open_nursery() as nursery:
        for user_id in range(1, 51):
            nursery.start_soon(ask, "general", user_id)
    assert len(reads) == 1
    assert all(a == RoomAccess("general", False, True) for a in answers.values())

    reads.clear()
    async with trio.open_nursery() as nursery:
        for user_id in (1, 2, 3, 4):
            nursery.start_soon(ask, "staff", user_id)
    assert [answers["staff", u].allowed for u in (1, 2, 3, 4)] == [True, True, False, False]
    assert 1 < len(reads) <= 4


async def test_last_seq(store: AnyStore) -> None:
    assert await store.last_seq(GENERAL) == 0
    await fill(store, "general", 3)
    await fill(store, "random", 2)
    assert await store.last_seq(GENERAL) == 3
    assert await store.last_seq(RANDOM) == 2


async def test_room_access_is_reused_only_when_it_lets_the_user_in(store: AnyStore) -> None:
    """Joins in a storm read a room's access once: an answer that lets the
    user in is reused (for ``ACCESS_TTL``); a refusal, or an unknown room, is
    read again, so a member added, or a room created, counts at once. A
    declaration of rooms forgets what was reused."""
    await store.declare_rooms(RoomsConfig(public=("general",), private={"staff": (1,)}))
    assert (await store.room_access("general", 5)).private is False  # type: ignore[union-attr]
    assert (await store.room_access("staff", 1)).allowed is True  # type: ignore[union-attr]
    assert (await store.room_access("staff", 2)).allowed is False  # type: ignore[union-attr]
    # Behind the store's back (as the CLI does): general made private, 2 added.
    await store.write(lambda c: _ensure(store, c, "general", True, ()))
    await store.write(lambda c: _ensure(store, c, "staff", True, (2,)))
    assert await store.room_access("general", 6) == RoomAccess("general", False, True)  # reused
    assert await store.room_access("staff", 2) == RoomAccess("staff", True, True)  # read again
    assert await store.room_access("lounge", 1) is None
    await store.write(lambda c: _ensure(store, c, "lounge", False, ()))
    assert await store.room_access("lounge", 1) == RoomAccess("lounge", False, True)
    # The server's own declaration (a reload) forgets what it reused.
    await store.declare_rooms(RoomsConfig(private={"general": (5,)}))
    assert await store.room_access("general", 6) == RoomAccess("general", True, False)


def counted_reads(store: AnyStore, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every read the store makes from now on, in a list."""
    reads: list[object] = []
    read = store.read

    async def counted(fn: Any) -> Any:
        reads.append(fn)
        return await read(fn)

    monkeypatch.setattr(store, "read", counted)
    return reads


def _ensure(store: AnyStore, conn: Any, name: str, private: bool, members: tuple[int, ...]) -> None:
    """The room made or changed directly, as another process would."""
    module = sys.modules[type(store).__module__]
    module.ensure_room(conn, name, private, members)


async def test_declare_rooms_is_idempotent_and_adds_members_only(store: AnyStore) -> None:
    rooms = RoomsConfig(public=("general", "random"), private={"staff": (1, 2)})
    await store.declare_rooms(rooms)
    await store.declare_rooms(rooms)
    assert await store.room_access("random", 1) == RoomAccess("random", False, True)
    await store.declare_rooms(RoomsConfig(public=("general",), private={"staff": (3,)}))
    for user in (1, 2, 3):  # members are added, never removed
        assert await store.room_access("staff", user) == RoomAccess("staff", True, True)
    assert await store.room_access("random", 1) is not None  # rooms are never removed
    await store.declare_rooms(RoomsConfig(public=("general", "staff")))
    assert await store.room_access("staff", 4) == RoomAccess("staff", False, True)
    assert await store.room_access("staff", 1) == RoomAccess("staff", False, True)


# --- users --------------------------------------------------------------------


async def test_users(backend: Backend) -> None:
    metrics = Metrics()
    async with open_store(backend, metrics=metrics) as store:
        assert await store.user_exists(0)  # the system sender
        assert not await store.user_exists(1)
        await store.upsert_user(1, "alice")
        assert await store.user_exists(1)
        before = group_sizes(metrics)
        await store.upsert_user(1, "alice")  # already stored with this name: no write
        assert group_sizes(metrics) == before
        await store.upsert_user(50, "zed")

        assert await store.dev_user("alice") == 1
        await store.upsert_user(1, "alicia")
        assert await store.dev_user("alicia") == 1
        new = await store.dev_user("alice")  # no one is called alice any more
        assert new == 51
        assert await store.dev_user("alice") == 51
        assert await store.user_exists(51)
        assert await store.dev_user("system") == 52  # never the system sender

    async with open_store(backend) as store:  # stored, not just remembered
        assert await store.user_exists(1) and await store.user_exists(50)
        assert not await store.user_exists(2)
        assert await store.dev_user("zed") == 50
        assert await store.dev_user("alicia") == 1


# --- what is stored is what comes back ------------------------------------------


async def test_notifications_and_odd_text_round_trip(store: AnyStore) -> None:
    payload = json.dumps(
        {"z": 1, "a": [1, 2.5, None], "s": "\u0000 é 😀 \\", "nested": {"k": "v"}},
        separators=(",", ":"),
    ).encode()
    sent = [
        NewMessage(0, "system", "", "notification", CREATED, to_user_id=5, data=payload),
        NewMessage(0, "system", "x", "notification", CREATED, to_user_id=5, data=b'{ "b" : 1 }'),
        NewMessage(5, "eve", "a\u0000b\u0000", "text", CREATED, room="general"),
        NewMessage(5, "eve", "'; DROP TABLE messages; --", "text", CREATED, room="general"),
        NewMessage(
            5,
            "eve",
            "\t\\N\n\r\\x00 \U0010ffff 👨\u200d👩\u200d👧",
            "text",
            CREATED,
            room="general",
        ),
        NewMessage(
            5,
            "eve",
            "",
            "image",
            CREATED,
            room="general",
            media_url="/media/a b.png",
            media_type="image/png",
        ),
        NewMessage(
            5,
            "eve",
            "",
            "audio",
            CREATED,
            to_user_id=6,
            media_url="https://example.org/a.ogg",
            media_type="audio/ogg",
            duration=12.25,
        ),
    ]
    rec = Recorder()
    for m in sent:
        await store.append(m, rec)
    await store.flush()
    assert [r.message for r in rec.stored] == sent
    notes, total = await store.history(dm_channel(0, 5), 10, 0)
    assert total == 2
    assert [m.message for m in notes] == sent[:2]
    assert notes[0].message.data == payload  # byte for byte, key order and all
    messages, _ = await store.history(GENERAL, 10, 0)
    assert [m.message for m in messages] == sent[2:6]
    audio, _ = await store.history(dm_channel(5, 6), 10, 0)
    assert [m.message for m in audio] == sent[6:]
    assert await store.missed(GENERAL, 0, 10) == Missed(0, 0, True, messages[-1].id)
    assert await store.after(GENERAL, 0, 10) == messages


# --- read state -----------------------------------------------------------------


async def test_markers_move_forward_only_and_count_by_position(store: AnyStore) -> None:
    ids_ = await fill(store, "general", 5)
    assert await store.marker(GENERAL, 7) == ChannelMarkers(ids_[-1], 5, {})
    await store.save_read_state([(7, GENERAL, ids_[2], 3)], [])
    await store.save_read_state([(7, GENERAL, ids_[0], 1)], [])  # back: refused
    assert await store.marker(GENERAL, 7) == ChannelMarkers(ids_[-1], 5, {7: (ids_[2], 3, 0)})
    [(channel, point)] = await store.unread(7)
    assert channel == GENERAL
    assert point == ReadPoint(ids_[2], 3, ids_[-1], 5, 0)
    assert point.unread == 2
    # read_point: moved to a message, never back, never below the floor
    assert await store.read_point(7, GENERAL, ids_[3], (0, 0)) == ReadPoint(
        ids_[3], 4, ids_[-1], 5, 0
    )
    assert await store.read_point(7, GENERAL, ids_[0], (0, 0)) == ReadPoint(
        ids_[2], 3, ids_[-1], 5, 0
    )
    assert await store.read_point(7, GENERAL, ids_[1], (ids_[4], 5)) == ReadPoint(
        ids_[4], 5, ids_[-1], 5, 0
    )
    other = await fill(store, "random", 1)
    assert await store.read_point(7, GENERAL, other[0], (0, 0)) is None
    assert await store.read_point(7, GENERAL, 10**12, (0, 0)) is None


async def test_a_marker_read_at_once_is_the_batched_reads_answer(
    store: AnyStore, backend: Backend
) -> None:
    ids_ = await fill(store, "general", 3)
    await store.save_read_state([(7, GENERAL, ids_[0], 1)], [])
    if backend[0] == "postgres":  # its reads all wait for the server
        assert store.marker_now(GENERAL, 7) is None
        return
    for user_id in (7, 8):
        assert store.marker_now(GENERAL, user_id) == await store.marker(GENERAL, user_id)
    assert store.marker_now(GENERAL, 7) == ChannelMarkers(ids_[-1], 3, {7: (ids_[0], 1, 0)})
    assert store.marker_now(RANDOM, 7) == ChannelMarkers(0, 0, {})


async def test_joins_at_once_read_their_markers_together(
    store: AnyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fill(store, "general", 2)
    await store.save_read_state([(u, GENERAL, 0, 0) for u in range(1, 40, 2)], [])
    reads = counted_reads(store, monkeypatch)
    found: dict[int, ChannelMarkers] = {}

    async def ask(user_id: int) -> None:
        found[user_id] = await store.marker(GENERAL, user_id)

    async with trio.open_nursery() as nursery:
        for user_id in range(1, 41):
            nursery.start_soon(ask, user_id)
    # the first read, then one for everyone who asked meanwhile
    assert len(reads) == 2
    for user_id, markers in found.items():
        assert (user_id in markers.found) == (user_id % 2 == 1)
        assert markers.last_seq == 2


async def test_mentions_of_known_users_are_stored_and_counted_after_the_marker(
    store: AnyStore,
) -> None:
    for uid, name in ((1, "alice"), (2, "bob")):
        await store.upsert_user(uid, name)
    first = await stored(store, msg(0, mentions=(2, 999, 2, 0)))
    assert isinstance(first, StoredMessage)
    assert first.message.mentions == (2,)  # unknown ids and repeats dropped
    await stored(store, msg(1))
    third = await stored(store, msg(2, mentions=(2,)))
    assert isinstance(third, StoredMessage)
    history, _ = await store.history(GENERAL, 10, 0)
    assert [m.message.mentions for m in history] == [(2,), None, (2,)]
    await store.save_read_state([(2, GENERAL, 0, 0)], [])
    [(_, point)] = await store.unread(2)
    assert (point.unread, point.mentions) == (3, 2)
    await store.save_read_state([(2, GENERAL, first.id, 1)], [])
    assert (await store.marker(GENERAL, 2)).found[2] == (first.id, 1, 1)
    assert store.marker_now(GENERAL, 2) in (None, await store.marker(GENERAL, 2))
    point2 = await store.read_point(2, GENERAL, third.id, (0, 0))
    assert point2 is not None and point2.mentions == 0


async def test_a_conversation_starts_unread_for_both_parties(store: AnyStore) -> None:
    channel = dm_channel(1, 2)
    first = await stored(store, msg(0, room=None, user=1, to_user_id=2))
    assert isinstance(first, StoredMessage)
    await stored(store, msg(1, room=None, user=1, to_user_id=2))
    unread = {uid: await store.unread(uid) for uid in (1, 2)}
    assert [(c, p.last_read_seq, p.last_seq) for c, p in unread[2]] == [(channel, 0, 2)]
    assert [(c, p.last_read_seq) for c, p in unread[1]] == [(channel, 0)]
    # a notification begins the user's conversation with the system sender
    await stored(store, NewMessage(0, "system", "hi", "notification", CREATED, to_user_id=5))
    assert [c for c, _ in await store.unread(5)] == [dm_channel(0, 5)]
    assert await store.unread(0) == []


async def test_a_new_private_member_starts_at_the_newest_message(store: AnyStore) -> None:
    await store.declare_rooms(RoomsConfig(private={"staff": (1,)}))
    staff = room_channel("staff")
    assert (await store.marker(staff, 1)).found == {1: (0, 0, 0)}
    newest = (await fill(store, "staff", 3))[-1]
    await store.declare_rooms(RoomsConfig(private={"staff": (1, 2)}))
    assert (await store.marker(staff, 1)).found == {1: (0, 0, 0)}  # kept
    assert (await store.marker(staff, 2)).found == {2: (newest, 3, 0)}


async def test_last_seen(store: AnyStore) -> None:
    await store.upsert_user(1, "alice")
    await store.upsert_user(2, "bob")
    assert await store.last_seen([1, 2, 3]) == {}
    await store.save_read_state([], [(1, "2026-12-07T10:00:00.000Z")])
    await store.save_read_state([], [(1, "2026-12-07T11:00:00.000Z")])
    assert await store.last_seen([1, 2, 3]) == {1: "2026-12-07T11:00:00.000Z"}


# --- edits and deletions ----------------------------------------------------------

AT = "2024-05-01T12:30:00.000Z"


async def change(store: AnyStore, message_id: int, user: int, content: str | None) -> Any:
    """One edit (``content``) or deletion, committed; the event or the
    refusal the callback got."""
    rec = Recorder()
    await store.change(Change(message_id, user, AT, content), rec)  # type: ignore[arg-type]
    await store.flush()
    (result,) = rec.results
    return result


async def test_edits_and_deletions_change_history_in_place(store: AnyStore) -> None:
    general = await fill(store, "general", 5)
    await fill(store, "random", 2)
    edited = await change(store, general[1], 1, "message 1, fixed")
    assert isinstance(edited, StoredEvent)
    assert (edited.kind, edited.message_id, edited.user_id, edited.room) == (
        "edited",
        general[1],
        1,
        "general",
    )
    assert edited.content == "message 1, fixed" and edited.at == AT
    assert edited.id > max(general)  # from the messages' own sequence
    deleted = await change(store, general[3], 1, None)
    assert isinstance(deleted, StoredEvent) and deleted.kind == "deleted"
    assert deleted.id > edited.id
    later = await fill(store, "general", 1)
    assert later[0] > deleted.id  # the next message's id comes after the events'
    messages, total = await store.history(GENERAL, 10, 0)
    assert total == 6 and ids(messages) == general + later
    by_id = {m.id: m.message for m in messages}
    assert by_id[general[1]].content == "message 1, fixed"
    assert by_id[general[1]].edited_at == AT and not by_id[general[1]].deleted
    gone = by_id[general[3]]
    assert gone.deleted and gone.content == "" and gone.media_url is None
    assert by_id[general[0]].edited_at is None
    assert await store.versions(general[1], 1) == [("message 1", None), ("message 1, fixed", AT)]


async def test_refused_changes_are_returned_and_change_nothing(store: AnyStore) -> None:
    general = await fill(store, "general", 2)
    await store.declare_rooms(RoomsConfig(public=("general",), private={"staff": (2,)}))
    kept = await stored(store, msg(9, room="staff", user=2))
    assert isinstance(kept, StoredMessage)
    secret = kept.id
    cases = [
        (general[0], 2, "x", ErrorCode.PERMISSION_DENIED),  # someone else's
        (general[0], 2, None, ErrorCode.PERMISSION_DENIED),
        (secret, 1, "x", ErrorCode.MESSAGE_NOT_FOUND),  # a private room not joined
        (10**9, 1, "x", ErrorCode.MESSAGE_NOT_FOUND),
    ]
    for message_id, user, content, code in cases:
        refused = await change(store, message_id, user, content)
        assert isinstance(refused, ChatError) and refused.code is code, (message_id, refused)
    assert isinstance(await change(store, general[1], 1, None), StoredEvent)
    refused = await change(store, general[1], 1, "back")
    assert isinstance(refused, ChatError) and refused.code is ErrorCode.MESSAGE_NOT_FOUND
    messages, _ = await store.history(GENERAL, 10, 0)
    assert [(m.message.content, m.message.edited_at) for m in messages] == [
        ("message 0", None),
        ("", None),
    ]
    # the system sender deletes anything
    assert isinstance(await change(store, secret, 0, None), StoredEvent)


async def test_a_replay_merges_messages_and_events_in_id_order(store: AnyStore) -> None:
    general = await fill(store, "general", 3)
    events = [await change(store, general[0], 1, "e0")]
    general += await fill(store, "general", 2)
    events.append(await change(store, general[4], 1, None))
    events.append(await change(store, general[1], 1, "e1"))
    general += await fill(store, "general", 1)
    entries = sorted([*general, *(e.id for e in events)])

    async def replay(since_id: int, cap: int, page: int) -> tuple[list[int], bool]:
        where = await store.missed(GENERAL, since_id, cap, page)
        assert where.newest_id == entries[-1]
        got = [e.id for e in where.entries]
        seq, after_id, more = where.after_seq, where.after_id, where.more
        for e in where.entries:
            seq = e.seq if isinstance(e, StoredMessage) else seq
        after_id = got[-1] if got else after_id
        while more:
            page_, more = await store.replay(GENERAL, seq, after_id, page)
            for e in page_:
                seq = e.seq if isinstance(e, StoredMessage) else seq
            got += [e.id for e in page_]
            after_id = got[-1] if got else after_id
        return got, where.complete

    for page in (1, 2, 3, 100):
        assert await replay(0, 100, page) == (entries, True), page
        assert await replay(general[2], 100, page) == (
            [i for i in entries if i > general[2]],
            True,
        ), page
    # past the cap: the newest messages, and the events after the first of them
    got, complete = await replay(0, 2, 100)
    assert not complete and got == [i for i in entries if i > general[3]]
    assert await store.replay(GENERAL, 6, entries[-1], 10) == ([], False)


# --- the webhook outbox -------------------------------------------------------------


async def test_the_outbox_is_written_with_the_commit_and_read_in_order(store: AnyStore) -> None:
    """Both stores: a group's deliveries stored with it; one message.unread
    pending a user; the sender's reads and writes (batch, retry, done)."""
    from chatd.config import WebhooksConfig
    from chatd.webhooks import Deliveries

    config = WebhooksConfig(url="http://backend/hooks", debounce_seconds=60)
    store.outbox = Deliveries(config).rows
    await store.upsert_user(2, "bob")
    dms = [msg(i, room=None, user=1, to_user_id=2) for i in range(2)]
    await fill(store, "general", 3)  # three groups at most, no one told
    for m in dms:  # two direct messages to bob: one notice pending
        await stored(store, m)
    head = await store.outbox_head(100)
    assert 2 <= len(head) <= 5 and [row[0] for row in head] == sorted(row[0] for row in head)
    assert all(row[2] == 0.0 and row[3] == 0 and row[4] is None for row in head)
    now = time.time()
    due, later = await store.outbox_unread(now, 10)
    assert due == [] and later is not None and now + 50 < later <= now + 61
    (unread,), _ = await store.outbox_unread(now + 61, 10)
    assert unread[1:] == (2, b"", 0)
    assert await store.outbox_pending() == len(head) + 1
    # the sender: a delivery of the first rows, retried, then done
    first, last = head[0][0], head[-1][0]
    await store.outbox_batch(first, last)
    await store.outbox_retry(first, now + 5, 1)
    again = await store.outbox_head(100)
    assert again[0][2:] == (now + 5, 1, last)
    await store.outbox_done(first, last, "message.created")
    assert await store.outbox_head(100) == []
    await store.outbox_body(unread[0], b"{}")
    (kept,), _ = await store.outbox_unread(now + 61, 10)
    assert kept[2] == b"{}"
    await store.outbox_done(unread[0], unread[0], "message.unread")
    assert await store.outbox_pending() == 0
    assert await store.username(2) == "bob" and await store.username(99) == ""
