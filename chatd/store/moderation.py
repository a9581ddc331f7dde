"""Roles, bans, mutes, the audit log and blocks, for either store: the same SQL,
written with the store's parameter placeholder (as ``outbox.py``).

``moderate`` runs in the writer's transaction: it reads the two users'
roles there, asks ``chatd.moderation.check``, and applies the action and
its audit line together; a refusal is returned, not raised (the rest of the
group commits). Sanctions that are over are deleted by the next action in
the room; until then a reader finds them over by its clock.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from chatd import moderation
from chatd.errors import ChatError, ErrorCode
from chatd.moderation import AuditEntry, Moderated, Moderation, Role, RoomRules


def for_placeholder(P: str) -> SimpleNamespace:
    """The moderation query functions with ``P`` as the parameter placeholder."""

    def room_rules(conn: Any, room: str) -> RoomRules:
        """The room's roles and sanctions (those over included: the reader
        compares their end with its clock)."""
        roles = {
            int(uid): cast(Role, role)
            for uid, role in conn.execute(
                f"SELECT user_id, role FROM room_roles WHERE room = {P}", (room,)
            )
        }
        sanctions = {
            (int(uid), str(kind)): None if until is None else float(until)
            for uid, kind, until in conn.execute(
                f"SELECT user_id, kind, until FROM room_sanctions WHERE room = {P}", (room,)
            )
        }
        return RoomRules(roles, sanctions) if roles or sanctions else moderation.NO_RULES

    def _role(conn: Any, room: str, user_id: int) -> Role:
        row = conn.execute(
            f"SELECT role FROM room_roles WHERE room = {P} AND user_id = {P}", (room, user_id)
        ).fetchone()
        return "member" if row is None else cast(Role, row[0])

    def moderate(conn: Any, m: Moderation) -> Moderated | ChatError:
        """Check and do one moderator's action, with its audit line."""
        room = conn.execute(f"SELECT private FROM rooms WHERE name = {P}", (m.room,)).fetchone()
        if room is None:
            return ChatError(ErrorCode.ROOM_NOT_FOUND, "Room not found", {"room": m.room})
        if conn.execute(f"SELECT 1 FROM users WHERE id = {P}", (m.user_id,)).fetchone() is None:
            return ChatError(ErrorCode.USER_NOT_FOUND, "User not found", {"user_id": m.user_id})
        refused = moderation.check(
            m.action, _role(conn, m.room, m.actor_id), _role(conn, m.room, m.user_id)
        )
        if refused is not None:
            return refused
        conn.execute(
            f"DELETE FROM room_sanctions WHERE room = {P} AND until <= {P}", (m.room, m.at)
        )
        kind = moderation.SANCTIONS.get(m.action)
        if kind is not None:
            conn.execute(
                "INSERT INTO room_sanctions (room, user_id, kind, until)"
                f" VALUES ({P}, {P}, {P}, {P}) ON CONFLICT (room, user_id, kind)"
                " DO UPDATE SET until = excluded.until",
                (m.room, m.user_id, kind, m.until),
            )
        lifted = moderation.LIFTS.get(m.action)
        if lifted is not None:
            conn.execute(
                f"DELETE FROM room_sanctions WHERE room = {P} AND user_id = {P} AND kind = {P}",
                (m.room, m.user_id, lifted),
            )
        if m.action in ("kick", "ban") and room[0]:
            # out of a private room: its membership goes (asked back in by
            # the room's admin, as any new member)
            conn.execute(
                f"DELETE FROM room_members WHERE room = {P} AND user_id = {P}",
                (m.room, m.user_id),
            )
        conn.execute(
            "INSERT INTO moderation_log (room, actor_id, user_id, action, until, reason, at)"
            f" VALUES ({P}, {P}, {P}, {P}, {P}, {P}, {P})",
            (m.room, m.actor_id, m.user_id, m.action, m.until, m.reason, m.at),
        )
        return Moderated(m.action, m.room, m.user_id, m.until)

    def set_role(conn: Any, room: str, user_id: int, role: Role, actor_id: int, at: float) -> bool:
        """Give ``user_id`` ``role`` in ``room`` (logged); False when there is
        no such room."""
        if conn.execute(f"SELECT 1 FROM rooms WHERE name = {P}", (room,)).fetchone() is None:
            return False
        if role == "member":
            conn.execute(
                f"DELETE FROM room_roles WHERE room = {P} AND user_id = {P}", (room, user_id)
            )
        else:
            conn.execute(
                f"INSERT INTO room_roles (room, user_id, role) VALUES ({P}, {P}, {P})"
                " ON CONFLICT (room, user_id) DO UPDATE SET role = excluded.role",
                (room, user_id, role),
            )
        conn.execute(
            "INSERT INTO moderation_log (room, actor_id, user_id, action, role, at)"
            f" VALUES ({P}, {P}, {P}, 'set_role', {P}, {P})",
            (room, actor_id, user_id, role, at),
        )
        return True

    def declare_roles(conn: Any, room: str, roles: dict[int, Role], at: float) -> None:
        """The config's roles in ``room``: set where they differ (logged)."""
        for user_id, role in sorted(roles.items()):
            if _role(conn, room, user_id) != role:
                set_role(conn, room, user_id, role, 0, at)

    def audit(conn: Any, room: str, limit: int) -> list[AuditEntry]:
        """The room's newest ``limit`` audit lines, oldest first."""
        rows = conn.execute(
            "SELECT id, room, actor_id, user_id, action, role, until, reason, at"
            f" FROM moderation_log WHERE room = {P} ORDER BY id DESC LIMIT {P}",
            (room, limit),
        ).fetchall()
        entries = []
        for i, r, a, u, act, role, until, reason, at in reversed(rows):
            end = None if until is None else float(until)
            entries.append(
                AuditEntry(int(i), str(r), int(a), int(u), str(act), role, end, reason, float(at))
            )
        return entries

    def block(conn: Any, user_id: int, other: int, on: bool) -> list[int] | ChatError:
        """``user_id`` blocks ``other`` (``on``) or stops; the user's blocks
        after it."""
        if other == user_id:
            return ChatError(
                ErrorCode.INVALID_FORMAT, "You cannot block yourself", {"field": "data.user_id"}
            )
        if on:
            if conn.execute(f"SELECT 1 FROM users WHERE id = {P}", (other,)).fetchone() is None:
                return ChatError(ErrorCode.USER_NOT_FOUND, "User not found", {"user_id": other})
            conn.execute(
                f"INSERT INTO blocks (user_id, blocked_id) VALUES ({P}, {P})"
                " ON CONFLICT (user_id, blocked_id) DO NOTHING",
                (user_id, other),
            )
        else:
            conn.execute(
                f"DELETE FROM blocks WHERE user_id = {P} AND blocked_id = {P}", (user_id, other)
            )
        return blocks_of(conn, user_id)

    def blocks_of(conn: Any, user_id: int) -> list[int]:
        rows = conn.execute(
            f"SELECT blocked_id FROM blocks WHERE user_id = {P} ORDER BY blocked_id", (user_id,)
        )
        return [int(r[0]) for r in rows]

    def all_blocks(conn: Any) -> list[tuple[int, int]]:
        return [(int(u), int(b)) for u, b in conn.execute("SELECT user_id, blocked_id FROM blocks")]

    return SimpleNamespace(
        block=block,
        blocks_of=blocks_of,
        all_blocks=all_blocks,
        room_rules=room_rules,
        moderate=moderate,
        set_role=set_role,
        declare_roles=declare_roles,
        audit=audit,
    )
