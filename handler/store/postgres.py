"""PostgreSQL backend: the store, its reads and its migrations; writes go through one
group-committing writer.

The server runs on Trio with no asyncio loop, so asyncio drivers (asyncpg, psycopg's
`AsyncConnection`) are out; psycopg's blocking connections run in `trio.to_thread` workers
instead, never on the Trio loop itself. docs/design.md has the measurements behind the choice.

The modules of this backend:
- here: `PostgresStore`: its read pool, its SQL for the shared reads (`sql_store`), its
  writes as operations, and the migrations. Reads run on a small pool of autocommit
  connections, each multi-statement read in one REPEATABLE READ READ ONLY transaction so it
  sees one snapshot; a stale connection gets one retry (reads are safe to repeat).
- `postgres_batch`: the write operations, the SQL of a batch (chat locks that keep per-chat
  commit order across processes) and the writer's retry/replay policy.
- `postgres_connect`: connections, their session settings and the outage backoff.
- `group_commit`: the writer task shared with SQLite (bounded queue, hand-off of what was
  created to the `commits` channel, in commit order, before the callers resume).

Outage: calls fail at once with `StoreUnavailable` during the connector's backoff window and
reconnect after it; broken connections are dropped and replaced. Nothing is acknowledged that
was not committed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, TypeVar, Unpack

import psycopg
import trio

from handler.config import StorageConfig
from handler.errors import StoreUnavailable
from handler.store.group_commit import GroupCommitWriter, Op, WorkerThread, WriterOptions
from handler.store.outbox import Outbox
from handler.store.postgres_batch import (
    AddMessage,
    BatchCommitter,
    ChangeMembers,
    ChangeMessage,
    CreateChat,
    CreateGroup,
    MarkDelivered,
    MoveReadMark,
    Probe,
    SaveLastSeen,
    SetBlock,
    decode,
)
from handler.store.postgres_connect import (
    Connection,
    Connector,
    close_quietly,
    describe,
    usable,
)
from handler.store.schema import POSTGRES_MIGRATIONS
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
)

T = TypeVar("T")

# Arbitrary constant naming the advisory lock that serializes migrations across processes.
_MIGRATION_LOCK: Final = 0x6368617473746F72

_DIALECT: Final = Dialect(pyformat=True, text=decode)


class PostgresStore(SQLStore[Op]):
    """The shared store for several handler processes; see the module docstring."""

    def __init__(
        self,
        config: StorageConfig,
        outbox: Outbox | None = None,
        **options: Unpack[WriterOptions],
    ) -> None:
        """`outbox`: write webhook events with the changes (None: no webhooks); `options`
        bound the writer (`group_commit.MAX_BATCH`, `MAX_QUEUED` by default)."""
        self._connector = Connector(config.dsn)
        self._committer = BatchCommitter(self._connector, outbox)
        super().__init__(
            GroupCommitWriter[Op](self._committer, WorkerThread(), **options), _DIALECT
        )
        self._config = config
        self._readers: list[Connection] = []
        # Bounds open reader connections; threads get their own limiter, since a task holding
        # a token cannot borrow a second one for its worker thread.
        self._reader_limiter = trio.CapacityLimiter(config.pool_size)
        self._reader_threads = trio.CapacityLimiter(config.pool_size)
        self._opened = False

    # ------------------------------------------------------------------ connections

    async def _prepare(self) -> None:
        def migrate() -> None:
            connection = self._connector.connect(force=True)
            try:
                _migrate(connection)
            finally:
                connection.close()

        try:
            await trio.to_thread.run_sync(migrate)
        except psycopg.Error as error:
            raise StoreUnavailable(f"postgres migration failed: {describe(error)}") from None
        self._opened = True

    async def _release(self) -> None:
        self._opened = False
        readers, self._readers = self._readers, []

        def close_all() -> None:
            for connection in readers:
                close_quietly(connection)
            self._committer.close_connection()

        await trio.to_thread.run_sync(close_all)

    async def _read(self, query: Callable[[Connection], T], *, snapshot: bool = True) -> T:
        """Run `query` on a pooled connection in a worker thread.

        `snapshot` wraps it in one REPEATABLE READ READ ONLY transaction, for reads of several
        statements; a single statement is consistent on its own and saves two round trips.
        Within the connector's backoff window this fails at once.
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
                if connection is None or not usable(connection):
                    close_quietly(connection)
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
                if not usable(connection):
                    close_quietly(connection)
                    connection = None
                    if attempt == 1:
                        continue
                return connection, StoreUnavailable(f"postgres read: {describe(error)}")
            except Exception as error:
                return connection, StoreUnavailable(f"postgres read failed: {error!r}")
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------------ writes

    def _noop(self) -> Op:
        return Op()  # applied as nothing, committed in queue order

    def _probe(self) -> Op:
        return Probe()  # a real write: an empty commit succeeds without writing

    def _mark(self, delivered: Delivered) -> Op:
        return MarkDelivered(delivered)

    def _change_op(self, change: Change) -> Op:
        return ChangeMessage(change)

    def _read_op(self, mark: ReadMark) -> Op:
        return MoveReadMark(mark)

    def _chat_op(self, new: NewChat) -> Op:
        return CreateChat(new)

    def _message_op(self, new: NewMessage) -> Op:
        return AddMessage(new)

    def _group_op(self, new: NewGroup) -> Op:
        return CreateGroup(new)

    def _members_op(self, change: MembersChange) -> Op:
        return ChangeMembers(change)

    def _block_op(self, request: BlockRequest) -> Op:
        return SetBlock(request)

    def _last_seen_op(self, entries: tuple[tuple[str, int], ...]) -> Op:
        return SaveLastSeen(entries)


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
