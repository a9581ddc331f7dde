"""Presence across nodes: who is online in each room, cluster-wide, with leases.

Each node tells Redis which users it holds in which rooms (``join`` on a
user's first connection to a room on this node, ``leave`` on its last), and
renews its entries every ``lease_seconds / 3`` (``renew``). An entry that is
not renewed in time (its node died or lost Redis) is *expired*; any node's
``reap`` then removes it. ``join``, ``leave``, ``reap`` and ``forget_node``
say when a user becomes present in a room, or stops being present, for the
whole cluster, so that exactly one node announces each ``user_connected``
and ``user_disconnected`` (docs/protocol.md, Presence).

A user is *present* in a room from the ``join`` that returns
``first_in_cluster=True`` until the ``leave``, ``reap`` or ``forget_node``
that reports it gone; each script is atomic, so concurrent nodes cannot both
see the same change. A user whose entries have all expired but are not yet
reaped is still present (it was never announced gone): a ``join`` for it
then returns False, and it is not announced twice. ``members`` lists only
users with a live (unexpired) entry.

Every script costs O(log n) in the room's size n (``members``: and the page
asked for): ``join`` and ``leave`` return the room's live member count
(``ZCOUNT``), never its member list, and ``members`` pages the users by id
from a zset scored by id. So a room of 10,000 users joining at once costs
Redis 10,000 small scripts, not 10,000 lists of up to 10,000 members.

Key layout (``P`` is the cluster's prefix; times are Redis ``TIME`` in ms):

``P:pr:ru:{room}:{user_id}``  zset  node_id -> expiry of that node's entry
``P:pr:room:{room}``          zset  user_id -> latest expiry of its entries
                                   (the users present in the room)
``P:pr:names:{room}``         hash  user_id -> username
``P:pr:ids:{room}``           zset  user_id -> user_id (the present users in
                                   id order, for pages of members)
``P:pr:rooms``                zset  room -> lowest score of ``P:pr:room:{room}``
                                   (the earliest expiry: ``reap`` looks only at
                                   rooms whose score has passed, never SCANs)
``P:pr:node:{node_id}``       set   "{user_id}:{room}" of every entry the node holds

Errors: every method talks to Redis and may raise what the client raises:
``coredis.exceptions.ConnectionError`` when Redis cannot be reached, any other
``coredis.exceptions.RedisError``, and ``TimeoutError`` when the client's
``stream_timeout`` passes. Bound the wait with the client's timeouts or with
``trio.fail_after``; a call cut short may or may not have taken effect in
Redis. That heals itself: an entry a node does not know it holds is not
renewed, expires and is reaped; an entry it holds but Redis lost (a Redis
restart) is returned by ``renew``, to be joined again.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import coredis
from coredis.commands.script import Script

_PRELUDE = """
local P = ARGV[1]
local ROOMS = P .. ':pr:rooms'
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function room_key(room) return P .. ':pr:room:' .. room end
local function names_key(room) return P .. ':pr:names:' .. room end
local function ru_key(room, uid) return P .. ':pr:ru:' .. room .. ':' .. uid end
local function node_key(node) return P .. ':pr:node:' .. node end
local function ids_key(room) return P .. ':pr:ids:' .. room end

-- How many users have a live entry in the room.
local function live_count(room, now)
  return redis.call('ZCOUNT', room_key(room), '(' .. now, '+inf')
end

-- Index the room by its earliest user expiry, or drop it when it is empty.
local function index_room(room)
  local low = redis.call('ZRANGE', room_key(room), 0, 0, 'WITHSCORES')
  if low[1] then
    redis.call('ZADD', ROOMS, low[2], room)
  else
    redis.call('ZREM', ROOMS, room)
  end
end

-- Remove the expired entries of (room, uid), from their nodes' sets too.
local function purge(room, uid, now)
  local ru = ru_key(room, uid)
  local dead = redis.call('ZRANGEBYSCORE', ru, '-inf', now)
  if #dead > 0 then
    for _, node in ipairs(dead) do
      redis.call('SREM', node_key(node), uid .. ':' .. room)
    end
    redis.call('ZREMRANGEBYSCORE', ru, '-inf', now)
  end
