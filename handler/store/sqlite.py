"""SQLite backend: WAL, versioned migrations, one group-committing writer thread, pooled readers.

Theory of operation:
- Writes go through `_Writer`: callers queue an operation and wait; one Trio task takes every
  operation queued so far, runs them in a worker thread inside ONE transaction (each in its own
  SAVEPOINT, so one failing operation does not undo its neighbours), commits, then wakes the
  callers in commit order. Throughput comes from amortizing the commit, not from skipping it:
  an acknowledgement is only sent after COMMIT returned.
- Reads run on a small pool of read-only connections in worker threads; WAL lets them proceed
  while the writer commits. The Trio loop never touches a sqlite3 call itself.
- Ids are SQLite rowids rendered as decimal strings; per chat they only grow, and timestamps
  are clamped to the chat's last message time so they never go backwards either.
"""

from __future__ import annotations

import contextlib
import math
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import attrs
import trio

from handler.config import StorageConfig
from handler.errors import StoreUnavailable
from handler.protocol import Chat, Message
from handler.store.base import Backlog, BacklogPlan, OnCommit, read_backlog
from handler.store.schema import SQLITE_MIGRATIONS
from handler.timefmt import format_ms, now_ms

T = TypeVar("T")

_READERS: Final = 4
_MAX_BATCH: Final = 512
_PROBE_BYTES: Final = 128 * 1024

_CHAT_COLUMNS: Final = "id, user_a, user_b, created_by, created_at_ms"
# One counter over all chats, bumped by every creation and message (indexed, so O(log n)).
_NEXT_SEQ: Final = "(SELECT COALESCE(MAX(activity_seq), 0) + 1 FROM chats)"
_MESSAGE_COLUMNS: Final = (
    "id, chat_id, sender_id, recipient_id, content, created_at_ms, client_message_id"
)


def _chat(row: Sequence[Any]) -> Chat:
    return Chat(str(row[0]), (row[1], row[2]), row[3], format_ms(row[4]))


def _message(row: Sequence[Any]) -> Message:
    return Message(str(row[0]), str(row[1]), row[2], row[3], row[4], format_ms(row[5]), row[6])


def _int_id(value: str) -> int | None:
    """Ids are decimal rowids; anything else cannot name a row."""
    if not value.isascii() or not value.isdigit() or len(value) > 18:
        return None
    return int(value)


@attrs.define
class _Operation:
    run: Callable[[sqlite3.Connection], Any]
    done: trio.Event = attrs.field(factory=trio.Event)
    result: Any = None
    error: BaseException | None = None
    on_commit: Callable[[Any], None] | None = None


