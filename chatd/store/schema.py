"""The SQLite schema and its migrations, versioned with ``PRAGMA user_version``.

Messages of every room and conversation live in one table. ``channel`` names
where a message belongs (``r:<room>``, or ``d:<low id>:<high id>`` for a direct
conversation) and ``seq`` is its 1-based position there. With the one index on
``(channel, seq)``, a channel's total is ``max(seq)`` (one index probe) and any
history page, at any offset, is one index range: a room of 10 messages and one
of 10 million cost the same per page. The writer keeps each channel's last
``seq`` in memory, so storing a message is one INSERT (a counter table updated
per message measured 3.4x slower).

Read state (migration 3): ``read_markers`` holds, per user and channel, the
newest message read and its ``seq``, so a channel's unread count is its last
``seq`` minus the marker's: two index probes, whatever the channel's size.
``mentions`` indexes the messages that mention each user by (user, channel,
seq): the unread mentions are a range of it after the marker.

Edits and deletions (migration 4) change a message's row in place (its
content, ``edited_at``, ``deleted``), so history and its totals cost what
they did; each one is also an event (``message_events``, by channel and id)
with an id from the messages' own sequence (``sqlite_sequence``), which a
reconnecting client replays in id order with the messages it missed.
``message_versions`` keeps every content an edit or a deletion replaced.

Search (migration 9): an FTS5 index of the content, written with each
message, and kept by triggers on every other write that changes a
message's text (edit, deletion, purge, erasure), in that write's own
transaction (``store/search.py``).
"""

from __future__ import annotations

import sqlite3

from chatd.errors import StorageError

