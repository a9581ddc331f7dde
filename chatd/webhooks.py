"""Webhooks to the application's backend: what is sent, signed, and retried.

A delivery is an HTTP POST of ``{"type", "timestamp", "data"}`` with the
Standard Webhooks headers, so a backend verifies it with any Standard
Webhooks library (docs/webhooks.md):

* ``webhook-id``: ``msg_`` + the delivery's outbox id, the same on every
  attempt (the receiver deduplicates by it: delivery is at least once);
* ``webhook-timestamp``: the attempt's time, Unix seconds;
* ``webhook-signature``: ``v1,`` + base64 of HMAC-SHA256 over
  ``id.timestamp.body`` keyed by the secret's bytes; during a rotation one
  signature per secret, separated by a space.

``message.created`` carries every message, notification, edit and deletion
of one commit group, in id order, as their live frames (``{"type",
"data"}``). ``message.unread`` is due ``debounce_seconds`` after a direct
message to a user or a room message mentioning one; its body is made when it
is due, from the user's read state then, and nothing is sent when nothing is
unread any more. ``Deliveries.rows`` is called by the store's writer, inside
a commit group's transaction, so the deliveries are stored with the commit
that caused them and cannot be lost to a crash (the outbox, ``store``'s
``webhook_outbox``; a user has one ``message.unread`` pending at most).

An attempt's outcome (``verdict``): 2xx is delivered; a network error, a
timeout, 408, 429 and 5xx are retried after ``backoff`` (exponential with
jitter, or the answer's ``Retry-After``) until ``max_attempts``; any other
status is given up.

Pure: no I/O; time and randomness are passed in.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence
from typing import Any, Literal

import msgspec

from chatd.config import WebhooksConfig, webhook_key
from chatd.hub import live_shape
from chatd.protocol import rfc3339
from chatd.store import OutboxRow, ReadPoint, StoredEvent, StoredMessage, dm_peer

CREATED = "message.created"
UNREAD = "message.unread"
#: The first retry waits about this long; each next one twice as long...
BACKOFF_FIRST = 1.0
#: ... up to this.
BACKOFF_MAX = 600.0

_encode = msgspec.json.Encoder().encode

Verdict = Literal["delivered", "retry", "give_up"]


class Deliveries:
    """What a commit group's results cause, as the config asks."""

    def __init__(self, config: WebhooksConfig) -> None:
        self.created = wanted(config, CREATED)
        self.unread = wanted(config, UNREAD)
        self.debounce = config.debounce_seconds

    def rows(self, results: Sequence[Any], now: float) -> list[OutboxRow]:
        """The deliveries to store with the group (on the writer thread)."""
        rows: list[OutboxRow] = []
        if self.created:
            created = created_body(results, now)
            if created is not None:
                rows.append((CREATED, created, 0.0, None))
        if self.unread:
            due = now + self.debounce
            for user_id in sorted(_told(results)):
                rows.append((UNREAD, b"", due, user_id))
        return rows


def _told(results: Sequence[Any]) -> set[int]:
    """The users a group's messages are for, personally: a direct message's
    recipient, a room message's mentioned users (not their senders)."""
    users: set[int] = set()
    for result in results:
        if not isinstance(result, StoredMessage):
            continue
        msg = result.message
        if msg.room is None and msg.to_user_id:
            users.add(msg.to_user_id)
        elif msg.mentions:
            users.update(uid for uid in msg.mentions if uid != msg.user_id)
    return users


def unread_data(user_id: int, username: str, points: Sequence[tuple[str, ReadPoint]]) -> Any:
    """``message.unread``'s data from a user's read state (``Store.unread``):
    the conversations with unread messages and the rooms with unread
    mentions; None when there is none of either."""
    direct = []
    mentions = []
    for channel, point in points:
        if channel.startswith("d:") and point.unread:
            other = dm_peer(channel, user_id)
            direct.append(
                {"with_user": other, "unread": point.unread, "last_message_id": point.last_id}
            )
        elif channel.startswith("r:") and point.mentions:
            mentions.append(
                {"room": channel[2:], "unread": point.mentions, "last_message_id": point.last_id}
            )
    if not direct and not mentions:
        return None
    return {"user_id": user_id, "username": username, "direct": direct, "mentions": mentions}


def created_body(entries: Sequence[Any], now: float) -> bytes | None:
    """What a commit group's results (messages and events; anything else,
    a refusal or an operation's value, is not one) add to ``message.created``
    as the outbox keeps it: the time, a newline, and the items' JSON
    without the list's brackets (``merged`` joins rows by concatenation,
    decoding nothing); None when the group committed none."""
    items = []
    for entry in entries:
        if isinstance(entry, StoredMessage | StoredEvent):
            kind, shape, _ = live_shape(entry)
            items.append({"type": kind, "data": shape})
    if not items:
        return None
    return rfc3339(now).encode() + b"\n" + _encode(items)[1:-1]


def merged(rows: Sequence[bytes]) -> bytes:
    """The ``message.created`` body of outbox rows (``created_body``): their
    items in order, the first one's time. The same bytes every time for the
    same rows, so that a retry is the same delivery."""
    timestamp = rows[0].split(b"\n", 1)[0]
    items = b",".join(row.split(b"\n", 1)[1] for row in rows)
    return (
        b'{"type":"message.created","timestamp":"'
        + timestamp
        + b'","data":{"messages":['
        + items
        + b"]}}"
    )


def body(event: str, data: Any, now: float) -> bytes:
    """A delivery's JSON body."""
    return _encode({"type": event, "timestamp": rfc3339(now), "data": data})


def signing_keys(config: WebhooksConfig) -> list[bytes]:
    """The keys deliveries are signed with: the secret's, and during a
    rotation the previous one's."""
    keys = (webhook_key(s) for s in (config.secret, config.previous_secret) if s)
    return [key for key in keys if key is not None]


def headers(
    keys: Sequence[bytes], delivery_id: int, body: bytes, now: float
) -> list[tuple[str, str]]:
    """The Standard Webhooks headers of one attempt, a signature per key."""
    message_id = f"msg_{delivery_id}"
    timestamp = str(int(now))
    signed = f"{message_id}.{timestamp}.".encode() + body
    signatures = [
        "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        for key in keys
    ]
    return [
        ("content-type", "application/json"),
        ("webhook-id", message_id),
        ("webhook-timestamp", timestamp),
        ("webhook-signature", " ".join(signatures)),
    ]


def verdict(status: int | None) -> Verdict:
    """What an attempt's answer (None: no answer: a network error or a
    timeout) means."""
    if status is not None and 200 <= status < 300:
        return "delivered"
    if status is None or status in (408, 429) or status >= 500:
        return "retry"
    return "give_up"


def backoff(attempts: int, retry_after: str | None, jitter: float) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones:
    ``Retry-After`` (seconds) when the receiver gave one, else
    exponential with ``jitter`` (0..1) taking off up to half."""
    if retry_after is not None and retry_after.strip().isdigit():
        return min(float(retry_after.strip()), BACKOFF_MAX)
    delay: float = min(BACKOFF_FIRST * 2 ** max(0, attempts - 1), BACKOFF_MAX)
    return delay * (1 - jitter / 2)


def wanted(config: WebhooksConfig, event: str) -> bool:
    return bool(config.url) and event in config.events
