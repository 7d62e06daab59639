"""PostgreSQL backend: psycopg 3 sync connections in worker threads, one group-committing writer.

The server runs on Trio with no asyncio loop, so asyncio drivers (asyncpg, psycopg's
`AsyncConnection`) are out; psycopg's blocking connections run in `trio.to_thread` workers
instead, never on the Trio loop itself. docs/design.md has the measurements behind the choice.

Theory of operation:
- Writes (`create_chat`, `add_message`, `mark_delivered`) are queued to `_Writer`: one Trio task
  takes everything queued so far and applies it in ONE transaction on one connection, in bulk
  phases, then COMMITs and wakes the callers in commit order, running `on_commit` first. The
  acknowledgement therefore always follows COMMIT; throughput comes from sharing the commit.
- Several processes may write to the same chat. Each batch locks its chat rows (`SELECT ... FOR
  UPDATE`) before inserting, so per chat the identity ids and the timestamps (the database
  clock, clamped to the chat's last message) follow commit order across processes, and each new
  message learns the id of the chat's previous one (`chats.last_message_id`, read under that
  lock), which `on_commit` passes on so receiving nodes can restore that order. Every batch
  takes its locks in one global order (new chat pairs sorted, then chat rows by id, then message
  rows by id), so two processes' batches cannot deadlock; a deadlock or serialization failure
  is still retried, as is a batch whose connection broke before COMMIT was sent.
- A batch that fails for a reason other than the connection is replayed one operation per
  transaction, so one bad operation does not fail its neighbours.
- Reads run on a small pool of autocommit connections, each read in one REPEATABLE READ
  READ ONLY transaction so multi-statement reads see one snapshot.
- Outage: a failed connection attempt opens a backoff window (0.1 s doubling to 5 s) during
  which calls fail at once with `StoreUnavailable`; the next call after it reconnects. Broken
  connections are dropped and replaced. Nothing is acknowledged that was not committed.
- `content` and `client_message_id` are stored as UTF-8 BYTEA: PostgreSQL text cannot hold
  U+0000, and the protocol returns content exactly as sent.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, TypeVar

import attrs
import psycopg
import psycopg.errors
import trio
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow

from handler.config import StorageConfig
from handler.errors import StoreUnavailable
from handler.protocol import Chat, Message
from handler.store.base import Backlog, BacklogPlan, OnCommit, read_backlog
from handler.store.schema import POSTGRES_MIGRATIONS
from handler.timefmt import format_ms

T = TypeVar("T")
Connection = psycopg.Connection[TupleRow]

_MAX_BATCH: Final = 512
_BATCH_RETRIES: Final = 5
_CONNECT_TIMEOUT_S: Final = 5
_BACKOFF_MIN_S: Final = 0.1
_BACKOFF_MAX_S: Final = 5.0
# Arbitrary constant naming the advisory lock that serializes migrations across processes.
_MIGRATION_LOCK: Final = 0x6368617473746F72

_NOW_MS: Final = "floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint"
_CHAT_COLUMNS: Final = "id, user_a, user_b, created_by, created_at_ms"
_MESSAGE_COLUMNS: Final = (
    "id, chat_id, sender_id, recipient_id, content, created_at_ms, client_message_id"
)
# Sessions settings: a stuck peer must not hold chat locks or a worker thread forever.
_SESSION_OPTIONS: Final = (
    "-c statement_timeout=30000 -c idle_in_transaction_session_timeout=60000 -c lock_timeout=20000"
)
_PIPELINE: Final = psycopg.Pipeline.is_supported()
# Retried whole: nothing was committed and the same batch can succeed on a second try.
_TRANSIENT: Final = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
# Likely caused by one operation's data: the batch is replayed one operation per transaction.
_OP_SPECIFIC: Final = (psycopg.DataError, psycopg.IntegrityError)


def _encode(text: str) -> bytes:
    """UTF-8 for BYTEA columns; surrogatepass so any Python string round-trips exactly."""
    return text.encode("utf-8", "surrogatepass")


def _decode(data: bytes) -> str:
    return bytes(data).decode("utf-8", "surrogatepass")


def _chat(row: Sequence[Any]) -> Chat:
    return Chat(str(row[0]), (row[1], row[2]), row[3], format_ms(row[4]))


def _message(row: Sequence[Any]) -> Message:
    return Message(
        str(row[0]),
        str(row[1]),
        row[2],
        row[3],
        _decode(row[4]),
        format_ms(row[5]),
        None if row[6] is None else _decode(row[6]),
    )


def _int_id(value: str) -> int | None:
    """Ids are decimal BIGINTs; anything else cannot name a row."""
    if not value.isascii() or not value.isdigit() or len(value) > 18:
        return None
    return int(value)


def _returned_id(cursor: psycopg.Cursor[TupleRow]) -> int:
    row = cursor.fetchone()
    if row is None:  # pragma: no cover - INSERT ... RETURNING always returns its row
        raise psycopg.InterfaceError("INSERT returned no id")
    return int(row[0])


def _describe(error: BaseException) -> str:
    sqlstate = getattr(error, "sqlstate", None)
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{first_line} ({sqlstate})" if sqlstate else first_line


# --------------------------------------------------------------------------- connections


class _Connector:
    """Opens connections with one shared backoff, so an outage costs one failed attempt per
    window instead of one per request. Called from worker threads, hence the lock."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        # Our session settings first, so `options` in the DSN (e.g. a search_path) add to them
        # and can override them instead of being replaced.
        extra = conninfo_to_dict(dsn).get("options")
        self._options = f"{_SESSION_OPTIONS} {extra}" if extra else _SESSION_OPTIONS
        self._lock = threading.Lock()
        self._delay = 0.0
        self._retry_at = 0.0

    def connect(self, *, force: bool = False) -> Connection:
        with self._lock:
            wait = self._retry_at - time.monotonic()
        if wait > 0 and not force:
            raise StoreUnavailable(f"postgres is unreachable; next attempt in {wait:.1f}s")
        try:
            connection = psycopg.connect(
                self._dsn,
                autocommit=True,
                connect_timeout=_CONNECT_TIMEOUT_S,
                application_name="chat-handler",
                options=self._options,
                keepalives=1,
                keepalives_idle=10,
                keepalives_interval=5,
                keepalives_count=3,
                tcp_user_timeout=30000,
            )
        except psycopg.Error as error:
            with self._lock:
                self._delay = min(max(self._delay * 2, _BACKOFF_MIN_S), _BACKOFF_MAX_S)
                self._retry_at = time.monotonic() + self._delay
            raise StoreUnavailable(f"postgres connect failed: {_describe(error)}") from None
        with self._lock:
            self._delay = 0.0
            self._retry_at = 0.0
        return connection


