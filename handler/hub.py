"""The hub: which users are connected here, their nurseries, and fan-out to their connections.

Theory of operation (the task tree is drawn in docs/design.md):
- `run()` owns the hub's nursery: the publisher task, and one task per connected user. A
  user's task owns the nursery its connections' writers run in, so closing a user (bus
  resync, the HTTP API's disconnect) is one cancel of that nursery.
- `users` maps a user id to the endpoints (connection drivers) bound here. The first one
  subscribes this node to the user's events on the bus; the last one to leave unsubscribes.
  Concurrent binders of the same user wait for that one subscription (`_UserEntry.ready`).
- The store hands every commit to the publisher (a bounded channel, in commit order); the
  publisher turns it into a bus `Delivery`. The bus calls `deliver()` synchronously, in
  order, for this node's recipients. It encodes each event once per variant (the origin
  connection's acknowledgement carries its `request_id`, everyone else shares one text) and
  hands it to each endpoint with `deliver_nowait`: fan-out never waits on a slow socket.
- A fault while fanning out is logged with a correlation id and contained: the message stays
  stored (and its sender acknowledged where the fan-out got that far); the connections that
  may have missed it are closed with 1013, and rebinding delivers it from the store.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterable
from typing import Final, Protocol

import attrs
import trio

from handler import protocol
from handler.bus.base import Bus, Delivery
from handler.connection import Connection, Outgoing, Receipt
from handler.delivery_marks import DeliveryMarks
from handler.errors import CloseCode, ConnectionLimitReached, HandlerError
from handler.metrics import Metrics
from handler.presence.link import LocalPresenceLink, PresenceLink
from handler.presence.service import Presence
from handler.ratelimit import TokenBucket
from handler.relations import Relations
from handler.session.outgoing import TYPING, SeqMark
from handler.store.base import Committed, Store
from handler.store.blocks import refused_in_chat
from handler.transport.acks import AckWatch

__all__ = ["ConnectionLimitReached", "Endpoint", "Hub"]

log = logging.getLogger("handler.hub")

DEFAULT_MAX_CONNECTIONS_PER_USER: Final = 10
# Commits the store may hand over before its writer waits for the publisher: two full batches.
COMMIT_QUEUE: Final = 1024
UNSUBSCRIBE_TIMEOUT_S: Final = 5.0


class Endpoint(Protocol):
    """What the hub needs of a bound connection (its driver)."""

    @property
    def connection(self) -> Connection: ...

    def deliver_nowait(self, item: Outgoing) -> None:
        """Hand a fan-out item to the connection's session; never waits."""


class _UserEntry:
    __slots__ = ("bucket", "closing", "endpoints", "failed", "left", "nursery", "opened", "ready")

    def __init__(self, rate: float, burst: float) -> None:
        self.endpoints: dict[str, Endpoint] = {}
        self.ready = trio.Event()  # the bus subscription is settled (`failed` says how)
        self.failed = False
        self.bucket = TokenBucket(rate, burst)
        self.nursery: trio.Nursery | None = None  # the writers of the user's connections
        self.opened = trio.Event()  # `nursery` is set
        self.left = trio.Event()  # the last endpoint left: the user's task may end
        self.closing = False


