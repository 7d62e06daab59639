"""Group chats on the writer's side, shared by both SQL backends.

Everything here runs inside the writer's transaction: on SQLite's one writer, or under the
chat row's lock in PostgreSQL, so who is in a group cannot change between reading it and
writing. That is where a group's membership is decided for every write: a message is
stored only for a current member and reaches the members of the moment it committed; a
change of a message reaches only the members who had it; a receipt reaches the members it
concerns (see `receipt_audience`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from handler.errors import ErrorCode, ProtocolError
from handler.protocol import Chat, ChatView, GroupChange
from handler.store.base import Committed
from handler.store.sql_store import Database, Dialect, MembersChange

Written = tuple[Any, Committed | None]


def members_of(db: Database, dialect: Dialect, chat_row: int) -> dict[str, int]:
    """The group's members, each with the seq they joined at, in user order."""
    rows = db.execute(dialect.sql("members_joined"), {"chat": chat_row}).fetchall()
    return {user: joined for user, joined in rows}


def with_members(chat: Chat, members: Iterable[str]) -> Chat:
    return attrs.evolve(chat, participants=tuple(sorted(members)))


def not_a_member() -> ProtocolError:
    return ProtocolError(ErrorCode.FORBIDDEN, "you are not a member of this group", field="chat_id")


def seen_by(members: Mapping[str, int], seq: int) -> tuple[str, ...]:
    """The members who joined before message `seq`: only they may learn of its changes."""
    return tuple(user for user, joined in members.items() if joined < seq)


def receipt_audience(
    db: Database, dialect: Dialect, chat_row: int, user_id: str, first: int, seq: int
) -> tuple[str, ...]:
    """Whom a member's receipt for messages `first..seq` concerns in a group: the other
    members (still members) who wrote one of them. (Telling all 255 others of every
    member's every receipt would multiply the frames of a busy group by its size.)"""
    rows = db.execute(
        dialect.sql("senders_between"),
        {"chat": chat_row, "user": user_id, "first": first, "seq": seq},
    ).fetchall()
    return tuple(sorted(sender for (sender,) in rows))


def read_seq_of(db: Database, dialect: Dialect, chat_row: int, user_id: str) -> int | None:
    """A member's read mark before a `mark_read` moves it (None: not a member)."""
    row = db.execute(dialect.sql("member_read_seq"), {"chat": chat_row, "user": user_id})
    found = row.fetchone()
    return None if found is None else int(found[0])


def read_audience(
    db: Database, dialect: Dialect, chat_row: int, user_id: str, before: int, seq: int
) -> tuple[str, ...]:
    """Whom a member's read receipt from `before` to `seq` reaches in a group: the reader's
    own devices, and the members it concerns."""
    return (user_id, *receipt_audience(db, dialect, chat_row, user_id, before + 1, seq))


def insert_members(
    db: Database, dialect: Dialect, chat_row: int, creator_id: str, member_ids: Sequence[str]
) -> None:
    """A new group's member rows: the creator has it delivered, the members do not yet."""
    sql = dialect.sql("add_member")
    for user in (creator_id, *member_ids):
        db.execute(sql, {"chat": chat_row, "user": user, "delivered": int(user == creator_id)})


def change_members(
    db: Database,
    dialect: Dialect,
    change: MembersChange,
    last_seq: int,
    version: int,
    now_ms: int,
) -> Written:
    """Apply an `add_members` or `remove_member`: its answer (the chat object for the
    requester, and whether anything changed, or the `ProtocolError` that refuses it) and
    the `GroupChange` to hand over. New members join at `last_seq`: their marks start
    there, and they see only what comes after."""
    members = members_of(db, dialect, change.chat_row)
    user = change.user_id
    if user not in members:
        return not_a_member(), None
    added: list[str] = []
    removed: tuple[str, ...] = ()
    if change.remove is None:
        added = [member for member in change.add if member not in members]
        if len(members) + len(added) > change.max_members:
            return (
                ProtocolError(
                    ErrorCode.BAD_REQUEST,
                    f"a group has at most {change.max_members} members",
                    field="member_ids",
                ),
                None,
            )
        join = dialect.sql("join_member")
        for member in added:
            db.execute(
                join,
                {
                    "chat": change.chat_row,
                    "user": member,
                    "seq": last_seq,
                    "version": version,
                    "at": now_ms,
                },
            )
    else:
        target = change.remove
        if target not in members:
            return (
                ProtocolError(
                    ErrorCode.BAD_REQUEST,
                    "user_id is not a member of this group",
                    field="user_id",
                ),
                None,
            )
        if target != user and user != change.chat.created_by:
            return (
                ProtocolError(
                    ErrorCode.FORBIDDEN,
                    "only the group's creator can remove other members",
                    field="user_id",
                ),
                None,
            )
        db.execute(dialect.sql("drop_member"), {"chat": change.chat_row, "user": target})
        removed = (target,)
    state = group_state(
        db, dialect, change.chat, change.chat_row, last_seq, version, tuple(added), removed
    )
    answer = state.view_for(user)
    if not added and not removed:
        return (answer, False), None
    return (answer, True), Committed(state.view.chat, change.origin, group=state)


def group_state(
    db: Database,
    dialect: Dialect,
    chat: Chat,
    chat_row: int,
    last_seq: int,
    version: int,
    added: tuple[str, ...] = (),
    removed: tuple[str, ...] = (),
) -> GroupChange:
    """The group as it is now in the transaction, for its fan-out (see `GroupChange`)."""
    rows = db.execute(dialect.sql("member_states"), {"chat": chat_row}).fetchall()
    group = with_members(chat, (row[0] for row in rows))
    last = None
    if last_seq:
        found = db.execute(
            dialect.sql("message_at_seq"), {"chat": chat_row, "seq": last_seq}
        ).fetchone()
        last = None if found is None else dialect.message(found)
    view = ChatView(
        group,
        last,
        0,
        tuple((user, read) for user, read, _, _, _ in rows),
        tuple((user, delivered) for user, _, delivered, _, _ in rows),
        tuple((user, joined) for user, _, _, joined, _ in rows),
    )
    unseen = () if last is None else tuple(row[0] for row in rows if row[3] >= last.seq)
    return GroupChange(
        view,
        added,
        removed,
        tuple((user, unread) for user, _, _, _, unread in rows),
        unseen,
        version,
    )


__all__ = [
    "change_members",
    "group_state",
    "insert_members",
    "members_of",
    "not_a_member",
    "read_audience",
    "read_seq_of",
    "receipt_audience",
    "seen_by",
    "with_members",
]
