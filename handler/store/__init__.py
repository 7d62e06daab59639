"""Storage backends behind one contract (`handler.store.base.Store`)."""

from __future__ import annotations

from handler.config import StorageConfig
from handler.store.base import Backlog, BacklogPlan, Store

__all__ = ["Backlog", "BacklogPlan", "Store", "open_store"]


def open_store(config: StorageConfig) -> Store:
    """Build the configured backend; call `await store.open()` before use."""
    if config.backend == "postgres":
        from handler.store.postgres import PostgresStore

        return PostgresStore(config)
    from handler.store.sqlite import SQLiteStore

    return SQLiteStore(config)
