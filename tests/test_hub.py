"""chatd.hub.Hub: rooms, presence, fan-out, holding for recovery, direct messages.

The hub is pure logic, so it is driven with fake peers that record the frames
handed to them (the only stand-in in these tests), through ``SendEach``.

The hub reports presence (``join`` says whether it is the user's first
connection in the room, ``leave`` and ``disconnect`` where its last one left)
and holds a joining connection until ``release``; announcing is the bus's
job. ``join``, ``leave`` and ``disconnect`` below do what a session and the
bus of a node alone do around the hub's own calls, so that the frames the
members see can be checked.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from chatd.auth import Identity
from chatd.hub import Hub, SendEach
from chatd.protocol import Member
from chatd.store import NewMessage, StoredMessage
from chatd.transport.frames import OutFrame

NOW = 1_700_000_000.0


class FakePeer:
    """A connection as the hub sees it; keeps every frame it is sent."""

    def __init__(self, user_id: int, username: str | None = None) -> None:
        self.identity = Identity(user_id, username or f"u{user_id}", None)
        self.frames: list[OutFrame] = []

    def send(self, frame: OutFrame) -> None:
        self.frames.append(frame)

    @property
    def received(self) -> list[dict[str, Any]]:
        return [json.loads(f.payload) for f in self.frames]

    def types(self) -> list[str]:
        return [m["type"] for m in self.received]

    def clear(self) -> None:
        self.frames.clear()


AnyHub = Hub[FakePeer]


@pytest.fixture
def hub() -> AnyHub:
    return Hub(SendEach())


def connect(hub: AnyHub, user_id: int, username: str | None = None) -> FakePeer:
    peer = FakePeer(user_id, username)
    hub.connect(peer)
    return peer


def join(hub: AnyHub, peer: FakePeer, room: str, now: float = NOW) -> list[Member]:
    """A session's join with nothing to replay: join (held), announce a
    first presence (``LocalBus.joined``), release; the room's members."""
    if hub.join(peer, room):
        hub.announce("user_connected", peer.identity, room, now)
    members = hub.members(room)
    hub.release(peer, room, 0)
    return members


def leave(hub: AnyHub, peer: FakePeer, room: str) -> bool:
    """A session's leave_room; False when ``peer`` was not in ``room``."""
    if not hub.is_in(peer, room):
        return False
    if hub.leave(peer, room):
        hub.announce("user_disconnected", peer.identity, room, NOW)
    return True


def disconnect(hub: AnyHub, peer: FakePeer) -> None:
    """A session's end."""
    for room in hub.disconnect(peer):
        hub.announce("user_disconnected", peer.identity, room, NOW)


def stored(
    room: str = "general", user_id: int = 1, msg_id: int = 10, content: str = "hi"
) -> StoredMessage:
    return StoredMessage(
        msg_id,
        NewMessage(
            user_id=user_id,
            username=f"u{user_id}",
            content=content,
            message_type="text",
            created_at="2023-11-20T10:30:00.000Z",
            room=room,
        ),
    )


# --- join / members ----------------------------------------------------------------


def test_join_returns_online_members(hub: AnyHub) -> None:
    alice = connect(hub, 1, "alice")
    assert join(hub, alice, "general") == [Member(1, "alice")]
    bob = connect(hub, 2, "bob")
    members = join(hub, bob, "general")
    assert sorted((m.user_id, m.username) for m in members) == [(1, "alice"), (2, "bob")]
    assert hub.is_in(alice, "general") and hub.is_in(bob, "general")
    assert not hub.is_in(alice, "random")


