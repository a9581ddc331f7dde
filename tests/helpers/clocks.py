"""Clocks a test controls: ``WallClock`` is the server's wall clock (token
expiry, timestamps), moved forward by the test (``ChatServer(..., wall=...)``).
For Trio's own time, use the ``autojump_clock`` or ``slow_autojump_clock``
fixture."""

from __future__ import annotations

import time


class WallClock:
    """A wall clock the test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset
