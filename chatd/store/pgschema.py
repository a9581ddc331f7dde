"""The PostgreSQL schema and its migrations, versioned in ``schema_version``.

The tables are SQLite's (``schema.py``), with the types PostgreSQL has, plus
``channels``: one row per room or conversation holding its last ``seq``. A
writer locks the rows of the channels it writes to and takes seqs from them
inside its transaction, which is what keeps seqs dense and in commit order
when several nodes write at once (``postgres.py``).

Differences from SQLite, each for a reason:

* ``content_raw``: PostgreSQL ``text`` cannot hold NUL, which a message's
  content may (tests/test_stored_text.py). Such content is kept as its UTF-8
  bytes there, and ``content`` holds it with each NUL shown as U+FFFD for
  people reading the table.
* ``data`` is ``text``, not ``jsonb``: jsonb reorders keys, drops white space
  and refuses ``\\u0000``, and a notification's payload comes back
  byte-for-byte.
* Names, channels and timestamps are ``COLLATE "C"``: the byte order SQLite
  uses (``chatd room list`` prints the same order) and the order RFC 3339
  timestamps compare in (a locale's collation may ignore punctuation).
* Two partial indexes serve ``direct_since`` (direct messages to or from a
  user since a time) without reading the whole table.
* ``pos`` (migration 3): the place of a message or an edit or deletion in
  its channel's log, dense like ``seq`` but counting both; ``channels.pos``
  is the last, taken under the same row lock as the seqs. SQLite (one node)
  needs no such count: its writer's commit order is the delivery order.
* ``messages_id_seq`` (the ``bigserial``'s) must keep ``CACHE 1``, the
  default: with a cache, each session hands out numbers it reserved earlier,
  and ids would no longer follow commit order across nodes.

Migrations run in one transaction under ``pg_advisory_xact_lock``, so nodes
starting at once take turns: the first migrates, the others find it done.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg


def stored_text(content: str) -> tuple[str, bytes | None]:
    """Content as stored: ``text`` cannot hold NUL, so such content keeps
    its bytes too (``content_raw``, above)."""
    if "\x00" in content:
        return content.replace("\x00", "\ufffd"), content.encode()
    return content, None


#: ``pg_advisory_xact_lock`` key held while migrating ("chatd" + 1).
MIGRATION_LOCK = 0x636861746401

MIGRATIONS: list[str] = [
    # 1: users (with the system sender, user 0), rooms, channels, messages.
    """
    CREATE TABLE users (
        id bigint PRIMARY KEY,
        username text NOT NULL,
        created_at text COLLATE "C" NOT NULL
    );
    INSERT INTO users (id, username, created_at)
        VALUES (0, 'system', '1970-01-01T00:00:00.000Z');
    CREATE TABLE rooms (
        name text COLLATE "C" PRIMARY KEY,
        private boolean NOT NULL DEFAULT false,
        created_at text COLLATE "C" NOT NULL
    );
    CREATE TABLE room_members (
        room text COLLATE "C" NOT NULL REFERENCES rooms (name) ON DELETE CASCADE,
        user_id bigint NOT NULL,
        PRIMARY KEY (room, user_id)
    );
    CREATE TABLE channels (
        name text COLLATE "C" PRIMARY KEY,
        seq bigint NOT NULL
    );
    CREATE TABLE messages (
        id bigserial PRIMARY KEY,
        channel text COLLATE "C" NOT NULL,
        seq bigint NOT NULL,
        user_id bigint NOT NULL,
        username text NOT NULL,
        to_user_id bigint,
        message_type text NOT NULL,
        content text NOT NULL,
        content_raw bytea,
        media_url text,
        media_type text,
        duration double precision,
        reply_to bigint,
        created_at text COLLATE "C" NOT NULL,
        data text
    );
    CREATE UNIQUE INDEX messages_by_channel ON messages (channel, seq);
    CREATE INDEX messages_direct_from ON messages (user_id, created_at)
        WHERE channel LIKE 'd:%';
    CREATE INDEX messages_direct_to ON messages (to_user_id, created_at)
        WHERE channel LIKE 'd:%';
    """,
    # 2: read state, as SQLite's migration 3 (schema.py): markers per user
    # and channel, an index of mentions, last-seen times.
    """
    ALTER TABLE messages ADD COLUMN mentions text;
    ALTER TABLE users ADD COLUMN last_seen text COLLATE "C";
    CREATE TABLE read_markers (
        user_id bigint NOT NULL,
        channel text COLLATE "C" NOT NULL,
        last_read_id bigint NOT NULL,
        last_read_seq bigint NOT NULL,
        PRIMARY KEY (user_id, channel)
    );
    CREATE TABLE mentions (
        user_id bigint NOT NULL,
        channel text COLLATE "C" NOT NULL,
        seq bigint NOT NULL,
        message_id bigint NOT NULL,
        PRIMARY KEY (user_id, channel, seq)
    );
    INSERT INTO read_markers (user_id, channel, last_read_id, last_read_seq)
        SELECT p.user_id, p.channel,
            coalesce((SELECT id FROM messages WHERE channel = p.channel
                      ORDER BY seq DESC LIMIT 1), 0),
            coalesce((SELECT max(seq) FROM messages WHERE channel = p.channel), 0)
        FROM (SELECT DISTINCT user_id, channel FROM messages WHERE channel LIKE 'd:%'
              UNION SELECT DISTINCT to_user_id, channel FROM messages WHERE channel LIKE 'd:%'
              UNION SELECT user_id, 'r:' || room FROM room_members) p
        WHERE p.user_id <> 0
        ON CONFLICT DO NOTHING;
    """,
    # 3: edits and deletions, as SQLite's migration 4, plus positions: a
    # channel's messages and events share one dense count (``channels.pos``,
    # each entry's ``pos``), which the nodes' sequencers deliver in. Rows
    # from before have none (NULL: their seq, as no event came before them).
    """
    ALTER TABLE messages ADD COLUMN edited_at text COLLATE "C";
    ALTER TABLE messages ADD COLUMN deleted boolean NOT NULL DEFAULT false;
    ALTER TABLE messages ADD COLUMN pos bigint;
    ALTER TABLE channels ADD COLUMN pos bigint;
    UPDATE channels SET pos = seq;
    ALTER TABLE channels ALTER COLUMN pos SET NOT NULL;
    CREATE TABLE message_events (
        id bigint PRIMARY KEY,
        channel text COLLATE "C" NOT NULL,
        pos bigint NOT NULL,
        message_id bigint NOT NULL,
        kind text NOT NULL,
        user_id bigint NOT NULL,
        content text,
        content_raw bytea,
        at text COLLATE "C" NOT NULL
    );
    CREATE INDEX message_events_by_channel ON message_events (channel, id);
    CREATE UNIQUE INDEX message_events_by_pos ON message_events (channel, pos);
    CREATE INDEX message_events_by_at ON message_events (at);
    CREATE TABLE message_versions (
        message_id bigint NOT NULL,
        version integer NOT NULL,
        content text NOT NULL,
        content_raw bytea,
        edited_at text COLLATE "C",
        PRIMARY KEY (message_id, version)
    );
    """,
    # 4: webhook deliveries, as SQLite's migration 5.
    """
    CREATE TABLE webhook_outbox (
        id bigserial PRIMARY KEY,
        event text NOT NULL,
        body bytea NOT NULL,
        due double precision NOT NULL DEFAULT 0,
        attempts integer NOT NULL DEFAULT 0,
        user_id bigint,
        batch_end bigint
    );
    CREATE INDEX webhook_outbox_due ON webhook_outbox (event, due);
    CREATE UNIQUE INDEX webhook_outbox_unread ON webhook_outbox (user_id)
        WHERE event = 'message.unread';
    """,
    # 5: moderation, as SQLite's migration 6.
    """
    CREATE TABLE room_roles (
        room text COLLATE "C" NOT NULL,
        user_id bigint NOT NULL,
        role text NOT NULL,
        PRIMARY KEY (room, user_id)
    );
    CREATE TABLE room_sanctions (
        room text COLLATE "C" NOT NULL,
        user_id bigint NOT NULL,
        kind text NOT NULL,
        until double precision,
        PRIMARY KEY (room, user_id, kind)
    );
    CREATE TABLE moderation_log (
        id bigserial PRIMARY KEY,
        room text COLLATE "C" NOT NULL,
        actor_id bigint NOT NULL,
        user_id bigint NOT NULL,
        action text NOT NULL,
        role text,
        until double precision,
        reason text,
        at double precision NOT NULL
    );
    CREATE INDEX moderation_log_by_room ON moderation_log (room, id);
    """,
    # 6: blocking, as SQLite's migration 7.
    """
    CREATE TABLE blocks (
        user_id bigint NOT NULL,
        blocked_id bigint NOT NULL,
        PRIMARY KEY (user_id, blocked_id)
    );
    """,
    # 7: retention, as SQLite's migration 8.
    """
    CREATE TABLE purged (
        channel text COLLATE "C" PRIMARY KEY,
        id bigint NOT NULL,
        seq bigint NOT NULL
    );
    CREATE INDEX message_events_by_message ON message_events (message_id);
    """,
    # 8: search, as SQLite's migration 9: each message's words as a
    # ``tsvector`` (``search``), set by a trigger on every insert and
    # change of ``content`` (a tombstone's is empty), in a GIN index. The
    # words are what SQLite's FTS5 tokenizer sees (runs of letters and
    # digits), folded by a configuration of the ``simple`` dictionary (no
    # stemming: whole words, as on SQLite) with ``unaccent``. What was
    # there before is indexed afterwards (``store/search.py``).
    """
    CREATE EXTENSION IF NOT EXISTS unaccent;
    CREATE TEXT SEARCH CONFIGURATION chatd_search (COPY = simple);
    ALTER TEXT SEARCH CONFIGURATION chatd_search ALTER MAPPING FOR
        word, numword, hword, hword_part, numhword, hword_numpart WITH unaccent, simple;
    ALTER TABLE messages ADD COLUMN search tsvector;
    CREATE FUNCTION chatd_search_words() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        NEW.search := to_tsvector('chatd_search',
            regexp_replace(NEW.content, '[^[:alnum:]]+', ' ', 'g'));
        RETURN NEW;
    END $$;
    CREATE TRIGGER messages_search BEFORE INSERT OR UPDATE OF content ON messages
        FOR EACH ROW EXECUTE FUNCTION chatd_search_words();
    CREATE INDEX messages_search ON messages USING gin (search);
    CREATE TABLE search_backlog (below bigint NOT NULL);
    INSERT INTO search_backlog SELECT coalesce(max(id), 0) + 1 FROM messages;
    """,
]


def migrate(conn: psycopg.Connection[Any]) -> int:
    """Bring the database to the latest schema; return its version. Refuses
    (RuntimeError, nothing changed) a database newer than this code."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        version = int(row[0]) if row is not None and row[0] is not None else 0
        if version > len(MIGRATIONS):
            raise RuntimeError(
                f"database schema version {version} is newer than this chatd "
                f"({len(MIGRATIONS)}); upgrade chatd"
            )
        for number in range(version, len(MIGRATIONS)):
            conn.execute(MIGRATIONS[number])  # several statements, no parameters
        if version < len(MIGRATIONS):
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (len(MIGRATIONS),))
    return len(MIGRATIONS)
