"""SQLite backend: WAL, versioned migrations, one group-committing writer thread, pooled readers.

Theory of operation:
- Writes go through the shared `group_commit.GroupCommitWriter` on the writer's own thread
  (`DedicatedThread`): every batch of queued operations runs inside ONE transaction on the
  writer connection (`_apply`), commits, and only then are its callers woken, after what it
  created was handed to the `commits` channel. Throughput comes from amortizing the commit, not
  from skipping it: an acknowledgement is only sent after COMMIT returned.
- Reads run on a small pool of read-only connections in worker threads, each in one
  snapshot; WAL lets them proceed while the writer commits. Their Python is shared with
  PostgreSQL (`sql_store.SQLStore`); this module gives their SQL (`_DIALECT`). The Trio loop
  never touches a sqlite3 call itself.
- Ids are SQLite rowids rendered as decimal strings; per chat they only grow, and timestamps
  are clamped to the chat's last message time so they never go backwards either.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar, Unpack

import attrs
import trio

from handler.config import StorageConfig
from handler.errors import StoreUnavailable
from handler.protocol import GROUP, Chat, Message, ReceiptFrame
from handler.store import blocks, groups
from handler.store.base import Committed
from handler.store.group_commit import DedicatedThread, GroupCommitWriter, Op, WriterOptions
from handler.store.outbox import Outbox
from handler.store.rows import CHAT_COLUMNS, MESSAGE_COLUMNS, chat_of, message_of
from handler.store.schema import SQLITE_MIGRATIONS
from handler.store.sql_store import (
    BlockRequest,
    Change,
    Delivered,
    Dialect,
    MembersChange,
    NewChat,
    NewGroup,
    NewMessage,
    ReadMark,
    SQLStore,
    change_refused,
    not_in_chat,
    read_answer,
)
from handler.timefmt import format_ms, now_ms

T = TypeVar("T")

_READERS: Final = 4
_PROBE_BYTES: Final = 128 * 1024

# One counter over all chats, bumped by every creation and message (indexed, so O(log n)).
_NEXT_SEQ: Final = "(SELECT COALESCE(MAX(activity_seq), 0) + 1 FROM chats)"


# What a write returns: its result, and the `Committed` to hand over if it created something.
Written = tuple[Any, Committed | tuple[Committed, ...] | None]


@attrs.define(eq=False)
class _Write(Op):
    """A write as a function of the writer connection."""

    run: Callable[[sqlite3.Connection], Written]


def _run(connection: sqlite3.Connection, op: _Write) -> None:
    op.reset()
    op.result, op.committed = op.run(connection)


def _apply(
    connection: sqlite3.Connection, batch: list[_Write], outbox: Outbox | None = None
) -> str | None:
    """One transaction for the whole batch; if any operation fails, the batch is rolled back
    and replayed one operation per transaction, so only the faulty one fails. (Failures are
    rare; a SAVEPOINT per operation would cost two statements each.) The webhook events of
    what it committed are written in the same transaction. Returns why the database could
    not write (I/O, disk full), or None."""
    try:
        connection.execute("BEGIN IMMEDIATE")
        for op in batch:
            _run(connection, op)
        if outbox is not None:
            outbox.write(connection, _DIALECT, batch, now_ms())
        connection.execute("COMMIT")
        return None
    except Exception:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
    failures = [_apply_alone(connection, op, outbox) for op in batch]
    return next((failure for failure in reversed(failures) if failure is not None), None)


def _apply_alone(connection: sqlite3.Connection, op: _Write, outbox: Outbox | None) -> str | None:
    try:
        connection.execute("BEGIN IMMEDIATE")
        _run(connection, op)
        if outbox is not None:
            outbox.write(connection, _DIALECT, (op,), now_ms())
        connection.execute("COMMIT")
        return None
    except sqlite3.OperationalError as error:  # I/O, disk full, locked: the store's fault
        op.fail(StoreUnavailable(f"sqlite commit failed: {error}"))
        return str(error)
    except Exception as error:
        op.fail(error)
        return None
    finally:
        if connection.in_transaction:
            connection.execute("ROLLBACK")


_DIALECT: Final = Dialect()


class SQLiteStore(SQLStore[_Write]):
    """The embedded default store; see the module docstring for the concurrency design."""

    def __init__(
        self,
        config: StorageConfig,
        outbox: Outbox | None = None,
        **options: Unpack[WriterOptions],
    ) -> None:
        """`outbox`: write webhook events with the changes (None: no webhooks); `options`
        bound the writer (`group_commit.MAX_BATCH`, `MAX_QUEUED` by default)."""
        writer = GroupCommitWriter[_Write](self._apply, DedicatedThread("sqlite-writer"), **options)
        super().__init__(writer, _DIALECT)
        self._config = config
        self._outbox = outbox
        self._path: Path = config.path
        self._readers: list[sqlite3.Connection] = []
        self._reader_limiter = trio.CapacityLimiter(_READERS)
        self._writer_connection: sqlite3.Connection | None = None

    # ------------------------------------------------------------------ connections

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

    async def _prepare(self) -> None:
        try:
            await trio.to_thread.run_sync(self._open_sync)
        except sqlite3.Error as error:
            raise StoreUnavailable(f"cannot open {self._path}: {error}") from None

    async def _release(self) -> None:
        def close_all() -> None:
            for connection in [*self._readers, self._writer_connection]:
                if connection is not None:
                    connection.close()

        await trio.to_thread.run_sync(close_all)
        self._readers = []
        self._writer_connection = None

    async def _read(self, query: Callable[[sqlite3.Connection], T], *, snapshot: bool = True) -> T:
        """Every read is one snapshot here (`snapshot` is for PostgreSQL's round trips)."""
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

    # ------------------------------------------------------------------ writes

    def _apply(self, batch: list[_Write]) -> str | None:
        """The writer's `apply`, in its thread (the connection is only used there)."""
        assert self._writer_connection is not None  # the writer runs only after `open`
        return _apply(self._writer_connection, batch, self._outbox)

    def _noop(self) -> _Write:
        return _Write(_nothing)

    def _probe(self) -> _Write:
        # Of real size: an empty commit (a flush) or a small write can succeed on a disk
        # that has no room for a message.
        return _Write(_probe_write)

    def _mark(self, delivered: Delivered) -> _Write:
        def run(db: sqlite3.Connection) -> Written:
            return None, _record_delivered(db, delivered)

        return _Write(run)

    def _chat_op(self, new: NewChat) -> _Write:
        user_a, user_b, creator_id = new.user_a, new.user_b, new.creator_id

        def run(db: sqlite3.Connection) -> Written:
            row = db.execute(
                f"SELECT {CHAT_COLUMNS} FROM chats WHERE user_a = ? AND user_b = ?",
                (user_a, user_b),
            ).fetchone()
            if blocks.block_between(db, _DIALECT, user_a, user_b):
                return blocks.refused(), None
            if row is not None:
                return (chat_of(row), False), None
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
            chat_row = cursor.lastrowid
            add_member = _DIALECT.sql("add_member")
            for user in (user_a, user_b):
                db.execute(
                    add_member, {"chat": chat_row, "user": user, "delivered": user == creator_id}
                )
            chat = Chat(str(chat_row), (user_a, user_b), creator_id, format_ms(created))
            return (chat, True), Committed(chat, new.origin)

        return _Write(run)

    def _group_op(self, new: NewGroup) -> _Write:
        def run(db: sqlite3.Connection) -> Written:
            created = now_ms()
            cursor = db.execute(
                "INSERT INTO chats (created_by, created_at_ms, last_activity_ms, activity_seq,"
                f" kind, title) VALUES (?, ?, ?, {_NEXT_SEQ}, 'group', ?)",
                (new.creator_id, created, created, new.title),
            )
            chat_row = cursor.lastrowid
            assert chat_row is not None
            groups.insert_members(db, _DIALECT, chat_row, new.creator_id, new.member_ids)
            chat = Chat(
                str(chat_row),
                tuple(sorted((new.creator_id, *new.member_ids))),
                new.creator_id,
                format_ms(created),
                GROUP,
                new.title,
            )
            return chat, Committed(chat, new.origin)

        return _Write(run)

    def _block_op(self, request: BlockRequest) -> _Write:
        def run(db: sqlite3.Connection) -> Written:
            return blocks.set_block(db, _DIALECT, request, now_ms())

        return _Write(run)

    def _last_seen_op(self, entries: tuple[tuple[str, int], ...]) -> _Write:
        def run(db: sqlite3.Connection) -> Written:
            blocks.save_last_seen(db, _DIALECT, entries, greatest="max")
            return None, None

        return _Write(run)

    def _members_op(self, change: MembersChange) -> _Write:
        def run(db: sqlite3.Connection) -> Written:
            last_seq, version = db.execute(
                "SELECT last_seq, version FROM chats WHERE id = ?", (change.chat_row,)
            ).fetchone()
            return groups.change_members(db, _DIALECT, change, last_seq, version, now_ms())

        return _Write(run)

    def _message_op(self, new: NewMessage) -> _Write:
        chat_row, sender_id, client_message_id = new.chat_row, new.sender_id, new.client_message_id

        def run(db: sqlite3.Connection) -> Written:
            chat = new.chat
            if chat.is_group:
                members = groups.members_of(db, _DIALECT, chat_row)
                if sender_id not in members:
                    return groups.not_a_member(), None
                chat = groups.with_members(chat, members)
            if client_message_id is not None:
                row = db.execute(
                    f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE sender_id = ? AND chat_id = ?"
                    " AND client_message_id = ?",
                    (sender_id, chat_row, client_message_id),
                ).fetchone()
                if row is not None:
                    return (message_of(row), False), None
            last_ms, last_seq, version, blocked = db.execute(
                "SELECT last_message_ms, last_seq, version, blocked FROM chats WHERE id = ?",
                (chat_row,),
            ).fetchone()
            if blocked:
                return blocks.refused_in_chat(), None
            created = max(now_ms(), last_ms)
            seq, version = last_seq + 1, version + 1
            cursor = db.execute(
                "INSERT INTO messages (chat_id, sender_id, recipient_id, content, created_at_ms,"
                " client_message_id, seq, version) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    chat_row,
                    sender_id,
                    new.recipient_id or "",
                    new.content,
                    created,
                    client_message_id,
                    seq,
                    version,
                ),
            )
            db.execute(
                f"UPDATE chats SET last_message_ms = ?, last_activity_ms = ?,"
                f" activity_seq = {_NEXT_SEQ}, last_seq = ?, version = ? WHERE id = ?",
                (created, created, seq, version, chat_row),
            )
            db.execute(
                _DIALECT.sql("mark_sender"),
                {"chat": chat_row, "user": sender_id, "seq": seq, "at": created},
            )
            message = Message(
                str(cursor.lastrowid),
                new.chat.chat_id,
                sender_id,
                new.recipient_id,
                new.content,
                format_ms(created),
                client_message_id,
                seq,
                version,
            )
            return (message, True), Committed(chat, new.origin, message)

        return _Write(run)

    def _change_op(self, change: Change) -> _Write:
        def run(db: sqlite3.Connection) -> Written:
            chat, audience = change.chat, None
            members = None
            if chat.is_group:
                members = groups.members_of(db, _DIALECT, change.chat_row)
                if change.user_id not in members:
                    return groups.not_a_member(), None
                chat = groups.with_members(chat, members)
            where = {"message": change.message_row, "chat": change.chat_row}
            row = db.execute(_DIALECT.sql("message_by_id"), where).fetchone()
            current = None if row is None else message_of(row)
            deleting = change.content is None
            refused = change_refused(
                None if current is None else current.sender_id,
                current is not None and current.deleted,
                change.user_id,
                deleting=deleting,
            )
            if refused is not None:
                return refused, None
            assert current is not None
            if deleting and current.deleted:
                return (current, False), None  # deleting again changes nothing
            if not deleting and blocks.chat_blocked(db, _DIALECT, change.chat_row):
                return blocks.refused_in_chat(), None  # deleting one's own stays allowed
            (version,) = db.execute(
                "UPDATE chats SET version = version + 1 WHERE id = ? RETURNING version",
                (change.chat_row,),
            ).fetchone()
            if deleting:
                db.execute(
                    "UPDATE messages SET content = '', deleted = 1, changed = 1, version = ?"
                    " WHERE id = ?",
                    (version, change.message_row),
                )
            else:
                db.execute(
                    "UPDATE messages SET content = ?, edited_at_ms = ?, changed = 1, version = ?"
                    " WHERE id = ?",
                    (change.content, now_ms(), version, change.message_row),
                )
            message = message_of(db.execute(_DIALECT.sql("message_by_id"), where).fetchone())
            if members is not None:
                audience = groups.seen_by(members, message.seq)
            committed = Committed(chat, change.origin, message, update=True, audience=audience)
            return (message, True), committed

        return _Write(run)

    def _read_op(self, mark: ReadMark) -> _Write:
        def run(db: sqlite3.Connection) -> Written:
            before = 0
            if mark.chat.is_group:
                found = groups.read_seq_of(db, _DIALECT, mark.chat_row, mark.user_id)
                if found is None:
                    return groups.not_a_member(), None
                before = found
            row = db.execute(
                "SELECT seq FROM messages WHERE id = ? AND chat_id = ?",
                (mark.message_row, mark.chat_row),
            ).fetchone()
            if row is None:
                return not_in_chat(), None
            seq, at = row[0], now_ms()
            where = {"chat": mark.chat_row, "user": mark.user_id, "seq": seq, "at": at}
            delivered = db.execute(_DIALECT.sql("read_delivers"), where).fetchone()
            if db.execute(_DIALECT.sql("mark_read"), where).fetchone() is not None:
                receipt = ReceiptFrame(
                    mark.chat.chat_id,
                    mark.user_id,
                    "read",
                    seq,
                    str(mark.message_row),
                    format_ms(at),
                )
                audience = None
                if mark.chat.is_group:
                    audience = groups.read_audience(
                        db, _DIALECT, mark.chat_row, mark.user_id, before, seq
                    )
                committed = Committed(mark.chat, mark.origin, receipt=receipt, audience=audience)
                return (receipt, True), committed
            current = db.execute(_DIALECT.sql("read_mark"), where).fetchone()
            return read_answer(mark, seq, current, at, delivered is not None)

        return _Write(run)