def _usable(connection: Connection | None) -> bool:
    return connection is not None and not connection.closed and not connection.broken


def _close_quietly(connection: Connection | None) -> None:
    if connection is not None:
        with contextlib.suppress(psycopg.Error):
            connection.close()


# --------------------------------------------------------------------------- writes


@attrs.define(eq=False)
class _Op:
    """One queued write; the writer fills `result` or `error`, then sets `done`."""

    done: trio.Event = attrs.field(factory=trio.Event, init=False)
    result: Any = attrs.field(default=None, init=False)
    error: BaseException | None = attrs.field(default=None, init=False)


@attrs.define(eq=False)
class _Probe(_Op):
    """A write that changes nothing but needs the database to write (the health check)."""


@attrs.define(eq=False)
class _CreateChat(_Op):
    creator_id: str = ""
    user_a: str = ""
    user_b: str = ""


@attrs.define(eq=False)
class _AddMessage(_Op):
    chat_row: int = 0
    chat_id: str = ""
    sender_id: str = ""
    recipient_id: str = ""
    content: str = ""
    client_message_id: str | None = None
    on_commit: OnCommit | None = None
    # The chat's message committed just before this one, for `on_commit` (None: the first).
    previous_id: str | None = attrs.field(default=None, init=False)


@attrs.define(eq=False)
class _MarkDelivered(_Op):
    user_id: str = ""
    chat_rows: tuple[int, ...] = ()
    message_rows: tuple[int, ...] = ()


