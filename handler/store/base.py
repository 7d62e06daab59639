"""The storage contract every backend implements, and the records it returns.

The store is the source of truth for chats, messages and what was delivered to whom. Its
guarantees, which the hub relies on and the contract tests check on every backend:

- `add_message` returns only after COMMIT; concurrent writes are batched into one transaction
  (group commit), never made faster by skipping durability. Writes wait for room in a bounded
  queue (`group_commit.MAX_QUEUED`): a burst slows its writers down, nothing is dropped.
- The store only stores. Every write that creates something (a new chat, a new message) is
  handed, in commit order and before its caller resumes, to the `commits` channel given to
  `open()` as a `Committed`; the hub's publisher task drains it and fans out. The channel is
  bounded: when it is full the writer waits (backpressure), nothing is dropped.
- Within a chat, message ids and timestamps never go backwards; ids are decimal integers
  that grow in commit order per chat.
- `(sender_id, chat_id, client_message_id)` is unique: a resend returns the stored message
  with `created=False`.
- Delivery state is per user: a chat or message is undelivered until `mark_delivered`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import attrs
import trio

from handler.protocol import Chat, Message, RequestId


@attrs.define  # not frozen: one per message on the hot path; never changed
class Origin:
    """Who caused a write; the store hands it back untouched with the commit, so the fan-out
    can send the origin connection its acknowledgement (with its `request_id`)."""

    connection_id: str | None = None
    request_id: RequestId | None = None


NO_ORIGIN = Origin()


@attrs.define  # not frozen: one per message on the hot path; never changed
class Committed:
    """A committed write that created something: the fan-out's input, in commit order.

    `message` is None when the chat itself was created. `previous_id` is the id of the chat's
    message committed just before `message` (None for the chat's first): a receiving node puts
    events from several publishers back in commit order per chat with it.
    """

    chat: Chat
    origin: Origin = NO_ORIGIN
    message: Message | None = None
    previous_id: str | None = None


CommitSender = trio.MemorySendChannel[Committed]


@attrs.frozen
class BacklogPlan:
    """What a user has not yet received, without the messages themselves: a binding reads
    the messages chat by chat (`Store.undelivered`) as the client takes them, so a large
    backlog is never held whole in memory.

    `chats` oldest first; `message_chats` lists, for each chat with undelivered messages in the
    order of its oldest one, that oldest message's id. `high_water` is every chat of the user
    in the same snapshot with its newest message id ("0" if none): fan-out of such a chat, or of
    a message at or below that id, is either in this backlog or was delivered to the user before
    this binding, so a binding drops it (`Connection`), and the binding reads each chat's
    undelivered messages only up to that id.
    """

    chats: tuple[Chat, ...]
    message_chats: tuple[tuple[str, str], ...]
    high_water: Mapping[str, str] = attrs.field(factory=dict)

    @classmethod
    def of(
        cls,
        chats: Iterable[Chat],
        oldest_undelivered: Iterable[tuple[object, object]],
        newest_per_chat: Iterable[tuple[object, object]],
    ) -> BacklogPlan:
        """Build a plan from a backend's three snapshot queries (shared by every backend)."""
        return cls(
            tuple(chats),
            tuple((str(chat_id), str(oldest)) for chat_id, oldest in oldest_undelivered),
            {str(chat_id): str(newest) for chat_id, newest in newest_per_chat},
        )

    @property
    def chat_ids(self) -> frozenset[str]:
        return frozenset(chat.chat_id for chat in self.chats)


@attrs.frozen
class Backlog:
    """A whole backlog in memory: for tests and tools, not for serving clients."""

    chats: tuple[Chat, ...]
    messages: tuple[tuple[str, tuple[Message, ...]], ...]
    high_water: Mapping[str, str] = attrs.field(factory=dict)

    @property
    def message_ids(self) -> frozenset[str]:
        return frozenset(m.message_id for _, batch in self.messages for m in batch)

    @property
    def chat_ids(self) -> frozenset[str]:
        return frozenset(chat.chat_id for chat in self.chats)


class BacklogReader(Protocol):
    """The two reads `read_backlog` is made of (every `Store` has them)."""

    async def backlog_plan(self, user_id: str) -> BacklogPlan: ...

    async def undelivered(
        self, user_id: str, chat_id: str, from_id: str, up_to_id: str
    ) -> tuple[Message, ...]: ...


async def read_backlog(store: BacklogReader, user_id: str) -> Backlog:
    """The plan and every chat's undelivered messages (the backends' `backlog`)."""
    plan = await store.backlog_plan(user_id)
    messages = []
    for chat_id, oldest in plan.message_chats:
        batch = await store.undelivered(user_id, chat_id, oldest, plan.high_water[chat_id])
        if batch:
            messages.append((chat_id, batch))
    return Backlog(plan.chats, tuple(messages), plan.high_water)


class Store(Protocol):
    """Persistent chats, messages and delivery state. All methods are safe to call concurrently."""

    async def open(self, nursery: trio.Nursery, commits: CommitSender | None = None) -> None:
        """Connect, run migrations, start background writers in `nursery`. Call once.

        The caller owns the nursery (structured concurrency: no hidden tasks); `aclose()` must
        be awaited before that nursery exits. Commits are handed to `commits` (see the module
        docstring); the store owns it from here and closes it once its writer has stopped.
        If `open` raises, `commits` is left open, so the caller may try again with it.
        """

    async def aclose(self) -> None:
        """Flush pending writes, stop the background tasks, release every connection."""

    async def flush(self) -> None:
        """Return once every write queued before this call is committed (delivery marks too).

        A binding calls it before reading the backlog, so what was just delivered to another
        connection of the user is not offered again. Raises `StoreUnavailable` when a delivery
        mark queued before it could not be recorded, so the caller can keep it for a retry.
        """

    async def check(self) -> None:
        """Raise `StoreUnavailable` when the backend does not answer (health check)."""

    async def create_chat(
        self, creator_id: str, recipient_id: str, origin: Origin = NO_ORIGIN
    ) -> tuple[Chat, bool]:
        """Create the 1:1 chat of the pair or find it; `True` when it was created now.

        The creator's copy counts as delivered, the recipient's does not. A new chat is handed
        to `commits` with `origin`.
        """

    async def get_chat(self, chat_id: str) -> Chat | None:
        """The chat with this id, or None."""

    async def add_message(
        self,
        chat: Chat,
        sender_id: str,
        content: str,
        client_message_id: str | None,
        origin: Origin = NO_ORIGIN,
    ) -> tuple[Message, bool]:
        """Store a message durably; `True` when new, `False` for an idempotent resend.

        A new message is handed to `commits` with `origin`, in commit order, before this
        returns.
        """

    async def chats_of(self, user_id: str) -> list[Chat]:
        """Every chat of the user, most recently active (created or written to) first."""

    async def messages_before(
        self, chat_id: str, before_id: str | None, limit: int
    ) -> tuple[tuple[Message, ...], bool] | None:
        """A page of messages older than `before_id` (or the newest), oldest first, with
        `has_more`; None when `before_id` is not a message of this chat."""

    async def backlog_plan(self, user_id: str) -> BacklogPlan:
        """What is not yet delivered to the user, as one snapshot (see `BacklogPlan`)."""

    async def undelivered(
        self, user_id: str, chat_id: str, from_id: str, up_to_id: str
    ) -> tuple[Message, ...]:
        """The chat's messages to the user not yet delivered, with ids from `from_id` to
        `up_to_id` (both included), oldest first."""

    async def backlog(self, user_id: str) -> Backlog:
        """Everything not yet delivered to the user, whole (tests and tools)."""

    async def mark_delivered(
        self, user_id: str, chat_ids: Sequence[str], message_ids: Sequence[str]
    ) -> None:
        """Record that these chats and messages reached the user (idempotent).

        Returns once the mark is queued (waiting for room, never dropped), not once it is
        committed; it takes effect before any later acknowledged write of this store returns,
        and a failure is reported by the next `flush`.
        """
