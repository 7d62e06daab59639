"""PostgreSQL's side of the group-commit writer: the write operations, the SQL that applies a
batch of them in one transaction, and the policy for a batch that fails (retry or replay).

Everything here runs in the writer's worker thread (`group_commit.WorkerThread`); the Trio
side, the queue and the hand-off of what was created, is `group_commit.GroupCommitWriter`'s.

- A batch is applied in bulk phases (`apply_batch`): new chat pairs, then the chat rows it
  writes to, locked (`SELECT ... FOR UPDATE`), then the messages (one pipelined insert), then
  the delivery marks. The chat lock serializes writers of a chat across processes, so per chat
  ids and timestamps (the database clock, clamped to the chat's last message) follow commit
  order, and each new message learns the id of the chat's previous one
  (`chats.last_message_id`, read under that lock), which it hands over in its `Committed`.
  Every batch takes its locks in one global order (new chat pairs sorted, then chat rows by
  id, then message rows by id), so two processes' batches cannot deadlock.
- `BatchCommitter` wraps it in BEGIN/COMMIT and decides what a failure means: a deadlock or
  serialization failure is retried whole, as is a batch whose connection broke before COMMIT
  was sent; a batch that fails on one operation's data is replayed one operation per
  transaction, so one bad operation does not fail its neighbours; anything else fails the
  batch and is reported as the database's `write_failure`. Nothing is reported committed
  that was not.
- `content` and `client_message_id` are stored as UTF-8 BYTEA: PostgreSQL text cannot hold
  U+0000, and the protocol returns content exactly as sent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Final

import attrs
import psycopg
import psycopg.errors
from psycopg.rows import TupleRow

from handler.errors import StoreUnavailable
from handler.protocol import Message
from handler.store.base import Committed
from handler.store.group_commit import Op
from handler.store.postgres_connect import (
    Connection,
    Connector,
    close_quietly,
    describe,
    usable,
)
from handler.store.rows import CHAT_COLUMNS, MESSAGE_COLUMNS, chat_of, message_of
from handler.store.sql_store import NewChat, NewMessage
from handler.timefmt import format_ms

_BATCH_RETRIES: Final = 5
_NOW_MS: Final = "floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint"
_PIPELINE: Final = psycopg.Pipeline.is_supported()
# Retried whole: nothing was committed and the same batch can succeed on a second try.
_TRANSIENT: Final = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
# Likely caused by one operation's data: the batch is replayed one operation per transaction.
_OP_SPECIFIC: Final = (psycopg.DataError, psycopg.IntegrityError)


def encode(text: str) -> bytes:
    """UTF-8 for BYTEA columns; surrogatepass so any Python string round-trips exactly."""
    return text.encode("utf-8", "surrogatepass")


def decode(data: bytes) -> str:
    """The inverse of `encode`, for what the BYTEA columns return."""
    return bytes(data).decode("utf-8", "surrogatepass")


def _returned_id(cursor: psycopg.Cursor[TupleRow]) -> int:
    row = cursor.fetchone()
    if row is None:  # pragma: no cover - INSERT ... RETURNING always returns its row
        raise psycopg.InterfaceError("INSERT returned no id")
    return int(row[0])


# --------------------------------------------------------------------------- operations
# A bare `Op` writes nothing but commits in queue order (`flush`).


@attrs.define(eq=False)
class Probe(Op):
    """A write that changes nothing but needs the database to write (the health check)."""


@attrs.define(eq=False)
class CreateChat(Op):
    new: NewChat


@attrs.define(eq=False)
class AddMessage(Op):
    new: NewMessage


@attrs.define(eq=False)
class MarkDelivered(Op):
    user_id: str
    chat_rows: tuple[int, ...] = ()
    message_rows: tuple[int, ...] = ()


# --------------------------------------------------------------------------- the batch SQL


def apply_batch(connection: Connection, batch: Sequence[Op]) -> None:
    """Run every operation of `batch` in the current transaction, in lock order.

    Raises on any database error; the caller decides between retry, replay and failure.
    """
    for op in batch:
        op.reset()
    cursor = connection.cursor()
    creates = sorted(
        (op for op in batch if isinstance(op, CreateChat)),
        key=lambda op: (op.new.user_a, op.new.user_b),
    )
    adds = [op for op in batch if isinstance(op, AddMessage)]
    marks = [op for op in batch if isinstance(op, MarkDelivered)]
    if any(isinstance(op, Probe) for op in batch):
        cursor.execute("UPDATE schema_version SET version = version")

    # 1. New chat pairs, in sorted order (the first lock class).
    for create in creates:
        creator = create.new.creator_id
        row = cursor.execute(
            f"INSERT INTO chats (user_a, user_b, created_by, created_at_ms, last_activity_ms,"
            f" a_delivered, b_delivered) SELECT %s, %s, %s, t.now, t.now, %s, %s"
            f" FROM (SELECT {_NOW_MS} AS now) t ON CONFLICT (user_a, user_b) DO NOTHING"
            f" RETURNING {CHAT_COLUMNS}",
            (
                create.new.user_a,
                create.new.user_b,
                creator,
                create.new.user_a == creator,
                create.new.user_b == creator,
            ),
        ).fetchone()
        if row is not None:
            chat = chat_of(row)
            create.result = (chat, True)
            create.committed = Committed(chat, create.new.origin)
            continue
        row = cursor.execute(
            f"SELECT {CHAT_COLUMNS} FROM chats WHERE user_a = %s AND user_b = %s",
            (create.new.user_a, create.new.user_b),
        ).fetchone()
        assert row is not None  # ON CONFLICT saw a committed or own row
        create.result = (chat_of(row), False)

    # 2. Chat rows, ascending (the second lock class): serializes writers of a chat across
    #    processes, and gives each chat's last message (time, to clamp the new timestamps to;
    #    id, for each new message to name its predecessor).
    lock_rows = sorted(
        {op.new.chat_row for op in adds} | {row for op in marks for row in op.chat_rows}
    )
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
    keyed = [op.new for op in adds if op.new.client_message_id is not None]
    if keyed:
        senders = [request.sender_id for request in keyed]
        chat_rows = [request.chat_row for request in keyed]
        keys = [encode(request.client_message_id or "") for request in keyed]
        for row in cursor.execute(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE (sender_id, chat_id,"
            " client_message_id) IN (SELECT * FROM unnest(%s::text[], %s::bigint[],"
            " %s::bytea[])) AND client_message_id IS NOT NULL",
            (senders, chat_rows, keys),
        ):
            existing[(row[2], row[1], bytes(row[6]))] = message_of(row, decode)

    inserts: list[tuple[AddMessage, int]] = []
    originals: dict[tuple[str, int, bytes], AddMessage] = {}
    resends: list[tuple[AddMessage, AddMessage]] = []
    for add in adds:
        if add.new.chat_row not in last_ms:
            add.error = StoreUnavailable(f"chat {add.new.chat.chat_id} does not exist")
            continue
        if add.new.client_message_id is not None:
            key = (add.new.sender_id, add.new.chat_row, encode(add.new.client_message_id))
            if key in existing:
                add.result = (existing[key], False)
                continue
            if key in originals:  # a resend queued in the same batch as its original
                resends.append((add, originals[key]))
                continue
            originals[key] = add
        created = max(now, last_ms[add.new.chat_row])
        last_ms[add.new.chat_row] = created
        inserts.append((add, created))
    if inserts:
        cursor.executemany(
            "INSERT INTO messages (chat_id, sender_id, recipient_id, content, created_at_ms,"
            " client_message_id) VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
            [
                (
                    add.new.chat_row,
                    add.new.sender_id,
                    add.new.recipient_id,
                    encode(add.new.content),
                    created,
                    None
                    if add.new.client_message_id is None
                    else encode(add.new.client_message_id),
                )
                for add, created in inserts
            ],
            returning=True,
        )
        message_rows = [_returned_id(cursor)]
        while cursor.nextset():  # one result set per inserted row (psycopg >= 3.1)
            message_rows.append(_returned_id(cursor))
        touched: dict[int, tuple[int, int]] = {}
        for (add, created), message_row in zip(inserts, message_rows, strict=True):
            # Rows were inserted in list order under the chat lock: per chat, that is commit
            # order, whichever process wrote the previous message.
            previous = last_id[add.new.chat_row]
            last_id[add.new.chat_row] = message_row
            message = Message(
                str(message_row),
                add.new.chat.chat_id,
                add.new.sender_id,
                add.new.recipient_id,
                add.new.content,
                format_ms(created),
                add.new.client_message_id,
            )
            add.result = (message, True)
            add.committed = Committed(
                add.new.chat, add.new.origin, message, None if previous is None else str(previous)
            )
            touched[add.new.chat_row] = (created, message_row)
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


# --------------------------------------------------------------------------- the policy


class BatchCommitter:
    """The writer's connection and its failure policy (see the module docstring): the
    `apply` of the PostgreSQL `GroupCommitWriter`, run in its worker thread."""

    def __init__(self, connector: Connector) -> None:
        self._connector = connector
        self._connection: Connection | None = None

    def __call__(self, batch: list[Op]) -> str | None:
        """Commit `batch`, retrying what is safe to retry; every op ends with a result or an
        error. Returns why the database could not write, or None."""
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
                    apply_batch(connection, batch)
                    commit_sent = True
                    connection.execute("COMMIT")
                return None
            except StoreUnavailable as error:
                return _fail(batch, error)
            except _TRANSIENT:
                self._rollback()
                if attempt < _BATCH_RETRIES:
                    continue
                return _fail(batch, StoreUnavailable("postgres: too much lock contention"))
            except psycopg.Error as error:
                if not usable(self._connection):
                    self.close_connection()
                    if commit_sent:
                        return _fail(
                            batch,
                            StoreUnavailable(
                                f"postgres connection lost during COMMIT, outcome unknown:"
                                f" {describe(error)}"
                            ),
                        )
                    # Nothing reached COMMIT, so nothing is half-done: a stale connection
                    # (e.g. after a server restart) gets one fresh try.
                    if attempt == 1:
                        continue
                    return _fail(batch, StoreUnavailable(f"postgres write: {describe(error)}"))
                self._rollback()
                if len(batch) > 1 and isinstance(error, _OP_SPECIFIC):
                    return self._replay_each(batch)
                failure = StoreUnavailable(f"postgres write: {describe(error)}")
                if isinstance(error, _OP_SPECIFIC):
                    _fail(batch, failure)
                    return None  # this operation's data, not the database
                return _fail(batch, failure)  # e.g. disk full
            except Exception as error:
                # A bug must fail its batch, not kill the writer and every later write with it.
                self._rollback()
                _fail(batch, StoreUnavailable(f"postgres write failed: {error!r}"))
                return None

    def _replay_each(self, batch: list[Op]) -> str | None:
        """One transaction per operation, so only the faulty one fails."""
        failures = [self([op]) for op in batch]
        return next((failure for failure in reversed(failures) if failure is not None), None)

    def _connect(self) -> Connection:
        if not usable(self._connection):
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

    def close_connection(self) -> None:
        """Drop the writer's connection (the store is closing, or it broke)."""
        close_quietly(self._connection)
        self._connection = None


def _fail(batch: Sequence[Op], error: StoreUnavailable) -> str:
    """Fail every op of the batch with `error`; returns it as the reason writes failed."""
    for op in batch:
        op.fail(error)
    return str(error)


__all__ = [
    "AddMessage",
    "BatchCommitter",
    "CreateChat",
    "MarkDelivered",
    "Probe",
    "apply_batch",
    "decode",
    "encode",
]
