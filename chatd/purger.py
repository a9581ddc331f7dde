"""The retention purge: a task that deletes what ``[retention]`` no longer
keeps, a little at a time, so that it never stalls the writer.

Every ``interval_seconds`` a pass goes over the messages in id order, the
oldest first, from where the last pass found the first message it had to
keep, until one newer than every cutoff (``chatd.retention.Policy``), in
batches of ``batch_size`` messages (``Store.purge``: one writer operation
each, queued behind whatever the writer has already, so messages committed
meanwhile wait for one batch at most, never for the whole purge).
After each batch it waits 19 times what the batch took (``WRITER_SHARE``:
5% of the time, less when the writer is busy, since a batch queued behind
other writes takes longer): a backlog of millions goes at a few thousand
messages a second, and live messages queue behind at most one small batch
now and then. What it deleted is counted by kind of channel and how long
each batch held the writer is observed (``chatd_retention_purged_messages``,
``chatd_retention_batch_seconds``). A pass that fails (the store
unreachable) is logged and the next one tries again. With several nodes
each node purges: the same deletions twice cost a little, and a channel's
horizon only moves forward.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from chatd.metrics import Metrics
from chatd.retention import Policy
from chatd.store import Store

log = logging.getLogger("chatd")

#: The share of the time a purge may take: after a batch, it waits 19 times
#: what the batch took (queued behind other writes, run, committed), so it
#: backs off by itself when the writer is busy.
WRITER_SHARE = 0.05


async def pace(started: float, share: float) -> None:
    """Wait so that the batch begun at ``started`` (queued, run,
    committed) took at most ``share`` of the time that passes."""
    spent = trio.current_time() - started
    await trio.sleep(spent * (1 / share - 1))


class Purger:
    """Runs ``[retention]`` on one node."""

    def __init__(
        self,
        policy: Policy,
        store: Store,
        metrics: Metrics,
        wall: Callable[[], float],
    ) -> None:
        self.policy = policy
        self._store = store
        self._metrics = metrics
        self._wall = wall
        #: Where the next pass starts (an id: what is before it is gone, or
        #: kept for ever).
        self._start = 0

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        interval = self.policy.config.interval_seconds
        while True:
            try:
                purged = await self.sweep()
            except Exception:  # the store failed: the next pass tries again
                log.exception("retention: the purge failed; next pass in %gs", interval)
            else:
                if purged:
                    log.info("retention: %d messages purged", purged)
            await trio.sleep(interval)

    async def sweep(self) -> int:
        """One pass over the messages, the oldest first; how many it purged."""
        policy, store, metrics = self.policy, self._store, self._metrics
        limit = policy.config.batch_size
        now = self._wall()
        newest = policy.newest_cutoff(now)
        cutoffs: dict[str, str | None] = {}

        def cutoff(channel: str) -> str | None:
            if channel not in cutoffs:
                cutoffs[channel] = policy.cutoff(channel, now)
            return cutoffs[channel]

        kept: set[str] = set()
        cursor = self._start
        first_kept: int | None = None
        total = 0
        while True:
            started = trio.current_time()
            done = await store.purge(cursor, cutoff, newest, limit, kept)
            metrics.purge_batch.observe(done.seconds)
            if done.rooms:
                metrics.purged.labels("room").inc(done.rooms)
            if done.direct:
                metrics.purged.labels("direct").inc(done.direct)
            deleted = done.rooms + done.direct
            total += deleted
            if first_kept is None:
                first_kept = done.first_kept
            cursor = done.cursor
            if done.finished:
                break
            await pace(started, WRITER_SHARE)
        # The next pass starts at the first message that may go then: what
        # lies before it is gone or kept for ever.
        self._start = cursor if first_kept is None else first_kept - 1
        return total
