"""Indexing for search what was stored before the index existed.

A database upgraded to the search index has its new messages indexed as
they are stored, and its older ones by this task: batches of ``BATCH`` ids,
the newest first (``Store.backfill``: one writer operation each), paced to
``WRITER_SHARE`` of the writer's time like the retention purge, so live
messages wait for one small batch at most. Searches meanwhile find the
newest messages and more of the older ones as it goes; the metric
``chatd_search_backlog_id`` says how far it has to go, and the log says
when it is done. With several nodes each node runs it: the backlog's row
is locked while a batch is indexed, so they take turns.
"""

from __future__ import annotations

import logging

import trio

from chatd.metrics import Metrics
from chatd.purger import pace
from chatd.store import Store

log = logging.getLogger("chatd")

#: Ids indexed in one batch (a few milliseconds of the writer's time).
BATCH = 500
#: The share of the writer's time the batches may take.
WRITER_SHARE = 0.2


async def backfill(
    store: Store, metrics: Metrics, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Index the backlog, then return (at once when there is none)."""
    task_status.started()
    first = True
    while True:
        started = trio.current_time()
        try:
            left = await store.backfill(BATCH)
        except Exception:  # the store failed: try again a little later
            log.exception("search: indexing older messages failed; trying again in 10s")
            await trio.sleep(10)
            continue
        metrics.search_backlog.set(left)
        if not left:
            if not first:
                log.info("search: every older message is indexed")
            return
        if first:
            log.info("search: indexing older messages, newest first (from id %d)", left)
            first = False
        await pace(started, WRITER_SHARE)