end

-- After (room, uid) lost an entry: purge the expired ones; if none is left,
-- the user stops being present (true when it was present until now), else its
-- room score becomes its latest expiry. The caller re-indexes the room.
local function settle(room, uid, now)
  purge(room, uid, now)
  local top = redis.call('ZRANGE', ru_key(room, uid), -1, -1, 'WITHSCORES')
  if top[1] then
    redis.call('ZADD', room_key(room), top[2], uid)
    return false
  end
  redis.call('HDEL', names_key(room), uid)
  redis.call('ZREM', ids_key(room), uid)
  return redis.call('ZREM', room_key(room), uid) == 1
end
"""

# ARGV: prefix, node, lease ms, room, uid, username -> {first (0/1), live count}
_JOIN = (
    _PRELUDE
    + """
local node, lease, room, uid = ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local now = now_ms()
local ru = ru_key(room, uid)
purge(room, uid, now)
redis.call('ZADD', ru, now + lease, node)
redis.call('SADD', node_key(node), uid .. ':' .. room)
redis.call('HSET', names_key(room), uid, ARGV[6])
local first = redis.call('ZSCORE', room_key(room), uid) == false
local top = redis.call('ZRANGE', ru, -1, -1, 'WITHSCORES')
redis.call('ZADD', room_key(room), top[2], uid)
redis.call('ZADD', ids_key(room), uid, uid)
index_room(room)
return {first and 1 or 0, live_count(room, now)}
"""
)

# ARGV: prefix, node, room, uid -> {1 when the user stopped being present, live count}
_LEAVE = (
    _PRELUDE
    + """
local node, room, uid = ARGV[2], ARGV[3], ARGV[4]
local now = now_ms()
redis.call('ZREM', ru_key(room, uid), node)
redis.call('SREM', node_key(node), uid .. ':' .. room)
local gone = settle(room, uid, now)
index_room(room)
return {gone and 1 or 0, live_count(room, now)}
"""
)

# ARGV: prefix, node, lease ms, then room, uid pairs -> flat room, uid pairs
# that this node no longer holds in Redis (reaped, or lost by Redis).
_RENEW = (
    _PRELUDE
    + """
