"""PostgreSQL connections: how the store opens them (session settings, one shared backoff for
outages) and how it tells and closes a broken one. Blocking calls: worker threads only.

Outage: a failed connection attempt opens a backoff window (0.1 s doubling to 5 s) during
which `Connector.connect` fails at once with `StoreUnavailable`, so an outage costs one failed
attempt per window instead of one per request; the next call after the window reconnects.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Final

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow

from handler.errors import StoreUnavailable

Connection = psycopg.Connection[TupleRow]

_CONNECT_TIMEOUT_S: Final = 5
_BACKOFF_MIN_S: Final = 0.1
_BACKOFF_MAX_S: Final = 5.0
# Session settings: a stuck peer must not hold chat locks or a worker thread forever.
_SESSION_OPTIONS: Final = (
    "-c statement_timeout=30000 -c idle_in_transaction_session_timeout=60000 -c lock_timeout=20000"
)


def describe(error: BaseException) -> str:
    """The first line of a driver error with its SQLSTATE: enough for a log or /healthz."""
    sqlstate = getattr(error, "sqlstate", None)
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{first_line} ({sqlstate})" if sqlstate else first_line


class Connector:
    """Opens connections with one shared backoff (see the module docstring). Called from
    worker threads, hence the lock."""

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
        """A new autocommit connection; `force` ignores the backoff window (startup)."""
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
            raise StoreUnavailable(f"postgres connect failed: {describe(error)}") from None
        with self._lock:
            self._delay = 0.0
            self._retry_at = 0.0
        return connection


def usable(connection: Connection | None) -> bool:
    """Open and not broken: worth sending a statement on."""
    return connection is not None and not connection.closed and not connection.broken


def close_quietly(connection: Connection | None) -> None:
    """Close, ignoring the errors of a connection that is already gone."""
    if connection is not None:
        with contextlib.suppress(psycopg.Error):
            connection.close()


__all__ = ["Connection", "Connector", "close_quietly", "describe", "usable"]
