"""The hub: which users are connected here, fan-out to their connections, delivery marks.

Theory of operation:
- `users` maps a user id to the connections bound here. The first connection of a user
  subscribes this node to the user's events on the bus; the last one to leave unsubscribes.
  Concurrent binders of the same user wait for that one subscription (`_UserEntry.ready`).
- The bus calls `deliver()` synchronously, in commit order. It encodes each event once per
  variant (the origin connection's acknowledgement carries its `request_id`, everyone else
  shares one text) and pushes it with `push_nowait`: fan-out never waits on a slow socket.
- A frame that carried a `Receipt` is reported back by the writer once the client's TCP stack
  acknowledged it (`transport.acks`); the marks are coalesced and written in batches by
  `run_marks()`, so delivery tracking costs one small write per batch rather than one per
  message.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable

import trio

from handler import protocol
from handler.bus.base import Bus, Delivery
from handler.connection import Connection, Outgoing, Receipt
from handler.errors import CloseCode, ErrorCode, HandlerError, ProtocolError
from handler.metrics import Metrics
from handler.ratelimit import TokenBucket
from handler.store.base import Store

log = logging.getLogger("handler.hub")

MARK_FLUSH_INTERVAL_S = 0.02
IN_FLIGHT_WAIT_S = 2.0
# Receipts the store could not record (e.g. during a database outage) are kept, up to this
# many, and retried this often: a dropped one would offer a delivered item again.
MARK_RETRY_S = 0.5
MAX_KEPT_RECEIPTS = 100_000


DEFAULT_MAX_CONNECTIONS_PER_USER = 10


class ConnectionLimitReached(ProtocolError):
    """The user has as many bound connections on this node as allowed: answered, then 1008."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            ErrorCode.RATE_LIMITED,
            f"too many connections: at most {limit} per user; close one first",
            field="token",
        )


