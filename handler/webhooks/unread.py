"""`message.unread`: messages a member still had not received `unread_delay_s` after they were
sent, found by a periodic scan of the store, not by a timer per message.

Each member has a mark in `webhook_unread`: the seq up to which their chat was scanned. A scan
finds, per member, the messages of the others above both that mark and the member's delivered
mark that are older than the delay, writes one event per message (for each endpoint that
wants it) and moves the mark past them, in ONE transaction: a crash leaves both or neither.
A message that reached the member before the scan (`delivered_seq` at or above it) is never
reported; one that reaches them later was reported once and is not taken back.

Within a chat seq follows time, so the messages due form a prefix of those above the mark and
the mark never skips one that is not due yet. Messages older than the outbox's give-up age
(24 h by default) move the mark without an event: turning webhooks on over an old database
does not flood the receivers with old news; deleted messages likewise.

On PostgreSQL one node scans at a time (a transaction-scoped advisory lock; the others skip
that round). A scan takes at most `limit` messages and runs again at once while it is full.
"""

from __future__ import annotations

from typing import Final

from handler.store.outbox import Outbox
from handler.store.rows import message_columns, message_of
from handler.store.sql_store import Database, register_queries
from handler.webhooks import events
from handler.webhooks.queue import OutboxQueue

_MARK: Final = "COALESCE(u.reported_seq, 0)"
_CREATED_AT: Final = 5  # `created_at_ms` in `message_columns`

register_queries(
    {
        "unread_due": f"SELECT m.chat_id, m.user_id, {message_columns('x')} FROM members m"
        " JOIN chats c ON c.id = m.chat_id LEFT JOIN webhook_unread u"
        " ON u.chat_id = m.chat_id AND u.user_id = m.user_id"
        f" JOIN messages x ON x.chat_id = m.chat_id AND x.seq > {_MARK}"
        " AND x.seq > m.delivered_seq AND x.seq > m.joined_seq"
        f" WHERE c.last_seq > m.delivered_seq AND c.last_seq > {_MARK}"
        " AND x.sender_id <> m.user_id AND x.created_at_ms <= :due"
        " ORDER BY m.chat_id, m.user_id, x.seq LIMIT :limit",
        "unread_mark": "INSERT INTO webhook_unread (chat_id, user_id, reported_seq)"
        " VALUES (:chat, :user, :seq) ON CONFLICT (chat_id, user_id) DO UPDATE SET"
        " reported_seq = CASE WHEN excluded.reported_seq > webhook_unread.reported_seq"
        " THEN excluded.reported_seq ELSE webhook_unread.reported_seq END",
    }
)


async def scan(
    queue: OutboxQueue,
    outbox: Outbox,
    *,
    now_ms: int,
    delay_ms: int,
    max_age_ms: int,
    limit: int = 500,
) -> tuple[int, bool]:
    """One scan: how many events it wrote, and whether it was full (scan again at once)."""
    dialect = queue.dialect
    params = {"due": now_ms - delay_ms, "limit": limit}
    oldest = now_ms - max_age_ms

    def run(db: Database) -> tuple[int, bool]:
        if not queue.holds_scan_lock(db):
            return 0, False
        found = db.execute(dialect.sql("unread_due"), params).fetchall()
        marks: dict[tuple[int, str], int] = {}
        rows = []
        for row in found:
            chat_row, user_id = int(row[0]), str(row[1])
            message = message_of(row[2:], dialect.text)
            marks[(chat_row, user_id)] = max(marks.get((chat_row, user_id), 0), message.seq)
            if message.deleted or int(row[2 + _CREATED_AT]) < oldest:
                continue
            data = events.unread_data(user_id, message)
            rows.extend(outbox.rows(events.MESSAGE_UNREAD, data, now_ms))
        insert = dialect.sql("outbox_insert")
        for event in rows:  # (a psycopg connection, unlike its cursors, has no executemany)
            db.execute(insert, event)
        mark = dialect.sql("unread_mark")
        for (chat_row, user_id), seq in marks.items():
            db.execute(mark, {"chat": chat_row, "user": user_id, "seq": seq})
        return len(rows), len(found) == limit

    return await queue.transaction(run)