local node, lease = ARGV[2], tonumber(ARGV[3])
local now = now_ms()
local expiry = now + lease
local missing, touched = {}, {}
for i = 4, #ARGV - 1, 2 do
  local room, uid = ARGV[i], ARGV[i + 1]
  local ru = ru_key(room, uid)
  if redis.call('ZSCORE', ru, node) then
    redis.call('ZADD', ru, expiry, node)
    -- A dead node's entry next to a live one is never reaped: drop it here.
    purge(room, uid, now)
    redis.call('ZADD', room_key(room), 'GT', expiry, uid)
    redis.call('ZADD', ids_key(room), uid, uid)
    touched[room] = true
  else
    missing[#missing + 1] = room
    missing[#missing + 1] = uid
  end
end
for room in pairs(touched) do
  index_room(room)
end
return missing
"""
)

# ARGV: prefix, max rooms -> {more (0/1), flat room, uid, name, live count of users gone}
_REAP = (
    _PRELUDE
    + """
local limit = tonumber(ARGV[2])
local now = now_ms()
local rooms = redis.call('ZRANGEBYSCORE', ROOMS, '-inf', now, 'LIMIT', 0, limit)
local gone = {}
for _, room in ipairs(rooms) do
  local uids = redis.call('ZRANGEBYSCORE', room_key(room), '-inf', now)
  for _, uid in ipairs(uids) do
    local name = redis.call('HGET', names_key(room), uid) or ''
    if settle(room, uid, now) then
      gone[#gone + 1] = room
      gone[#gone + 1] = uid
      gone[#gone + 1] = name
      gone[#gone + 1] = live_count(room, now)
    end
  end
  index_room(room)
end
return {#rooms == limit and 1 or 0, gone}
"""
)

# ARGV: prefix, node, batch -> {more (0/1), flat room, uid, name, live count of users gone}
_FORGET = (
    _PRELUDE
    + """
local node, batch = ARGV[2], tonumber(ARGV[3])
local now = now_ms()
local entries = redis.call('SPOP', node_key(node), batch)
local gone, touched = {}, {}
for _, entry in ipairs(entries) do
  local colon = string.find(entry, ':', 1, true)
  local uid, room = string.sub(entry, 1, colon - 1), string.sub(entry, colon + 1)
  redis.call('ZREM', ru_key(room, uid), node)
  local name = redis.call('HGET', names_key(room), uid) or ''
  if settle(room, uid, now) then
    gone[#gone + 1] = room
    gone[#gone + 1] = uid
    gone[#gone + 1] = name
    gone[#gone + 1] = live_count(room, now)
  end
  touched[room] = true
end
for room in pairs(touched) do
  index_room(room)
end
return {redis.call('SCARD', node_key(node)) > 0 and 1 or 0, gone}
"""
)

# ARGV: prefix, room, after uid, limit -> {live count, flat uid, name of a page}
# (by id; users whose entries all expired are skipped, not counted)
_MEMBERS = (
    _PRELUDE
    + """
local room, cursor, limit = ARGV[2], ARGV[3], tonumber(ARGV[4])
local now = now_ms()
local out, found = {}, 0
while found < limit do
  local uids = redis.call('ZRANGEBYSCORE', ids_key(room), '(' .. cursor, '+inf',
                          'LIMIT', 0, limit - found)
  if #uids == 0 then break end
  for _, uid in ipairs(uids) do
    local expiry = redis.call('ZSCORE', room_key(room), uid)
    if expiry and tonumber(expiry) > now then
      found = found + 1
      out[#out + 1] = uid
      out[#out + 1] = redis.call('HGET', names_key(room), uid) or ''
    end
    cursor = uid
  end
end
return {live_count(room, now), out}
"""
)


# ARGV: prefix, room, uid... -> one 1/0 per uid: whether it has a live entry
_PRESENT = (
    _PRELUDE
    + """
local room = ARGV[2]
local now = now_ms()
local out = {}
for i = 3, #ARGV do
  local score = redis.call('ZSCORE', room_key(room), ARGV[i])
  if score and tonumber(score) > now then out[#out + 1] = 1 else out[#out + 1] = 0 end
end
return out
"""
)


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value
    raise TypeError(f"unexpected reply from a presence script: {value!r}")


def _int(value: object) -> int:
    if isinstance(value, int):
        return value
    return int(_text(value))


def _list(value: object) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"unexpected reply from a presence script: {value!r}")
    return value


def _members(flat: object) -> list[tuple[int, str]]:
    items = _list(flat)
    return [(_int(items[i]), _text(items[i + 1])) for i in range(0, len(items), 2)]


#: A user who stopped being present: (room, user_id, username, the room's
#: live member count after).
Gone = tuple[str, int, str, int]


def _gone(flat: object) -> list[Gone]:
    items = _list(flat)
    return [
        (_text(items[i]), _int(items[i + 1]), _text(items[i + 2]), _int(items[i + 3]))
        for i in range(0, len(items), 4)
    ]


class RedisPresence:
    """This node's view of, and part in, cluster-wide presence.

    ``client`` is an entered ``coredis.Redis``; ``prefix`` the cluster's key
    prefix; ``node_id`` this node's name, unique in the cluster (a node that
    restarts under the same name takes its previous entries over);
    ``lease_seconds`` how long an entry lives without ``renew``.
    """

    def __init__(
        self, client: coredis.Redis[Any], prefix: str, node_id: str, lease_seconds: float
    ) -> None:
        if not node_id:
            raise ValueError("node_id must not be empty")
        if not lease_seconds > 0:
            raise ValueError("lease_seconds must be > 0")
        self.node_id = node_id
        self.lease_seconds = lease_seconds
        self._prefix = prefix
        self._lease_ms = max(1, round(lease_seconds * 1000))
        self._join: Script[Any] = client.register_script(_JOIN)
        self._leave: Script[Any] = client.register_script(_LEAVE)
        self._renew: Script[Any] = client.register_script(_RENEW)
        self._reap: Script[Any] = client.register_script(_REAP)
        self._forget: Script[Any] = client.register_script(_FORGET)
        self._members: Script[Any] = client.register_script(_MEMBERS)
        self._present: Script[Any] = client.register_script(_PRESENT)

    @property
    def renew_interval(self) -> float:
        """How often to call ``renew`` (and ``reap``): a third of the lease."""
        return self.lease_seconds / 3

    async def join(self, room: str, user_id: int, username: str) -> tuple[bool, int]:
        """The user's first connection on this node joined ``room``.

        Records this node's entry (expiring after the lease) and returns
        ``(first_in_cluster, count)``: ``first_in_cluster`` is True when the
        user was not present in the room on any node until now (announce
        ``user_connected``); ``count`` is how many users are online in the
        room cluster-wide, this one included. Calling it again for an entry
        this node holds only renews it.
        """
        reply = _list(
            await self._join(
                args=[self._prefix, self.node_id, self._lease_ms, room, user_id, username]
            )
        )
        return _int(reply[0]) == 1, _int(reply[1])

    async def leave(self, room: str, user_id: int) -> tuple[bool, int]:
        """The user's last connection on this node left ``room``: drop this
        node's entry. Returns ``(gone, count)``: ``gone`` is True when the
        user thereby stopped being present in the room cluster-wide
        (announce ``user_disconnected``); False when another node still
        holds it live, or when its leaving was already reported (a ``reap``
        of this node's expired entry). ``count``: the users online in the
        room now."""
        reply = _list(await self._leave(args=[self._prefix, self.node_id, room, user_id]))
        return _int(reply[0]) == 1, _int(reply[1])

    async def renew(self, entries: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
        """Extend this node's lease on each ``(room, user_id)`` it holds, in one
        round trip. Returns the entries Redis no longer had (reaped while this
        node was cut off, or lost by a Redis restart): ``join`` them again.
        Also drops other nodes' expired entries for the same users (which
        ``reap`` leaves alone while the user is live elsewhere)."""
        args: list[str | int] = [self._prefix, self.node_id, self._lease_ms]
        for room, user_id in entries:
            args += (room, user_id)
        if len(args) == 3:
            return []
        items = _list(await self._renew(args=args))
        return [(_text(items[i]), _int(items[i + 1])) for i in range(0, len(items), 2)]

    async def reap(self, *, batch: int = 100) -> list[Gone]:
        """Remove expired entries (a dead node's). Returns ``(room, user_id,
        username, count)`` for each user that thereby stopped being present
        in a room (``count``: the room's online users after): announce
        ``user_disconnected`` for each. Any node may reap, and several at
        once: each such user is returned to exactly one of them. Looks only
        at rooms with an expired entry, ``batch`` rooms per script call
        (each call atomic)."""
        gone: list[Gone] = []
        while True:
            reply = _list(await self._reap(args=[self._prefix, batch]))
            gone += _gone(reply[1])
            if _int(reply[0]) == 0:
                return gone

    async def forget_node(self, *, batch: int = 1000) -> list[Gone]:
        """Remove every entry this node holds (clean shutdown, or a restart
        under the same ``node_id``). Returns, as ``reap`` does, the users that
        thereby stopped being present: announce ``user_disconnected`` for them
        to the other nodes. ``batch`` entries per script call."""
        gone: list[Gone] = []
        while True:
            reply = _list(await self._forget(args=[self._prefix, self.node_id, batch]))
            gone += _gone(reply[1])
            if _int(reply[0]) == 0:
                return gone

    async def members(
        self, room: str, after_user_id: int = 0, limit: int = 100
    ) -> tuple[list[tuple[int, str]], int]:
        """At most ``limit`` of the users with a live entry in ``room`` on
        any node, by id, from the first above ``after_user_id``; and how
        many there are in all."""
        reply = _list(await self._members(args=[self._prefix, room, after_user_id, limit]))
        return _members(reply[1]), _int(reply[0])

    async def present(self, room: str, user_ids: Sequence[int]) -> list[bool]:
        """Whether each user has a live entry in ``room`` on any node."""
        if not user_ids:
            return []
        reply = _list(await self._present(args=[self._prefix, room, *user_ids]))
        return [_int(flag) == 1 for flag in reply]