class _UserEntry:
    def __init__(self, rate: float, burst: float) -> None:
        self.connections: dict[str, Connection] = {}
        self.ready = trio.Event()
        self.failed = False
        self.bucket = TokenBucket(rate, burst)


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
    ) -> None:
        self.store = store
        self._max_connections = max_connections_per_user
        self.bus = bus
        self.metrics = metrics
        self._rate = rate_per_s
        self._burst = rate_burst
        self.users: dict[str, _UserEntry] = {}
        self.connections: dict[str, Connection] = {}
        # Receipts of written frames, waiting to be recorded. A plain list rather than a
        # channel: a binding must be able to take *all* of them, including those the periodic
        # writer is about to take.
        self._receipts: list[Receipt] = []
        self._receipts_queued = trio.Event()
        self._marks_stopping = False
        self.closing = False
        self._all_detached = trio.Event()
        self._marks_done = trio.Event()
        self._marks_lock = trio.Lock()
        self._writes_in_flight: collections.Counter[str] = collections.Counter()
        # Receipts per user taken for recording but not yet known to be committed.
        self._unsettled: collections.Counter[str] = collections.Counter()
        self._writes_landed = trio.Event()

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

    async def unregister(self, connection: Connection) -> None:
        """Stop fan-out to the connection; unsubscribe the user if it was the last one."""
        user_id = connection.user_id
        connection.user_id = None
        if user_id is None:
            return
        entry = self.users.get(user_id)
        if entry is None or entry.connections.pop(connection.id, None) is None:
            return
        if not entry.connections:
            del self.users[user_id]
            self.metrics.bound_users.dec()
            if entry.ready.is_set() and not entry.failed:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    try:
                        await self.bus.unsubscribe(user_id)
                    except HandlerError as error:
                        log.warning("unsubscribe of a user failed: %s", error)

    async def register(self, connection: Connection, user_id: str) -> None:
        """Make the connection reachable by fan-out; it starts in binding mode.

        Raises `ConnectionLimitReached` when the user has `max_connections_per_user` here
        already, HandlerError if the bus cannot subscribe; the caller then unregisters it.
        """
        entry = self.users.get(user_id)
        if entry is not None and len(entry.connections) >= self._max_connections:
            raise ConnectionLimitReached(self._max_connections)
        connection.user_id = user_id
        connection.start_binding()
        if entry is None:
            entry = self.users[user_id] = _UserEntry(self._rate, self._burst)
            self.metrics.bound_users.inc()
            entry.connections[connection.id] = connection
            try:
                await self.bus.subscribe(user_id)
            except BaseException:
                entry.failed = True
                raise
            finally:
                entry.ready.set()
        else:
            entry.connections[connection.id] = connection
            await entry.ready.wait()
            if entry.failed:
                raise HandlerError("subscription failed")

    def bucket_for(self, user_id: str) -> TokenBucket | None:
        entry = self.users.get(user_id)
        return None if entry is None else entry.bucket

    def user_connections(self, user_id: str) -> Iterable[Connection]:
        entry = self.users.get(user_id)
        return () if entry is None else entry.connections.values()

    # ------------------------------------------------------------------ fan-out

    def deliver(self, event: Delivery) -> None:
        """The bus sink: push a committed event to every local connection of its recipients."""
        if event.kind == "message":
            self._deliver_message(event)
        else:
            self._deliver_chat(event)

    def _deliver_message(self, event: Delivery) -> None:
        message = event.message
        assert message is not None
        now = trio.current_time()
        plain: str | None = None  # encoded once, shared by every non-origin connection
        for user_id in event.recipients:
            entry = self.users.get(user_id)
            if entry is None:
                continue
            receipt = None
            if user_id == message.recipient_id:
                receipt = Receipt(user_id, message_ids=(message.message_id,))
            for connection in list(entry.connections.values()):
                if connection.id == event.origin_connection:
                    text = protocol.encode(protocol.MessageEvent(message, event.origin_request_id))
                else:
                    plain = plain or protocol.encode(protocol.MessageEvent(message))
                    text = plain
                connection.push_nowait(
                    Outgoing(
                        text,
                        "message",
                        receipt,
                        now,
                        message_id=message.message_id,
                        chat_id=message.chat_id,
                    )
                )

    def _deliver_chat(self, event: Delivery) -> None:
        chat = event.chat
        assert chat is not None
        now = trio.current_time()
        text: str | None = None
        for user_id in event.recipients:
            entry = self.users.get(user_id)
            if entry is None:
                continue
            receipt = Receipt(user_id, chat_ids=(chat.chat_id,))
            for connection in list(entry.connections.values()):
                if connection.id == event.origin_connection:
                    continue  # it already has the chat in its direct reply
                text = text or protocol.encode(protocol.NewChats((chat,)))
                connection.push_nowait(
                    Outgoing(text, "new_chats", receipt, now, chat_id=chat.chat_id)
                )

    def resync(self, user_ids: tuple[str, ...]) -> None:
        """The bus may have lost events for these users: make their connections rebind.

        Rebinding is the one path that is already exactly-once (subscribe, then read the
        backlog, then replay), so repair reuses it: each connection is closed with 1013 and
        its client reconnects and receives what it missed as backlog.
        """
        for user_id in user_ids:
            for connection in list(self.user_connections(user_id)):
                log.warning("resync conn=%s user=%s: closing so it rebinds", connection.id, user_id)
                connection.close(CloseCode.TRY_AGAIN_LATER, "missed events; reconnect")

    def drop_slow(self, connection: Connection) -> None:
        """Slow-consumer policy: count it; the connection closes itself with 1013."""
        self.metrics.slow_consumers.inc()
        log.warning("dropping slow consumer conn=%s user=%s", connection.id, connection.user_id)

    # ------------------------------------------------------------------ delivery marks

    def sent(self, item: Outgoing) -> None:
        """Called by a writer once `item` is in the socket's send buffer."""
        if item.published_at is not None:
            self.metrics.deliver_latency.observe(trio.current_time() - item.published_at)

    def acknowledged(self, receipt: Receipt) -> None:
        """The frame carrying `receipt` reached the client (its TCP stack acknowledged it)."""
        self._receipts.append(receipt)
        self._unsettled[receipt.user_id] += 1
        self._receipts_queued.set()

    async def run_marks(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Coalesce delivery receipts and write them in batches."""
        task_status.started()
        try:
            await self._write_marks()
        finally:
            self._marks_done.set()

    async def _write_marks(self) -> None:
        while True:
            await self._receipts_queued.wait()
            self._receipts_queued = trio.Event()  # only this loop replaces it
            if not self._marks_stopping:
                await trio.sleep(MARK_FLUSH_INTERVAL_S)  # coalesce a burst into one write
            if not await self._record_queued_receipts():
                await trio.sleep(MARK_RETRY_S)  # the store is failing: try again in a while
                self._receipts_queued.set()
                continue
            if self._marks_stopping:
                return

    async def _record_queued_receipts(self) -> bool:
        """False when the store failed and the receipts were kept for a retry."""
        async with self._marks_lock:  # one batch at a time, in the order they were taken
            receipts, self._receipts = self._receipts, []
            return not receipts or await self._flush_marks(receipts)

    def begin_write(self, user_id: str) -> None:
        """A frame carrying a receipt for `user_id` is written but not yet acknowledged by
        the client, or is being written (see `sync_marks`)."""
        self._writes_in_flight[user_id] += 1

    def end_write(self, user_id: str) -> None:
        self._writes_in_flight[user_id] -= 1
        if not self._writes_in_flight[user_id]:
            del self._writes_in_flight[user_id]
            self._writes_landed.set()
            self._writes_landed = trio.Event()

    async def sync_marks(self, user_id: str) -> None:
        """Commit every receipt of the user's finished writes; a binding calls this before
        its backlog read, so items just written to another connection of the user are not
        offered twice. Writes under way are waited for (bounded: a stuck one is dropped by the
        slow-consumer policy, and its items simply stay undelivered)."""
        with trio.move_on_after(IN_FLIGHT_WAIT_S):
            while self._writes_in_flight.get(user_id):
                await self._writes_landed.wait()
        if self._unsettled.get(user_id):  # else nothing of this user awaits recording
            await self._record_queued_receipts()  # also waits for a batch being recorded now

    async def _flush_marks(self, batch: list[Receipt]) -> bool:
        chats: dict[str, list[str]] = collections.defaultdict(list)
        messages: dict[str, list[str]] = collections.defaultdict(list)
        for receipt in batch:
            chats[receipt.user_id].extend(receipt.chat_ids)
            messages[receipt.user_id].extend(receipt.message_ids)
        users = chats.keys() | messages.keys()
        try:
            for user_id in users:
                await self.store.mark_delivered(user_id, chats[user_id], messages[user_id])
            await self.store.flush()
        except HandlerError as error:
            if not self._marks_stopping and len(batch) + len(self._receipts) <= MAX_KEPT_RECEIPTS:
                # Marks are idempotent: keep them (still unsettled) and try again.
                log.warning("could not record deliveries yet (%d kept): %s", len(batch), error)
                self._receipts[:0] = batch
                return False
            # Not fatal: an unmarked item is offered again on the next binding.
            log.warning("could not record deliveries: %s", error)
        for receipt in batch:
            self._unsettled[receipt.user_id] -= 1
            if not self._unsettled[receipt.user_id]:
                del self._unsettled[receipt.user_id]
        return True

    async def stop_marks(self) -> None:
        """Write the receipts still queued, then stop the mark writer."""
        self._marks_stopping = True
        self._receipts_queued.set()
        await self._marks_done.wait()

    # ------------------------------------------------------------------ shutdown

    async def close_all(self, code: CloseCode, grace_s: float) -> None:
        """Ask every connection to close with `code` and wait (bounded) for them to go."""
        self.closing = True
        for connection in list(self.connections.values()):
            connection.close(code, "server shutting down")
        if self.connections:
            with trio.move_on_after(grace_s):
                await self._all_detached.wait()