def _record_delivered(db: sqlite3.Connection, delivered: Delivered) -> tuple[Committed, ...]:
    """Move the user's marks (a chat's ranges in order), one statement per range; each chat
    whose delivered mark moved gives one receipt to hand over, for where the mark ended."""
    user = delivered.user_id
    for chat_row in delivered.chat_rows:
        db.execute(_DIALECT.sql("mark_chat_delivered"), {"chat": chat_row, "user": user})
    at = now_ms()
    moved: dict[int, tuple[int, str | None, int]] = {}
    both = _DIALECT.sql("mark_both")
    for chat_row, first, seq, message_id, version in delivered.marks:
        where = {"chat": chat_row, "user": user, "seq": seq, "first": first, "at": at}
        before = db.execute(
            "SELECT delivered_seq FROM members WHERE chat_id = ? AND user_id = ?", (chat_row, user)
        ).fetchone()
        row = db.execute(both, {**where, "version": version}).fetchone()
        if seq and row is not None and before is not None and row[0] > before[0]:
            if row[0] != seq:  # it went on over the user's own messages after `seq`
                found = db.execute(_DIALECT.sql("message_at"), {**where, "seq": row[0]})
                message_id = str(found.fetchone()[0])
            # The newly delivered range starts above the mark as it was before this op.
            earliest = moved[chat_row][2] if chat_row in moved else before[0] + 1
            moved[chat_row] = (row[0], message_id, earliest)
    if not moved:
        return ()
    rows = db.execute(
        f"SELECT {CHAT_COLUMNS} FROM chats WHERE id IN ({', '.join('?' * len(moved))})",
        tuple(moved),
    ).fetchall()
    receipts = []
    for chat in map(chat_of, rows):
        chat_row = int(chat.chat_id)
        seq, message_id, first = moved[chat_row]
        receipt = ReceiptFrame(chat.chat_id, user, "delivered", seq, message_id, format_ms(at))
        audience = None
        if chat.is_group:  # its members are not loaded: `audience` says whom it concerns
            audience = groups.receipt_audience(db, _DIALECT, chat_row, user, first, seq)
        receipts.append(Committed(chat, receipt=receipt, audience=audience))
    return tuple(receipts)


