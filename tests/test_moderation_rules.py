"""The rules of ``chatd.moderation`` alone: who may act on whom, and when a
ban or a mute is over."""

from __future__ import annotations

import itertools

import pytest

from chatd.errors import ErrorCode
from chatd.moderation import ACTIONS, ROLES, RoomRules, check, lasts_until, may_moderate


@pytest.mark.parametrize(
    ("action", "actor", "target"), list(itertools.product(ACTIONS, ROLES, ROLES))
)
def test_who_may_act_on_whom(action: str, actor: str, target: str) -> None:
    allowed = (actor, target) in {
        ("owner", "moderator"),
        ("owner", "member"),
        ("moderator", "member"),
    }
    refused = check(action, actor, target)  # type: ignore[arg-type]
    if allowed:
        assert refused is None
    else:
        assert refused is not None and refused.code is ErrorCode.PERMISSION_DENIED
        assert refused.details == {"action": action}


def test_a_sanction_ends_at_its_time_and_a_lifted_one_is_gone() -> None:
    rules = RoomRules(
        roles={1: "owner"},
        sanctions={(5, "ban"): 100.0, (5, "mute"): None, (6, "mute"): 50.0},
    )
    assert rules.until(5, "ban", 99.9) == 100.0
    assert rules.until(5, "ban", 100.0) is False  # over at its time
    assert rules.until(5, "mute", 10**9) is None  # until lifted
    assert rules.until(6, "mute", 60.0) is False
    assert rules.until(7, "ban", 0.0) is False  # never set
    assert (rules.role(1), rules.role(5)) == ("owner", "member")


def test_durations_and_roles_that_moderate() -> None:
    assert lasts_until(1000.0, 60) == 1060.0
    assert lasts_until(1000.0, None) is None
    assert [may_moderate(r) for r in ROLES] == [True, True, False]