def test_a_connections_rooms_one_then_several_then_none(hub: AnyHub) -> None:
    """One room is kept as a tuple, several as a set: membership is the same
    either way, a room whose name holds another's included."""
    alice, bob = connect(hub, 1), connect(hub, 2)
    join(hub, bob, "general")
    join(hub, alice, "general")
    assert hub.is_in(alice, "general") and not hub.is_in(alice, "gen")
    join(hub, alice, "gen")
    join(hub, alice, "random")
    assert all(hub.is_in(alice, r) for r in ("general", "gen", "random"))
    assert leave(hub, alice, "gen") and not hub.is_in(alice, "gen")
    assert leave(hub, alice, "random") and leave(hub, alice, "general")
    assert not any(hub.is_in(alice, r) for r in ("general", "gen", "random"))
    join(hub, alice, "random")
    assert hub.is_in(alice, "random") and not hub.is_in(alice, "general")
    bob.clear()
    disconnect(hub, alice)
    assert not hub.is_in(alice, "random")
    assert hub.members("general") == [Member(2, "u2")]
    assert hub.members("random") == []


def test_members_are_per_room(hub: AnyHub) -> None:
    alice, bob = connect(hub, 1), connect(hub, 2)
    join(hub, alice, "general")
    assert join(hub, bob, "random") == [Member(2, "u2")]


def test_two_connections_of_one_user_are_one_member(hub: AnyHub) -> None:
    tab1, tab2 = connect(hub, 1, "alice"), connect(hub, 1, "alice")
    join(hub, tab1, "general")
    assert join(hub, tab2, "general") == [Member(1, "alice")]


def test_join_twice_is_harmless(hub: AnyHub) -> None:
    alice, bob = connect(hub, 1), connect(hub, 2)
    join(hub, bob, "general")
    join(hub, alice, "general")
    join(hub, alice, "general")
    assert bob.types() == ["user_connected"]
    assert leave(hub, alice, "general") is True
    assert bob.types() == ["user_connected", "user_disconnected"]


# --- presence ---------------------------------------------------------------------


def test_presence_frame_shape(hub: AnyHub) -> None:
    bob = connect(hub, 2)
    join(hub, bob, "general")
    alice = connect(hub, 1, "alice")
    join(hub, alice, "general", now=0.0)
    assert bob.received == [
        {
            "type": "user_connected",
            "data": {"user_id": 1, "username": "alice", "room": "general"},
            "timestamp": "1970-01-01T00:00:00.000Z",
            "user_id": 1,
        }
    ]


def test_user_connected_only_on_first_connection(hub: AnyHub) -> None:
    bob = connect(hub, 2)
    join(hub, bob, "general")
    tab1, tab2 = connect(hub, 1), connect(hub, 1)
    join(hub, tab1, "general")
    join(hub, tab2, "general")
    assert bob.types() == ["user_connected"]


def test_user_disconnected_only_on_last_connection(hub: AnyHub) -> None:
    bob = connect(hub, 2)
    join(hub, bob, "general")
    tab1, tab2 = connect(hub, 1), connect(hub, 1)
    join(hub, tab1, "general")
    join(hub, tab2, "general")
    bob.clear()
    assert leave(hub, tab1, "general") is True
    assert bob.frames == []
    assert sorted(m.user_id for m in join(hub, bob, "general")) == [1, 2]
    disconnect(hub, tab2)
    assert bob.types() == ["user_disconnected"]
    assert bob.received[0]["data"] == {"user_id": 1, "username": "u1", "room": "general"}
    assert bob.received[0]["user_id"] == 1


def test_user_never_gets_its_own_presence(hub: AnyHub) -> None:
    tab1, tab2 = connect(hub, 1), connect(hub, 1)
    join(hub, tab1, "general")
    join(hub, tab2, "general")
    bob = connect(hub, 2)
    join(hub, bob, "general")
    leave(hub, tab1, "general")
    disconnect(hub, tab2)
    assert tab1.types() == ["user_connected"]  # bob's, not its own
    assert tab2.types() == ["user_connected"]
    assert all(m["data"]["user_id"] == 2 for m in tab1.received + tab2.received)


