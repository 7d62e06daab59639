"""Versioned schema migrations. Append a new tuple to migrate; never edit a shipped one."""

from __future__ import annotations

from typing import Final

SQLITE_MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """
        CREATE TABLE chats (
            id INTEGER PRIMARY KEY,
            user_a TEXT NOT NULL,
            user_b TEXT NOT NULL,
            created_by TEXT NOT NULL,
            created_at_ms INTEGER NOT NULL,
            last_message_ms INTEGER NOT NULL DEFAULT 0,
            last_activity_ms INTEGER NOT NULL,
            a_delivered INTEGER NOT NULL DEFAULT 0,
            b_delivered INTEGER NOT NULL DEFAULT 0,
            UNIQUE (user_a, user_b)
        )
        """,
        "CREATE INDEX chats_by_user_b ON chats (user_b)",
        """
        CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            chat_id INTEGER NOT NULL REFERENCES chats (id),
            sender_id TEXT NOT NULL,
            recipient_id TEXT NOT NULL,
            content TEXT NOT NULL,
            created_at_ms INTEGER NOT NULL,
            client_message_id TEXT,
            delivered INTEGER NOT NULL DEFAULT 0
        )
        """,
        "CREATE INDEX messages_by_chat ON messages (chat_id, id)",
        "CREATE INDEX messages_undelivered ON messages (recipient_id, id) WHERE delivered = 0",
        """
        CREATE UNIQUE INDEX messages_idempotency
            ON messages (sender_id, chat_id, client_message_id)
            WHERE client_message_id IS NOT NULL
        """,
    ),
    # 2: a chat's place in the order of activity (creation or newest message), from one
    # counter for all chats: `all_chats` lists the most recently active first even when two
    # chats were active within the same millisecond. Existing chats keep their order by time.
    (
        "ALTER TABLE chats ADD COLUMN activity_seq INTEGER NOT NULL DEFAULT 0",
        "UPDATE chats SET activity_seq = ranked.n FROM (SELECT id, ROW_NUMBER() OVER"
        " (ORDER BY last_activity_ms, id) AS n FROM chats) AS ranked WHERE ranked.id = chats.id",
        "CREATE INDEX chats_by_activity ON chats (activity_seq)",
    ),
    # 3: one row the health check rewrites while writes are failing, to learn whether the disk
    # has room again for as much as a client frame.
    ("CREATE TABLE health_probe (id INTEGER PRIMARY KEY, data BLOB NOT NULL)",),
    # 4: version 2's model. Per chat: `seq` numbers its messages 1, 2, 3, ... without gaps,
    # and `version` counts its changes (every new message and every edit or delete takes the
    # next one), so a chat's events have one order on every node. Per member (`members`, one
    # row per chat and user, ready for groups): marks instead of a flag per message
    # (`delivered_seq`, `read_seq`), `version_mark` (every change up to it reached the user),
    # and whether the chat itself was delivered. The backlog is then an index range scan per
    # chat (`seq > delivered_seq`); changed messages are found through a partial index.
    # Existing data: messages are numbered in id order; a member's delivered mark is the seq
    # below their oldest undelivered message (every undelivered message stays undelivered);
    # what was delivered counts as read, since version 1 kept no read state.
    (
        "ALTER TABLE chats ADD COLUMN kind TEXT NOT NULL DEFAULT 'direct'",
        "ALTER TABLE chats ADD COLUMN title TEXT",
        "ALTER TABLE chats ADD COLUMN last_seq INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE chats ADD COLUMN version INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE messages ADD COLUMN seq INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE messages ADD COLUMN version INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE messages ADD COLUMN edited_at_ms INTEGER",
        "ALTER TABLE messages ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE messages ADD COLUMN changed INTEGER NOT NULL DEFAULT 0",
        "UPDATE messages SET seq = ranked.n, version = ranked.n FROM (SELECT id, ROW_NUMBER()"
        " OVER (PARTITION BY chat_id ORDER BY id) AS n FROM messages) AS ranked"
        " WHERE ranked.id = messages.id",
        "UPDATE chats SET last_seq = COALESCE((SELECT MAX(seq) FROM messages"
        " WHERE chat_id = chats.id), 0)",
        "UPDATE chats SET version = last_seq",
        "CREATE UNIQUE INDEX messages_by_seq ON messages (chat_id, seq)",
        "CREATE INDEX messages_changed ON messages (chat_id, version) WHERE changed = 1",
        "DROP INDEX messages_undelivered",
        """
        CREATE TABLE members (
            chat_id INTEGER NOT NULL REFERENCES chats (id),
            user_id TEXT NOT NULL,
            chat_delivered INTEGER NOT NULL DEFAULT 0,
            delivered_seq INTEGER NOT NULL DEFAULT 0,
            delivered_at_ms INTEGER NOT NULL DEFAULT 0,
            read_seq INTEGER NOT NULL DEFAULT 0,
            read_at_ms INTEGER NOT NULL DEFAULT 0,
            version_mark INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (chat_id, user_id)
        )
        """,
        "CREATE INDEX members_by_user ON members (user_id, chat_id)",
        "CREATE INDEX members_undelivered ON members (user_id) WHERE chat_delivered = 0",
        "INSERT INTO members (chat_id, user_id, chat_delivered) SELECT id, user_a, a_delivered"
        " FROM chats UNION ALL SELECT id, user_b, b_delivered FROM chats WHERE user_b <> user_a",
        "UPDATE members SET delivered_seq = COALESCE((SELECT MIN(seq) - 1 FROM messages"
        " WHERE messages.chat_id = members.chat_id AND recipient_id = members.user_id"
        " AND delivered = 0), (SELECT last_seq FROM chats WHERE id = members.chat_id))",
        "UPDATE members SET read_seq = delivered_seq, version_mark = (SELECT version FROM chats"
        " WHERE id = members.chat_id), delivered_at_ms = (SELECT last_activity_ms FROM chats"
        " WHERE id = members.chat_id), read_at_ms = (SELECT last_activity_ms FROM chats"
        " WHERE id = members.chat_id)",
    ),
    # 5: groups. A group's chat row has no pair (`user_a`, `user_b` NULL: SQLite cannot drop
    # NOT NULL, so the table is rebuilt, its rows and ids kept); its members are its
    # `members` rows. `joined_seq`: the chat's newest seq when the member joined; they see
    # only the messages after it (0 for everyone before: they were there from the start).
    # A group message has no recipient: `recipient_id` is '' (no user id is empty).
    (
        """
        CREATE TABLE chats_v5 (
            id INTEGER PRIMARY KEY,
            user_a TEXT,
            user_b TEXT,
            created_by TEXT NOT NULL,
            created_at_ms INTEGER NOT NULL,
            last_message_ms INTEGER NOT NULL DEFAULT 0,
            last_activity_ms INTEGER NOT NULL,
            a_delivered INTEGER NOT NULL DEFAULT 0,
            b_delivered INTEGER NOT NULL DEFAULT 0,
            activity_seq INTEGER NOT NULL DEFAULT 0,
            kind TEXT NOT NULL DEFAULT 'direct',
            title TEXT,
            last_seq INTEGER NOT NULL DEFAULT 0,
            version INTEGER NOT NULL DEFAULT 0,
            UNIQUE (user_a, user_b)
        )
        """,
        "INSERT INTO chats_v5 (id, user_a, user_b, created_by, created_at_ms, last_message_ms,"
        " last_activity_ms, a_delivered, b_delivered, activity_seq, kind, title, last_seq,"
        " version) SELECT id, user_a, user_b, created_by, created_at_ms, last_message_ms,"
        " last_activity_ms, a_delivered, b_delivered, activity_seq, kind, title, last_seq,"
        " version FROM chats",
        "DROP TABLE chats",
        "ALTER TABLE chats_v5 RENAME TO chats",
        "CREATE INDEX chats_by_user_b ON chats (user_b)",
        "CREATE INDEX chats_by_activity ON chats (activity_seq)",
        "ALTER TABLE members ADD COLUMN joined_seq INTEGER NOT NULL DEFAULT 0",
    ),
    # 6: blocking and presence. `blocks` holds who blocks whom; a direct chat's `blocked` is
    # 1 while either of its pair blocks the other, kept with `blocks` in one transaction, so
    # the writer refuses a message by the chat row it reads anyway. `presence` keeps each
    # user's last_seen (when their last connection closed).
    (
        "ALTER TABLE chats ADD COLUMN blocked INTEGER NOT NULL DEFAULT 0",
        """
        CREATE TABLE blocks (
            blocker_id TEXT NOT NULL,
            blocked_id TEXT NOT NULL,
            created_at_ms INTEGER NOT NULL,
            PRIMARY KEY (blocker_id, blocked_id)
        )
        """,
        "CREATE INDEX blocks_by_blocked ON blocks (blocked_id, blocker_id)",
        "CREATE TABLE presence (user_id TEXT PRIMARY KEY, last_seen_ms INTEGER NOT NULL)",
    ),
    # 7: webhooks. `webhook_outbox` holds one row per event and endpoint, written in the
    # transaction of the change that caused it; a row is deleted once its endpoint answered
    # 2xx (or gave up after 24 h). `body` is the exact JSON POSTed, so every retry sends and
    # signs the same bytes. `lease_until_ms`: a node delivering the row owns it until then.
    # `webhook_unread` is each member's `message.unread` mark (the seq reported up to), kept
    # apart from `members` so the scan never writes a row the writer locks per message.
    (
        """
        CREATE TABLE webhook_outbox (
            id INTEGER PRIMARY KEY,
            event_id TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            body BLOB NOT NULL,
            created_at_ms INTEGER NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_at_ms INTEGER NOT NULL,
            lease_until_ms INTEGER NOT NULL DEFAULT 0
        )
        """,
        "CREATE INDEX webhook_outbox_due ON webhook_outbox (endpoint, next_at_ms)",
        """
        CREATE TABLE webhook_unread (
            chat_id INTEGER NOT NULL,
            user_id TEXT NOT NULL,
            reported_seq INTEGER NOT NULL,
            PRIMARY KEY (chat_id, user_id)
        )
        """,
    ),
)

