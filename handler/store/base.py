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
  that grow in commit order per chat, and so does `seq` (1, 2, 3, ... without gaps). Every
  new message and every edit or delete takes the chat's next `version`.
- `(sender_id, chat_id, client_message_id)` is unique: a resend returns the stored message
  with `created=False`.
- Delivery state is per member and chat: marks (delivered and read seq, the version of the
  changes received), never a flag per message; they only move up. A chat is undelivered to a
  member until `mark_delivered` names it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import attrs
import trio

from handler.protocol import (
    BlockChange,
    Chat,
    ChatView,
    GroupChange,
    Message,
    ReceiptFrame,
    RequestId,
)
from handler.session.outgoing import SeqMark


@attrs.define  # not frozen: one per message on the hot path; never changed
class Origin:
    """Who caused a write; the store hands it back untouched with the commit, so the fan-out
    can send the origin connection its acknowledgement (with its `request_id`)."""

    connection_id: str | None = None
    request_id: RequestId | None = None


NO_ORIGIN = Origin()
NO_CHAT = Chat("", (), "", "")  # the chat of a commit that concerns no chat (a block)


@attrs.define  # not frozen: one per message on the hot path; never changed
class Committed:
    """A committed write to fan out, in commit order. One of:

    - a new chat: `message` and `receipt` are None;
    - a new message: `message`;
    - a changed message (edit or delete): `message` in its new state, `update` True;
    - a moved mark: `receipt` (its `request_id` unset: the origin's copy gets it);
    - a change of a group's members: `group`;
    - a block or an unblock: `block` (its `chat` is `NO_CHAT`).

    `chat.participants` are the members when it committed. `audience`, when set, narrows who
    is told (in a group: a change only reaches the members who had the message, a receipt
    the members it concerns). A group's receipt is told to its `audience` alone, so its
    chat's participants are not loaded for it (they may be empty or as the caller knew them).
    """

    chat: Chat
    origin: Origin = NO_ORIGIN
    message: Message | None = None
    update: bool = False
    receipt: ReceiptFrame | None = None
    group: GroupChange | None = None
    audience: tuple[str, ...] | None = None
    block: BlockChange | None = None

    @classmethod
    def of_block(cls, block: BlockChange, origin: Origin) -> Committed:
        """A block or unblock: it concerns two users, not a chat."""
        return cls(NO_CHAT, origin, block=block)


CommitSender = trio.MemorySendChannel[Committed]

HighWater = tuple[int, int]
"""A chat's newest `seq` and `version` in a backlog snapshot."""


@attrs.frozen
class BacklogPlan:
    """What a user has not yet received, without the messages themselves: a binding reads
    them chat by chat (`Store.undelivered`, `Store.updated`) as the client takes them, so a
    large backlog is never held whole in memory.

    - `chats`: the chats not yet delivered, oldest first, as chat objects for the user;
    - `message_chats`: `(chat_id, delivered_seq)` for each chat whose other members wrote
      since the user's delivered mark, in the order of its oldest such message;
    - `update_chats`: `(chat_id, version_mark, delivered_seq)` for each chat with messages the
      user had already received that changed since the user's `version_mark`;
    - `high_water`: every chat of the user in the same snapshot, with its newest seq and
      version. The binding reads only up to them; fan-out at or below them is either in this
      backlog or reached the user before, so a binding drops it.
    """

    chats: tuple[ChatView, ...]
    message_chats: tuple[tuple[str, int], ...]
    update_chats: tuple[tuple[str, int, int], ...] = ()
    high_water: Mapping[str, HighWater] = attrs.field(factory=dict)

    @property
    def chat_ids(self) -> frozenset[str]:
        return frozenset(chat.chat_id for chat in self.chats)


@attrs.frozen
class Backlog:
    """A whole backlog in memory: for tests and tools, not for serving clients."""

    chats: tuple[ChatView, ...]
    messages: tuple[tuple[str, tuple[Message, ...]], ...]
    updates: tuple[tuple[str, tuple[Message, ...]], ...] = ()
    high_water: Mapping[str, HighWater] = attrs.field(factory=dict)

    @property
    def message_ids(self) -> frozenset[str]:
        return frozenset(m.message_id for _, batch in self.messages for m in batch)

    @property
    def updated_ids(self) -> frozenset[str]:
        return frozenset(m.message_id for _, batch in self.updates for m in batch)

    @property
    def chat_ids(self) -> frozenset[str]:
        return frozenset(chat.chat_id for chat in self.chats)