def test_presence_only_to_that_room(hub: AnyHub) -> None:
    in_general, in_random = connect(hub, 2), connect(hub, 3)
    join(hub, in_general, "general")
    join(hub, in_random, "random")
    alice = connect(hub, 1)
    join(hub, alice, "general")
    assert in_general.types() == ["user_connected"]
    assert in_random.frames == []


def test_presence_is_one_shared_frame(hub: AnyHub) -> None:
    others = [connect(hub, uid) for uid in (2, 3, 4)]
    for peer in others:
        join(hub, peer, "general")
    for peer in others:
        peer.clear()
    join(hub, connect(hub, 1), "general")
    assert others[0].frames[0] is others[1].frames[0] is others[2].frames[0]


# --- leave / disconnect -------------------------------------------------------------


def test_leave_when_not_in_room(hub: AnyHub) -> None:
    alice, bob = connect(hub, 1), connect(hub, 2)
    assert leave(hub, alice, "general") is False  # room has no one
    join(hub, bob, "general")
    bob.clear()
    assert leave(hub, alice, "general") is False  # room exists, alice not in it
    assert bob.frames == []
    join(hub, alice, "general")
    assert leave(hub, alice, "general") is True
    assert leave(hub, alice, "general") is False
    assert not hub.is_in(alice, "general")


def test_disconnect_leaves_all_rooms(hub: AnyHub) -> None:
    alice, bob, carol = connect(hub, 1), connect(hub, 2), connect(hub, 3)
    join(hub, bob, "general")
    join(hub, carol, "random")
    for room in ("general", "random", "staff"):
        join(hub, alice, room)
    bob.clear()
    carol.clear()
    disconnect(hub, alice)
    assert bob.types() == ["user_disconnected"]
    assert carol.types() == ["user_disconnected"]
    assert carol.received[0]["data"]["room"] == "random"
    for room in ("general", "random", "staff"):
        assert not hub.is_in(alice, room)
    assert join(hub, bob, "general") == [Member(2, "u2")]
    # A room whose last peer left starts afresh.
    dave = connect(hub, 4)
    assert join(hub, dave, "staff") == [Member(4, "u4")]


def test_disconnect_then_messages_not_delivered(hub: AnyHub) -> None:
    alice, bob = connect(hub, 1), connect(hub, 2)
    join(hub, alice, "general")
    join(hub, bob, "general")
    disconnect(hub, bob)
    alice.clear()
    bob.clear()
    hub.deliver(stored(), NOW)
    assert bob.frames == []
    assert alice.types() == ["room_message"]


# --- deliver_room --------------------------------------------------------------------


def test_deliver_room_one_shared_frame(hub: AnyHub) -> None:
    members = [connect(hub, uid) for uid in (1, 2, 3)]
    outsider = connect(hub, 4)
    for peer in members:
        join(hub, peer, "general")
    join(hub, outsider, "random")
    for peer in [*members, outsider]:
        peer.clear()
    hub.deliver(stored(user_id=2), 0.0)
    assert outsider.frames == []
    frames = [peer.frames for peer in members]
    assert all(len(f) == 1 for f in frames)
    assert frames[0][0] is frames[1][0] is frames[2][0]
    assert members[0].received[0] == {
        "type": "room_message",
        "data": {
            "id": 10,
            "room": "general",
            "user_id": 2,
            "username": "u2",
            "content": "hi",
            "message_type": "text",
            "created_at": "2023-11-20T10:30:00.000Z",
        },
        "timestamp": "1970-01-01T00:00:00.000Z",
        "user_id": 2,
    }


@pytest.mark.parametrize("request_id", ["req-1", 0, 42])
def test_deliver_room_origin_gets_own_copy(hub: AnyHub, request_id: str | int) -> None:
    origin, tab2, bob = connect(hub, 1), connect(hub, 1), connect(hub, 2)
    for peer in (origin, tab2, bob):
        join(hub, peer, "general")
    for peer in (origin, tab2, bob):
        peer.clear()
    hub.deliver(stored(user_id=1), NOW, origin=origin, request_id=request_id)
    assert len(origin.frames) == len(tab2.frames) == len(bob.frames) == 1
    assert tab2.frames[0] is bob.frames[0]
    assert origin.frames[0] is not bob.frames[0]
    own, shared = origin.received[0], bob.received[0]
    assert own["request_id"] == request_id
    assert "request_id" not in shared
    assert "request_id" not in tab2.received[0]
    own.pop("request_id")
    assert own == shared


