"""One task keeps the timers of every connection (heartbeat pings, idle drops).

A task per connection only to sleep until its next ping cost about 3 KiB per
idle connection (the task, its context, its coroutine frames, a cancel
scope). Here each connection has one small ``Timer`` in a heap, and one task
per Trio run sleeps until the earliest is due, calls it, and puts it back at
the time it asks for next.

The task is a system task, started on first use in each run (so it needs no
nursery from the server, and tests on a mock clock get their own). A system
task must not raise: a target that does is logged and dropped.
"""

from __future__ import annotations

import heapq
import logging
import math
from typing import Protocol

import trio

log = logging.getLogger("chatd.transport")


class Timed(Protocol):
    def on_timer(self, now: float) -> float | None:
        """Called when due; returns when to be called next (None: never)."""


class Timer:
    """One target's place in the heap."""

    __slots__ = ("target", "when")

    def __init__(self, when: float, target: Timed) -> None:
        self.when = when
        self.target: Timed | None = target

    def __lt__(self, other: Timer) -> bool:
        return self.when < other.when


class TimerHeap:
    """The timers of one Trio run, and the task that fires them."""

    def __init__(self) -> None:
        self._heap: list[Timer] = []
        #: Cancelled timers still in the heap (dropped when due, or all at
        #: once when they are half of it: churn does not make it grow).
        self._cancelled = 0
        #: The scope the task sleeps in (its deadline: the earliest timer).
        self._sleep: trio.CancelScope | None = None

    def schedule(self, when: float, target: Timed) -> Timer:
        timer = Timer(when, target)
        self._push(timer)
        return timer

    def _push(self, timer: Timer) -> None:
        heapq.heappush(self._heap, timer)
        sleep = self._sleep
        if sleep is not None and timer.when < sleep.deadline:
            sleep.deadline = timer.when

    def cancel(self, timer: Timer) -> None:
        """Never call ``timer``'s target again."""
        if timer.target is None:
            return
        timer.target = None
        self._cancelled += 1
        heap = self._heap
        if self._cancelled > 64 and 2 * self._cancelled > len(heap):
            heap[:] = [t for t in heap if t.target is not None]
            heapq.heapify(heap)
            self._cancelled = 0

    def __len__(self) -> int:
        return len(self._heap)

    async def run(self) -> None:
        heap = self._heap
        while True:
            with trio.CancelScope(deadline=heap[0].when if heap else math.inf) as sleep:
                self._sleep = sleep
                await trio.sleep_forever()
            self._sleep = None
            now = trio.current_time()
            while heap and heap[0].when <= now:
                timer = heapq.heappop(heap)
                target = timer.target
                if target is None:
                    self._cancelled -= 1
                    continue
                try:
                    when = target.on_timer(now)
                except Exception:  # a system task must not raise
                    log.exception("timer of %r failed; dropped", target)
                    continue
                if when is not None and timer.target is not None:
                    timer.when = when
                    heapq.heappush(heap, timer)


_HEAP: trio.lowlevel.RunVar[TimerHeap] = trio.lowlevel.RunVar("chatd_timers")


def timers() -> TimerHeap:
    """This run's timers, their task started on first use."""
    try:
        return _HEAP.get()
    except LookupError:
        heap = TimerHeap()
        _HEAP.set(heap)
        trio.lowlevel.spawn_system_task(heap.run, name="chatd.transport.timers")
        return heap
