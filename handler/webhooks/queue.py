"""The outbox as the delivery sees it, on a small connection of its own.

The writer only INSERTs outbox rows (in the transactions of the changes). Claiming, settling
and counting them runs here, on one dedicated connection in a worker thread (one call at a
time), never through the store's group-commit queue: a slow or failing endpoint then costs the
hot path nothing but a few short transactions.

- Claim: one statement sets `lease_until_ms` on up to `limit` due rows of an endpoint whose
  lease has run out, and returns them. On PostgreSQL the rows are picked `FOR UPDATE SKIP
  LOCKED`, so two nodes claiming at once take different rows; the lease then keeps a row
  claimed while it is being POSTed, with no transaction open. A node that dies leaves its
  leases to run out, and another node delivers those rows again.
- Settle: a delivered row is deleted; a failed one gets its next attempt and loses its lease.
- SQLite has one process (the process lock), so at start every lease is released: rows a
  killed process had claimed are due again at once.

The SQL is shared (`register_queries`); the backends differ in how they connect, how a write
transaction begins, and the claim's row locking (`Backend`).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from typing import Any, Final, TypeVar

import attrs
import trio

from handler.config import StorageConfig
from handler.store.sql_store import Database, Dialect, register_queries

T = TypeVar("T")

register_queries(
    {
        "outbox_claim_sqlite": "UPDATE webhook_outbox SET lease_until_ms = :lease WHERE id IN"
        " (SELECT id FROM webhook_outbox WHERE endpoint = :endpoint AND next_at_ms <= :now"
        " AND lease_until_ms <= :now ORDER BY next_at_ms, id LIMIT :limit)"
        " RETURNING id, event_id, body, attempts, created_at_ms",
        "outbox_claim_postgres": "UPDATE webhook_outbox SET lease_until_ms = :lease WHERE id IN"
        " (SELECT id FROM webhook_outbox WHERE endpoint = :endpoint AND next_at_ms <= :now"
        " AND lease_until_ms <= :now ORDER BY next_at_ms, id LIMIT :limit"
        " FOR UPDATE SKIP LOCKED) RETURNING id, event_id, body, attempts, created_at_ms",
        "outbox_delete": "DELETE FROM webhook_outbox WHERE id = :id",
        "outbox_retry": "UPDATE webhook_outbox SET attempts = :attempts, next_at_ms = :next,"
        " lease_until_ms = 0 WHERE id = :id",
        "outbox_depth": "SELECT COUNT(*), MIN(created_at_ms) FROM webhook_outbox",
        "outbox_release": "UPDATE webhook_outbox SET lease_until_ms = 0 WHERE lease_until_ms > 0",
    }
)


@attrs.frozen
class Due:
    """A claimed row: one event for one endpoint."""

    row_id: int
    event_id: str
    body: bytes
    attempts: int
    created_at_ms: int


@attrs.frozen
class Backend:
    """What differs between SQLite and PostgreSQL here."""

    name: str
    connect: Callable[[], Any]
    dialect: Dialect
    begin: str  # a write transaction
    # The statement that makes one node the only one to scan (None: a single process).
    exclusive: str | None = None


_SCAN_LOCK: Final = 0x7765626F6F6B73  # names the advisory lock of the unread scan


def sqlite_backend(config: StorageConfig) -> Backend:
    def connect() -> sqlite3.Connection:
        connection = sqlite3.connect(
            config.path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        connection.execute("PRAGMA busy_timeout = 30000")
        connection.execute(f"PRAGMA synchronous = {config.synchronous.upper()}")
        return connection

    return Backend("sqlite", connect, Dialect(), "BEGIN IMMEDIATE")


def postgres_backend(config: StorageConfig) -> Backend:
    from handler.store.postgres_batch import decode
    from handler.store.postgres_connect import Connector

    connector = Connector(config.dsn)
    return Backend(
        "postgres",
        connector.connect,
        Dialect(pyformat=True, text=decode),
        "BEGIN",
        exclusive=f"SELECT pg_try_advisory_xact_lock({_SCAN_LOCK})",
    )


class OutboxQueue:
    """The outbox on one dedicated connection (see the module docstring). A call that fails
    drops the connection; the next one connects again."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._connection: Any = None
        self._limiter = trio.CapacityLimiter(1)

    @classmethod
    def of(cls, config: StorageConfig) -> OutboxQueue:
        if config.backend == "postgres":
            return cls(postgres_backend(config))
        return cls(sqlite_backend(config))

    @property
    def dialect(self) -> Dialect:
        return self._backend.dialect

    @property
    def single_process(self) -> bool:
        return self._backend.exclusive is None

    async def _run(self, job: Callable[[Database], T]) -> T:
        return await trio.to_thread.run_sync(self._run_sync, job, limiter=self._limiter)

    def _run_sync(self, job: Callable[[Database], T]) -> T:
        if self._connection is None:
            self._connection = self._backend.connect()
        try:
            return job(self._connection)
        except BaseException:
            self._close_sync()
            raise

    def _close_sync(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):  # already broken: nothing to release
                connection.close()

    async def transaction(self, job: Callable[[Database], T]) -> T:
        """Run `job` in one write transaction (rolled back if it raises)."""
        begin = self._backend.begin

        def run(db: Database) -> T:
            db.execute(begin, {})
            try:
                result = job(db)
            except BaseException:
                db.execute("ROLLBACK", {})
                raise
            db.execute("COMMIT", {})
            return result

        return await self._run(run)

    async def claim(self, endpoint: str, limit: int, now_ms: int, lease_ms: int) -> list[Due]:
        """Lease up to `limit` due rows of `endpoint` (oldest first)."""
        sql = self.dialect.sql(f"outbox_claim_{self._backend.name}")
        params = {"endpoint": endpoint, "now": now_ms, "lease": now_ms + lease_ms, "limit": limit}

        def run(db: Database) -> list[Due]:
            rows = db.execute(sql, params).fetchall()
            return sorted(
                (Due(int(r[0]), str(r[1]), bytes(r[2]), int(r[3]), int(r[4])) for r in rows),
                key=lambda due: due.row_id,
            )

        return await self._run(run)

    async def delivered(self, row_id: int) -> None:
        sql = self.dialect.sql("outbox_delete")
        await self._run(lambda db: db.execute(sql, {"id": row_id}))

    async def retry(self, row_id: int, attempts: int, next_at_ms: int) -> None:
        sql = self.dialect.sql("outbox_retry")
        params = {"id": row_id, "attempts": attempts, "next": next_at_ms}
        await self._run(lambda db: db.execute(sql, params))

    async def depth(self) -> tuple[int, int | None]:
        """How many rows are pending, and when the oldest was created (epoch ms)."""
        sql = self.dialect.sql("outbox_depth")

        def run(db: Database) -> tuple[int, int | None]:
            count, oldest = db.execute(sql, {}).fetchone()
            return int(count), None if oldest is None else int(oldest)

        return await self._run(run)

    async def release_leases(self) -> None:
        """At the start of the only process (SQLite): what a killed one claimed is due."""
        sql = self.dialect.sql("outbox_release")
        await self._run(lambda db: db.execute(sql, {}))

    def holds_scan_lock(self, db: Database) -> bool:
        """In a transaction: whether this node may scan now (always, for one process)."""
        if self._backend.exclusive is None:
            return True
        return bool(db.execute(self._backend.exclusive, {}).fetchone()[0])

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self._close_sync, limiter=self._limiter)


__all__ = ["Backend", "Due", "OutboxQueue"]