def test_deliver_room_origin_without_request_id_shares_frame(hub: AnyHub) -> None:
    origin, bob = connect(hub, 1), connect(hub, 2)
    join(hub, origin, "general")
    join(hub, bob, "general")
    origin.clear()
    bob.clear()
    hub.deliver(stored(user_id=1), NOW, origin=origin, request_id=None)
    assert origin.frames[0] is bob.frames[0]
    assert "request_id" not in origin.received[0]


def test_deliver_room_origin_gone(hub: AnyHub) -> None:
    """The sender disconnected before the commit: others still get it, nothing for it."""
    origin, bob = connect(hub, 1), connect(hub, 2)
    join(hub, origin, "general")
    join(hub, bob, "general")
    disconnect(hub, origin)
    origin.clear()
    bob.clear()
    hub.deliver(stored(user_id=1), NOW, origin=origin, request_id="r")
    assert origin.frames == []
    assert bob.types() == ["room_message"]


def test_deliver_room_to_empty_room(hub: AnyHub) -> None:
    alice = connect(hub, 1)
    hub.deliver(stored(room="nobody-here"), NOW)
    assert alice.frames == []


def test_deliver_room_media_fields(hub: AnyHub) -> None:
    alice = connect(hub, 1)
    join(hub, alice, "general")
    alice.clear()
    msg = StoredMessage(
        5,
        NewMessage(
            user_id=1,
            username="u1",
            content="",
            message_type="audio",
            created_at="t",
            room="general",
            media_url="/a.ogg",
            duration=2.5,
            reply_to=4,
        ),
    )
    hub.deliver(msg, NOW)
    data = alice.received[0]["data"]
    assert data["media_url"] == "/a.ogg"
    assert data["duration"] == 2.5
    assert data["reply_to"] == 4
    assert "media_type" not in data


# --- holding during recovery -----------------------------------------------------


def test_held_peer_gets_nothing_until_release(hub: AnyHub) -> None:
    alice, bob = connect(hub, 1), connect(hub, 2)
    join(hub, alice, "general")
    hub.join(bob, "general")
    hub.deliver(stored(msg_id=11), NOW)
    hub.deliver(stored(msg_id=12), NOW)
    assert bob.frames == []
    assert [m["data"]["id"] for m in alice.received if m["type"] == "room_message"] == [11, 12]
    hub.release(bob, "general", after_id=11)  # the replay already carried 11
    assert [m["data"]["id"] for m in bob.received] == [12]
    hub.deliver(stored(msg_id=13), NOW)
    assert [m["data"]["id"] for m in bob.received] == [12, 13]


def test_held_presence_is_released_in_order(hub: AnyHub) -> None:
    alice = connect(hub, 1)
    hub.join(alice, "general")
    carol = connect(hub, 3)
    join(hub, carol, "general")
    hub.deliver(stored(msg_id=20, user_id=3), NOW)
    assert alice.frames == []
    hub.release(alice, "general", after_id=5)
    assert alice.types() == ["user_connected", "room_message"]