class Hub:
    def __init__(
        self,
        store: Store,
        bus: Bus,
        metrics: Metrics,
        *,
        rate_per_s: float,
        rate_burst: float,
        max_connections_per_user: int = DEFAULT_MAX_CONNECTIONS_PER_USER,
        presence_link: PresenceLink | None = None,
        presence: bool = True,
        presence_grace_s: float = 5.0,
    ) -> None:
        self.bus = bus
        self.relations = Relations(store, with_contacts=presence)
        self.presence = Presence(
            store,
            presence_link or LocalPresenceLink(),
            self.relations,
            self.push_to_user,
            grace_s=presence_grace_s,
            enabled=presence,
        )
        self.metrics = metrics
        self.marks = DeliveryMarks(store)
        self.acks = AckWatch()
        self._max_connections = max_connections_per_user
        self._rate = rate_per_s
        self._burst = rate_burst
        # Called with a group whose members changed (None: everything may have changed), so
        # the process's chat cache drops it (`ChatCache.forget_group`).
        self.on_group_changed: Callable[[str | None], None] = lambda chat_id: None
        self.users: dict[str, _UserEntry] = {}
        self.connections: dict[str, Connection] = {}
        self.closing = False
        self._all_detached = trio.Event()
        self._nursery: trio.Nursery | None = None

    # ------------------------------------------------------------------ tasks

    async def run(
        self,
        commits: trio.MemoryReceiveChannel[Committed],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Own the users' tasks and the publisher until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._publish, commits)
            await nursery.start(self.presence.run)
            task_status.started()
            await trio.sleep_forever()

    async def _run_user(self, entry: _UserEntry) -> None:
        """The user's task: its nursery holds the writers of the user's connections, and lives
        until the last of them left (or the user is closed: one cancel)."""
        async with trio.open_nursery() as nursery:
            entry.nursery = nursery
            entry.opened.set()
            await entry.left.wait()

    async def _publish(self, commits: trio.MemoryReceiveChannel[Committed]) -> None:
        """Drain the store's commits, in commit order, into the bus.

        Everything already queued is taken without a checkpoint per item: a batch of commits
        is fanned out in one go, as it was committed, not one item per scheduler round.
        """
        async with commits:
            async for first in commits:
                self._publish_one(first)
                while True:
                    try:
                        committed = commits.receive_nowait()
                    except trio.WouldBlock:
                        break
                    except trio.EndOfChannel:
                        return
                    self._publish_one(committed)

    def _publish_one(self, committed: Committed) -> None:
        delivery = _delivery(committed)
        try:
            self.bus.publish_nowait(delivery)
        except Exception as error:  # one fault must not stop every later fan-out
            self._fan_out_failed(error, delivery.recipients, "publish")

    # ------------------------------------------------------------------ registry

    def attach(self, connection: Connection) -> None:
        self.connections[connection.id] = connection
        self.metrics.connections.inc()

    async def detach(self, connection: Connection) -> None:
        """Forget a closed connection."""
        if self.connections.pop(connection.id, None) is not None:
            self.metrics.connections.dec()
            if not self.connections:
                self._all_detached.set()
                self._all_detached = trio.Event()
        await self.unregister(connection)

    async def register(self, endpoint: Endpoint, user_id: str) -> _UserEntry:
        """Make the endpoint reachable by the user's fan-out; return the user's entry (its
        `nursery` is where the connection's writer moves, its `bucket` the user's limiter).

        Raises `ConnectionLimitReached` when the user has `max_connections_per_user` here
        already, HandlerError if the bus cannot subscribe; the caller then unregisters.
        """
        entry = self.users.get(user_id)
        while entry is not None and entry.closing:
            await entry.left.wait()  # the user is being closed: start afresh once it is
            entry = self.users.get(user_id)
        if entry is not None and len(entry.endpoints) >= self._max_connections:
            raise ConnectionLimitReached(self._max_connections)
        connection = endpoint.connection
        connection.user_id = user_id
        if entry is None:
            assert self._nursery is not None, "Hub.run() is not running"
            entry = self.users[user_id] = _UserEntry(self._rate, self._burst)
            self.metrics.bound_users.inc()
            entry.endpoints[connection.id] = endpoint
            try:
                # `start_soon`, not `start`: the task opens its nursery while the bus
                # subscribes (`nursery_of` waits for it): no start handshake per connection.
                self._nursery.start_soon(self._run_user, entry)
                await self.bus.subscribe(user_id)
            except BaseException:
                entry.failed = True
                raise
            finally:
                entry.ready.set()
            self.relations.bind(user_id, self._nursery)
            self.presence.connected(user_id)
        else:
            entry.endpoints[connection.id] = endpoint
            await entry.ready.wait()
            if entry.failed:
                raise HandlerError("subscription failed")
        return entry

    async def unregister(self, connection: Connection) -> None:
        """Stop fan-out to the connection; unsubscribe the user if it was the last one."""
        user_id = connection.user_id
        connection.user_id = None
        if user_id is None:
            return
        entry = self.users.get(user_id)
        if entry is None or entry.endpoints.pop(connection.id, None) is None:
            return
        if entry.endpoints:
            return
        del self.users[user_id]
        self.metrics.bound_users.dec()
        entry.left.set()
        self.presence.disconnected(user_id)
        self.relations.forget(user_id)
        if entry.ready.is_set() and not entry.failed:
            with trio.CancelScope(shield=True), trio.move_on_after(UNSUBSCRIBE_TIMEOUT_S):
                try:
                    await self.bus.unsubscribe(user_id)
                except HandlerError as error:
                    log.warning("unsubscribe of a user failed: %s", error)

    @staticmethod
    async def nursery_of(entry: _UserEntry) -> trio.Nursery:
        """The nursery of a registered user's connections' writers (see `register`)."""
        if entry.nursery is None:
            await entry.opened.wait()
        assert entry.nursery is not None
        return entry.nursery

    def push_to_user(self, user_id: str, item: Outgoing) -> None:
        """A live notification (presence) to every open connection of a user bound here."""
        entry = self.users.get(user_id)
        if entry is not None:
            for endpoint in list(entry.endpoints.values()):
                self._hand(endpoint, item)

    async def typing(
        self, user_id: str, chat: protocol.Chat, active: bool, *, forward: bool = True
    ) -> None:
        """Tell the chat's other participants, on every node, that the user types (or
        stopped); never stored. A block hides it: refused in a direct chat (`forbidden`),
        left out per member in a group. With `forward` False it is only checked."""
        relations = await self.relations.ready(user_id)
        if (
            relations is not None
            and not chat.is_group
            and any(relations.apart(other) for other in chat.participants)
        ):
            raise refused_in_chat()
        if forward:
            self._signal_typing(user_id, chat, active)

    def stop_typing(self, user_id: str, chat: protocol.Chat) -> None:
        self._signal_typing(user_id, chat, False)

    def _signal_typing(self, user_id: str, chat: protocol.Chat, active: bool) -> None:
        relations = self.relations.get(user_id)
        others = tuple(
            user
            for user in chat.participants
            if user != user_id and (relations is None or not relations.apart(user))
        )
        if others:
            signal = protocol.TypingEvent(chat.chat_id, user_id, active)
            self.bus.publish_nowait(Delivery("typing", others, typing=signal))

    def user_connections(self, user_id: str) -> Iterable[Connection]:
        entry = self.users.get(user_id)
        return () if entry is None else [e.connection for e in entry.endpoints.values()]

    async def disconnect(self, user_id: str) -> int:
        """Close every connection of the user, on every node, with 1008; how many: those
        closed here plus those the other nodes reported within the bus's bounded wait.

        Raises `BusUnavailable` when the other nodes could not be asked (this node's
        connections are closed then all the same)."""
        closed = self.disconnect_here(user_id)
        return closed + await self.bus.disconnect(user_id)

    def disconnect_here(self, user_id: str) -> int:
        """This node's part of `disconnect` (the bus's `on_disconnect`)."""
        closed = self.close_user(user_id, CloseCode.POLICY_VIOLATION, "disconnected by the server")
        if closed:
            log.info("disconnect user=%s: closed %d connections here", user_id, closed)
        return closed

    def close_user(self, user_id: str, code: CloseCode, reason: str) -> int:
        """Close every connection of the user here: one cancel of the user's nursery (each
        connection keeps `code`, the first close request it got). Returns how many were not
        closing already."""
        entry = self.users.get(user_id)
        if entry is None:
            return 0
        entry.closing = True
        closed = 0
        for endpoint in list(entry.endpoints.values()):
            connection = endpoint.connection
            if connection.close_code is None:
                closed += 1
                connection.close_code, connection.close_reason = code, reason
            if entry.nursery is None or connection.writer.nursery is not entry.nursery:
                connection.close(code, reason)  # still binding: its writer has not moved yet
        if entry.nursery is not None:
            entry.nursery.cancel_scope.cancel()
        return closed

    # ------------------------------------------------------------------ fan-out

    def deliver(self, event: Delivery) -> None:
        """The bus sink: push a committed event to every local connection of its recipients."""
        try:
            kind = event.kind
            if kind == "message":
                self._deliver_message(event)
            elif kind == "receipt":
                self._deliver_receipt(event)
            elif kind == "update":
                self._deliver_update(event)
            elif kind == "typing":
                self._deliver_typing(event)
            elif kind == "members":
                self._deliver_members(event)
            elif kind == "block":
                self._deliver_block(event)
            else:
                self._deliver_chat(event)
        except Exception as error:
            self._fan_out_failed(error, event.recipients, "deliver")

    def _deliver_message(self, event: Delivery) -> None:
        message = event.message
        assert message is not None
        mark = SeqMark(message.chat_id, message.seq, message.message_id, message.version)
        # The sender's copies deliver nothing: one's own messages are never in one's backlog,
        # and writing moved the sender's marks (the delivered mark follows the other members'
        # messages before it, whose own receipts move it).
        self._deliver_state(
            event, message, protocol.MessageEvent, "message", mark, message.sender_id
        )

    def _deliver_update(self, event: Delivery) -> None:
        message = event.message
        assert message is not None
        mark = SeqMark(message.chat_id, version=message.version)
        self._deliver_state(event, message, protocol.MessageUpdated, "message_updated", mark)

    def _deliver_state(
        self,
        event: Delivery,
        message: protocol.Message,
        frame: type[protocol.MessageEvent] | type[protocol.MessageUpdated],
        frame_type: str,
        mark: SeqMark,
        unmarked: str | None = None,
    ) -> None:
        """A message in its new state to every connection of the recipients, encoded once
        (the origin connection's copy with its `request_id`); each copy's receipt carries
        `mark`, except those of `unmarked`."""
        now = trio.current_time()
        plain: str | None = None  # shared by every non-origin connection
        marks = (mark,)
        hidden = event.hidden
        for user_id in event.recipients:
            entry = self.users.get(user_id)
            if entry is None or (hidden and user_id in hidden):
                continue
            receipt = None if user_id == unmarked else Receipt(user_id, marks=marks)
            for connection_id, endpoint in list(entry.endpoints.items()):
                if connection_id == event.origin_connection:
                    text = protocol.encode(frame(message, event.origin_request_id))
                else:
                    plain = plain or protocol.encode(frame(message))
                    text = plain
                self._hand(
                    endpoint,
                    Outgoing(
                        text,
                        frame_type,
                        receipt,
                        now,
                        message.message_id,
                        message.chat_id,
                        message.version,
                    ),
                )

    def _deliver_receipt(self, event: Delivery) -> None:
        """Receipts are live notifications: never part of a backlog, never covered by one."""
        receipt = event.receipt
        assert receipt is not None
        now = trio.current_time()
        plain: str | None = None
        for user_id in event.recipients:
            entry = self.users.get(user_id)
            if entry is None:
                continue
            for connection_id, endpoint in list(entry.endpoints.items()):
                if connection_id == event.origin_connection:
                    frame = attrs.evolve(receipt, request_id=event.origin_request_id)
                    text = protocol.encode(frame)
                else:
                    plain = plain or protocol.encode(receipt)
                    text = plain
                self._hand(endpoint, Outgoing(text, "receipt", None, now))

    def _deliver_typing(self, event: Delivery) -> None:
        """Typing is the first thing dropped for a client that falls behind (`Connection`)."""
        signal = event.typing
        assert signal is not None
        text: str | None = None
        now = trio.current_time()
        for user_id in event.recipients:
            entry = self.users.get(user_id)
            if entry is None:
                continue
            text = text or protocol.encode(signal)
            for endpoint in list(entry.endpoints.values()):
                self._hand(endpoint, Outgoing(text, TYPING, None, now, None, signal.chat_id))

    def _deliver_block(self, event: Delivery) -> None:
        """Both sides' relations here change; the blocker's connections get the new list
        (the origin's copy answers its request); each side's view of the other's presence
        changes. The blocked user is not told."""
        change = event.block
        assert change is not None
        self.relations.block_changed(change)
        self.presence.block_changed(change, event.recipients)
        entry = self.users.get(change.blocker)
        if entry is None or change.blocker not in event.recipients:
            return
        now = trio.current_time()
        plain: str | None = None
        for connection_id, endpoint in list(entry.endpoints.items()):
            if connection_id == event.origin_connection:
                text = protocol.encode(
                    protocol.BlockedFrame(change.blocks, event.origin_request_id)
                )
            else:
                plain = plain or protocol.encode(protocol.BlockedFrame(change.blocks))
                text = plain
            self._hand(endpoint, Outgoing(text, "blocked", None, now))

    def _deliver_chat(self, event: Delivery) -> None:
        chat = event.chat
        assert chat is not None
        self.relations.chat_created(chat, event.recipients)
        now = trio.current_time()
        text: str | None = None  # a new chat's object is the same for every participant
        for user_id in event.recipients:
            entry = self.users.get(user_id)
            if entry is None:
                continue
            receipt = Receipt(user_id, chat_ids=(chat.chat_id,))
            for connection_id, endpoint in list(entry.endpoints.items()):
                if connection_id == event.origin_connection:
                    continue  # it already has the chat in its direct reply
                text = text or protocol.encode(protocol.NewChats((protocol.ChatView.fresh(chat),)))
                self._hand(
                    endpoint, Outgoing(text, "new_chats", receipt, now, None, chat.chat_id, 0)
                )

    def _deliver_members(self, event: Delivery) -> None:
        """A group's members changed: the added get the chat as a new chat, everyone else
        who was or is a member `chat_updated` (the origin connection's copy with its
        `request_id`). Each user's copy is their own chat object (unread count)."""
        change = event.group
        assert change is not None
        assert self._nursery is not None
        self.on_group_changed(change.view.chat_id)
        self.relations.members_changed(change, event.recipients, self._nursery)
        chat_id = change.view.chat_id
        now = trio.current_time()
        added = set(change.added)
        for user_id in event.recipients:
            entry = self.users.get(user_id)
            if entry is None:
                continue
            view = change.view_for(user_id)
            if user_id in added:
                receipt = Receipt(user_id, chat_ids=(chat_id,))
                text = protocol.encode(protocol.NewChats((view,)))
                for endpoint in list(entry.endpoints.values()):
                    # No version: a join is not ordered among the chat's changes (the user
                    # may have had the chat before, when the snapshot was taken).
                    self._hand(endpoint, Outgoing(text, "new_chats", receipt, now, None, chat_id))
                continue
            plain: str | None = None
            for connection_id, endpoint in list(entry.endpoints.items()):
                if connection_id == event.origin_connection:
                    text = protocol.encode(protocol.ChatUpdated(view, event.origin_request_id))
                else:
                    plain = plain or protocol.encode(protocol.ChatUpdated(view))
                    text = plain
                self._hand(endpoint, Outgoing(text, "chat_updated", None, now, None, chat_id))

    def _hand(self, endpoint: Endpoint, item: Outgoing) -> None:
        """One connection's fault closes that connection only (it rebinds from the store)."""
        try:
            endpoint.deliver_nowait(item)
        except Exception as error:
            correlation_id = secrets.token_hex(6)
            log.exception(
                "fan-out to conn=%s failed correlation=%s: closing it so it rebinds",
                endpoint.connection.id,
                correlation_id,
                exc_info=error,
            )
            endpoint.connection.close(CloseCode.TRY_AGAIN_LATER, "missed events; reconnect")

    def _fan_out_failed(self, error: Exception, users: Iterable[str], stage: str) -> None:
        correlation_id = secrets.token_hex(6)
        log.error(
            "fan-out %s failed correlation=%s: %r; the event is stored, its recipients here rebind",
            stage,
            correlation_id,
            error,
            exc_info=error,
        )
        self.resync(tuple(users))

    def resync(self, user_ids: tuple[str, ...]) -> None:
        """The bus may have lost events for these users: make their connections rebind.

        Rebinding is the one path that is already exactly-once (subscribe, then read the
        backlog, then replay), so repair reuses it: the user is closed with 1013 and its
        clients reconnect and receive what they missed as backlog.
        """
        self.on_group_changed(None)
        for user_id in user_ids:
            if user_id in self.users:
                log.warning("resync user=%s: closing its connections so they rebind", user_id)
                self.close_user(user_id, CloseCode.TRY_AGAIN_LATER, "missed events; reconnect")

    def drop_slow(self, connection: Connection) -> None:
        """Slow-consumer policy: count it; the connection closes itself with 1013."""
        self.metrics.slow_consumers.inc()
        log.warning("dropping slow consumer conn=%s user=%s", connection.id, connection.user_id)

    def sent(self, item: Outgoing) -> None:
        """Called by a writer once `item` is in the socket's send buffer."""
        if item.published_at is not None:
            self.metrics.deliver_latency.observe(trio.current_time() - item.published_at)

    # ------------------------------------------------------------------ shutdown

    async def close_all(self, code: CloseCode, grace_s: float) -> None:
        """Ask every connection to close with `code` and wait (bounded) for them to go."""
        self.closing = True
        for connection in list(self.connections.values()):
            connection.close(code, "server shutting down")
        if self.connections:
            with trio.move_on_after(grace_s):
                await self._all_detached.wait()


def _delivery(committed: Committed) -> Delivery:
    """The bus event for a commit, with its recipients: the author last."""
    origin = committed.origin
    chat = committed.chat
    message = committed.message
    receipt = committed.receipt
    if message is not None:
        sender = message.sender_id
        # In a group, a change reaches only the members who had the message; the others
        # still see its place in the chat's order (`hidden`), so their chain has no gap.
        audience = committed.audience
        hidden = (
            () if audience is None else tuple(u for u in chat.participants if u not in audience)
        )
        return Delivery(
            "update" if committed.update else "message",
            recipients=(*(user for user in chat.participants if user != sender), sender),
            message=message,
            origin_connection=origin.connection_id,
            origin_request_id=origin.request_id,
            hidden=hidden,
        )
    block = committed.block
    if block is not None:
        return Delivery(
            "block",
            recipients=(block.blocked, block.blocker),
            block=block,
            origin_connection=origin.connection_id,
            origin_request_id=origin.request_id,
        )
    group = committed.group
    if group is not None:
        return Delivery(
            "members",
            recipients=(*group.added, *group.kept, *group.removed),
            group=group,
            origin_connection=origin.connection_id,
            origin_request_id=origin.request_id,
        )
    if receipt is not None:
        reader = receipt.user_id
        if committed.audience is not None:  # a group's: the writer named whom it concerns
            return Delivery(
                "receipt",
                recipients=committed.audience,
                receipt=receipt,
                origin_connection=origin.connection_id,
                origin_request_id=origin.request_id,
            )
        others = tuple(user for user in chat.participants if user != reader)
        # A read mark clears the reader's badge on their other devices too; a delivered mark
        # only tells the others.
        return Delivery(
            "receipt",
            recipients=(*others, reader) if receipt.kind == "read" else others,
            receipt=receipt,
            origin_connection=origin.connection_id,
            origin_request_id=origin.request_id,
        )
    creator = chat.created_by
    return Delivery(
        "chat",
        recipients=(*(user for user in chat.participants if user != creator), creator),
        chat=chat,
        origin_connection=origin.connection_id,
    )