def _apply_batch(connection: Connection, batch: Sequence[_Op]) -> None:
    """Run every operation of `batch` in the current transaction, in lock order.

    Raises on any database error; the caller decides between retry, replay and failure.
    """
    for op in batch:
        op.result = None
        op.error = None
        if isinstance(op, _AddMessage):
            op.previous_id = None
    cursor = connection.cursor()
    creates = sorted(
        (op for op in batch if isinstance(op, _CreateChat)), key=lambda op: (op.user_a, op.user_b)
    )
    adds = [op for op in batch if isinstance(op, _AddMessage)]
    marks = [op for op in batch if isinstance(op, _MarkDelivered)]
    if any(isinstance(op, _Probe) for op in batch):
        cursor.execute("UPDATE schema_version SET version = version")

    # 1. New chat pairs, in sorted order (the first lock class).
    for create in creates:
        creator = create.creator_id
        row = cursor.execute(
            f"INSERT INTO chats (user_a, user_b, created_by, created_at_ms, last_activity_ms,"
            f" a_delivered, b_delivered) SELECT %s, %s, %s, t.now, t.now, %s, %s"
            f" FROM (SELECT {_NOW_MS} AS now) t ON CONFLICT (user_a, user_b) DO NOTHING"
            f" RETURNING {_CHAT_COLUMNS}",
            (
                create.user_a,
                create.user_b,
                creator,
                create.user_a == creator,
                create.user_b == creator,
            ),
        ).fetchone()
        if row is not None:
            create.result = (_chat(row), True)
            continue
        row = cursor.execute(
            f"SELECT {_CHAT_COLUMNS} FROM chats WHERE user_a = %s AND user_b = %s",
            (create.user_a, create.user_b),
        ).fetchone()
        assert row is not None  # ON CONFLICT saw a committed or own row
        create.result = (_chat(row), False)

    # 2. Chat rows, ascending (the second lock class): serializes writers of a chat across
    #    processes, and gives each chat's last message (time, to clamp the new timestamps to;
    #    id, for each new message to name its predecessor).
    lock_rows = sorted({op.chat_row for op in adds} | {row for op in marks for row in op.chat_rows})
    last_ms: dict[int, int] = {}
    last_id: dict[int, int | None] = {}
    now = 0
    if lock_rows:
        for chat_row, last, last_message, clock in cursor.execute(
            f"SELECT id, last_message_ms, last_message_id, {_NOW_MS} FROM chats"
            " WHERE id = ANY(%s) ORDER BY id FOR UPDATE",
            (lock_rows,),
        ):
            last_ms[chat_row] = last
            last_id[chat_row] = last_message
            now = max(now, clock)

    # 3. Messages: idempotent resends first (read after the lock, so a concurrent process's
    #    committed resend is visible), then one pipelined insert for the rest.
    existing: dict[tuple[str, int, bytes], Message] = {}
    keyed = [op for op in adds if op.client_message_id is not None]
    if keyed:
        senders = [op.sender_id for op in keyed]
        chat_rows = [op.chat_row for op in keyed]
        keys = [_encode(op.client_message_id or "") for op in keyed]
        for row in cursor.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE (sender_id, chat_id,"
            " client_message_id) IN (SELECT * FROM unnest(%s::text[], %s::bigint[],"
            " %s::bytea[])) AND client_message_id IS NOT NULL",
            (senders, chat_rows, keys),
        ):
            existing[(row[2], row[1], bytes(row[6]))] = _message(row)

    new: list[tuple[_AddMessage, int]] = []
    originals: dict[tuple[str, int, bytes], _AddMessage] = {}
    resends: list[tuple[_AddMessage, _AddMessage]] = []
    for add in adds:
        if add.chat_row not in last_ms:
            add.error = StoreUnavailable(f"chat {add.chat_id} does not exist")
            continue
        if add.client_message_id is not None:
            key = (add.sender_id, add.chat_row, _encode(add.client_message_id))
            if key in existing:
                add.result = (existing[key], False)
                continue
            if key in originals:  # a resend queued in the same batch as its original
                resends.append((add, originals[key]))
                continue
            originals[key] = add
        created = max(now, last_ms[add.chat_row])
        last_ms[add.chat_row] = created
        new.append((add, created))
    if new:
        cursor.executemany(
            "INSERT INTO messages (chat_id, sender_id, recipient_id, content, created_at_ms,"
            " client_message_id) VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
            [
                (
                    add.chat_row,
                    add.sender_id,
                    add.recipient_id,
                    _encode(add.content),
                    created,
                    None if add.client_message_id is None else _encode(add.client_message_id),
                )
                for add, created in new
            ],
            returning=True,
        )
        message_rows = [_returned_id(cursor)]
        while cursor.nextset():  # one result set per inserted row (psycopg >= 3.1)
            message_rows.append(_returned_id(cursor))
        touched: dict[int, tuple[int, int]] = {}
        for (add, created), message_row in zip(new, message_rows, strict=True):
            # Rows were inserted in list order under the chat lock: per chat, that is commit
            # order, whichever process wrote the previous message.
            previous = last_id[add.chat_row]
            add.previous_id = None if previous is None else str(previous)
            last_id[add.chat_row] = message_row
            message = Message(
                str(message_row),
                add.chat_id,
                add.sender_id,
                add.recipient_id,
                add.content,
                format_ms(created),
                add.client_message_id,
            )
            add.result = (message, True)
            touched[add.chat_row] = (created, message_row)
        # In the order of each chat's newest message, so the activity sequence follows it
        # (the rows are locked already; the order of these updates cannot deadlock).
        cursor.executemany(
            "UPDATE chats SET last_message_ms = %s, last_message_id = %s,"
            " last_activity_ms = GREATEST(last_activity_ms, %s),"
            " activity_seq = nextval('chat_activity_seq') WHERE id = %s",
            [
                (created, message_row, created, chat_row)
                for chat_row, (created, message_row) in sorted(
                    touched.items(), key=lambda item: item[1][1]
                )
            ],
        )
    for resend, original in resends:
        resend.result = (original.result[0], False)

    # 4. Delivery marks last: chat rows are already locked; message rows go ascending.
    for mark in marks:
        if mark.chat_rows:
            cursor.execute(
                "UPDATE chats SET a_delivered = a_delivered OR user_a = %s,"
                " b_delivered = b_delivered OR user_b = %s WHERE id = ANY(%s)",
                (mark.user_id, mark.user_id, sorted(mark.chat_rows)),
            )
        if mark.message_rows:
            cursor.execute(
                "UPDATE messages SET delivered = TRUE WHERE id = ANY(%s) AND recipient_id = %s"
                " AND NOT delivered",
                (sorted(mark.message_rows), mark.user_id),
            )