def test_a_message_the_replay_had_is_dropped_when_it_arrives_late(hub: AnyHub) -> None:
    """With several nodes a room's message can reach a node after the replay
    of a recovering connection already carried it (it was read from the
    store while the live copy was still on its way): the connection gets it
    once. The first newer message ends the check."""
    alice, carol = connect(hub, 1), connect(hub, 3)
    join(hub, carol, "general")
    hub.join(alice, "general")
    hub.release(alice, "general", after_id=19)  # the replay went up to 19
    hub.deliver(stored(msg_id=18), NOW)
    hub.deliver(stored(msg_id=19), NOW)
    hub.deliver(stored(msg_id=20), NOW)
    assert [m["data"]["id"] for m in alice.received] == [20]
    assert [m["data"]["id"] for m in carol.received if m["type"] == "room_message"] == [
        18,
        19,
        20,
    ]
    # the sender's own copy (no id to compare) is never dropped
    hub.join(alice, "random")
    hub.release(alice, "random", after_id=30)
    hub.deliver(stored(msg_id=25, room="random", user_id=1), NOW, origin=alice, request_id="r")
    assert alice.received[-1]["request_id"] == "r"


def test_leaving_drops_what_was_held(hub: AnyHub) -> None:
    alice = connect(hub, 1)
    hub.join(alice, "general")
    hub.deliver(stored(msg_id=30, user_id=2), NOW)
    leave(hub, alice, "general")
    hub.release(alice, "general", after_id=0)
    assert alice.frames == []


# --- direct messages ---------------------------------------------------------------


def direct(from_id: int = 1, to_id: int = 2, msg_id: int = 40) -> StoredMessage:
    return StoredMessage(
        msg_id,
        NewMessage(
            user_id=from_id,
            username=f"u{from_id}",
            content="psst",
            message_type="text",
            created_at="2023-11-20T10:30:00.000Z",
            to_user_id=to_id,
        ),
    )


def test_direct_message_reaches_every_device_of_both(hub: AnyHub) -> None:
    a1, a2, b1, b2, c = (
        connect(hub, 1),
        connect(hub, 1),
        connect(hub, 2),
        connect(hub, 2),
        connect(hub, 3),
    )
    hub.deliver(direct(), NOW, origin=a1, request_id="d1")
    for peer in (a1, a2, b1, b2):
        (frame,) = peer.received
        assert frame["type"] == "direct_message"
        assert frame["user_id"] == 1
        assert frame["data"] == {
            "id": 40,
            "from_user_id": 1,
            "from_username": "u1",
            "to_user_id": 2,
            "content": "psst",
            "message_type": "text",
            "created_at": "2023-11-20T10:30:00.000Z",
        }
    assert a1.received[0]["request_id"] == "d1"
    assert all("request_id" not in p.received[0] for p in (a2, b1, b2))
    assert b1.frames[0] is b2.frames[0] is a2.frames[0]  # one shared frame
    assert c.frames == []


def test_direct_message_to_an_offline_user_reaches_the_senders_devices(hub: AnyHub) -> None:
    a1, a2 = connect(hub, 1), connect(hub, 1)
    hub.deliver(direct(to_id=9), NOW)
    assert a1.types() == a2.types() == ["direct_message"]


def test_direct_message_to_self_arrives_once_per_device(hub: AnyHub) -> None:
    a1 = connect(hub, 1)
    hub.deliver(direct(from_id=1, to_id=1), NOW)
    assert a1.types() == ["direct_message"]


def test_users_are_those_with_a_connection(hub: AnyHub) -> None:
    tab1, tab2 = connect(hub, 1), connect(hub, 1)
    bob = connect(hub, 2)
    assert sorted(hub.users()) == [1, 2]
    disconnect(hub, tab1)
    assert sorted(hub.users()) == [1, 2]
    disconnect(hub, tab2)
    disconnect(hub, bob)
    assert hub.users() == []


# --- what the hub reports: presence that begins and ends ----------------------------


def test_join_says_whether_it_is_the_users_first_connection_there(hub: AnyHub) -> None:
    tab1, tab2 = connect(hub, 1), connect(hub, 1)
    assert hub.join(tab1, "general") is True
    assert hub.join(tab2, "general") is False
    assert hub.join(tab1, "general") is False  # again: already there
    assert hub.join(tab2, "random") is True