def _probe_write(db: sqlite3.Connection) -> Written:
    """A write of as much as a large message: a small one could fit in WAL space that a
    failed transaction left allocated, and report a disk with room that has none."""
    db.execute(
        "INSERT OR REPLACE INTO health_probe (id, data) VALUES (1, zeroblob(?))", (_PROBE_BYTES,)
    )
    return None, None


def _nothing(db: sqlite3.Connection) -> Written:
    """A write that writes nothing: queued behind everything before it (see `flush`)."""
    return None, None


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
    # A migration may rebuild a table others refer to (SQLite's way to change a column):
    # foreign keys are off while it runs (the pragma is a no-op inside a transaction), and
    # checked before each migration commits.
    connection.execute("PRAGMA foreign_keys = OFF")
    try:
        for version, statements in enumerate(SQLITE_MIGRATIONS, start=1):
            if version <= current:
                continue
            connection.execute("BEGIN IMMEDIATE")
            try:
                for statement in statements:
                    connection.execute(statement)
                broken = connection.execute("PRAGMA foreign_key_check").fetchone()
                if broken is not None:
                    raise sqlite3.IntegrityError(f"migration {version} broke a reference: {broken}")
                connection.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
                connection.execute("COMMIT")
            finally:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
    finally:
        connection.execute("PRAGMA foreign_keys = ON")


__all__ = ["SQLiteStore"]
