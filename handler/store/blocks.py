"""Blocking and last-seen times on the writer's side, shared by both SQL backends.

A block lives in `blocks`; the direct chat of the pair (if any) carries `blocked`, set in the
same transaction, so the writer refuses a message or an edit from the chat row it reads for
every write anyway (no query more per message). A chat is never created while a block is in
place (`block_between` runs in the writer's transaction that would create it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from handler.errors import ErrorCode, ProtocolError
from handler.protocol import BlockChange
from handler.store.base import Committed
from handler.store.sql_store import BlockRequest, Database, Dialect, register_queries

BLOCK_IN_PLACE: Final = "a block is in place between you and this user"

register_queries(
    {
        "block_between": "SELECT 1 FROM blocks WHERE (blocker_id = :a AND blocked_id = :b)"
        " OR (blocker_id = :b AND blocked_id = :a)",
        "is_blocking": "SELECT 1 FROM blocks WHERE blocker_id = :user AND blocked_id = :other",
        "count_blocks": "SELECT COUNT(*) FROM blocks WHERE blocker_id = :user",
        "insert_block": "INSERT INTO blocks (blocker_id, blocked_id, created_at_ms)"
        " VALUES (:user, :other, :at) ON CONFLICT DO NOTHING",
        "delete_block": "DELETE FROM blocks WHERE blocker_id = :user AND blocked_id = :other",
        # The pair's direct chat carries whether a block is in place, either way.
        "flag_chat": "UPDATE chats SET blocked = CASE WHEN EXISTS (SELECT 1 FROM blocks"
        " WHERE (blocker_id = :a AND blocked_id = :b) OR (blocker_id = :b AND blocked_id = :a))"
        " THEN 1 ELSE 0 END WHERE user_a = :a AND user_b = :b",
        "chat_blocked": "SELECT blocked FROM chats WHERE id = :chat",
    }
)


def refused() -> ProtocolError:
    return ProtocolError(ErrorCode.FORBIDDEN, BLOCK_IN_PLACE, field="user_id")


def refused_in_chat() -> ProtocolError:
    return ProtocolError(ErrorCode.FORBIDDEN, BLOCK_IN_PLACE, field="chat_id")


def block_between(db: Database, dialect: Dialect, user_a: str, user_b: str) -> bool:
    """Whether either user blocks the other."""
    params = {"a": user_a, "b": user_b}
    return db.execute(dialect.sql("block_between"), params).fetchone() is not None


def chat_blocked(db: Database, dialect: Dialect, chat_row: int) -> bool:
    row = db.execute(dialect.sql("chat_blocked"), {"chat": chat_row}).fetchone()
    return row is not None and bool(row[0])


def blocks_of(db: Database, dialect: Dialect, user_id: str) -> tuple[str, ...]:
    """Whom the user blocks, sorted by code point (not by the database's collation)."""
    rows = db.execute(dialect.sql("blocks_of"), {"user": user_id}).fetchall()
    return tuple(sorted(row[0] for row in rows))


def blocked_by(db: Database, dialect: Dialect, user_id: str) -> tuple[str, ...]:
    rows = db.execute(dialect.sql("blocked_by"), {"user": user_id}).fetchall()
    return tuple(sorted(row[0] for row in rows))


def set_block(
    db: Database, dialect: Dialect, request: BlockRequest, now_ms: int
) -> tuple[Any, Committed | None]:
    """Block or unblock; the result is the blocker's list and whether it changed (then
    with a commit).
    Past `max_blocked` a new block is refused (`bad_request`)."""
    blocker, blocked, on = request.blocker, request.blocked, request.on
    params = {"user": blocker, "other": blocked, "at": now_ms}
    exists = db.execute(dialect.sql("is_blocking"), params).fetchone() is not None
    if exists == on:
        return (blocks_of(db, dialect, blocker), False), None  # idempotent: nothing changes
    if on:
        (count,) = db.execute(dialect.sql("count_blocks"), params).fetchone()
        if count >= request.max_blocked:
            return (
                ProtocolError(
                    ErrorCode.BAD_REQUEST,
                    f"you block {count} users already, the most there may be",
                    field="user_id",
                ),
                None,
            )
        db.execute(dialect.sql("insert_block"), params)
    else:
        db.execute(dialect.sql("delete_block"), params)
    user_a, user_b = sorted((blocker, blocked))
    db.execute(dialect.sql("flag_chat"), {"a": user_a, "b": user_b})
    blocks = blocks_of(db, dialect, blocker)
    change = BlockChange(blocker, blocked, on, blocks)
    return (blocks, True), Committed.of_block(change, request.origin)


def save_last_seen(
    db: Database, dialect: Dialect, entries: Sequence[tuple[str, int]], *, greatest: str
) -> None:
    """Record when users' last connections closed; a time only moves forward. `greatest`
    is the backend's two-argument maximum (`max` in SQLite, `GREATEST` in PostgreSQL)."""
    query = dialect.sql(f"save_last_seen_{greatest}")
    for user_id, at in entries:
        db.execute(query, {"user": user_id, "at": at})


for _greatest in ("max", "GREATEST"):
    register_queries(
        {
            f"save_last_seen_{_greatest}": "INSERT INTO presence (user_id, last_seen_ms)"
            " VALUES (:user, :at) ON CONFLICT (user_id) DO UPDATE SET last_seen_ms ="
            f" {_greatest}(presence.last_seen_ms, excluded.last_seen_ms)"
        }
    )