def test_leave_says_whether_it_was_the_users_last_connection_there(hub: AnyHub) -> None:
    tab1, tab2 = connect(hub, 1), connect(hub, 1)
    hub.join(tab1, "general")
    hub.join(tab2, "general")
    assert hub.leave(tab1, "general") is False
    assert hub.presence() == [("general", 1)]
    assert hub.leave(tab2, "general") is True
    assert hub.presence() == [] and not hub.has_room("general")


def test_disconnect_returns_the_rooms_its_user_left(hub: AnyHub) -> None:
    tab1, tab2 = connect(hub, 1), connect(hub, 1)
    for room in ("general", "random", "staff"):
        hub.join(tab1, room)
    hub.join(tab2, "random")
    assert sorted(hub.disconnect(tab1)) == ["general", "staff"]
    assert hub.disconnect(tab2) == ["random"]
    assert hub.disconnect(tab2) == []  # gone already


def test_a_join_is_held_until_released(hub: AnyHub) -> None:
    """Frames of the room wait for the joiner's ack: nothing reaches it
    between ``join`` and ``release``, then everything does, in order."""
    alice, bob = connect(hub, 1), connect(hub, 2)
    join(hub, bob, "general")
    hub.join(alice, "general")
    hub.deliver(stored(msg_id=1, user_id=2), NOW)
    hub.deliver(stored(msg_id=2, user_id=2), NOW)
    assert alice.frames == []
    hub.release(alice, "general", 0)
    assert [m["data"]["id"] for m in alice.received] == [1, 2]


def test_presence_is_announced_only_to_others_in_the_room(hub: AnyHub) -> None:
    alice, bob, carol = connect(hub, 1), connect(hub, 2), connect(hub, 3)
    join(hub, alice, "general")
    join(hub, bob, "general")
    join(hub, carol, "random")
    for peer in (alice, bob, carol):
        peer.clear()
    hub.announce("user_connected", Identity(1, "alice", None), "general", NOW)
    assert alice.frames == [] and carol.frames == []
    assert bob.types() == ["user_connected"]


# --- big rooms: members by id, presence summarised ------------------------------------


def big_hub(threshold: int = 3, cap: int = 2) -> AnyHub:
    return Hub(SendEach(), presence_max_members=threshold, summary_members=cap)


def test_members_are_paged_by_id_whatever_the_order_of_joining() -> None:
    hub = big_hub()
    for uid in (50, 7, 300, 12, 9):
        join(hub, connect(hub, uid), "big")
    join(hub, connect(hub, 7), "big")  # a second tab: one member
    assert [m.user_id for m in hub.members("big", 0, 2)] == [7, 9]
    assert [m.user_id for m in hub.members("big", 9, 2)] == [12, 50]
    assert [m.user_id for m in hub.members("big", 50, 10)] == [300]
    assert hub.members("big", 300, 10) == [] and hub.member_count("big") == 5
    assert hub.members("nowhere") == [] and hub.member_count("nowhere") == 0


def test_members_stay_sorted_as_users_leave() -> None:
    hub = big_hub()
    peers = {uid: connect(hub, uid) for uid in (5, 1, 3, 4, 2)}
    for peer in peers.values():
        join(hub, peer, "big")
    for uid in (3, 1, 5):
        leave(hub, peers[uid], "big")
    assert [m.user_id for m in hub.members("big", 0, 10)] == [2, 4]
    assert hub.member_count("big") == 2


def test_a_small_room_announces_each_change_at_once() -> None:
    hub = big_hub(threshold=3)
    bob = connect(hub, 2)
    join(hub, bob, "general")
    join(hub, connect(hub, 1), "general")
    assert bob.types() == ["user_connected"]
    assert not hub.has_pending_presence()


