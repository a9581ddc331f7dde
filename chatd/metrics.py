"""What chatd counts, in Prometheus' terms (``prometheus-client``).

One ``Metrics`` per server, each with its own registry (so several servers in
one process, as in the tests, do not collide). Hot paths count per message,
never per recipient: a fan-out adds its number of recipients in one ``inc``.
Labelled children are resolved once and cached. The SQLite writer thread
observes commit latency and group size directly, and the SQLite checkpointer
thread its checkpoints and the WAL's size (the client is thread-safe).

Exposed at ``GET /metrics`` (or on ``[server] metrics_listen``).
"""

from __future__ import annotations

import prometheus_client as prom
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from chatd import __version__
from chatd.errors import ErrorCode

prom.disable_created_metrics()  # type: ignore[no-untyped-call]

#: Seconds a user may be gone and still count as reconnecting.
RECONNECT_WINDOW = 60.0
#: Most recently gone users remembered for that (bounds memory).
MAX_REMEMBERED = 100_000
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_GROUP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_CHECKPOINT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0, 5.0)


class Metrics:
    """Every figure the protocol document's monitoring section asks for,
    and a few more."""

    def __init__(self, store: str = "sqlite", bus: str = "local") -> None:
        self.registry = r = CollectorRegistry()
        # The process: CPU, resident memory, open files and their limit
        # (process_*, read from /proc at each scrape), and which chatd runs.
        prom.ProcessCollector(registry=r)
        build = Gauge(
            "chatd_build_info",
            "Always 1: the running chatd's version, and its [storage] and [bus] backends",
            ["version", "store", "bus"],
            registry=r,
        )
        build.labels(__version__, store, bus).set(1)
        self.connections = Gauge("chatd_connections", "WebSocket connections open now", registry=r)
        self.connects = Counter("chatd_connects", "WebSocket connections accepted", registry=r)
        self.disconnects = Counter("chatd_disconnects", "WebSocket connections ended", registry=r)
        self.reconnects = Counter(
            "chatd_reconnects",
            f"Connections of a user who had disconnected less than {RECONNECT_WINDOW:g}s before",
            registry=r,
        )
        self.auth_failures = Counter(
            "chatd_auth_failures", "Connections refused for a bad token", registry=r
        )
        self._frames_in = Counter(
            "chatd_frames_in", "Client frames received, by type", ["type"], registry=r
        )
        self._frames_out = Counter(
            "chatd_frames_out", "Frames sent, by type (one per recipient)", ["type"], registry=r
        )
        self._errors = Counter("chatd_errors", "error frames sent, by code", ["code"], registry=r)
        self.rate_limited = Counter(
            "chatd_rate_limited", "Requests refused by a rate limit", registry=r
        )
        self.slow_consumers = Counter(
            "chatd_slow_consumer_closes",
            "Connections closed 1013 for reading too slowly",
            registry=r,
        )
        self.busy_closes = Counter(
            "chatd_busy_closes",
            "Connections closed 1013 for sending on while the node was saturated",
            registry=r,
        )
        self.messages = Counter("chatd_messages", "Messages committed and delivered", registry=r)
        self.webhook_deliveries = Counter(
            "chatd_webhook_deliveries",
            "Webhook deliveries by event and outcome (delivered, retried, given_up;"
            " read: a message.unread not sent, the user having read meanwhile)",
            ["event", "outcome"],
            registry=r,
        )
        self.webhooks_pending = Gauge(
            "chatd_webhooks_pending", "Webhook deliveries stored and not yet sent", registry=r
        )
        self.webhook_attempt_seconds = Histogram(
            "chatd_webhook_attempt_seconds",
            "Time of one webhook delivery attempt",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.changes = Counter(
            "chatd_message_changes",
            "Edits and deletions committed and delivered, by kind (edited, deleted)",
            ["kind"],
            registry=r,
        )
        self.delivery_latency = Histogram(
            "chatd_delivery_latency_seconds",
            "From a message's receipt to its hand-off to the last recipient's socket",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.commit_latency = Histogram(
            "chatd_store_commit_seconds",
            "Time of one group commit (transaction and COMMIT)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.group_size = Histogram(
            "chatd_store_group_size",
            "Operations committed in one transaction",
            buckets=_GROUP_BUCKETS,
            registry=r,
        )
        # The SQLite store's WAL and its checkpoints (store/checkpoint.py).
        self.wal_bytes = Gauge(
            "chatd_sqlite_wal_bytes",
            "Size of the SQLite -wal file, as the last checkpoint left it",
            registry=r,
        )
        self.wal_frames = Gauge(
            "chatd_sqlite_wal_frames",
            "Frames (pages) in the WAL, as the last checkpoint found them",
            registry=r,
        )
        self.wal_frames_left = Gauge(
            "chatd_sqlite_wal_frames_left",
            "Frames of the WAL the last checkpoint could not copy into the database",
            registry=r,
        )
        self.checkpoint_latency = Histogram(
            "chatd_sqlite_checkpoint_seconds",
            "Time of one WAL checkpoint, by mode (RESTART and TRUNCATE hold the writer)",
            ["mode"],
            buckets=_CHECKPOINT_BUCKETS,
            registry=r,
        )
        self.checkpoints = Counter(
            "chatd_sqlite_checkpoints",
            "WAL checkpoints, by mode and result (done, busy: not all done, error)",
            ["mode", "result"],
            registry=r,
        )
        # The retention purge (chatd/purger.py).
        self.purged = Counter(
            "chatd_retention_purged_messages",
            "Messages deleted by the retention purge, by kind of channel (room, direct)",
            ["kind"],
            registry=r,
        )
        self.purge_batch = Histogram(
            "chatd_retention_batch_seconds",
            "Time of one purge batch: one writer operation, held by it meanwhile",
            buckets=_CHECKPOINT_BUCKETS,
            registry=r,
        )
        self.shed = Counter(
            "chatd_messages_shed",
            "Messages, edits and notifications refused while the node was saturated,"
            " or from a connection sending faster than the node reads it",
            registry=r,
        )
        self.store_queued = Gauge(
            "chatd_store_queued",
            "Writes waiting for the store (new messages refused past 7,500; all wait at 10,000)",
            registry=r,
        )
        # Search (chatd/search.py).
        self.search_seconds = Histogram(
            "chatd_search_seconds",
            "Time of one search, from the request to the answer's page",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.searches_cut = Counter(
            "chatd_searches_cut_total",
            "Searches that answered what they had found when their time ran out",
            registry=r,
        )
        self.search_backlog = Gauge(
            "chatd_search_backlog_id",
            "The newest message stored before the search index that is not indexed yet (0: none)",
            registry=r,
        )
        self.published = Counter(
            "chatd_api_published", "Notifications sent through POST /api/publish", registry=r
        )
        self.presence_summaries = Counter(
            "chatd_presence_summaries",
            "room_presence summaries sent (one per big room per second with changes)",
            registry=r,
        )
        self.replays_waiting = Gauge(
            "chatd_replays_waiting",
            "Joins with since_id waiting for a replay slot (a reconnect storm)",
            registry=r,
        )
        # Several nodes ([bus] backend = "redis"); zero on a node alone.
        self.bus_sent = Counter(
            "chatd_bus_events_sent", "Events published to the other nodes", registry=r
        )
        self.bus_received = Counter(
            "chatd_bus_events_received", "Events received from the other nodes", registry=r
        )
        self.bus_gap_reads = Counter(
            "chatd_bus_gap_reads",
            "Room messages read from the store because they had not arrived (yet)",
            registry=r,
        )
        self.bus_dropped = Counter(
            "chatd_bus_events_dropped",
            "Events dropped unpublished because the outbox was full while Redis was away",
            registry=r,
        )
        self.bus_up = Gauge(
            "chatd_bus_redis_up", "1 while the last exchange with Redis succeeded", registry=r
        )
        self._children: dict[tuple[int, str], Counter] = {}
        self._gone: dict[int, float] = {}
        # Every label a counter is known to take, at 0 from the start: a
        # series that appears only at its first event is one that alerts
        # and rate() cannot see until then (the first error of a kind
        # would never show as an increase).
        for code in ErrorCode:
            self._child(self._errors, code.value)
        for kind in ("room", "direct"):
            self.purged.labels(kind)
        for kind in ("edited", "deleted"):
            self.changes.labels(kind)
        if store == "sqlite":
            for mode in ("PASSIVE", "RESTART", "TRUNCATE"):
                for result in ("done", "busy", "error"):
                    self.checkpoints.labels(mode, result)

    def _child(self, family: Counter, label: str) -> Counter:
        key = (id(family), label)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(label)
        return child

    def searched(self, seconds: float, cut: bool) -> None:
        self.search_seconds.observe(seconds)
        if cut:
            self.searches_cut.inc()

    def frame_in(self, type_: str) -> None:
        self._child(self._frames_in, type_).inc()

    def frames_out(self, type_: str, count: int = 1) -> None:
        if count:
            self._child(self._frames_out, type_).inc(count)

    def error(self, code: str) -> None:
        self._child(self._errors, code).inc()

    def connected(self, user_id: int, now: float) -> None:
        self.connects.inc()
        self.connections.inc()
        gone = self._gone.pop(user_id, None)
        if gone is not None and now - gone <= RECONNECT_WINDOW:
            self.reconnects.inc()

    def disconnected(self, user_id: int, now: float) -> None:
        self.disconnects.inc()
        self.connections.dec()
        gone = self._gone
        gone.pop(user_id, None)
        gone[user_id] = now  # at the end: the dict stays ordered by time
        # Forget users gone longer than the window, oldest first: O(1) a call
        # amortised (a rebuild of the whole dict here cost O(n) per disconnect
        # after a mass disconnect, just when everyone reconnects).
        while gone:
            oldest = next(iter(gone))
            if now - gone[oldest] <= RECONNECT_WINDOW and len(gone) <= MAX_REMEMBERED:
                break
            del gone[oldest]

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        text: bytes = prom.generate_latest(self.registry)
        return text


CONTENT_TYPE = prom.CONTENT_TYPE_LATEST
