"""What the two SQL stores share above their SQL and their driver: the Store contract's
lifecycle around the group-commit writer, delivery marks, and every read.

`SQLStore` implements those once; a backend (`sqlite.SQLiteStore`, `postgres.PostgresStore`)
supplies its SQL as a `Dialect`, how it opens, reads and releases its connections, and the
write operations its writer applies: for `create_chat` and `add_message` it turns a `NewChat`
or a `NewMessage` into an op, whose `apply` also fills `Op.committed` when the write created
something, which the writer hands to `commits` (see `group_commit`).
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Generic, Protocol, TypeVar

import attrs
import trio

from handler.errors import ErrorCode, ProtocolError, StoreUnavailable
from handler.protocol import Chat, ChatView, Message, ReceiptFrame
from handler.session.outgoing import SeqMark
from handler.store.base import (
    NO_ORIGIN,
    Backlog,
    BacklogPlan,
    CommitSender,
    Committed,
    Origin,
    read_backlog,
)
from handler.store.group_commit import GroupCommitWriter, OpT
from handler.store.rows import (
    CHAT_COLUMNS,
    CHAT_WIDTH,
    MESSAGE_COLUMNS,
    as_text,
    chat_columns,
    chat_of,
    int_id,
    is_group_row,
    message_columns,
    message_of,
)
from handler.timefmt import format_ms

T = TypeVar("T")

# Above any id either backend hands out: the bound of a page read from the newest message.
_NO_BOUND = 2**62


class Cursor(Protocol):
    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Database(Protocol):
    """What the shared reads need of a connection: sqlite3's and psycopg's both have it."""

    def execute(self, query: str, params: Mapping[str, Any], /) -> Cursor: ...


# The shared reads, in SQLite's parameter style; `Dialect.sql` turns them into a backend's.
# A chat object needs three queries over the user's member rows (`{only}` narrows them):
# the chats with the user's unread count, every participant's marks, the last messages.
_VIEW_CHATS: Final = (
    f"SELECT {chat_columns('c')}, (SELECT COUNT(*) FROM messages x WHERE x.chat_id = c.id"
    " AND x.seq > m.read_seq AND x.sender_id <> :user AND x.deleted = 0)"
    " FROM members m JOIN chats c ON c.id = m.chat_id WHERE m.user_id = :user {only}"
)
_VIEW_MARKS: Final = (
    "SELECT p.chat_id, p.user_id, p.read_seq, p.delivered_seq, p.joined_seq FROM members m"
    " JOIN members p ON p.chat_id = m.chat_id WHERE m.user_id = :user {only}"
)
_VIEW_LAST: Final = (
    f"SELECT {message_columns('x')} FROM members m JOIN chats c ON c.id = m.chat_id"
    " JOIN messages x ON x.chat_id = c.id AND x.seq = c.last_seq AND x.seq > m.joined_seq"
    " WHERE m.user_id = :user {only}"
)
# The seq a member's view of a chat starts after (their join); no row: not a member, who
# sees nothing (NULL compares false).
_JOINED: Final = (
    "(SELECT j.joined_seq FROM members j WHERE j.chat_id = :chat AND j.user_id = :user)"
)
_ALL: Final = ""
_ONE: Final = "AND m.chat_id = :chat"
_UNDELIVERED_CHATS: Final = "AND m.chat_delivered = 0"

_QUERIES: Final = {
    "get_chat": f"SELECT {CHAT_COLUMNS} FROM chats WHERE id = :chat",
    "has_message": "SELECT 1 FROM messages WHERE id = :message AND chat_id = :chat",
    "page": f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE chat_id = :chat AND id < :bound"
    " ORDER BY id DESC LIMIT :limit",
    "member_page": f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE chat_id = :chat"
    f" AND id < :bound AND seq > {_JOINED} ORDER BY id DESC LIMIT :limit",
    "chat_members": "SELECT user_id FROM members WHERE chat_id = :chat ORDER BY user_id",
    "all_chats": _VIEW_CHATS.format(only=_ALL) + " ORDER BY c.activity_seq DESC",
    "all_marks": _VIEW_MARKS.format(only=_ALL),
    "all_last": _VIEW_LAST.format(only=_ALL),
    "one_chats": _VIEW_CHATS.format(only=_ONE),
    "one_marks": _VIEW_MARKS.format(only=_ONE),
    "one_last": _VIEW_LAST.format(only=_ONE),
    "new_chats": _VIEW_CHATS.format(only=_UNDELIVERED_CHATS) + " ORDER BY c.id",
    "new_marks": _VIEW_MARKS.format(only=_UNDELIVERED_CHATS),
    "new_last": _VIEW_LAST.format(only=_UNDELIVERED_CHATS),
    # Chats where another member wrote above the user's delivered mark, with the id of the
    # oldest such message (the order of the `new_messages` frames).
    "plan_messages": "SELECT m.chat_id, m.delivered_seq, (SELECT x.id FROM messages x"
    " WHERE x.chat_id = m.chat_id AND x.seq > m.delivered_seq AND x.sender_id <> :user"
    " ORDER BY x.seq LIMIT 1) FROM members m JOIN chats c ON c.id = m.chat_id"
    " WHERE m.user_id = :user AND c.last_seq > m.delivered_seq",
    # Chats with a message the user had received that changed since the user's version mark
    # (through the partial index of changed messages).
    "plan_updates": "SELECT m.chat_id, m.version_mark, m.delivered_seq FROM members m"
    " JOIN chats c ON c.id = m.chat_id WHERE m.user_id = :user AND c.version > m.version_mark"
    " AND EXISTS (SELECT 1 FROM messages x WHERE x.chat_id = m.chat_id AND x.changed = 1"
    " AND x.version > m.version_mark AND x.version <= c.version AND x.seq > m.joined_seq"
    " AND (x.seq <= m.delivered_seq OR x.sender_id = :user)) ORDER BY m.chat_id",
    "plan_newest": "SELECT c.id, c.last_seq, c.version FROM members m"
    " JOIN chats c ON c.id = m.chat_id WHERE m.user_id = :user",
    "undelivered": f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE chat_id = :chat"
    " AND seq > :after AND seq <= :last AND sender_id <> :user ORDER BY seq",
    "updated": f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE chat_id = :chat AND changed = 1"
    " AND version > :after AND version <= :last AND (seq <= :seq OR sender_id = :user)"
    f" AND seq > {_JOINED} ORDER BY seq",
}


# Whether a new message at `:seq` may move its sender's delivered mark up to it: no message of
# another member lies between (one that arrived at the same moment may not have reached the
# sender yet; the mark then moves once it has).
_DELIVERED_MOVES: Final = (
    "delivered_seq < :seq AND NOT EXISTS (SELECT 1 FROM messages x WHERE x.chat_id = :chat"
    " AND x.seq > members.delivered_seq AND x.seq < :seq AND x.sender_id <> :user)"
)

# Whether a frame that delivered messages `:first` to `:seq` moves the delivered mark: it is
# above the mark and continues it (no other member's message between the mark and `:first`).
_FRAME_CONTINUES: Final = (
    "delivered_seq < :seq AND NOT EXISTS (SELECT 1 FROM messages x WHERE x.chat_id = :chat"
    " AND x.seq > members.delivered_seq AND x.seq < :first AND x.sender_id <> :user)"
)

# Where a delivered mark that reached `:seq` ends: one's own messages count as delivered, so it
# goes on over those right after it, up to the next message of another member (or the end).
_DELIVERED_END: Final = (
    "COALESCE((SELECT x.seq FROM messages x WHERE x.chat_id = :chat AND x.seq > :seq"
    " AND x.sender_id <> :user ORDER BY x.seq LIMIT 1) - 1,"
    " (SELECT c.last_seq FROM chats c WHERE c.id = :chat))"
)

# The writes both backends run alike (inside their writer's transaction).
_QUERIES.update(
    {
        # A new message moves its sender's own marks (see `Store.add_message`).
        "mark_sender": "UPDATE members SET"
        # (`delivered_at_ms` is left: the sender's own move needs no time, and this runs for
        # every message.)
        f" delivered_seq = CASE WHEN {_DELIVERED_MOVES} THEN :seq ELSE delivered_seq END,"
        # Writing in a chat reads it (the protocol's rule): the read mark moves at once.
        " read_at_ms = CASE WHEN read_seq < :seq THEN :at ELSE read_at_ms END,"
        " read_seq = CASE WHEN read_seq < :seq THEN :seq ELSE read_seq END"
        " WHERE chat_id = :chat AND user_id = :user",
        # Reading implies delivery: `mark_read` moves the delivered mark first, then the read
        # mark; each only up.
        "read_delivers": f"UPDATE members SET delivered_seq = {_DELIVERED_END},"
        " delivered_at_ms = :at WHERE chat_id = :chat AND user_id = :user"
        " AND delivered_seq < :seq RETURNING delivered_seq",
        "mark_read": "UPDATE members SET read_seq = :seq, read_at_ms = :at"
        " WHERE chat_id = :chat AND user_id = :user AND read_seq < :seq RETURNING read_seq",
        "read_mark": "SELECT m.read_seq, m.read_at_ms, (SELECT x.id FROM messages x"
        " WHERE x.chat_id = m.chat_id AND x.seq = m.read_seq) FROM members m"
        " WHERE m.chat_id = :chat AND m.user_id = :user",
        "mark_chat_delivered": "UPDATE members SET chat_delivered = 1"
        " WHERE chat_id = :chat AND user_id = :user AND chat_delivered = 0",
        # Both marks in one statement (SQLite's path).
        "mark_both": "UPDATE members SET"
        " version_mark = CASE WHEN version_mark < :version THEN :version ELSE version_mark END,"
        f" delivered_at_ms = CASE WHEN {_FRAME_CONTINUES} THEN :at ELSE delivered_at_ms END,"
        f" delivered_seq = CASE WHEN {_FRAME_CONTINUES} THEN {_DELIVERED_END}"
        " ELSE delivered_seq END"
        " WHERE chat_id = :chat AND user_id = :user RETURNING delivered_seq, delivered_at_ms",
        "message_at": "SELECT id FROM messages WHERE chat_id = :chat AND seq = :seq",
        "add_member": "INSERT INTO members (chat_id, user_id, chat_delivered)"
        " VALUES (:chat, :user, :delivered)",
        "message_by_id": f"SELECT {MESSAGE_COLUMNS} FROM messages"
        " WHERE id = :message AND chat_id = :chat",
        # Groups (the writer's side: `store.groups`).
        "members_joined": "SELECT user_id, joined_seq FROM members WHERE chat_id = :chat"
        " ORDER BY user_id",
        "join_member": "INSERT INTO members (chat_id, user_id, chat_delivered, delivered_seq,"
        " delivered_at_ms, read_seq, read_at_ms, version_mark, joined_seq) VALUES (:chat,"
        " :user, 0, :seq, :at, :seq, :at, :version, :seq)",
        "drop_member": "DELETE FROM members WHERE chat_id = :chat AND user_id = :user",
        "member_read_seq": "SELECT read_seq FROM members WHERE chat_id = :chat AND user_id = :user",
        "member_states": "SELECT m.user_id, m.read_seq, m.delivered_seq, m.joined_seq,"
        " (SELECT COUNT(*) FROM messages x WHERE x.chat_id = m.chat_id AND x.seq > m.read_seq"
        " AND x.sender_id <> m.user_id AND x.deleted = 0) FROM members m"
        " WHERE m.chat_id = :chat ORDER BY m.user_id",
        "message_at_seq": f"SELECT {MESSAGE_COLUMNS} FROM messages"
        " WHERE chat_id = :chat AND seq = :seq",
        # The other members who wrote in a range of seq: whom a group receipt concerns.
        "senders_between": "SELECT DISTINCT sender_id FROM messages WHERE chat_id = :chat"
        " AND seq >= :first AND seq <= :seq AND sender_id <> :user AND sender_id IN"
        " (SELECT user_id FROM members WHERE chat_id = :chat)",
    }
)

# Blocking and presence (the writes are `store.blocks`).
_QUERIES.update(
    {
        "blocks_of": "SELECT blocked_id FROM blocks WHERE blocker_id = :user",
        "blocked_by": "SELECT blocker_id FROM blocks WHERE blocked_id = :user",
        # Everyone who shares a chat with the user, with how many chats they share.
        "contacts": "SELECT p.user_id, COUNT(*) FROM members m JOIN members p"
        " ON p.chat_id = m.chat_id AND p.user_id <> m.user_id WHERE m.user_id = :user"
        " GROUP BY p.user_id",
        # The user's contacts by when they were last seen, most recent first.
        "recent_contacts": "SELECT p.user_id, MAX(s.last_seen_ms) FROM members m JOIN members p"
        " ON p.chat_id = m.chat_id AND p.user_id <> m.user_id LEFT JOIN presence s"
        " ON s.user_id = p.user_id WHERE m.user_id = :user GROUP BY p.user_id"
        " ORDER BY COALESCE(MAX(s.last_seen_ms), 0) DESC, p.user_id LIMIT :limit",
    }
)


def register_queries(queries: Mapping[str, str]) -> None:
    """Add the shared SQL of a writer-side module (`groups`, `blocks`); names are unique."""
    for name in queries:
        assert name not in _QUERIES, f"query {name!r} is defined twice"
    _QUERIES.update(queries)


_PARAMETER: Final = re.compile(r"(?<!:):(\w+)")


@attrs.frozen
class Dialect:
    """How one backend runs the shared reads: its parameter style (`:user` in SQLite,
    `%(user)s` in psycopg, `pyformat`), and how text columns come back (`text`)."""

    pyformat: bool = False
    text: Callable[[Any], str] = as_text
    _sql: dict[str, str] = attrs.field(init=False, factory=dict)

    def sql(self, name: str) -> str:
        """The shared query `name` in this backend's parameter style."""
        query = self._sql.get(name)
        if query is None:
            query = _QUERIES[name]
            if self.pyformat:
                query = _PARAMETER.sub(r"%(\1)s", query)
            self._sql[name] = query
        return query

    def sql_text(self, query: str) -> str:
        """A query built at run time (not cached) in this backend's parameter style."""
        return _PARAMETER.sub(r"%(\1)s", query) if self.pyformat else query

    def message(self, row: Sequence[Any]) -> Message:
        return message_of(row, self.text)

    def views(self, db: Database, which: str, params: Mapping[str, Any]) -> list[ChatView]:
        """Chat objects for `params["user"]`: `which` is "all", "one" or "new"."""
        rows = db.execute(self.sql(f"{which}_chats"), params).fetchall()
        if not rows:
            return []
        read: dict[str, dict[str, int]] = {}
        delivered: dict[str, dict[str, int]] = {}
        joined: dict[str, dict[str, int]] = {}
        for chat_id, user_id, read_seq, delivered_seq, joined_seq in db.execute(
            self.sql(f"{which}_marks"), params
        ).fetchall():
            read.setdefault(str(chat_id), {})[user_id] = read_seq
            delivered.setdefault(str(chat_id), {})[user_id] = delivered_seq
            joined.setdefault(str(chat_id), {})[user_id] = joined_seq
        last = {
            message.chat_id: message
            for message in map(
                self.message, db.execute(self.sql(f"{which}_last"), params).fetchall()
            )
        }
        views = []
        for row in rows:
            chat = chat_of(row, read.get(str(row[0]), ()))  # a group: its members' marks
            chat_id = chat.chat_id
            views.append(
                ChatView(
                    chat,
                    last.get(chat_id),
                    row[CHAT_WIDTH],
                    _per_participant(chat, read.get(chat_id, {})),
                    _per_participant(chat, delivered.get(chat_id, {})),
                    _per_participant(chat, joined.get(chat_id, {})) if chat.is_group else (),
                )
            )
        return views