def test_a_big_room_summarises_presence_once_per_flush() -> None:
    hub = big_hub(threshold=3, cap=10)
    watchers = [connect(hub, uid) for uid in (1, 2, 3)]
    for peer in watchers:
        join(hub, peer, "big")
    for peer in watchers:
        peer.clear()
    # A fourth member: the room is now above the threshold.
    dave = connect(hub, 4, "dave")
    join(hub, dave, "big")
    eve = connect(hub, 5, "eve")
    join(hub, eve, "big")
    leave(hub, watchers[0], "big")
    assert all(p.frames == [] for p in watchers)  # nothing one by one
    assert hub.has_pending_presence()
    assert hub.flush_presence(NOW) == 1
    summary = watchers[1].received[0]
    assert summary == {
        "type": "room_presence",
        "data": {
            "room": "big",
            "member_count": 4,
            "joined": [{"user_id": 4, "username": "dave"}, {"user_id": 5, "username": "eve"}],
            "left": [{"user_id": 1, "username": "u1"}],
            "truncated": False,
        },
        "timestamp": "2023-11-14T22:13:20.000Z",
    }
    # One frame, shared by every member (dave and eve too: no per-member copy).
    frames = [p.frames[-1] for p in (watchers[1], watchers[2], dave, eve)]
    assert all(f is frames[0] for f in frames)
    assert watchers[0].frames == []  # gone before the summary
    assert hub.flush_presence(NOW) == 0 and not hub.has_pending_presence()


def test_a_change_undone_before_the_flush_is_not_summarised() -> None:
    hub = big_hub(threshold=1)
    bob = connect(hub, 2)
    join(hub, bob, "big")
    join(hub, connect(hub, 3), "big")
    carol_tab = connect(hub, 4, "carol")
    join(hub, carol_tab, "big")
    leave(hub, carol_tab, "big")  # came and went within the second
    bob.clear()
    hub.flush_presence(NOW)
    assert bob.received[0]["data"]["joined"] == [{"user_id": 3, "username": "u3"}]
    assert bob.received[0]["data"]["left"] == []


def test_a_summary_lists_at_most_its_cap_and_says_so() -> None:
    hub = big_hub(threshold=1, cap=2)
    bob = connect(hub, 1)
    join(hub, bob, "big")
    for uid in range(2, 7):
        join(hub, connect(hub, uid), "big")
    bob.clear()
    hub.flush_presence(NOW)
    data = bob.received[0]["data"]
    assert len(data["joined"]) == 2 and data["truncated"] is True
    assert data["member_count"] == 6


def test_a_room_that_shrinks_goes_back_to_single_announcements_after_its_flush() -> None:
    hub = big_hub(threshold=2)
    peers = [connect(hub, uid) for uid in (1, 2, 3)]
    for peer in peers:
        join(hub, peer, "big")  # 3 members: above the threshold, 3's join waits
    leave(hub, peers[1], "big")  # 2 members: small again, but a change waits
    assert peers[0].types() == ["user_connected"]  # 2's join, before the room grew
    hub.flush_presence(NOW)
    assert peers[0].types()[-1] == "room_presence"  # what waited, in order
    data = peers[0].received[-1]["data"]
    assert [m["user_id"] for m in data["joined"]] == [3]
    assert [m["user_id"] for m in data["left"]] == [2]
    leave(hub, peers[2], "big")
    assert peers[0].types()[-1] == "user_disconnected"


def test_the_announced_count_is_the_callers() -> None:
    """With several nodes the bus knows the cluster's count: a room that is
    small on this node but big in the cluster is summarised."""
    hub = big_hub(threshold=100)
    bob = connect(hub, 2)
    join(hub, bob, "big")
    bob.clear()
    hub.announce("user_connected", Identity(7, "gus", None), "big", NOW, member_count=5000)
    assert bob.frames == []
    hub.flush_presence(NOW)
    assert bob.received[0]["data"]["member_count"] == 5000


def test_a_joining_connection_gets_the_summary_after_its_ack() -> None:
    hub = big_hub(threshold=1)
    bob = connect(hub, 2)
    join(hub, bob, "big")
    alice = connect(hub, 1)
    hub.join(alice, "big")  # its ack not sent yet
    join(hub, connect(hub, 3), "big")
    hub.flush_presence(NOW)
    assert alice.frames == []
    hub.release(alice, "big", 0)
    assert alice.types() == ["room_presence"]


