"""The pub/sub contract: route a committed event to every node that serves its users.

The bus carries *notifications*; the store stays the source of truth. A backend must:

- deliver each published event to the sink of every node that has subscribed to one of its
  `recipients`, including the publishing node itself;
- preserve publish order per recipient user;
- make `subscribe` return only once events published afterwards will reach this node (the
  binding race depends on it: subscribe, then read the backlog);
- make `settle(user)` return only once every other node serving the user has committed the
  delivery marks it holds for that user (`on_settle`), and leave a user (`unsubscribe`) only
  after committing its own: a binding settles before reading the backlog, so what another
  node has just written to the user is not offered again;
- never block the publisher: `publish_nowait` queues or delivers synchronously;
- make `disconnect(user)` reach every other node serving the user, each of which closes the
  user's connections there (`on_disconnect`) and reports how many, and return their total
  (bounded wait: a node that does not answer in time is not counted).

A copy delivered from another node may be narrowed: `recipients` is then just the user whose
channel carried it, and `origin_connection` is None (the origin lives on the publishing node,
which delivered to it directly).

A backend that can lose events (Redis pub/sub is at-most-once) must repair the loss, e.g. with
a gap check against the store, since the protocol promises exactly-once delivery per binding.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Literal, Protocol

import attrs
import trio

from handler.protocol import (
    BlockChange,
    Chat,
    GroupChange,
    Message,
    ReceiptFrame,
    RequestId,
    TypingEvent,
)


@attrs.define  # not frozen: one per commit on the hot path (messages, receipts); never changed
class Delivery:
    """A committed event to push to the open connections of `recipients`: a new chat, a new
    message, a changed message (`update`), a moved mark (`receipt`), a change of a
    group's members (`members`: `group`), a block or unblock (`block`), or a live signal
    that is never stored (`typing`: at most once, so never repaired when lost).

    `origin_connection` is the connection whose frame caused it; it receives the event with
    `origin_request_id` (its acknowledgement) instead of the plain copy.
    """

    kind: Literal["message", "update", "receipt", "chat", "members", "block", "typing"]
    recipients: tuple[str, ...]
    message: Message | None = None
    chat: Chat | None = None
    receipt: ReceiptFrame | None = None
    group: GroupChange | None = None
    block: BlockChange | None = None
    typing: TypingEvent | None = None
    origin_connection: str | None = None
    origin_request_id: RequestId | None = None
    # Recipients who take part in the chat's order but are not told (a group member who
    # joined after the changed message): they see its position, not its content.
    hidden: tuple[str, ...] = ()

    @property
    def position(self) -> str | None:
        """A message's or an update's place in its chat's order of changes (its version);
        a receiving node puts events from several publishers back in that order per chat."""
        message = self.message
        return None if message is None else str(message.version)

    @property
    def previous(self) -> str | None:
        """The position of the chat's change just before this one ("0": none)."""
        message = self.message
        return None if message is None else str(message.version - 1)


DeliverySink = Callable[[Delivery], None]
# Called with users whose events this node may have missed (e.g. after a reconnect to the
# pub/sub server); the hub repairs it through the store.
ResyncHook = Callable[[tuple[str, ...]], None]
# Commits the delivery marks this node holds for a user (the hub's `sync_marks`); awaited when
# another node binds the user, and before this node leaves the user.
SettleHook = Callable[[str], Awaitable[None]]
# Closes every connection of a user on this node (with 1008) and says how many it closed;
# called when another node is asked to disconnect the user (the HTTP API's disconnect).
DisconnectHook = Callable[[str], int]


class Bus(Protocol):
    async def run(
        self,
        sink: DeliverySink,
        *,
        on_resync: ResyncHook | None = None,
        on_settle: SettleHook | None = None,
        on_disconnect: DisconnectHook | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run until cancelled, calling `sink` (synchronously) for every event for this node,
        `on_resync` for users whose events may have been lost, `on_settle` when another
        node binds one of this node's users, and `on_disconnect` when another node
        disconnects one of them."""

    async def subscribe(self, user_id: str) -> None:
        """Start routing the user's events to this node; returns once that is in effect."""

    async def unsubscribe(self, user_id: str) -> None:
        """Stop routing the user's events to this node (after `on_settle(user_id)`)."""

    async def settle(self, user_id: str) -> None:
        """Return once the other nodes serving the user have committed their delivery marks
        for it (bounded wait: a node that does not answer is not waited for forever)."""

    async def disconnect(self, user_id: str) -> int:
        """Have every other node serving the user close its connections of the user; how many
        they closed, as reported within a bounded wait (this node's own are the caller's).

        Raises `BusUnavailable` when the other nodes cannot be reached."""

    def read_at(self, user_id: str, versions: Mapping[str, int]) -> None:
        """A binding of the user (subscribed here) read these chats at these versions: order
        the chats' later changes after them."""

    def publish_nowait(self, event: Delivery) -> None:
        """Send an event to its recipients' nodes without blocking; order kept per user."""

    async def check(self) -> None:
        """Raise `BusUnavailable` when the backend does not answer (health check)."""