class _Writer:
    """One connection, one task: each batch of queued writes becomes one transaction."""

    def __init__(self, connector: _Connector, max_batch: int) -> None:
        self._connector = connector
        self._max_batch = max_batch
        self._connection: Connection | None = None
        self._send, self._receive = trio.open_memory_channel[_Op](math.inf)
        self._limiter = trio.CapacityLimiter(1)
        self.batches = 0
        self.operations = 0
        # Delivery marks (queued without a waiter) that failed: `flush` reports them.
        self.lost_marks = 0
        # Why a batch failed for a reason of the database's (not one operation's data), until
        # the health check's probe write succeeds; /healthz reports it.
        self.write_failure: str | None = None

    async def submit(self, op: _Op) -> Any:
        try:
            self._send.send_nowait(op)
        except trio.ClosedResourceError:
            raise StoreUnavailable("the store is closed") from None
        await op.done.wait()
        if op.error is not None:
            raise op.error
        return op.result

    def submit_nowait(self, op: _Op) -> None:
        """Queue a write nobody waits for (delivery marks); dropped if the store is closing."""
        with contextlib.suppress(trio.ClosedResourceError):
            self._send.send_nowait(op)

    def close(self) -> None:
        self._send.close()

    async def run(self) -> None:
        async with self._receive:
            async for first in self._receive:
                batch = [first]
                while len(batch) < self._max_batch:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                # Shielded: once a batch is handed to the thread it must finish and wake its
                # waiters, or a committed write could be reported as failed.
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._commit, batch, limiter=self._limiter)
                    self.batches += 1
                    self.operations += len(batch)
                    for op in batch:
                        if (
                            op.error is None
                            and isinstance(op, _AddMessage)
                            and op.on_commit is not None
                        ):
                            message, created = op.result
                            if created:
                                op.on_commit(message, op.previous_id)
                        elif op.error is not None and isinstance(op, _MarkDelivered):
                            self.lost_marks += 1
                        op.done.set()

    def close_connection(self) -> None:
        _close_quietly(self._connection)
        self._connection = None

    # ---------------------------------------------------------------- worker thread

    def _commit(self, batch: list[_Op]) -> None:
        """Commit `batch`, retrying what is safe to retry; every op ends with result or error."""
        attempt = 0
        while True:
            attempt += 1
            commit_sent = False
            try:
                connection = self._connect()
                with connection.pipeline() if _PIPELINE else contextlib.nullcontext():
                    # Pipeline mode: statements whose results are not needed yet (BEGIN, the
                    # UPDATEs, COMMIT) travel together instead of one round trip each.
                    connection.execute("BEGIN")
                    _apply_batch(connection, batch)
                    commit_sent = True
                    connection.execute("COMMIT")
                return
            except StoreUnavailable as error:
                self._fail_all(batch, error)
                return
            except _TRANSIENT:
                self._rollback()
                if attempt < _BATCH_RETRIES:
                    continue
                self._fail_all(batch, StoreUnavailable("postgres: too much lock contention"))
                return
            except psycopg.Error as error:
                if not _usable(self._connection):
                    self.close_connection()
                    if not commit_sent:
                        # Nothing reached COMMIT, so nothing is half-done: a stale connection
                        # (e.g. after a server restart) gets one fresh try.
                        if attempt == 1:
                            continue
                        self._fail_all(
                            batch, StoreUnavailable(f"postgres write: {_describe(error)}")
                        )
                    else:
                        self._fail_all(
                            batch,
                            StoreUnavailable(
                                f"postgres connection lost during COMMIT, outcome unknown:"
                                f" {_describe(error)}"
                            ),
                        )
                    return
                self._rollback()
                if len(batch) > 1 and isinstance(error, _OP_SPECIFIC):
                    self._replay_each(batch)
                    return
                failure = StoreUnavailable(f"postgres write: {_describe(error)}")
                if isinstance(error, _OP_SPECIFIC):
                    self._fail(batch, failure)  # this operation's data, not the database
                else:
                    self._fail_all(batch, failure)  # e.g. disk full
                return
            except Exception as error:
                # A bug must fail its batch, not kill the writer and every later write with it.
                self._rollback()
                self._fail(batch, StoreUnavailable(f"postgres write failed: {error!r}"))
                return

    def _replay_each(self, batch: list[_Op]) -> None:
        """One transaction per operation, so only the faulty one fails."""
        for op in batch:
            self._commit([op])

    def _connect(self) -> Connection:
        if not _usable(self._connection):
            self.close_connection()
            self._connection = self._connector.connect()
        assert self._connection is not None
        return self._connection

    def _rollback(self) -> None:
        try:
            if self._connection is not None:
                self._connection.execute("ROLLBACK")
        except psycopg.Error:
            self.close_connection()

    def _fail_all(self, batch: Iterable[_Op], error: StoreUnavailable) -> None:
        """The database could not write: fail the batch and remember why (health check)."""
        self.write_failure = str(error)
        self._fail(batch, error)

    @staticmethod
    def _fail(batch: Iterable[_Op], error: StoreUnavailable) -> None:
        for op in batch:
            op.result = None
            op.error = error


