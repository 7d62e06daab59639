"""Storage backends behind one contract (`handler.store.base.Store`).

The modules, by role:
- `base`: the contract (`Store`), the records it returns, and `Committed`, what the store
  hands to the fan-out.
- `group_commit`: the one writer both backends use (bounded queue, one transaction per batch,
  the hand-off to `commits` in commit order) and its two thread mechanisms.
- `sql_store`: the Python both SQL backends share (lifecycle, delivery marks, every read);
  `rows`: their column lists and row-to-record mapping.
- `sqlite`: the embedded backend (its SQL, its reader pool, its writes).
- `postgres`: the shared backend's store, reads and migrations; `postgres_batch`: its write
  operations, batch SQL and retry/replay policy; `postgres_connect`: its connections and
  outage backoff.
- `outbox`: what a committed batch becomes as webhook events, in its transaction.
- `schema`: the versioned migrations of both.
"""

from __future__ import annotations

from handler.config import StorageConfig, WebhooksConfig
from handler.store.base import Backlog, BacklogPlan, Store

__all__ = ["Backlog", "BacklogPlan", "Store", "open_store"]


def open_store(config: StorageConfig, webhooks: WebhooksConfig | None = None) -> Store:
    """Build the configured backend; call `await store.open()` before use. With webhook
    endpoints, every write also stores its events (`store.outbox`)."""
    from handler.store.outbox import Outbox

    outbox = None if webhooks is None else Outbox.of(webhooks)
    if config.backend == "postgres":
        from handler.store.postgres import PostgresStore

        return PostgresStore(config, outbox)
    from handler.store.sqlite import SQLiteStore

    return SQLiteStore(config, outbox)