MIGRATIONS: list[str] = [
    # 1: users, rooms, messages.
    """
    CREATE TABLE users (
        id INTEGER PRIMARY KEY,
        username TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE rooms (
        name TEXT PRIMARY KEY,
        private INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE room_members (
        room TEXT NOT NULL REFERENCES rooms(name) ON DELETE CASCADE,
        user_id INTEGER NOT NULL,
        PRIMARY KEY (room, user_id)
    ) WITHOUT ROWID;
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        channel TEXT NOT NULL,
        seq INTEGER NOT NULL,
        user_id INTEGER NOT NULL,
        username TEXT NOT NULL,
        to_user_id INTEGER,
        message_type TEXT NOT NULL,
        content TEXT NOT NULL,
        media_url TEXT,
        media_type TEXT,
        duration REAL,
        reply_to INTEGER,
        created_at TEXT NOT NULL
    );
    CREATE UNIQUE INDEX messages_by_channel ON messages (channel, seq);
    """,
    # 2: notifications from the publish API: a JSON payload, and the system
    # sender (user 0), whose conversation with a user holds that user's
    # notifications.
    """
    ALTER TABLE messages ADD COLUMN data TEXT;
    INSERT OR IGNORE INTO users (id, username, created_at)
        VALUES (0, 'system', '1970-01-01T00:00:00.000Z');
    """,
    # 3: read state. Conversations that exist already, and private rooms'
    # members, get a marker at their channel's newest message (what was
    # there before the upgrade counts as read); public rooms get one at a
    # user's first join.
    """
    ALTER TABLE messages ADD COLUMN mentions TEXT;
    ALTER TABLE users ADD COLUMN last_seen TEXT;
    CREATE TABLE read_markers (
        user_id INTEGER NOT NULL,
        channel TEXT NOT NULL,
        last_read_id INTEGER NOT NULL,
        last_read_seq INTEGER NOT NULL,
        PRIMARY KEY (user_id, channel)
    ) WITHOUT ROWID;
    CREATE TABLE mentions (
        user_id INTEGER NOT NULL,
        channel TEXT NOT NULL,
        seq INTEGER NOT NULL,
        message_id INTEGER NOT NULL,
        PRIMARY KEY (user_id, channel, seq)
    ) WITHOUT ROWID;
    INSERT OR IGNORE INTO read_markers (user_id, channel, last_read_id, last_read_seq)
        SELECT p.user_id, p.channel,
            coalesce((SELECT id FROM messages WHERE channel = p.channel
                      ORDER BY seq DESC LIMIT 1), 0),
            coalesce((SELECT max(seq) FROM messages WHERE channel = p.channel), 0)
        FROM (SELECT DISTINCT user_id, channel FROM messages WHERE channel LIKE 'd:%'
              UNION SELECT DISTINCT to_user_id, channel FROM messages WHERE channel LIKE 'd:%'
              UNION SELECT user_id, 'r:' || room FROM room_members) p
        WHERE p.user_id != 0
    """,
    # 4: edits and deletions. A message's row holds its current content (a
    # deleted one: none, ``deleted`` 1), so history reads stay one index
    # range; ``message_versions`` keeps each content it replaced;
    # ``message_events`` the edits and deletions themselves, in the order of
    # their ids (taken from the messages' sequence), for recovery.
    """
    ALTER TABLE messages ADD COLUMN edited_at TEXT;
    ALTER TABLE messages ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE message_events (
        id INTEGER PRIMARY KEY,
        channel TEXT NOT NULL,
        message_id INTEGER NOT NULL,
        kind TEXT NOT NULL,
        user_id INTEGER NOT NULL,
        content TEXT,
        at TEXT NOT NULL
    );
    CREATE INDEX message_events_by_channel ON message_events (channel, id);
    CREATE TABLE message_versions (
        message_id INTEGER NOT NULL,
        version INTEGER NOT NULL,
        content TEXT NOT NULL,
        edited_at TEXT,
        PRIMARY KEY (message_id, version)
    ) WITHOUT ROWID
    """,
    # 5: webhook deliveries, stored with the commit that causes them and
    # deleted once delivered (or given up); ids never reused (webhook-id).
    # A user has at most one message.unread pending (the debounce window).
    # message.created rows sent together: the first one holds the last one's
    # id (batch_end), so a retry sends the same rows again.
    """
    CREATE TABLE webhook_outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        event TEXT NOT NULL,
        body BLOB NOT NULL,
        due REAL NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        user_id INTEGER,
        batch_end INTEGER
    );
    CREATE INDEX webhook_outbox_due ON webhook_outbox (event, due);
    CREATE UNIQUE INDEX webhook_outbox_unread ON webhook_outbox (user_id)
        WHERE event = 'message.unread'
    """,
    # 6: moderation: roles per room (owners and moderators; everyone else is
    # a member), bans and mutes (until: Unix seconds, NULL until lifted),
    # and the audit log of every action (chatd/moderation.py).
    """
    CREATE TABLE room_roles (
        room TEXT NOT NULL,
        user_id INTEGER NOT NULL,
        role TEXT NOT NULL,
        PRIMARY KEY (room, user_id)
    ) WITHOUT ROWID;
    CREATE TABLE room_sanctions (
        room TEXT NOT NULL,
        user_id INTEGER NOT NULL,
        kind TEXT NOT NULL,
        until REAL,
        PRIMARY KEY (room, user_id, kind)
    ) WITHOUT ROWID;
    CREATE TABLE moderation_log (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        room TEXT NOT NULL,
        actor_id INTEGER NOT NULL,
        user_id INTEGER NOT NULL,
        action TEXT NOT NULL,
        role TEXT,
        until REAL,
        reason TEXT,
        at REAL NOT NULL
    );
    CREATE INDEX moderation_log_by_room ON moderation_log (room, id)
    """,
    # 7: blocking: user_id blocks blocked_id (their direct messages refused,
    # their typing and receipts not delivered).
    """
    CREATE TABLE blocks (
        user_id INTEGER NOT NULL,
        blocked_id INTEGER NOT NULL,
        PRIMARY KEY (user_id, blocked_id)
    ) WITHOUT ROWID
    """,
    # 8: retention: each channel's horizon, its last message purged; the
    # events of a message found by the message (a purge deletes them).
    """
    CREATE TABLE purged (
        channel TEXT PRIMARY KEY,
        id INTEGER NOT NULL,
        seq INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX message_events_by_message ON message_events (message_id)
    """,
    # 9: search. An FTS5 index of the messages' content (external content:
    # the text stays in ``messages`` only), written in the transaction of
    # every insert (by ``insert_message``: an insert trigger costs 3x as
    # much, FTS5 writing its pending terms out at each trigger's
    # savepoint; since 10, a batch at a time), and by triggers on every
    # edit, deletion (a tombstone's content is empty), purge and erasure.
    # Case and accents are folded
    # (``cafe`` finds ``Café``). No prefix index: ``prefix = '2 3'`` made
    # a message of words cost 7 µs more to store (the commit rate 0.80 of
    # the rate without search instead of 0.90), for prefix searches that
    # are fast enough without. What was there before is indexed
    # afterwards, newest first (``store/search.py``): until then the
    # triggers leave those rows alone (FTS5 must be told exactly what it
    # indexed to forget it).
    """
    CREATE VIRTUAL TABLE messages_search USING fts5 (
        content, content = 'messages', content_rowid = 'id',
        tokenize = 'unicode61 remove_diacritics 2'
    );
    CREATE TABLE search_backlog (below INTEGER NOT NULL);
    INSERT INTO search_backlog SELECT coalesce(max(id), 0) + 1 FROM messages;
    CREATE TRIGGER messages_search_update AFTER UPDATE OF content ON messages
    WHEN old.id >= (SELECT below FROM search_backlog) BEGIN
        INSERT INTO messages_search (messages_search, rowid, content)
            VALUES ('delete', old.id, old.content);
        INSERT INTO messages_search (rowid, content) VALUES (new.id, new.content);
    END;
    CREATE TRIGGER messages_search_delete AFTER DELETE ON messages
    WHEN old.id >= (SELECT below FROM search_backlog) BEGIN
        INSERT INTO messages_search (messages_search, rowid, content)
            VALUES ('delete', old.id, old.content);
    END
    """,
    # 10: search, indexed a batch at a time. Each transaction that writes
    # FTS5 leaves a new segment of the index (and the merges that follow):
    # 50 µs a commit, which at an ordinary rate, where each message is a
    # commit of its own, made the index cost as much as the message. So new
    # messages are indexed by the writer a batch at a time, half a second
    # after they are stored or as soon as a search asks
    # (``sqlite.index_tail``): ``above`` is where that has got to (every
    # message with an id below it, and at or above ``below``, is indexed);
    # the triggers leave the rows above it alone, as those below ``below``.
    """
    ALTER TABLE search_backlog ADD COLUMN above INTEGER NOT NULL DEFAULT 0;
    UPDATE search_backlog SET above = (SELECT coalesce(max(id), 0) + 1 FROM messages);
    DROP TRIGGER messages_search_update;
    DROP TRIGGER messages_search_delete;
    CREATE TRIGGER messages_search_update AFTER UPDATE OF content ON messages
    WHEN EXISTS (SELECT 1 FROM search_backlog WHERE old.id >= below AND old.id < above) BEGIN
        INSERT INTO messages_search (messages_search, rowid, content)
            VALUES ('delete', old.id, old.content);
        INSERT INTO messages_search (rowid, content) VALUES (new.id, new.content);
    END;
    CREATE TRIGGER messages_search_delete AFTER DELETE ON messages
    WHEN EXISTS (SELECT 1 FROM search_backlog WHERE old.id >= below AND old.id < above) BEGIN
        INSERT INTO messages_search (messages_search, rowid, content)
            VALUES ('delete', old.id, old.content);
    END
    """,
]


