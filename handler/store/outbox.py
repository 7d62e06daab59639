"""The outbox on the writer's side: what a committed batch becomes as webhook events.

Both backends call `Outbox.write` inside the batch's transaction, after its ops ran and before
COMMIT, so an event exists exactly when its change does: a rolled-back batch leaves no event,
a committed one cannot lose its events in a crash. A store without webhooks has no `Outbox`
and pays nothing. What each kind of commit becomes is decided here, once:

- a new chat (direct or group): `chat.created`, the chat object;
- a new message: `message.created`; an edit or a delete: `message.updated`, the message object;
- a moved read mark: `message.read` (moved delivered marks are not events);
- membership changes and blocks: no event.

One row per event and endpoint that wants its type (the event's id is shared): each endpoint
then has its own attempts, schedule and lease, and a dead endpoint's rows never hold up
another's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import attrs

from handler.config import WebhooksConfig
from handler.store.base import NO_CHAT, Committed
from handler.store.group_commit import Op
from handler.store.sql_store import Dialect, register_queries
from handler.webhooks import events

register_queries(
    {
        "outbox_insert": "INSERT INTO webhook_outbox (event_id, endpoint, body, created_at_ms,"
        " next_at_ms) VALUES (:event, :endpoint, :body, :at, :at)",
    }
)


class Executor(Protocol):
    """sqlite3's connection and psycopg's cursor both have it."""

    def executemany(self, query: str, params: Sequence[Mapping[str, Any]], /) -> Any: ...


def event_of(commit: Committed) -> tuple[str, Any] | None:
    """The event type and `data` of one commit, or None when it is not an event."""
    if commit.message is not None:
        kind = events.MESSAGE_UPDATED if commit.update else events.MESSAGE_CREATED
        return kind, events.message_data(commit.message)
    if commit.receipt is not None:
        if commit.receipt.kind != "read":
            return None
        return events.MESSAGE_READ, events.read_data(commit.receipt)
    if commit.group is not None or commit.block is not None or commit.chat is NO_CHAT:
        return None
    return events.CHAT_CREATED, events.chat_data(commit.chat)


def committed_of(batch: Iterable[Op]) -> Iterable[Committed]:
    """What the ops of a batch committed, in batch order."""
    for op in batch:
        if op.error is not None or op.committed is None:
            continue
        if isinstance(op.committed, tuple):
            yield from op.committed
        else:
            yield op.committed


@attrs.frozen
class Outbox:
    """The endpoints as the writer needs them: where each event type goes."""

    endpoints: tuple[tuple[str, frozenset[str]], ...]

    @classmethod
    def of(cls, config: WebhooksConfig) -> Outbox | None:
        """None without endpoints: the writers then skip the outbox entirely."""
        if not config.enabled:
            return None
        return cls(tuple((endpoint.url, endpoint.events) for endpoint in config.endpoints))

    def rows(self, event_type: str, data: Any, now_ms: int) -> list[dict[str, Any]]:
        """The rows of one event: one per endpoint that wants `event_type`."""
        urls = [url for url, wanted in self.endpoints if event_type in wanted]
        if not urls:
            return []
        event_id = events.new_event_id()
        body = events.encode_event(event_id, event_type, now_ms, data)
        return [{"event": event_id, "endpoint": url, "body": body, "at": now_ms} for url in urls]

    def write(self, db: Executor, dialect: Dialect, batch: Iterable[Op], now_ms: int) -> None:
        """Insert the events of what `batch` committed (in its transaction, before COMMIT)."""
        rows = []
        for commit in committed_of(batch):
            event = event_of(commit)
            if event is not None:
                rows.extend(self.rows(*event, now_ms))
        self.insert(db, dialect, rows)

    @staticmethod
    def insert(db: Executor, dialect: Dialect, rows: Sequence[Mapping[str, Any]]) -> None:
        if rows:
            db.executemany(dialect.sql("outbox_insert"), rows)


__all__ = ["Executor", "Outbox", "committed_of", "event_of"]
