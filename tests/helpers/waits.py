"""Waiting on real time for what a test cannot be told about: ``wait_until``
polls a condition (PostgreSQL's or Redis's state, another node's view)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio


async def wait_until(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``predicate`` (every 20 ms) until it is true, 10 s at most."""
    try:
        with trio.fail_after(10):
            while True:
                if await predicate():
                    return
                await trio.sleep(0.02)
    except trio.TooSlowError:
        raise AssertionError(f"timed out waiting for {what}") from None