def connect(
    path: str, *, synchronous: str = "normal", readonly: bool = False
) -> sqlite3.Connection:
    """A connection with chatd's pragmas; autocommit, transactions explicit."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA foreign_keys = ON")
    if readonly:
        conn.execute("PRAGMA query_only = ON")
    else:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
    return conn


def statements(script: str) -> list[str]:
    """A script's statements, one by one (a trigger's body holds ``;``
    too: a statement ends at the first ``;`` where it is complete)."""
    done: list[str] = []
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                done.append(pending)
            pending = ""
    if pending.strip(" \n;"):
        done.append(pending)
    return done


def _run(conn: sqlite3.Connection, statement: str) -> None:
    try:
        conn.execute(statement)
    except sqlite3.OperationalError as exc:
        if "no such module: fts5" in str(exc):
            raise StorageError(
                f"this Python's SQLite ({sqlite3.sqlite_version}) has no FTS5, which message"
                " search needs: run chatd with a Python whose SQLite has it (Debian's and"
                " python.org's do)"
            ) from exc
        raise


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the database to the latest schema; return its version."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version > len(MIGRATIONS):
            raise RuntimeError(
                f"database schema version {version} is newer than this chatd "
                f"({len(MIGRATIONS)}); upgrade chatd"
            )
        for number in range(version, len(MIGRATIONS)):
            for statement in statements(MIGRATIONS[number]):
                _run(conn, statement)
            conn.execute(f"PRAGMA user_version = {number + 1}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return len(MIGRATIONS)