def _per_participant(chat: Chat, marks: Mapping[str, int]) -> tuple[tuple[str, int], ...]:
    return tuple((user, marks.get(user, 0)) for user in chat.participants)


def change_refused(
    sender_id: str | None, deleted: bool, user_id: str, *, deleting: bool
) -> ProtocolError | None:
    """Why a user may not edit or delete a message (`sender_id` None: not in the chat)."""
    if sender_id is None:
        return ProtocolError(
            ErrorCode.BAD_REQUEST, "message_id is not a message of this chat", field="message_id"
        )
    if sender_id != user_id:
        action = "delete" if deleting else "edit"
        return ProtocolError(
            ErrorCode.FORBIDDEN, f"you can only {action} your own messages", field="message_id"
        )
    if deleted and not deleting:
        return ProtocolError(
            ErrorCode.BAD_REQUEST,
            "the message was deleted; it cannot be edited",
            field="message_id",
        )
    return None


def read_answer(
    mark: ReadMark, seq: int, current: Sequence[Any] | None, now_ms: int, delivered_moved: bool
) -> tuple[tuple[ReceiptFrame, bool], Committed | None]:
    """A `mark_read` that did not move the read mark: the answer is the mark as it is
    (`current`: read seq, when it moved, the message at it); if it moved the delivered mark
    (reading implies delivery), that is a delivered receipt to hand over."""
    read_seq, read_at, message_row = current if current is not None else (0, now_ms, None)
    chat_id = mark.chat.chat_id
    answer = ReceiptFrame(
        chat_id,
        mark.user_id,
        "read",
        read_seq,
        None if message_row is None else str(message_row),
        format_ms(read_at or now_ms),
    )
    if not delivered_moved:
        return (answer, False), None
    delivered = ReceiptFrame(
        chat_id, mark.user_id, "delivered", seq, str(mark.message_row), format_ms(now_ms)
    )
    return (answer, False), Committed(mark.chat, receipt=delivered)


