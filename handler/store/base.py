"""The storage contract every backend implements, and the records it returns.

The store is the source of truth for chats, messages and what was delivered to whom. Its
guarantees, which the hub relies on and the contract tests check on every backend:

- `add_message` returns only after COMMIT; concurrent writes are batched into one transaction
  (group commit), never made faster by skipping durability.
- `on_commit` callbacks run in the caller's Trio thread, in commit order, before the writing
  task resumes; the hub publishes from there, so fan-out order equals commit order.
- Within a chat, message ids and timestamps never go backwards; ids are decimal integers
  that grow in commit order per chat.
- `(sender_id, chat_id, client_message_id)` is unique: a resend returns the stored message
  with `created=False`.
- Delivery state is per user: a chat or message is undelivered until `mark_delivered`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

import attrs
import trio

from handler.protocol import Chat, Message

# Called after COMMIT with the new message and the id of the chat's previous message.
OnCommit = Callable[[Message, str | None], None]


@attrs.frozen
class ChatHistory:
    """A chat with a page of its messages, oldest first."""

    chat: Chat
    messages: tuple[Message, ...]
    has_more: bool


@attrs.frozen
class Backlog:
    """What a user has not yet received: chats oldest first, then messages grouped by chat.

    `messages` is ordered by each chat's oldest undelivered message; each tuple oldest first.
    """

    chats: tuple[Chat, ...]
    messages: tuple[tuple[str, tuple[Message, ...]], ...]
    # Every chat of the user in the same snapshot, with its newest message id ("0" if none).
    # Fan-out of such a chat, or of a message at or below that id, is either in this backlog
    # or was delivered to the user before this binding, so a binding drops it (Connection).
    high_water: Mapping[str, str] = attrs.field(factory=dict)

    @property
    def message_ids(self) -> frozenset[str]:
        return frozenset(m.message_id for _, batch in self.messages for m in batch)

    @property
    def chat_ids(self) -> frozenset[str]:
        return frozenset(chat.chat_id for chat in self.chats)


def assemble_backlog(
    chats: Iterable[Chat],
    undelivered_oldest_first: Iterable[Message],
    newest_per_chat: Iterable[tuple[object, object]],
) -> Backlog:
    """Build a `Backlog` from a backend's three snapshot queries (shared by every backend)."""
    grouped: dict[str, list[Message]] = {}
    for message in undelivered_oldest_first:
        grouped.setdefault(message.chat_id, []).append(message)
    return Backlog(
        tuple(chats),
        tuple((chat_id, tuple(messages)) for chat_id, messages in grouped.items()),
        {str(chat_id): str(newest) for chat_id, newest in newest_per_chat},
    )


class Store(Protocol):
    """Persistent chats, messages and delivery state. All methods are safe to call concurrently."""

    async def open(self, nursery: trio.Nursery) -> None:
        """Connect, run migrations, start background writers in `nursery`. Call once.

        The caller owns the nursery (structured concurrency: no hidden tasks); `aclose()` must
        be awaited before that nursery exits.
        """

    async def aclose(self) -> None:
        """Flush pending writes, stop the background tasks, release every connection."""

    async def flush(self) -> None:
        """Return once every write queued before this call is committed (delivery marks too).

        A binding calls it before reading the backlog, so what was just delivered to another
        connection of the user is not offered again.
        """

    async def check(self) -> None:
        """Raise `StoreUnavailable` when the backend does not answer (health check)."""

    async def create_chat(self, creator_id: str, recipient_id: str) -> tuple[Chat, bool]:
        """Create the 1:1 chat of the pair or find it; `True` when it was created now.

        The creator's copy counts as delivered, the recipient's does not.
        """

    async def get_chat(self, chat_id: str) -> Chat | None:
        """The chat with this id, or None."""

    async def add_message(
        self,
        chat: Chat,
        sender_id: str,
        content: str,
        client_message_id: str | None,
        on_commit: OnCommit | None = None,
    ) -> tuple[Message, bool]:
        """Store a message durably; `True` when new, `False` for an idempotent resend.

        `on_commit` is called (only for new messages) after COMMIT, in commit order.
        """

    async def chat_histories(self, user_id: str, limit: int) -> list[ChatHistory]:
        """Every chat of the user, most recently active first, each with its newest `limit`
        messages oldest first."""

    async def messages_before(
        self, chat_id: str, before_id: str | None, limit: int
    ) -> tuple[tuple[Message, ...], bool] | None:
        """A page of messages older than `before_id` (or the newest), oldest first, with
        `has_more`; None when `before_id` is not a message of this chat."""

    async def backlog(self, user_id: str) -> Backlog:
        """Everything not yet delivered to the user."""

    async def mark_delivered(
        self, user_id: str, chat_ids: Sequence[str], message_ids: Sequence[str]
    ) -> None:
        """Record that these chats and messages reached the user (idempotent).

        Takes effect before any later acknowledged write of this store returns.
        """