# --------------------------------------------------------------------------- the store


class PostgresStore:
    """The shared store for several handler processes; see the module docstring."""

    def __init__(self, config: StorageConfig, *, max_batch: int = _MAX_BATCH) -> None:
        self._config = config
        self._connector = _Connector(config.dsn)
        self._readers: list[Connection] = []
        # Bounds open reader connections; threads get their own limiter, since a task holding
        # a token cannot borrow a second one for its worker thread.
        self._reader_limiter = trio.CapacityLimiter(config.pool_size)
        self._reader_threads = trio.CapacityLimiter(config.pool_size)
        self._writer = _Writer(self._connector, max_batch)
        self._opened = False
        self._writer_done = trio.Event()

    @property
    def writer_statistics(self) -> tuple[int, int]:
        """(batches, operations) committed so far: their ratio is the group-commit factor."""
        return self._writer.batches, self._writer.operations

    # ------------------------------------------------------------------ lifecycle

    async def open(self, nursery: trio.Nursery) -> None:
        def migrate() -> None:
            connection = self._connector.connect(force=True)
            try:
                _migrate(connection)
            finally:
                connection.close()

        try:
            await trio.to_thread.run_sync(migrate)
        except psycopg.Error as error:
            raise StoreUnavailable(f"postgres migration failed: {_describe(error)}") from None
        nursery.start_soon(self._run_writer)
        self._opened = True

    async def _run_writer(self) -> None:
        try:
            await self._writer.run()
        finally:
            self._writer_done.set()

    async def aclose(self) -> None:
        """Commit what is queued, then close every connection."""
        self._writer.close()
        if self._opened:
            await self._writer_done.wait()
        self._opened = False
        readers, self._readers = self._readers, []

        def close_all() -> None:
            for connection in readers:
                _close_quietly(connection)
            self._writer.close_connection()

        await trio.to_thread.run_sync(close_all)

    async def check(self) -> None:
        # Within a backoff window this fails at once: /healthz must not wait on a dead server.
        await self._read(lambda db: db.execute("SELECT 1").fetchone(), snapshot=False)
        writer = self._writer
        failure = writer.write_failure
        if failure is not None:
            # Only a probe that writes clears it (an empty commit succeeds without writing).
            try:
                await writer.submit(_Probe())
            except StoreUnavailable:
                raise StoreUnavailable(f"writes are failing: {failure}") from None
            writer.write_failure = None

    # ------------------------------------------------------------------ helpers

    async def _read(self, query: Callable[[Connection], T], *, snapshot: bool = True) -> T:
        """Run `query` on a pooled connection in a worker thread.

        `snapshot` wraps it in one REPEATABLE READ READ ONLY transaction, for reads of several
        statements; a single statement is consistent on its own and saves two round trips.
        """
        if not self._opened:
            raise StoreUnavailable("the store is not open")
        async with self._reader_limiter:
            connection = self._readers.pop() if self._readers else None
            connection, result = await trio.to_thread.run_sync(
                self._read_sync, connection, query, snapshot, limiter=self._reader_threads
            )
            if connection is not None:
                self._readers.append(connection)
            if isinstance(result, StoreUnavailable):
                raise result
            return result

    def _read_sync(
        self,
        connection: Connection | None,
        query: Callable[[Connection], T],
        snapshot: bool,
    ) -> tuple[Connection | None, T | StoreUnavailable]:
        """Returns the connection to keep (None when it broke) with the result or the error.

        A stale connection (e.g. after a server restart) gets one retry: reads are safe to
        repeat.
        """
        for attempt in (1, 2):
            try:
                if connection is None or not _usable(connection):
                    _close_quietly(connection)
                    connection = None
                    connection = self._connector.connect()
                    connection.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
                    connection.read_only = True
                live = connection
                if not snapshot:
                    return live, query(live)
                with live.transaction():
                    return live, query(live)
            except StoreUnavailable as error:
                return connection, error
            except psycopg.Error as error:
                if not _usable(connection):
                    _close_quietly(connection)
                    connection = None
                    if attempt == 1:
                        continue
                return connection, StoreUnavailable(f"postgres read: {_describe(error)}")
            except Exception as error:
                return connection, StoreUnavailable(f"postgres read failed: {error!r}")
        raise AssertionError("unreachable")  # pragma: no cover

    def _require_open(self) -> None:
        if not self._opened:
            raise StoreUnavailable("the store is not open")

    # ------------------------------------------------------------------ contract

    async def create_chat(self, creator_id: str, recipient_id: str) -> tuple[Chat, bool]:
        self._require_open()
        user_a, user_b = sorted((creator_id, recipient_id))
        result: tuple[Chat, bool] = await self._writer.submit(
            _CreateChat(creator_id=creator_id, user_a=user_a, user_b=user_b)
        )
        return result

    async def get_chat(self, chat_id: str) -> Chat | None:
        row_id = _int_id(chat_id)
        if row_id is None:
            return None
        row = await self._read(
            lambda db: db.execute(
                f"SELECT {_CHAT_COLUMNS} FROM chats WHERE id = %s", (row_id,)
            ).fetchone(),
            snapshot=False,
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
        self._require_open()
        chat_row = _int_id(chat.chat_id)
        if chat_row is None:
            raise StoreUnavailable(f"chat {chat.chat_id!r} is not a postgres chat id")
        result: tuple[Message, bool] = await self._writer.submit(
            _AddMessage(
                chat_row=chat_row,
                chat_id=chat.chat_id,
                sender_id=sender_id,
                recipient_id=chat.other_participant(sender_id),
                content=content,
                client_message_id=client_message_id,
                on_commit=on_commit,
            )
        )
        return result

    async def chats_of(self, user_id: str) -> list[Chat]:
        def query(db: Connection) -> list[Chat]:
            return [
                _chat(row)
                for row in db.execute(
                    f"SELECT {_CHAT_COLUMNS} FROM (SELECT * FROM chats WHERE user_a = %s"
                    " UNION ALL SELECT * FROM chats WHERE user_b = %s AND user_a <> %s) c"
                    " ORDER BY activity_seq DESC",
                    (user_id, user_id, user_id),
                )
            ]

        return await self._read(query)

    async def messages_before(
        self, chat_id: str, before_id: str | None, limit: int
    ) -> tuple[tuple[Message, ...], bool] | None:
        chat_row = _int_id(chat_id)
        if chat_row is None:
            return None
        before_row: int | None = None
        if before_id is not None:
            before_row = _int_id(before_id)
            if before_row is None:
                return None

        def query(db: Connection) -> tuple[tuple[Message, ...], bool] | None:
            bound = 2**62
            if before_row is not None:
                found = db.execute(
                    "SELECT 1 FROM messages WHERE id = %s AND chat_id = %s",
                    (before_row, chat_row),
                ).fetchone()
                if found is None:
                    return None
                bound = before_row
            rows = db.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE chat_id = %s AND id < %s"
                " ORDER BY id DESC LIMIT %s",
                (chat_row, bound, limit + 1),
            ).fetchall()
            return tuple(_message(row) for row in reversed(rows[:limit])), len(rows) > limit

        return await self._read(query)

    async def backlog_plan(self, user_id: str) -> BacklogPlan:
        def query(db: Connection) -> BacklogPlan:
            return BacklogPlan.of(
                [
                    _chat(row)
                    for row in db.execute(
                        f"SELECT {_CHAT_COLUMNS} FROM chats WHERE user_a = %s AND NOT a_delivered"
                        f" UNION ALL SELECT {_CHAT_COLUMNS} FROM chats WHERE user_b = %s"
                        " AND NOT b_delivered AND user_a <> %s ORDER BY id",
                        (user_id, user_id, user_id),
                    )
                ],
                db.execute(
                    "SELECT chat_id, MIN(id) FROM messages WHERE recipient_id = %s"
                    " AND NOT delivered GROUP BY chat_id ORDER BY MIN(id)",
                    (user_id,),
                ).fetchall(),
                db.execute(
                    "SELECT id, COALESCE(last_message_id, 0) FROM chats"
                    " WHERE user_a = %s OR user_b = %s",
                    (user_id, user_id),
                ).fetchall(),
            )

        return await self._read(query)

    async def undelivered(
        self, user_id: str, chat_id: str, from_id: str, up_to_id: str
    ) -> tuple[Message, ...]:
        bounds = (_int_id(chat_id), _int_id(from_id), _int_id(up_to_id))
        if None in bounds:
            return ()

        def query(db: Connection) -> tuple[Message, ...]:
            return tuple(
                _message(row)
                for row in db.execute(
                    f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE chat_id = %s AND id >= %s"
                    " AND id <= %s AND recipient_id = %s AND NOT delivered ORDER BY id",
                    (*bounds, user_id),
                )
            )

        return await self._read(query, snapshot=False)

    async def backlog(self, user_id: str) -> Backlog:
        return await read_backlog(self, user_id)

    async def flush(self) -> None:
        # A bare operation is applied as nothing, but commits (and wakes) in queue order. The
        # delivery marks queued before it may have failed in an earlier batch (the outage
        # ended in between): then they are not committed, and the caller must hear of it.
        lost = self._writer.lost_marks
        await self._writer.submit(_Op())
        if self._writer.lost_marks != lost:
            raise StoreUnavailable("delivery marks queued before could not be recorded")

    async def mark_delivered(
        self, user_id: str, chat_ids: Sequence[str], message_ids: Sequence[str]
    ) -> None:
        chat_rows = tuple(row for row in map(_int_id, chat_ids) if row is not None)
        message_rows = tuple(row for row in map(_int_id, message_ids) if row is not None)
        if (not chat_rows and not message_rows) or not self._opened:
            return
        # Delivery marks are not acknowledgements: nobody waits for them, and losing one in an
        # outage only means the item is offered again on the next binding.
        self._writer.submit_nowait(
            _MarkDelivered(user_id=user_id, chat_rows=chat_rows, message_rows=message_rows)
        )


def _migrate(connection: Connection) -> None:
    """Apply the missing migrations and their version rows in one transaction.

    A transaction-scoped advisory lock serializes processes that start at the same time.
    """
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        connection.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = connection.execute("SELECT MAX(version) FROM schema_version").fetchone()
        current = 0 if row is None or row[0] is None else int(row[0])
        for version, statements in enumerate(POSTGRES_MIGRATIONS, start=1):
            if version <= current:
                continue
            for statement in statements:
                connection.execute(statement)
            connection.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))


__all__ = ["PostgresStore"]