def not_in_chat() -> ProtocolError:
    return ProtocolError(
        ErrorCode.BAD_REQUEST, "message_id is not a message of this chat", field="message_id"
    )


@attrs.frozen
class NewChat:
    """What `create_chat` asks the backend to write: the pair sorted, as stored."""

    creator_id: str
    user_a: str
    user_b: str
    origin: Origin


@attrs.frozen
class NewGroup:
    """What `create_group` asks the backend to write."""

    creator_id: str
    title: str
    member_ids: tuple[str, ...]
    origin: Origin


@attrs.frozen
class MembersChange:
    """What `add_members` (`add`) or `remove_member` (`remove`) asks the backend to write."""

    chat: Chat
    chat_row: int
    user_id: str
    origin: Origin
    add: tuple[str, ...] = ()
    remove: str | None = None
    max_members: int = 0


@attrs.frozen
class BlockRequest:
    """What `set_block` asks the backend to write."""

    blocker: str
    blocked: str
    on: bool
    max_blocked: int
    origin: Origin = NO_ORIGIN


@attrs.define  # not frozen: one per message on the hot path; never changed
class NewMessage:
    """What `add_message` asks the backend to write."""

    chat: Chat
    chat_row: int
    sender_id: str
    recipient_id: str | None  # None in a group
    content: str
    client_message_id: str | None
    origin: Origin


