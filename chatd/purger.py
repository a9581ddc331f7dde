"""The retention purge: a task that deletes what ``[retention]`` no longer
keeps, a little at a time, so that it never stalls the writer.

Every ``interval_seconds`` a pass goes over every room and conversation
with a cutoff (``chatd.retention.Policy``) and asks the store to purge each
in batches of ``batch_size`` messages (``Store.purge``: one writer
operation each, queued behind whatever the writer has already, so messages
committed meanwhile wait for one batch at most, never for the whole purge).
What it deleted is counted by kind of channel and how long each batch held
the writer is observed (``chatd_retention_purged_messages``,
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
        """One pass over every channel; how many messages it purged."""
        policy, store, metrics = self.policy, self._store, self._metrics
        limit = policy.config.batch_size
        now = self._wall()
        total = 0
        for channel in await store.retention_channels():
            cutoff = policy.cutoff(channel, now)
            if cutoff is None:
                continue
            kind = "room" if channel.startswith("r:") else "direct"
            more = True
            while more:
                done = await store.purge(channel, cutoff, limit)
                metrics.purge_batch.observe(done.seconds)
                metrics.purged.labels(kind).inc(done.deleted)
                total += done.deleted
                more = done.more
        return total