# PostgreSQL keeps the SQLite shape, with two differences that matter:
# - `content` and `client_message_id` are BYTEA holding UTF-8, because PostgreSQL text cannot
#   hold U+0000 and the protocol returns content exactly as sent;
# - partial indexes serve the backlog of chats as well as of messages, since several processes
#   read it concurrently.
POSTGRES_MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """
        CREATE TABLE chats (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            user_a TEXT NOT NULL,
            user_b TEXT NOT NULL,
            created_by TEXT NOT NULL,
            created_at_ms BIGINT NOT NULL,
            last_message_ms BIGINT NOT NULL DEFAULT 0,
            last_activity_ms BIGINT NOT NULL,
            a_delivered BOOLEAN NOT NULL DEFAULT FALSE,
            b_delivered BOOLEAN NOT NULL DEFAULT FALSE,
            UNIQUE (user_a, user_b)
        )
        """,
        "CREATE INDEX chats_by_user_b ON chats (user_b)",
        "CREATE INDEX chats_undelivered_a ON chats (user_a, id) WHERE NOT a_delivered",
        "CREATE INDEX chats_undelivered_b ON chats (user_b, id) WHERE NOT b_delivered",
        """
        CREATE TABLE messages (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            chat_id BIGINT NOT NULL REFERENCES chats (id),
            sender_id TEXT NOT NULL,
            recipient_id TEXT NOT NULL,
            content BYTEA NOT NULL,
            created_at_ms BIGINT NOT NULL,
            client_message_id BYTEA,
            delivered BOOLEAN NOT NULL DEFAULT FALSE
        )
        """,
        "CREATE INDEX messages_by_chat ON messages (chat_id, id)",
        "CREATE INDEX messages_undelivered ON messages (recipient_id, id) WHERE NOT delivered",
        """
        CREATE UNIQUE INDEX messages_idempotency
            ON messages (sender_id, chat_id, client_message_id)
            WHERE client_message_id IS NOT NULL
        """,
    ),
    # 2: the id of each chat's newest message, read under the chat row lock so a new message
    # can name its predecessor (receiving nodes put events from several writers back in
    # order); existing chats get it from their messages.
    (
        "ALTER TABLE chats ADD COLUMN last_message_id BIGINT",
        "UPDATE chats SET last_message_id = m.id FROM (SELECT chat_id, MAX(id) AS id"
        " FROM messages GROUP BY chat_id) m WHERE m.chat_id = chats.id",
    ),
    # 3: the order of activity, as in SQLite's migration 2, from a sequence.
    (
        "CREATE SEQUENCE chat_activity_seq",
        "ALTER TABLE chats ADD COLUMN activity_seq BIGINT NOT NULL DEFAULT 0",
        "UPDATE chats SET activity_seq = ranked.n FROM (SELECT id, ROW_NUMBER() OVER"
        " (ORDER BY last_activity_ms, id) AS n FROM chats) AS ranked WHERE ranked.id = chats.id",
        "SELECT setval('chat_activity_seq', COALESCE(MAX(activity_seq), 0) + 1, false) FROM chats",
        "ALTER TABLE chats ALTER COLUMN activity_seq SET DEFAULT nextval('chat_activity_seq')",
        "CREATE INDEX chats_by_activity ON chats (activity_seq)",
    ),
    # 4: version 2's model, as in SQLite's migration 4 (the new flags are SMALLINT 0/1, so
    # both backends share their reads' SQL). `last_message_id` stays: the writer reads it.
    (
        "ALTER TABLE chats ADD COLUMN kind TEXT NOT NULL DEFAULT 'direct'",
        "ALTER TABLE chats ADD COLUMN title TEXT",
        "ALTER TABLE chats ADD COLUMN last_seq BIGINT NOT NULL DEFAULT 0",
        "ALTER TABLE chats ADD COLUMN version BIGINT NOT NULL DEFAULT 0",
        "ALTER TABLE messages ADD COLUMN seq BIGINT NOT NULL DEFAULT 0",
        "ALTER TABLE messages ADD COLUMN version BIGINT NOT NULL DEFAULT 0",
        "ALTER TABLE messages ADD COLUMN edited_at_ms BIGINT",
        "ALTER TABLE messages ADD COLUMN deleted SMALLINT NOT NULL DEFAULT 0",
        "ALTER TABLE messages ADD COLUMN changed SMALLINT NOT NULL DEFAULT 0",
        "UPDATE messages SET seq = ranked.n, version = ranked.n FROM (SELECT id, ROW_NUMBER()"
        " OVER (PARTITION BY chat_id ORDER BY id) AS n FROM messages) AS ranked"
        " WHERE ranked.id = messages.id",
        "UPDATE chats SET last_seq = COALESCE((SELECT MAX(seq) FROM messages"
        " WHERE chat_id = chats.id), 0)",
        "UPDATE chats SET version = last_seq",
        "CREATE UNIQUE INDEX messages_by_seq ON messages (chat_id, seq)",
        "CREATE INDEX messages_changed ON messages (chat_id, version) WHERE changed = 1",
        "DROP INDEX messages_undelivered",
        "DROP INDEX chats_undelivered_a",
        "DROP INDEX chats_undelivered_b",
        """
        CREATE TABLE members (
            chat_id BIGINT NOT NULL REFERENCES chats (id),
            user_id TEXT NOT NULL,
            chat_delivered SMALLINT NOT NULL DEFAULT 0,
            delivered_seq BIGINT NOT NULL DEFAULT 0,
            delivered_at_ms BIGINT NOT NULL DEFAULT 0,
            read_seq BIGINT NOT NULL DEFAULT 0,
            read_at_ms BIGINT NOT NULL DEFAULT 0,
            version_mark BIGINT NOT NULL DEFAULT 0,
            PRIMARY KEY (chat_id, user_id)
        )
        """,
        "CREATE INDEX members_by_user ON members (user_id, chat_id)",
        "CREATE INDEX members_undelivered ON members (user_id) WHERE chat_delivered = 0",
        "INSERT INTO members (chat_id, user_id, chat_delivered) SELECT id, user_a,"
        " a_delivered::int FROM chats UNION ALL SELECT id, user_b, b_delivered::int FROM chats"
        " WHERE user_b <> user_a",
        "UPDATE members SET delivered_seq = COALESCE((SELECT MIN(seq) - 1 FROM messages"
        " WHERE messages.chat_id = members.chat_id AND recipient_id = members.user_id"
        " AND NOT delivered), (SELECT last_seq FROM chats WHERE id = members.chat_id))",
        "UPDATE members SET read_seq = delivered_seq, version_mark = c.version,"
        " delivered_at_ms = c.last_activity_ms, read_at_ms = c.last_activity_ms"
        " FROM chats c WHERE c.id = members.chat_id",
    ),
    # 5: groups, as in SQLite's migration 5 (here the pair's columns just lose NOT NULL).
    (
        "ALTER TABLE chats ALTER COLUMN user_a DROP NOT NULL, ALTER COLUMN user_b DROP NOT NULL",
        "ALTER TABLE members ADD COLUMN joined_seq BIGINT NOT NULL DEFAULT 0",
    ),
    # 6: blocking and presence, as in SQLite's migration 6.
    (
        "ALTER TABLE chats ADD COLUMN blocked SMALLINT NOT NULL DEFAULT 0",
        """
        CREATE TABLE blocks (
            blocker_id TEXT NOT NULL,
            blocked_id TEXT NOT NULL,
            created_at_ms BIGINT NOT NULL,
            PRIMARY KEY (blocker_id, blocked_id)
        )
        """,
        "CREATE INDEX blocks_by_blocked ON blocks (blocked_id, blocker_id)",
        "CREATE TABLE presence (user_id TEXT PRIMARY KEY, last_seen_ms BIGINT NOT NULL)",
    ),
    # 7: webhooks, as in SQLite's migration 7.
    (
        """
        CREATE TABLE webhook_outbox (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            event_id TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            body BYTEA NOT NULL,
            created_at_ms BIGINT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_at_ms BIGINT NOT NULL,
            lease_until_ms BIGINT NOT NULL DEFAULT 0
        )
        """,
        "CREATE INDEX webhook_outbox_due ON webhook_outbox (endpoint, next_at_ms)",
        """
        CREATE TABLE webhook_unread (
            chat_id BIGINT NOT NULL,
            user_id TEXT NOT NULL,
            reported_seq BIGINT NOT NULL,
            PRIMARY KEY (chat_id, user_id)
        )
        """,
    ),
)
