"""Room roles, kicks, bans and mutes: the rules, apart from storage.

A room's members are ``member`` by default; an ``owner`` or a ``moderator``
is named per room (the config, ``chatd room set-role``, the HTTP API). A
moderator or an owner kicks, bans, unbans, mutes and unmutes; nobody acts
on an owner, and moderators do not act on moderators (nor, so, on
themselves). ``check`` says so, inside the writer's transaction, against
the roles as stored there (``store.Moderation``): a check and the action it
allows cannot be split by another write.

A ban or a mute lasts until a time (``until``, Unix seconds) or until it is
lifted (None). Nothing runs when one ends: every check compares ``until``
with the clock (``RoomRules``), so a ban ends by itself on every node at
the same moment.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, NamedTuple

import msgspec

from chatd.errors import ChatError, ErrorCode

Role = Literal["owner", "moderator", "member"]
ROLES: tuple[Role, ...] = ("owner", "moderator", "member")
Action = Literal["kick", "ban", "unban", "mute", "unmute"]
ACTIONS: tuple[Action, ...] = ("kick", "ban", "unban", "mute", "unmute")
#: What a sanction is stored as, by the action that sets it.
SANCTIONS = {"ban": "ban", "mute": "mute"}
#: The action that lifts each sanction.
LIFTS = {"unban": "ban", "unmute": "mute"}
_RANK = {"member": 0, "moderator": 1, "owner": 2}
#: The longest ban or mute with a duration, in seconds (ten years): past it,
#: leave the duration out (until lifted).
MAX_DURATION = 10 * 365 * 86400


class Moderation(msgspec.Struct, frozen=True, kw_only=True):
    """One moderator's action, as the store checks and records it."""

    action: Action
    room: str
    #: Who acts (0: the system: the CLI, the HTTP API, the config).
    actor_id: int
    user_id: int
    #: When the ban or mute ends (Unix seconds); None: until lifted.
    until: float | None = None
    reason: str | None = None
    #: When it happened (Unix seconds).
    at: float


class Moderated(NamedTuple):
    """An action done: what ``moderation_ack`` and ``kicked`` say."""

    action: Action
    room: str
    user_id: int
    until: float | None


class AuditEntry(NamedTuple):
    """One line of a room's audit log."""

    id: int
    room: str
    actor_id: int
    user_id: int
    #: A moderation action, or ``set_role``.
    action: str
    #: The role a ``set_role`` gave.
    role: str | None
    until: float | None
    reason: str | None
    at: float


class RoomRules(msgspec.Struct, frozen=True):
    """A room's roles and sanctions as stored (they are few: a room's
    owners and moderators, and the users banned or muted there)."""

    roles: Mapping[int, Role] = msgspec.field(default_factory=dict)
    #: (user id, "ban" | "mute") -> until (None: until lifted)
    sanctions: Mapping[tuple[int, str], float | None] = msgspec.field(default_factory=dict)

    def role(self, user_id: int) -> Role:
        return self.roles.get(user_id, "member")

    def until(self, user_id: int, kind: str, now: float) -> float | Literal[False] | None:
        """When the user's ban or mute ends (None: until lifted); False when
        there is none now (never set, lifted, or over)."""
        key = (user_id, kind)
        if key not in self.sanctions:
            return False
        until = self.sanctions[key]
        if until is not None and until <= now:
            return False
        return until


NO_RULES = RoomRules()


def check(action: Action, actor: Role, target: Role) -> ChatError | None:
    """Whether a user of role ``actor`` may do ``action`` to one of role
    ``target``: None when allowed, else the refusal."""
    if _RANK[actor] < _RANK["moderator"]:
        return ChatError(
            ErrorCode.PERMISSION_DENIED,
            "Only the room's moderators and owners may do this",
            {"action": action},
        )
    if target == "owner":
        return ChatError(
            ErrorCode.PERMISSION_DENIED, "Nobody acts on the room's owner", {"action": action}
        )
    if actor == "moderator" and target == "moderator":
        return ChatError(
            ErrorCode.PERMISSION_DENIED,
            "Moderators do not act on moderators",
            {"action": action},
        )
    return None


def may_moderate(role: Role) -> bool:
    """Whether a user of this role moderates the room (deletes others'
    messages, sees the audit of it)."""
    return _RANK[role] >= _RANK["moderator"]


def lasts_until(at: float, duration_seconds: int | None) -> float | None:
    return None if duration_seconds is None else at + duration_seconds