class BacklogReader(Protocol):
    """The reads `read_backlog` is made of (every `Store` has them)."""

    async def backlog_plan(self, user_id: str) -> BacklogPlan: ...

    async def undelivered(
        self, user_id: str, chat_id: str, after_seq: int, up_to_seq: int
    ) -> tuple[Message, ...]: ...

    async def updated(
        self, user_id: str, chat_id: str, after_version: int, up_to_version: int, up_to_seq: int
    ) -> tuple[Message, ...]: ...


async def read_backlog(store: BacklogReader, user_id: str) -> Backlog:
    """The plan and every chat's undelivered and changed messages (the backends' `backlog`)."""
    plan = await store.backlog_plan(user_id)
    messages = []
    for chat_id, after in plan.message_chats:
        batch = await store.undelivered(user_id, chat_id, after, plan.high_water[chat_id][0])
        if batch:
            messages.append((chat_id, batch))
    updates = []
    for chat_id, after_version, up_to_seq in plan.update_chats:
        batch = await store.updated(
            user_id, chat_id, after_version, plan.high_water[chat_id][1], up_to_seq
        )
        if batch:
            updates.append((chat_id, batch))
    return Backlog(plan.chats, tuple(messages), tuple(updates), plan.high_water)


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

    async def create_group(
        self, creator_id: str, title: str, member_ids: Sequence[str], origin: Origin = NO_ORIGIN
    ) -> Chat:
        """Create a group of the creator and the members (every call creates one). The
        creator's copy counts as delivered, the members' do not. Handed to `commits` as a new
        chat."""

    async def add_members(
        self,
        chat: Chat,
        user_id: str,
        member_ids: Sequence[str],
        max_members: int,
        origin: Origin = NO_ORIGIN,
    ) -> tuple[ChatView, bool]:
        """Add the users who are not members yet to the group; `user_id` (a member) asks.
        New members' marks start at the chat's newest message: they see only what comes
        after. Returns the chat object for `user_id` and whether anyone was added (then it is
        handed to `commits` as a `GroupChange`).

        Raises `ProtocolError`: `forbidden` (`user_id` is not a member), `bad_request` on
        `member_ids` (the group would pass `max_members`). Nothing changes then.
        """

    async def remove_member(
        self, chat: Chat, user_id: str, member_id: str, origin: Origin = NO_ORIGIN
    ) -> ChatView:
        """Remove `member_id` from the group; `user_id` asks (the creator may remove anyone,
        a member themselves). Handed to `commits` as a `GroupChange`; returns the chat object
        for `user_id`.

        Raises `ProtocolError`: `forbidden` (not a member, or not the creator removing someone
        else), `bad_request` on `user_id` (not a member). Nothing changes then.
        """

    async def get_chat(self, chat_id: str) -> Chat | None:
        """The chat with this id (a group's current members), or None."""

    async def chat_view(self, chat_id: str, user_id: str) -> ChatView | None:
        """The chat object of one chat for one of its members (None if not a member)."""

    async def add_message(
        self,
        chat: Chat,
        sender_id: str,
        content: str,
        client_message_id: str | None,
        origin: Origin = NO_ORIGIN,
    ) -> tuple[Message, bool]:
        """Store a message durably; `True` when new, `False` for an idempotent resend.

        A new message takes the chat's next `seq` and `version`, moves the sender's read mark
        up to it, and their delivered mark too unless another member's message above that
        mark has not reached the sender yet (it moves once it has); it is handed to
        `commits` with `origin`, in commit order, before this returns.
        """

    async def edit_message(
        self, chat: Chat, user_id: str, message_id: str, content: str, origin: Origin = NO_ORIGIN
    ) -> Message:
        """Replace the content of the user's own message; it takes the chat's next `version`
        and is handed to `commits` as an update.

        Raises `ProtocolError`: `bad_request` (`message_id` not of this chat, or deleted),
        `forbidden` (not the sender). Nothing changes then.
        """

    async def delete_message(
        self, chat: Chat, user_id: str, message_id: str, origin: Origin = NO_ORIGIN
    ) -> tuple[Message, bool]:
        """Make the user's own message a tombstone; `False` when it already was one (nothing
        is changed or handed over then). Raises `ProtocolError` as `edit_message`."""

    async def mark_read(
        self, chat: Chat, user_id: str, message_id: str, origin: Origin = NO_ORIGIN
    ) -> tuple[ReceiptFrame, bool]:
        """Move the user's read mark (and delivered mark) up to the message; the user's read
        mark as it is now, and `True` when it moved (then it is handed to `commits`).
        Raises `ProtocolError` (`bad_request`) when `message_id` is not of this chat."""

    async def chats_of(self, user_id: str) -> list[ChatView]:
        """Every chat of the user as chat objects for the user, most recently active
        (created or written to) first."""

    async def messages_before(
        self, chat_id: str, before_id: str | None, limit: int, viewer: str | None = None
    ) -> tuple[tuple[Message, ...], bool] | None:
        """A page of messages older than `before_id` (or the newest), oldest first, with
        `has_more`; None when `before_id` is not a message of this chat. With `viewer`, only
        the messages sent after that member joined."""

    async def backlog_plan(self, user_id: str) -> BacklogPlan:
        """What is not yet delivered to the user, as one snapshot (see `BacklogPlan`)."""

    async def undelivered(
        self, user_id: str, chat_id: str, after_seq: int, up_to_seq: int
    ) -> tuple[Message, ...]:
        """The chat's messages of the other members with `after_seq < seq <= up_to_seq`, in
        their current state, by seq."""

    async def updated(
        self, user_id: str, chat_id: str, after_version: int, up_to_version: int, up_to_seq: int
    ) -> tuple[Message, ...]:
        """The chat's messages the user had received (`seq <= up_to_seq`, or the user's own)
        that changed with `after_version < version <= up_to_version`, by seq."""

    async def backlog(self, user_id: str) -> Backlog:
        """Everything not yet delivered to the user, whole (tests and tools)."""

    async def set_block(
        self, blocker: str, blocked: str, on: bool, max_blocked: int, origin: Origin = NO_ORIGIN
    ) -> tuple[tuple[str, ...], bool]:
        """Block (`on`) or unblock; every user the blocker blocks now, sorted, and whether
        that changed (then it is handed to `commits`). While either of a pair blocks the
        other, their chat cannot be created, nor written or edited in (`forbidden`).
        Raises `ProtocolError` (`bad_request`) past `max_blocked`."""

    async def blocks_of(self, user_id: str) -> tuple[str, ...]:
        """Every user the user blocks, sorted."""

    async def block_relations(self, user_id: str) -> tuple[frozenset[str], frozenset[str]]:
        """Whom the user blocks, and who blocks the user."""

    async def contacts_of(self, user_id: str) -> dict[str, int]:
        """Everyone who shares a chat with the user, with how many chats they share."""

    async def relations_of(
        self, user_id: str, *, with_contacts: bool
    ) -> tuple[frozenset[str], frozenset[str], dict[str, int]]:
        """`block_relations`, and `contacts_of` when asked (else empty), in one snapshot."""

    async def recent_contacts(self, user_id: str, limit: int) -> list[tuple[str, int | None]]:
        """The user's contacts with their last-seen time (epoch ms, None if never seen),
        most recent first."""

    async def last_seen_of(self, user_ids: Sequence[str]) -> dict[str, int]:
        """The last-seen times (epoch ms) of those users that have one."""

    async def save_last_seen(self, entries: Sequence[tuple[str, int]]) -> None:
        """Record when users' last connections closed (a time only moves forward)."""

    async def mark_delivered(
        self, user_id: str, chat_ids: Sequence[str], marks: Sequence[SeqMark]
    ) -> None:
        """Record that these chats, and each chat's messages and changes up to its mark,
        reached the user (idempotent: marks only move up). A delivered mark that moves is
        handed to `commits` as a receipt.

        Returns once the mark is queued (waiting for room, never dropped), not once it is
        committed; it takes effect before any later acknowledged write of this store returns,
        and a failure is reported by the next `flush`.
        """
