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
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, Protocol, TypeVar

import attrs
import trio

from handler.errors import StoreUnavailable
from handler.protocol import Chat, Message
from handler.store.base import (
    NO_ORIGIN,
    Backlog,
    BacklogPlan,
    CommitSender,
    Origin,
    read_backlog,
)
from handler.store.group_commit import GroupCommitWriter, OpT
from handler.store.rows import as_text, chat_of, int_id, message_of

T = TypeVar("T")

# Above any id either backend hands out: the bound of a page read from the newest message.
_NO_BOUND = 2**62


class Cursor(Protocol):
    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Database(Protocol):
    """What the shared reads need of a connection: sqlite3's and psycopg's both have it."""

    def execute(self, query: str, params: Mapping[str, Any], /) -> Cursor: ...


@attrs.frozen
class Dialect:
    """One backend's SQL for the shared reads, with named parameters (`:user` in SQLite,
    `%(user)s` in psycopg), and how text columns come back (`text`).

    Parameters: `get_chat` (chat); `chats_of` (user), most recently active first;
    `has_message` (message, chat); `page` (chat, bound, limit), newest first, below `bound`;
    `plan_chats`, `plan_oldest`, `plan_newest` (user), the three queries of
    `BacklogPlan.of`; `undelivered` (chat, first, last, user), ids from first to last
    (both included), oldest first.
    """

    get_chat: str
    chats_of: str
    has_message: str
    page: str
    plan_chats: str
    plan_oldest: str
    plan_newest: str
    undelivered: str
    text: Callable[[Any], str] = as_text

    def message(self, row: Sequence[Any]) -> Message:
        return message_of(row, self.text)


@attrs.frozen
class NewChat:
    """What `create_chat` asks the backend to write: the pair sorted, as stored."""

    creator_id: str
    user_a: str
    user_b: str
    origin: Origin


@attrs.define  # not frozen: one per message on the hot path; never changed
class NewMessage:
    """What `add_message` asks the backend to write."""

    chat: Chat
    chat_row: int
    sender_id: str
    recipient_id: str
    content: str
    client_message_id: str | None
    origin: Origin


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
    def _noop(self) -> OpT:
        """A write that writes nothing (it commits in queue order: `flush`)."""

    @abc.abstractmethod
    def _probe(self) -> OpT:
        """A write that needs the database to write (the health check)."""

    @abc.abstractmethod
    def _mark(self, user_id: str, chat_rows: tuple[int, ...], message_rows: tuple[int, ...]) -> OpT:
        """The write that records these chats and messages as delivered to the user."""

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
        result: tuple[Chat, bool] = await self._writer.submit(op)
        return result

    async def add_message(
        self,
        chat: Chat,
        sender_id: str,
        content: str,
        client_message_id: str | None,
        origin: Origin = NO_ORIGIN,
    ) -> tuple[Message, bool]:
        chat_row = int_id(chat.chat_id)
        if chat_row is None:
            raise StoreUnavailable(f"chat {chat.chat_id!r} is not a chat id of this store")
        recipient_id = chat.other_participant(sender_id)
        op = self._message_op(
            NewMessage(chat, chat_row, sender_id, recipient_id, content, client_message_id, origin)
        )
        result: tuple[Message, bool] = await self._writer.submit(op)
        return result

    async def mark_delivered(
        self, user_id: str, chat_ids: Sequence[str], message_ids: Sequence[str]
    ) -> None:
        chat_rows = tuple(row for row in map(int_id, chat_ids) if row is not None)
        message_rows = tuple(row for row in map(int_id, message_ids) if row is not None)
        if not chat_rows and not message_rows:
            return
        # Delivery marks are not acknowledgements: nobody waits for their commit (a full queue
        # is waited for, though: they are never dropped). One that fails is reported by the
        # next `flush`; lost in a crash, it only means the item is offered again.
        await self._writer.enqueue(self._mark(user_id, chat_rows, message_rows))

    # ------------------------------------------------------------------ reads

    async def get_chat(self, chat_id: str) -> Chat | None:
        row_id = int_id(chat_id)
        if row_id is None:
            return None
        sql = self._dialect.get_chat
        row = await self._read(
            lambda db: db.execute(sql, {"chat": row_id}).fetchone(), snapshot=False
        )
        return None if row is None else chat_of(row)

    # Rows become records in the worker thread, not on the Trio loop: a page or a backlog
    # can be long.

    async def chats_of(self, user_id: str) -> list[Chat]:
        sql = self._dialect.chats_of
        return await self._read(
            lambda db: [chat_of(row) for row in db.execute(sql, {"user": user_id}).fetchall()]
        )

    async def messages_before(
        self, chat_id: str, before_id: str | None, limit: int
    ) -> tuple[tuple[Message, ...], bool] | None:
        chat_row = int_id(chat_id)
        before_row = None if before_id is None else int_id(before_id)
        if chat_row is None or (before_id is not None and before_row is None):
            return None
        dialect = self._dialect

        def query(db: Database) -> tuple[tuple[Message, ...], bool] | None:
            if before_row is not None:
                found = db.execute(
                    dialect.has_message, {"message": before_row, "chat": chat_row}
                ).fetchone()
                if found is None:
                    return None
            bound = _NO_BOUND if before_row is None else before_row
            rows = db.execute(
                dialect.page, {"chat": chat_row, "bound": bound, "limit": limit + 1}
            ).fetchall()
            page = tuple(dialect.message(row) for row in reversed(rows[:limit]))
            return page, len(rows) > limit

        return await self._read(query)

    async def backlog_plan(self, user_id: str) -> BacklogPlan:
        dialect = self._dialect
        user = {"user": user_id}

        def query(db: Database) -> BacklogPlan:
            return BacklogPlan.of(
                [chat_of(row) for row in db.execute(dialect.plan_chats, user).fetchall()],
                db.execute(dialect.plan_oldest, user).fetchall(),
                db.execute(dialect.plan_newest, user).fetchall(),
            )

        return await self._read(query)

    async def undelivered(
        self, user_id: str, chat_id: str, from_id: str, up_to_id: str
    ) -> tuple[Message, ...]:
        chat_row, from_row, to_row = int_id(chat_id), int_id(from_id), int_id(up_to_id)
        if chat_row is None or from_row is None or to_row is None:
            return ()
        dialect = self._dialect
        bounds = {"chat": chat_row, "first": from_row, "last": to_row, "user": user_id}
        return await self._read(
            lambda db: tuple(
                dialect.message(row) for row in db.execute(dialect.undelivered, bounds).fetchall()
            ),
            snapshot=False,
        )

    async def backlog(self, user_id: str) -> Backlog:
        return await read_backlog(self, user_id)


__all__ = ["Database", "Dialect", "NewChat", "NewMessage", "SQLStore"]