# --- a join that replays drops the room's messages for the replay to read --------------


def test_a_replaying_join_drops_messages_and_is_released_only_past_them() -> None:
    alice, bob = connect(hub_ := Hub(SendEach()), 1), connect(hub_, 2)
    join(hub_, bob, "general")
    hub_.join(alice, "general", replaying=True)
    hub_.deliver(stored(msg_id=11, user_id=2), NOW)
    hub_.announce("user_connected", Identity(3, "carol", None), "general", NOW)
    assert alice.frames == []
    assert hub_.release(alice, "general", 10) is False  # 11 was dropped: read on
    assert alice.frames == []
    assert hub_.release(alice, "general", 11) is True
    assert alice.types() == ["user_connected"]  # what has no id was kept
    hub_.deliver(stored(msg_id=11, user_id=2), NOW)  # 11 again, late (another node)
    hub_.deliver(stored(msg_id=12, user_id=2), NOW)
    assert [m["data"].get("id") for m in alice.received] == [None, 12]


def test_a_replaying_senders_own_copy_is_kept() -> None:
    hub = Hub(SendEach())
    alice = connect(hub, 1)
    hub.join(alice, "general", replaying=True)
    hub.deliver(stored(msg_id=20, user_id=1), NOW, origin=alice, request_id="r")
    assert hub.release(alice, "general", 20) is True
    assert [m.get("request_id") for m in alice.received] == ["r"]


def test_joining_connections_are_apart_from_the_rooms_set() -> None:
    """Released members get a room's messages through the broadcaster (one
    call for the set), joining ones are handled apart: the fast path stays."""

    class Counting(SendEach[FakePeer]):
        def __init__(self) -> None:
            self.sets: list[int] = []

        def broadcast(self, peers, frame, own, own_frame):  # type: ignore[no-untyped-def]
            self.sets.append(len(peers))
            super().broadcast(peers, frame, own, own_frame)

    fan = Counting()
    hub: AnyHub = Hub(fan)
    members = [connect(hub, uid) for uid in (1, 2, 3)]
    for peer in members:
        join(hub, peer, "general")
    late = connect(hub, 4)
    hub.join(late, "general")
    fan.sets.clear()
    hub.deliver(stored(msg_id=5, user_id=9), NOW)
    assert fan.sets == [3]
    assert late.frames == []
    hub.release(late, "general", 0)
    assert [m["data"]["id"] for m in late.received] == [5]


def test_the_acks_first_members_are_encoded_once_until_one_of_them_changes() -> None:
    hub = big_hub()
    peers = {uid: connect(hub, uid, f"u{uid}") for uid in (5, 10, 20, 30)}
    for peer in peers.values():
        join(hub, peer, "big")
    first = hub.first_members("big", 2)
    assert json.loads(bytes(first)) == [
        {"user_id": 5, "username": "u5"},
        {"user_id": 10, "username": "u10"},
    ]
    join(hub, connect(hub, 40), "big")  # past the first two: the same bytes
    assert hub.first_members("big", 2) is first
    tab = connect(hub, 10, "ten")  # a second tab of 10, under another name
    join(hub, tab, "big")
    assert json.loads(bytes(hub.first_members("big", 2)))[1] == {"user_id": 10, "username": "ten"}
    join(hub, connect(hub, 1), "big")  # a new first member
    assert [m["user_id"] for m in json.loads(bytes(hub.first_members("big", 2)))] == [1, 5]
    leave(hub, peers[5], "big")
    assert [m["user_id"] for m in json.loads(bytes(hub.first_members("big", 2)))] == [1, 10]
    assert json.loads(bytes(hub.first_members("big", 10))) == [
        {"user_id": m.user_id, "username": m.username} for m in hub.members("big", 0, 10)
    ]
    assert bytes(hub.first_members("nowhere", 2)) == b"[]"