@attrs.frozen
class Change:
    """What `edit_message` (`content` set) or `delete_message` (`content` None) asks the
    backend to write."""

    chat: Chat
    chat_row: int
    message_row: int
    user_id: str
    content: str | None
    origin: Origin


@attrs.frozen
class ReadMark:
    """What `mark_read` asks the backend to write."""

    chat: Chat
    chat_row: int
    message_row: int
    user_id: str
    origin: Origin


@attrs.frozen
class Delivered:
    """What `mark_delivered` asks the backend to write: chat rows, and the marks delivered to
    `user_id`: `(chat_row, first, seq, message_id, version)` (see `SeqMark`), in chat order;
    a chat may have several, in seq order, to apply one after the other."""

    user_id: str
    chat_rows: tuple[int, ...]
    marks: tuple[tuple[int, int, int, str | None, int], ...]


class SQLStore(abc.ABC, Generic[OpT]):
    """The shared part of a SQL store; see the module docstring."""

    def __init__(self, writer: GroupCommitWriter[OpT], dialect: Dialect) -> None:
        self._writer = writer
        self._dialect = dialect

    @property
    def writer(self) -> GroupCommitWriter[OpT]:
        """The group-commit writer: its statistics, `write_failure`, and the `after_commit`
        test hook."""
        return self._writer

    @property
    def writer_statistics(self) -> tuple[int, int]:
        """(batches, operations) committed so far: their ratio is the group-commit factor."""
        return self._writer.batches, self._writer.operations

    # ------------------------------------------------------------------ what a backend adds

    @abc.abstractmethod
    async def _prepare(self) -> None:
        """Connect and migrate; raise `StoreUnavailable` if the database cannot be used."""

    @abc.abstractmethod
    async def _release(self) -> None:
        """Close every connection (the writer has stopped)."""

    @abc.abstractmethod
    async def _read(self, query: Callable[[Database], T], *, snapshot: bool = True) -> T:
        """Run `query` on a reader connection in a worker thread; `snapshot` asks for one
        consistent snapshot (reads of several statements)."""

    @abc.abstractmethod
    def _chat_op(self, new: NewChat) -> OpT:
        """The write that creates the chat or finds it: result `(Chat, created)`."""

    @abc.abstractmethod
    def _message_op(self, new: NewMessage) -> OpT:
        """The write that stores the message or finds its resend: result `(Message,
        created)`."""

    @abc.abstractmethod
    def _group_op(self, new: NewGroup) -> OpT:
        """The write that creates a group: result its `Chat`."""

    @abc.abstractmethod
    def _members_op(self, change: MembersChange) -> OpT:
        """The write that adds or removes members: result `(ChatView, changed)` or the
        `ProtocolError` that refuses it (see `groups.change_members`)."""

    @abc.abstractmethod
    def _block_op(self, request: BlockRequest) -> OpT:
        """The write that blocks or unblocks: result the blocker's list (sorted), or the
        `ProtocolError` that refuses it (see `blocks.set_block`)."""

    @abc.abstractmethod
    def _last_seen_op(self, entries: tuple[tuple[str, int], ...]) -> OpT:
        """The write that records users' last-seen times (epoch ms; only forward)."""

    @abc.abstractmethod
    def _noop(self) -> OpT:
        """A write that writes nothing (it commits in queue order: `flush`)."""

    @abc.abstractmethod
    def _probe(self) -> OpT:
        """A write that needs the database to write (the health check)."""

    @abc.abstractmethod
    def _change_op(self, change: Change) -> OpT:
        """The write that edits or deletes a message: result the `Message` in its new state
        and whether it changed, or the `ProtocolError` that refuses it."""

    @abc.abstractmethod
    def _read_op(self, mark: ReadMark) -> OpT:
        """The write that moves a read mark: result `(ReceiptFrame, moved)` or the
        `ProtocolError` that refuses it."""

    @abc.abstractmethod
    def _mark(self, delivered: Delivered) -> OpT:
        """The write that records deliveries to the user (marks only move up)."""

    # ------------------------------------------------------------------ lifecycle

    async def open(self, nursery: trio.Nursery, commits: CommitSender | None = None) -> None:
        """Connect and migrate, then start the writer in `nursery`; it hands what it creates
        to `commits` and closes it once stopped. If this raises, `commits` is left open (the
        caller may try again with it)."""
        await self._prepare()
        await nursery.start(self._writer.run, commits)

    async def aclose(self) -> None:
        """Commit and hand over what is queued, then close every connection."""
        await self._writer.aclose()
        await self._release()

    async def flush(self) -> None:
        # The no-op commits behind everything queued before it. A delivery mark queued before
        # may have failed (an outage, a full disk): then this raises, and the caller keeps the
        # mark for a retry.
        await self._writer.flush(self._noop())

    async def check(self) -> None:
        # Within PostgreSQL's backoff window this fails at once: /healthz must not wait.
        await self._read(lambda db: db.execute("SELECT 1", {}).fetchone(), snapshot=False)
        await self._writer.check_writes(self._probe())

    # ------------------------------------------------------------------ writes

    async def create_chat(
        self, creator_id: str, recipient_id: str, origin: Origin = NO_ORIGIN
    ) -> tuple[Chat, bool]:
        user_a, user_b = sorted((creator_id, recipient_id))
        op = self._chat_op(NewChat(creator_id, user_a, user_b, origin))
        result: tuple[Chat, bool] | ProtocolError = await self._writer.submit(op)
        if isinstance(result, ProtocolError):
            raise result  # a block is in place
        return result

    async def create_group(
        self, creator_id: str, title: str, member_ids: Sequence[str], origin: Origin = NO_ORIGIN
    ) -> Chat:
        op = self._group_op(NewGroup(creator_id, title, tuple(member_ids), origin))
        chat: Chat = await self._writer.submit(op)
        return chat

    async def add_members(
        self,
        chat: Chat,
        user_id: str,
        member_ids: Sequence[str],
        max_members: int,
        origin: Origin = NO_ORIGIN,
    ) -> tuple[ChatView, bool]:
        change = MembersChange(
            chat, _chat_row(chat), user_id, origin, add=tuple(member_ids), max_members=max_members
        )
        return await self._members(change)

    async def remove_member(
        self, chat: Chat, user_id: str, member_id: str, origin: Origin = NO_ORIGIN
    ) -> ChatView:
        change = MembersChange(chat, _chat_row(chat), user_id, origin, remove=member_id)
        view, _ = await self._members(change)
        return view

    async def _members(self, change: MembersChange) -> tuple[ChatView, bool]:
        result: tuple[ChatView, bool] | ProtocolError = await self._writer.submit(
            self._members_op(change)
        )
        if isinstance(result, ProtocolError):
            raise result
        return result

    async def set_block(
        self, blocker: str, blocked: str, on: bool, max_blocked: int, origin: Origin = NO_ORIGIN
    ) -> tuple[tuple[str, ...], bool]:
        result: tuple[tuple[str, ...], bool] | ProtocolError = await self._writer.submit(
            self._block_op(BlockRequest(blocker, blocked, on, max_blocked, origin))
        )
        if isinstance(result, ProtocolError):
            raise result
        return result

    async def save_last_seen(self, entries: Sequence[tuple[str, int]]) -> None:
        if entries:
            await self._writer.submit(self._last_seen_op(tuple(entries)))

    async def add_message(
        self,
        chat: Chat,
        sender_id: str,
        content: str,
        client_message_id: str | None,
        origin: Origin = NO_ORIGIN,
    ) -> tuple[Message, bool]:
        recipient_id = chat.other_participant(sender_id)
        op = self._message_op(
            NewMessage(
                chat, _chat_row(chat), sender_id, recipient_id, content, client_message_id, origin
            )
        )
        result: tuple[Message, bool] | ProtocolError = await self._writer.submit(op)
        if isinstance(result, ProtocolError):  # no longer a member of the group
            raise result
        return result

    async def edit_message(
        self, chat: Chat, user_id: str, message_id: str, content: str, origin: Origin = NO_ORIGIN
    ) -> Message:
        message, _ = await self._change(chat, user_id, message_id, content, origin)
        return message

    async def delete_message(
        self, chat: Chat, user_id: str, message_id: str, origin: Origin = NO_ORIGIN
    ) -> tuple[Message, bool]:
        return await self._change(chat, user_id, message_id, None, origin)

    async def _change(
        self, chat: Chat, user_id: str, message_id: str, content: str | None, origin: Origin
    ) -> tuple[Message, bool]:
        message_row = int_id(message_id)
        if message_row is None:
            raise not_in_chat()
        op = self._change_op(Change(chat, _chat_row(chat), message_row, user_id, content, origin))
        result: tuple[Message, bool] | ProtocolError = await self._writer.submit(op)
        if isinstance(result, ProtocolError):
            raise result
        return result

    async def mark_read(
        self, chat: Chat, user_id: str, message_id: str, origin: Origin = NO_ORIGIN
    ) -> tuple[ReceiptFrame, bool]:
        message_row = int_id(message_id)
        if message_row is None:
            raise not_in_chat()
        op = self._read_op(ReadMark(chat, _chat_row(chat), message_row, user_id, origin))
        result: tuple[ReceiptFrame, bool] | ProtocolError = await self._writer.submit(op)
        if isinstance(result, ProtocolError):
            raise result
        return result

    async def mark_delivered(
        self, user_id: str, chat_ids: Sequence[str], marks: Sequence[SeqMark]
    ) -> None:
        chat_rows = tuple(row for row in map(int_id, chat_ids) if row is not None)
        # Per chat, the seq ranges the frames delivered, joined where they meet or overlap
        # (a user's connections each get every message in order, so they usually make one);
        # ranges that do not join are applied one after the other, each moving the mark only
        # where it continues it. The changes' mark is the highest version.
        ranges: dict[int, list[tuple[int, int, str | None]]] = {}
        versions: dict[int, int] = {}
        for mark in marks:
            row = int_id(mark.chat_id)
            if row is None:
                continue
            versions[row] = max(versions.get(row, 0), mark.version)
            if mark.seq:
                first = mark.seq if mark.first is None else mark.first
                ranges.setdefault(row, []).append((first, mark.seq, mark.message_id))
        best: list[tuple[int, int, int, str | None, int]] = []
        for row in sorted(versions):
            joined: list[tuple[int, int, str | None]] = []
            for first, seq, message_id in sorted(ranges.get(row, ()), key=lambda r: r[0]):
                if joined and first <= joined[-1][1] + 1:
                    if seq > joined[-1][1]:
                        joined[-1] = (joined[-1][0], seq, message_id)
                else:
                    joined.append((first, seq, message_id))
            if not joined:
                best.append((row, 0, 0, None, versions[row]))
            for index, (first, seq, message_id) in enumerate(joined):
                last = index == len(joined) - 1
                best.append((row, first, seq, message_id, versions[row] if last else 0))
        if not chat_rows and not best:
            return
        # Delivery marks are not acknowledgements: nobody waits for their commit (a full queue
        # is waited for, though: they are never dropped). One that fails is reported by the
        # next `flush`; lost in a crash, it only means the item is offered again.
        await self._writer.enqueue(self._mark(Delivered(user_id, chat_rows, tuple(best))))

    # ------------------------------------------------------------------ reads

    async def get_chat(self, chat_id: str) -> Chat | None:
        row_id = int_id(chat_id)
        if row_id is None:
            return None
        dialect = self._dialect

        def query(db: Database) -> Chat | None:
            where = {"chat": row_id}
            row = db.execute(dialect.sql("get_chat"), where).fetchone()
            if row is None or not is_group_row(row):
                return None if row is None else chat_of(row)
            members = db.execute(dialect.sql("chat_members"), where).fetchall()
            return chat_of(row, (member for (member,) in members))

        # A direct chat is one statement; a group's members need the same snapshot.
        return await self._read(query, snapshot=False)

    # Rows become records in the worker thread, not on the Trio loop: a page or a backlog
    # can be long.

    async def chats_of(self, user_id: str) -> list[ChatView]:
        dialect = self._dialect
        return await self._read(lambda db: dialect.views(db, "all", {"user": user_id}))

    async def chat_view(self, chat_id: str, user_id: str) -> ChatView | None:
        """The chat object of one chat for one of its members (None if not a member)."""
        row_id = int_id(chat_id)
        if row_id is None:
            return None
        dialect = self._dialect
        views = await self._read(
            lambda db: dialect.views(db, "one", {"user": user_id, "chat": row_id})
        )
        return views[0] if views else None

    async def messages_before(
        self, chat_id: str, before_id: str | None, limit: int, viewer: str | None = None
    ) -> tuple[tuple[Message, ...], bool] | None:
        chat_row = int_id(chat_id)
        before_row = None if before_id is None else int_id(before_id)
        if chat_row is None or (before_id is not None and before_row is None):
            return None
        dialect = self._dialect

        def query(db: Database) -> tuple[tuple[Message, ...], bool] | None:
            if before_row is not None:
                found = db.execute(
                    dialect.sql("has_message"), {"message": before_row, "chat": chat_row}
                ).fetchone()
                if found is None:
                    return None
            bound = _NO_BOUND if before_row is None else before_row
            params = {"chat": chat_row, "bound": bound, "limit": limit + 1, "user": viewer}
            query = "page" if viewer is None else "member_page"
            rows = db.execute(dialect.sql(query), params).fetchall()
            page = tuple(dialect.message(row) for row in reversed(rows[:limit]))
            return page, len(rows) > limit

        return await self._read(query)

    async def backlog_plan(self, user_id: str) -> BacklogPlan:
        dialect = self._dialect
        user = {"user": user_id}

        def query(db: Database) -> BacklogPlan:
            chats = dialect.views(db, "new", user)
            oldest = [
                (row[2], str(row[0]), row[1])
                for row in db.execute(dialect.sql("plan_messages"), user).fetchall()
                if row[2] is not None
            ]
            oldest.sort()
            updates = tuple(
                (str(chat_id), mark, seq)
                for chat_id, mark, seq in db.execute(dialect.sql("plan_updates"), user).fetchall()
            )
            newest = {
                str(chat_id): (last_seq, version)
                for chat_id, last_seq, version in db.execute(
                    dialect.sql("plan_newest"), user
                ).fetchall()
            }
            return BacklogPlan(
                tuple(chats),
                tuple((chat_id, after) for _, chat_id, after in oldest),
                updates,
                newest,
            )

        return await self._read(query)

    async def undelivered(
        self, user_id: str, chat_id: str, after_seq: int, up_to_seq: int
    ) -> tuple[Message, ...]:
        chat_row = int_id(chat_id)
        if chat_row is None:
            return ()
        bounds = {"chat": chat_row, "after": after_seq, "last": up_to_seq, "user": user_id}
        return await self._messages("undelivered", bounds)

    async def updated(
        self, user_id: str, chat_id: str, after_version: int, up_to_version: int, up_to_seq: int
    ) -> tuple[Message, ...]:
        chat_row = int_id(chat_id)
        if chat_row is None:
            return ()
        bounds = {
            "chat": chat_row,
            "after": after_version,
            "last": up_to_version,
            "seq": up_to_seq,
            "user": user_id,
        }
        return await self._messages("updated", bounds)

    async def _messages(self, name: str, params: Mapping[str, Any]) -> tuple[Message, ...]:
        dialect = self._dialect
        sql = dialect.sql(name)
        return await self._read(
            lambda db: tuple(dialect.message(row) for row in db.execute(sql, params).fetchall()),
            snapshot=False,
        )

    async def backlog(self, user_id: str) -> Backlog:
        return await read_backlog(self, user_id)

    async def blocks_of(self, user_id: str) -> tuple[str, ...]:
        sql = self._dialect.sql("blocks_of")
        return await self._read(
            lambda db: tuple(sorted(r[0] for r in db.execute(sql, {"user": user_id}).fetchall())),
            snapshot=False,
        )

    async def block_relations(self, user_id: str) -> tuple[frozenset[str], frozenset[str]]:
        """Whom the user blocks, and who blocks the user."""
        dialect = self._dialect

        def query(db: Database) -> tuple[frozenset[str], frozenset[str]]:
            user = {"user": user_id}
            blocks = db.execute(dialect.sql("blocks_of"), user).fetchall()
            blocked_by = db.execute(dialect.sql("blocked_by"), user).fetchall()
            return frozenset(r[0] for r in blocks), frozenset(r[0] for r in blocked_by)

        return await self._read(query)

    async def relations_of(
        self, user_id: str, *, with_contacts: bool
    ) -> tuple[frozenset[str], frozenset[str], dict[str, int]]:
        """`block_relations`, and `contacts_of` when asked, in one read."""
        dialect = self._dialect

        def query(db: Database) -> tuple[frozenset[str], frozenset[str], dict[str, int]]:
            user = {"user": user_id}
            blocks = db.execute(dialect.sql("blocks_of"), user).fetchall()
            blocked_by = db.execute(dialect.sql("blocked_by"), user).fetchall()
            contacts = db.execute(dialect.sql("contacts"), user).fetchall() if with_contacts else []
            return (
                frozenset(r[0] for r in blocks),
                frozenset(r[0] for r in blocked_by),
                {r[0]: int(r[1]) for r in contacts},
            )

        return await self._read(query)

    async def contacts_of(self, user_id: str) -> dict[str, int]:
        sql = self._dialect.sql("contacts")
        return await self._read(
            lambda db: {r[0]: int(r[1]) for r in db.execute(sql, {"user": user_id}).fetchall()},
            snapshot=False,
        )

    async def recent_contacts(self, user_id: str, limit: int) -> list[tuple[str, int | None]]:
        sql = self._dialect.sql("recent_contacts")
        params = {"user": user_id, "limit": limit}
        return await self._read(
            lambda db: [(r[0], r[1]) for r in db.execute(sql, params).fetchall()],
            snapshot=False,
        )

    async def last_seen_of(self, user_ids: Sequence[str]) -> dict[str, int]:
        if not user_ids:
            return {}
        names = [f"u{index}" for index in range(len(user_ids))]
        sql = self._dialect.sql_text(
            "SELECT user_id, last_seen_ms FROM presence WHERE user_id IN"
            f" ({', '.join(':' + name for name in names)})"
        )
        params = dict(zip(names, user_ids, strict=True))
        return await self._read(
            lambda db: {r[0]: int(r[1]) for r in db.execute(sql, params).fetchall()},
            snapshot=False,
        )


def _chat_row(chat: Chat) -> int:
    row = int_id(chat.chat_id)
    if row is None:
        raise StoreUnavailable(f"chat {chat.chat_id!r} is not a chat id of this store")
    return row


__all__ = [
    "BlockRequest",
    "Change",
    "Database",
    "Delivered",
    "Dialect",
    "MembersChange",
    "NewChat",
    "NewGroup",
    "NewMessage",
    "ReadMark",
    "SQLStore",
    "change_refused",
    "not_in_chat",
    "register_queries",
]