class _Writer:
    """One connection, one task, one dedicated thread: batches queued operations into a
    single transaction.

    The thread is the writer's own (not `trio.to_thread`): handing it a batch through a
    `SimpleQueue` and getting the result back with `run_sync_soon` costs about half the CPU of
    a `to_thread` round trip, and at moderate load most batches hold a single message.
    """

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection
        self._send, self._receive = trio.open_memory_channel[_Operation](math.inf)
        self._jobs: queue.SimpleQueue[tuple[list[_Operation], Callable[[], None]] | None] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        # Why a write failed (disk full, I/O error), until the health check's probe write
        # succeeds: /healthz reports it, so a balancer stops sending users to a node that
        # cannot store their messages.
        self.write_failure: str | None = None

    async def submit(
        self,
        run: Callable[[sqlite3.Connection], T],
        on_commit: Callable[[T], None] | None = None,
    ) -> T:
        operation = _Operation(run, on_commit=on_commit)
        try:
            self._send.send_nowait(operation)
        except trio.ClosedResourceError:
            raise StoreUnavailable("the store is closed") from None
        await operation.done.wait()
        if operation.error is not None:
            raise operation.error
        return operation.result  # type: ignore[no-any-return]

    def submit_nowait(self, run: Callable[[sqlite3.Connection], Any]) -> None:
        """Queue a write nobody waits for (delivery marks); dropped if the store is closing."""
        with contextlib.suppress(trio.ClosedResourceError):
            self._send.send_nowait(_Operation(run))

    def close(self) -> None:
        self._send.close()

    def _thread_main(self, token: trio.lowlevel.TrioToken) -> None:
        while (job := self._jobs.get()) is not None:
            batch, done = job
            try:
                self._apply(batch)
            finally:
                token.run_sync_soon(done)

    async def _in_thread(self, batch: list[_Operation]) -> None:
        applied = trio.Event()
        self._jobs.put((batch, applied.set))
        await applied.wait()

    async def join_thread(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            await trio.to_thread.run_sync(self._thread.join)
            self._thread = None

    async def run(self) -> None:
        self._thread = threading.Thread(
            target=self._thread_main,
            args=(trio.lowlevel.current_trio_token(),),
            name="sqlite-writer",
            daemon=True,
        )
        self._thread.start()
        async with self._receive:
            async for first in self._receive:
                batch = [first]
                while len(batch) < _MAX_BATCH:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                # Shielded: once a batch is handed to the thread it must finish and wake its
                # waiters, or an acknowledged write could be reported as failed.
                with trio.CancelScope(shield=True):
                    await self._in_thread(batch)
                    for operation in batch:
                        if operation.error is None and operation.on_commit is not None:
                            operation.on_commit(operation.result)
                        operation.done.set()

    def _apply(self, batch: list[_Operation]) -> None:
        """One transaction for the whole batch; if any operation fails, the batch is rolled
        back and replayed one operation per transaction, so only the faulty one fails.
        (Failures are rare; a SAVEPOINT per operation would cost two statements each.)"""
        connection = self._connection
        try:
            connection.execute("BEGIN IMMEDIATE")
            for operation in batch:
                operation.result = operation.run(connection)
            connection.execute("COMMIT")
            return
        except Exception:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            if len(batch) == 1:
                self._apply_alone(batch[0])
                return
        for operation in batch:
            self._apply_alone(operation)

    def _apply_alone(self, operation: _Operation) -> None:
        connection = self._connection
        operation.result = None
        try:
            connection.execute("BEGIN IMMEDIATE")
            operation.result = operation.run(connection)
            connection.execute("COMMIT")
        except sqlite3.OperationalError as error:  # I/O, disk full, locked: the store's fault
            operation.error = StoreUnavailable(f"sqlite commit failed: {error}")
            self.write_failure = str(error)
        except Exception as error:
            operation.error = error
        finally:
            if connection.in_transaction:
                connection.execute("ROLLBACK")


class SQLiteStore:
    """The embedded default store; see the module docstring for the concurrency design."""

    def __init__(self, config: StorageConfig) -> None:
        self._config = config
        self._path: Path = config.path
        self._readers: list[sqlite3.Connection] = []
        self._reader_limiter = trio.CapacityLimiter(_READERS)
        self._writer: _Writer | None = None
        self._writer_connection: sqlite3.Connection | None = None
        self._writer_done = trio.Event()

    # ------------------------------------------------------------------ lifecycle

    def _connect(self, *, readonly: bool) -> sqlite3.Connection:
        connection = sqlite3.connect(
            self._path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        connection.execute("PRAGMA busy_timeout = 30000")
        connection.execute(f"PRAGMA synchronous = {self._config.synchronous.upper()}")
        connection.execute("PRAGMA foreign_keys = ON")
        if readonly:
            connection.execute("PRAGMA query_only = ON")
        return connection

    def _open_sync(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        writer = self._connect(readonly=False)
        writer.execute("PRAGMA journal_mode = WAL")
        _migrate(writer)
        self._writer_connection = writer
        self._readers = [self._connect(readonly=True) for _ in range(_READERS)]

    async def open(self, nursery: trio.Nursery) -> None:
        try:
            await trio.to_thread.run_sync(self._open_sync)
        except sqlite3.Error as error:
            raise StoreUnavailable(f"cannot open {self._path}: {error}") from None
        assert self._writer_connection is not None
        self._writer = _Writer(self._writer_connection)
        nursery.start_soon(self._run_writer, self._writer)

    async def _run_writer(self, writer: _Writer) -> None:
        try:
            await writer.run()
        finally:
            with trio.CancelScope(shield=True):
                await writer.join_thread()
            self._writer_done.set()

    async def aclose(self) -> None:
        if self._writer is not None:
            self._writer.close()
            await self._writer_done.wait()
            self._writer = None

        def close_all() -> None:
            for connection in [*self._readers, self._writer_connection]:
                if connection is not None:
                    connection.close()

        await trio.to_thread.run_sync(close_all)
        self._readers = []
        self._writer_connection = None

    async def flush(self) -> None:
        await self._require_writer().submit(_nothing)

    async def check(self) -> None:
        await self._read(lambda db: db.execute("SELECT 1").fetchone())
        writer = self._require_writer()
        failure = writer.write_failure
        if failure is not None:
            # Only a probe of real size clears it: an empty commit (a flush) or a small write
            # can succeed on a disk that has no room for a message.
            try:
                await writer.submit(_probe_write)
            except StoreUnavailable:
                raise StoreUnavailable(f"writes are failing: {failure}") from None
            writer.write_failure = None

    # ------------------------------------------------------------------ helpers

    async def _read(self, query: Callable[[sqlite3.Connection], T]) -> T:
        async with self._reader_limiter:
            if not self._readers:
                raise StoreUnavailable("the store is closed")
            connection = self._readers.pop()
            try:
                return await trio.to_thread.run_sync(_read_in_transaction, connection, query)
            except sqlite3.Error as error:
                raise StoreUnavailable(f"sqlite read failed: {error}") from None
            finally:
                self._readers.append(connection)

    def _require_writer(self) -> _Writer:
        if self._writer is None:
            raise StoreUnavailable("the store is not open")
        return self._writer

    # ------------------------------------------------------------------ contract

    async def create_chat(self, creator_id: str, recipient_id: str) -> tuple[Chat, bool]:
        user_a, user_b = sorted((creator_id, recipient_id))

        def run(db: sqlite3.Connection) -> tuple[Chat, bool]:
            row = db.execute(
                f"SELECT {_CHAT_COLUMNS} FROM chats WHERE user_a = ? AND user_b = ?",
                (user_a, user_b),
            ).fetchone()
            if row is not None:
                return _chat(row), False
            created = now_ms()
            cursor = db.execute(
                "INSERT INTO chats (user_a, user_b, created_by, created_at_ms, last_activity_ms,"
                " a_delivered, b_delivered, activity_seq)"
                f" VALUES (?, ?, ?, ?, ?, ?, ?, {_NEXT_SEQ})",
                (
                    user_a,
                    user_b,
                    creator_id,
                    created,
                    created,
                    int(user_a == creator_id),
                    int(user_b == creator_id),
                ),
            )
            chat_id = cursor.lastrowid
            return Chat(str(chat_id), (user_a, user_b), creator_id, format_ms(created)), True

        return await self._require_writer().submit(run)

    async def get_chat(self, chat_id: str) -> Chat | None:
        row_id = _int_id(chat_id)
        if row_id is None:
            return None
        row = await self._read(
            lambda db: db.execute(
                f"SELECT {_CHAT_COLUMNS} FROM chats WHERE id = ?", (row_id,)
            ).fetchone()
        )
        return None if row is None else _chat(row)

    async def add_message(
        self,
        chat: Chat,
        sender_id: str,
        content: str,
        client_message_id: str | None,
        on_commit: OnCommit | None = None,
    ) -> tuple[Message, bool]:
        chat_row_id = int(chat.chat_id)
        recipient_id = chat.other_participant(sender_id)

        def run(db: sqlite3.Connection) -> tuple[Message, bool, str | None]:
            if client_message_id is not None:
                row = db.execute(
                    f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE sender_id = ? AND chat_id = ?"
                    " AND client_message_id = ?",
                    (sender_id, chat_row_id, client_message_id),
                ).fetchone()
                if row is not None:
                    return _message(row), False, None
            last_ms, previous_id = db.execute(
                "SELECT last_message_ms, (SELECT MAX(id) FROM messages WHERE chat_id = chats.id)"
                " FROM chats WHERE id = ?",
                (chat_row_id,),
            ).fetchone()
            created = max(now_ms(), last_ms)
            cursor = db.execute(
                "INSERT INTO messages (chat_id, sender_id, recipient_id, content, created_at_ms,"
                " client_message_id) VALUES (?, ?, ?, ?, ?, ?)",
                (chat_row_id, sender_id, recipient_id, content, created, client_message_id),
            )
            db.execute(
                f"UPDATE chats SET last_message_ms = ?, last_activity_ms = ?,"
                f" activity_seq = {_NEXT_SEQ} WHERE id = ?",
                (created, created, chat_row_id),
            )
            message = Message(
                str(cursor.lastrowid),
                chat.chat_id,
                sender_id,
                recipient_id,
                content,
                format_ms(created),
                client_message_id,
            )
            return message, True, None if previous_id is None else str(previous_id)

        def after_commit(result: tuple[Message, bool, str | None]) -> None:
            message, created, previous = result
            if created and on_commit is not None:
                on_commit(message, previous)

        message, created, _ = await self._require_writer().submit(run, after_commit)
        return message, created

    async def chats_of(self, user_id: str) -> list[Chat]:
        return await self._read(
            lambda db: [
                _chat(row)
                for row in db.execute(
                    f"SELECT {_CHAT_COLUMNS} FROM chats WHERE user_a = ? OR user_b = ?"
                    " ORDER BY activity_seq DESC",
                    (user_id, user_id),
                )
            ]
        )

    async def messages_before(
        self, chat_id: str, before_id: str | None, limit: int
    ) -> tuple[tuple[Message, ...], bool] | None:
        chat_row_id = _int_id(chat_id)
        if chat_row_id is None:
            return None
        before_row_id: int | None = None
        if before_id is not None:
            before_row_id = _int_id(before_id)
            if before_row_id is None:
                return None

        def query(db: sqlite3.Connection) -> tuple[tuple[Message, ...], bool] | None:
            if before_row_id is None:
                bound = 2**62
            else:
                found = db.execute(
                    "SELECT 1 FROM messages WHERE id = ? AND chat_id = ?",
                    (before_row_id, chat_row_id),
                ).fetchone()
                if found is None:
                    return None
                bound = before_row_id
            rows = db.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE chat_id = ? AND id < ?"
                " ORDER BY id DESC LIMIT ?",
                (chat_row_id, bound, limit + 1),
            ).fetchall()
            return tuple(_message(row) for row in reversed(rows[:limit])), len(rows) > limit

        return await self._read(query)

    async def backlog_plan(self, user_id: str) -> BacklogPlan:
        def query(db: sqlite3.Connection) -> BacklogPlan:
            return BacklogPlan.of(
                [
                    _chat(row)
                    for row in db.execute(
                        f"SELECT {_CHAT_COLUMNS} FROM chats WHERE (user_a = ? AND a_delivered = 0)"
                        " OR (user_b = ? AND b_delivered = 0) ORDER BY id",
                        (user_id, user_id),
                    )
                ],
                db.execute(
                    "SELECT chat_id, MIN(id) FROM messages WHERE recipient_id = ? AND delivered = 0"
                    " GROUP BY chat_id ORDER BY MIN(id)",
                    (user_id,),
                ),
                db.execute(
                    "SELECT id, COALESCE((SELECT MAX(id) FROM messages WHERE chat_id = chats.id),"
                    " 0) FROM chats WHERE user_a = ? OR user_b = ?",
                    (user_id, user_id),
                ),
            )

        return await self._read(query)

    async def undelivered(
        self, user_id: str, chat_id: str, from_id: str, up_to_id: str
    ) -> tuple[Message, ...]:
        bounds = (_int_id(chat_id), _int_id(from_id), _int_id(up_to_id))
        if None in bounds:
            return ()
        return await self._read(
            lambda db: tuple(
                _message(row)
                for row in db.execute(
                    f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE chat_id = ? AND id >= ?"
                    " AND id <= ? AND recipient_id = ? AND delivered = 0 ORDER BY id",
                    (*bounds, user_id),
                )
            )
        )

    async def backlog(self, user_id: str) -> Backlog:
        return await read_backlog(self, user_id)

    async def mark_delivered(
        self, user_id: str, chat_ids: Sequence[str], message_ids: Sequence[str]
    ) -> None:
        chat_rows = [row for row in map(_int_id, chat_ids) if row is not None]
        message_rows = [row for row in map(_int_id, message_ids) if row is not None]
        if not chat_rows and not message_rows:
            return

        def run(db: sqlite3.Connection) -> None:
            for row_id in chat_rows:
                db.execute(
                    "UPDATE chats SET a_delivered = CASE WHEN user_a = ? THEN 1 ELSE a_delivered"
                    " END, b_delivered = CASE WHEN user_b = ? THEN 1 ELSE b_delivered END"
                    " WHERE id = ?",
                    (user_id, user_id, row_id),
                )
            db.executemany(
                "UPDATE messages SET delivered = 1 WHERE id = ? AND recipient_id = ?"
                " AND delivered = 0",
                [(row_id, user_id) for row_id in message_rows],
            )

        # Delivery marks are not acknowledgements: nobody waits for them, and losing one in a
        # crash only means the item is offered again on the next binding.
        self._require_writer().submit_nowait(run)


def _probe_write(db: sqlite3.Connection) -> None:
    """A write of as much as a large message: a small one could fit in WAL space that a
    failed transaction left allocated, and report a disk with room that has none."""
    db.execute(
        "INSERT OR REPLACE INTO health_probe (id, data) VALUES (1, zeroblob(?))", (_PROBE_BYTES,)
    )


def _nothing(db: sqlite3.Connection) -> None:
    """A write that writes nothing: queued behind everything before it (see `flush`)."""


def _read_in_transaction(
    connection: sqlite3.Connection, query: Callable[[sqlite3.Connection], T]
) -> T:
    """One snapshot per read, so multi-statement reads see a consistent database."""
    connection.execute("BEGIN")
    try:
        return query(connection)
    finally:
        connection.execute("COMMIT")


def _migrate(connection: sqlite3.Connection) -> None:
    connection.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = connection.execute("SELECT MAX(version) FROM schema_version").fetchone()
    current = row[0] or 0
    for version, statements in enumerate(SQLITE_MIGRATIONS, start=1):
        if version <= current:
            continue
        connection.execute("BEGIN IMMEDIATE")
        for statement in statements:
            connection.execute(statement)
        connection.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
        connection.execute("COMMIT")


__all__ = ["SQLiteStore"]
