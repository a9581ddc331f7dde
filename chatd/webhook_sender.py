"""Sends the webhook outbox to the application's backend.

The store keeps the deliveries (``webhook_outbox``, written in the
transaction of the commit that caused each one: ``chatd.webhooks``). One
task per node sends them, in id order, one at a time, with an HTTP client
that runs under Trio (httpx, on anyio; one pooled connection reused):

* only the node that holds the outbox sends (``Store.outbox_leader``: always
  the one node on SQLite; on PostgreSQL the node whose session holds an
  advisory lock, so that each delivery is sent by one node, and another
  takes over within ``LEADER_CHECK`` seconds when that node dies);
* a delivery is deleted once the backend answers 2xx, or once it is given
  up (logged, counted); a retried ``message.created`` waits for its time
  and holds the ones after it (the backend gets them in order); each
  ``message.unread`` goes on its own when due, made from the user's read
  state then (dropped, counted as ``read``, when nothing is unread);
* the task wakes when a commit stores a delivery (``wake``), else every
  ``LEADER_CHECK`` seconds; with the backend down, deliveries pile up on
  disk, not in memory, and chat goes on: nothing here is on a message's path.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Protocol

import httpx
import trio

from chatd import webhooks
from chatd.config import WebhooksConfig
from chatd.metrics import Metrics
from chatd.store import ReadPoint

log = logging.getLogger("chatd.webhooks")

#: Deliveries read from the outbox at once; as many rows of
#: ``message.created`` (one per commit group) at most make one delivery,
#: of about ``BATCH_BYTES`` at most.
BATCH = 1000
BATCH_BYTES = 1 << 20
#: Seconds the sender waits, woken by a commit, for the commits that follow:
#: under load one POST then carries a tenth of a second of messages, not
#: one group's (a POST costs chatd's core about as much as a few hundred
#: messages' fan-out).
LINGER = 0.1
#: Seconds between checks of the outbox lock (and of the outbox, when idle).
LEADER_CHECK = 5.0
#: Seconds between recounts of the deliveries pending (the gauge).
RECOUNT = 10.0


class Outbox(Protocol):
    """What the sender needs of the store."""

    async def outbox_leader(self) -> bool: ...
    async def outbox_head(self, limit: int) -> list[tuple[int, bytes, float, int, int | None]]: ...
    async def outbox_batch(self, first: int, last: int) -> None: ...
    async def outbox_unread(
        self, now: float, limit: int
    ) -> tuple[list[tuple[int, int, bytes, int]], float | None]: ...
    async def outbox_pending(self) -> int: ...
    async def outbox_done(self, first: int, last: int, event: str) -> None: ...
    async def outbox_retry(self, first: int, due: float, attempts: int) -> None: ...
    async def outbox_body(self, delivery_id: int, body: bytes) -> None: ...
    async def unread(self, user_id: int) -> list[tuple[str, ReadPoint]]: ...
    async def username(self, user_id: int) -> str: ...


class WebhookSender:
    """The outbox's one sender on this node."""

    def __init__(
        self,
        config: WebhooksConfig,
        store: Outbox,
        metrics: Metrics,
        wall: Any,
    ) -> None:
        self.config = config
        self._store = store
        self._metrics = metrics
        self._wall = wall
        self._keys = webhooks.signing_keys(config)
        self._woken = trio.Event()
        self._idle = True
        self._counted_at = -RECOUNT
        self._created = webhooks.CREATED in config.events
        self._unread_on = webhooks.UNREAD in config.events

    def wake(self) -> None:
        """A commit stored a delivery (on the Trio thread): the sender, if
        it waits with nothing to send, goes. (One that has some waits for
        their time anyway: a wake per commit would only cost reads.)"""
        if self._idle:
            self._woken.set()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        timeout = httpx.Timeout(self.config.timeout_seconds)
        async with httpx.AsyncClient(timeout=timeout) as client:
            task_status.started()
            while True:
                try:
                    await self._round(client)
                except Exception as exc:  # the store failed: try again later
                    log.warning("webhooks: cannot read the outbox: %s", exc)
                    await trio.sleep(LEADER_CHECK)

    async def _round(self, client: httpx.AsyncClient) -> None:
        """Send what is due; then sleep until more is, or a commit stores
        some (or, idle, ``LEADER_CHECK``: another node's may have)."""
        store = self._store
        if not await store.outbox_leader():
            await trio.sleep(LEADER_CHECK)
            return
        self._woken = trio.Event()  # (before reading: a commit meanwhile wakes us)
        rows = await store.outbox_head(BATCH) if self._created else []
        unread: list[tuple[int, int, bytes, int]] = []
        later = None
        if self._unread_on:
            unread, later = await store.outbox_unread(self._wall(), BATCH)
        await self._recount(bool(rows or unread or later is not None))
        waits = []
        blocked = False  # a message.created waits for its time
        while rows:  # message.created: in order, a retried batch holds the rest
            first, _, due, attempts, end = rows[0]
            if due > self._wall():
                waits.append(due - self._wall())
                blocked = True
                break
            if end is None:  # the rows waiting, joined from now on
                size, count = 0, 0
                for row in rows:
                    size += len(row[1])
                    count += 1
                    if size >= BATCH_BYTES:
                        break
                end = rows[count - 1][0]
                await store.outbox_batch(first, end)
            taken = [row for row in rows if row[0] <= end]
            rows = rows[len(taken) :]
            ids = (first, end)
            body = webhooks.merged([row[1] for row in taken])
            if not await self._attempt(client, ids, webhooks.CREATED, body, attempts):
                waits.append(0.0)  # retried: the next round finds its new time
                blocked = True
                break
            if not rows and len(taken) == BATCH:
                waits.append(0.0)  # more may wait
        for delivery_id, user_id, body, attempts in unread:  # each on its own
            await self._unread(client, delivery_id, user_id, body, attempts)
        if len(unread) == BATCH:
            waits.append(0.0)
        if later is not None:
            waits.append(later - self._wall())
        self._idle = not blocked
        wait = min(waits) if waits else LEADER_CHECK
        if wait > 0:
            with trio.move_on_after(wait) as timer:
                await self._woken.wait()
            if not timer.cancelled_caught:
                await trio.sleep(LINGER)  # a commit woke us: let the next ones join it

    async def _unread(
        self, client: httpx.AsyncClient, delivery_id: int, user_id: int, body: bytes, attempts: int
    ) -> None:
        """A ``message.unread`` due: made from the user's read state now
        (none left unread: dropped), then sent like any delivery."""
        store = self._store
        if not body:
            data = webhooks.unread_data(
                user_id, await store.username(user_id), await store.unread(user_id)
            )
            if data is None:
                await store.outbox_done(delivery_id, delivery_id, webhooks.UNREAD)
                self._metrics.webhook_deliveries.labels(webhooks.UNREAD, "read").inc()
                return
            body = webhooks.body(webhooks.UNREAD, data, self._wall())
            await store.outbox_body(delivery_id, body)
        await self._attempt(client, (delivery_id, delivery_id), webhooks.UNREAD, body, attempts)

    async def _recount(self, busy: bool) -> None:
        now = trio.current_time()
        if not busy:
            self._metrics.webhooks_pending.set(0)
        elif now - self._counted_at >= RECOUNT:
            self._counted_at = now
            self._metrics.webhooks_pending.set(await self._store.outbox_pending())

    async def _attempt(
        self,
        client: httpx.AsyncClient,
        ids: tuple[int, int],
        event: str,
        body: bytes,
        attempts: int,
    ) -> bool:
        """One attempt at one delivery (the outbox rows from ``ids[0]`` to
        ``ids[1]``: its id is the first's); whether it is done (delivered
        or given up, not retried)."""
        config = self.config
        delivery_id = ids[0]
        headers = webhooks.headers(self._keys, delivery_id, body, self._wall())
        started = trio.current_time()
        status: int | None = None
        retry_after = None
        try:
            answer = await client.post(config.url, content=body, headers=headers)
            status, retry_after = answer.status_code, answer.headers.get("retry-after")
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        else:
            error = f"HTTP {status}"
        self._metrics.webhook_attempt_seconds.observe(trio.current_time() - started)
        attempts += 1
        verdict = webhooks.verdict(status)
        if verdict == "retry" and attempts < config.max_attempts:
            delay = webhooks.backoff(attempts, retry_after, random.random())
            await self._store.outbox_retry(delivery_id, self._wall() + delay, attempts)
            self._metrics.webhook_deliveries.labels(event, "retried").inc()
            log.info("webhooks: msg_%d %s, attempt %d: %s; again in %.1fs",
                     delivery_id, event, attempts, error, delay)  # fmt: skip
            return False
        await self._store.outbox_done(ids[0], ids[1], event)
        if verdict == "delivered":
            self._metrics.webhook_deliveries.labels(event, "delivered").inc()
        else:
            self._metrics.webhook_deliveries.labels(event, "given_up").inc()
            log.warning("webhooks: msg_%d %s given up after %d attempts: %s",
                        delivery_id, event, attempts, error)  # fmt: skip
        return True
