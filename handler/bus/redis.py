"""Redis bus: pub/sub with one channel per user, so a node receives only its own users' events.

coredis runs on Trio through anyio (no asyncio loop); everything here is plain Trio. This
module owns the connections and the tasks (subscriber, publisher, heartbeat, order expiry);
the parts with a job of their own live beside it:
- `redis_codec`: channel names and payloads (pure);
- `redis_settle`: the settle exchange (delivery marks committed across nodes);
- `redis_losses`: the loss accounting (resync notices owed, resyncs of this node's users);
- `redis_errors`: which coredis failures are handled, and which (cancellation) pass through;
- `order`: the per-chat order gate (pure).

Theory of operation:
- Channels (named in `redis_codec`): one per user, one per node (its heartbeat), and one for
  "resynchronize everyone" notices. `subscribe(user)` sends SUBSCRIBE on the node's one
  subscriber connection and returns once Redis confirmed it.
- `publish_nowait(event)` first calls the sink synchronously when a recipient is bound here (so
  same-node delivery needs no round trip and survives a Redis outage), then queues one compact
  orjson payload for the recipients' channels. One publisher task drains the bounded queue in
  pipelines, so order per user is publish order. Copies that come back from Redis to the node
  that published them are skipped. Remote copies carry no origin connection (it lives on the
  publishing node) and name only the channel's user as recipient.
- Per-chat order across publishers: both the local and the remote copies pass through a
  `ChatOrder` gate, which holds a message event for a user until the chat's previous message
  (`prev_message_id`) has been passed on to that user here. An event whose predecessor does
  not come within `order_hold_s` is released and its user resynchronized (below).
- Redis pub/sub is at-most-once, so every way an event can be lost is turned into a *resync*:
  the bus calls `on_resync(users)` and the hub closes those users' connections here with 1013,
  so they rebind and get what they missed from the store as backlog.
  - the subscriber connection broke (or went silent: a heartbeat published to the node channel
    every `heartbeat_s` must come back within three periods): after reconnecting and
    resubscribing, resync every user bound here;
  - the publisher could not send a batch, or its queue was full: the recipients are remembered
    and, once Redis answers again, sent a resync notice on their channels (or on `{prefix}all`
    when too many were lost), so the nodes serving them resync them.
- Delivery marks across nodes: `settle(user)` asks every other node serving the user to commit
  its marks for the user, and `unsubscribe` commits this node's own first (`redis_settle`).
- `disconnect(user)` asks every node serving the user to close its connections of the user,
  and adds up the counts they answer (`redis_settle`).
- Outage: `subscribe` raises `BusUnavailable` (after waiting briefly for a reconnect);
  `publish_nowait` never raises (events queue, then turn into resync notices); `check` fails;
  the bus reconnects with backoff (0.1 s doubling to 5 s) and never stops on a Redis error.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping, Sequence
from typing import Final

import attrs
import coredis
import orjson
import trio
from coredis.patterns.pubsub import PubSub
from coredis.retry import NoRetryPolicy

from handler.bus import redis_codec
from handler.bus.base import Delivery, DeliverySink, DisconnectHook, ResyncHook, SettleHook
from handler.bus.order import HOLD_S, ChatOrder
from handler.bus.redis_codec import Channels, Outgoing
from handler.bus.redis_errors import reraise_cancellation
from handler.bus.redis_losses import LossLedger, Repair
from handler.bus.redis_settle import SettleExchange
from handler.config import BusConfig
from handler.errors import BusUnavailable

log = logging.getLogger("handler.bus.redis")


_QUEUE_SIZE: Final = 10_000
_MAX_PIPELINE: Final = 512
_SUBSCRIBE_CHUNK: Final = 512
_READY_WAIT_S: Final = 2.0
_COMMAND_TIMEOUT_S: Final = 5.0
_BACKOFF_MIN_S: Final = 0.1
_BACKOFF_MAX_S: Final = 5.0
_HEARTBEAT_S: Final = 2.0


@attrs.define
class RedisBusStatistics:
    """Counters for metrics and tests (Trio naming: `statistics()`)."""

    published: int = 0
    received: int = 0
    dropped: int = 0
    lost_batches: int = 0
    reconnects: int = 0
    resyncs: int = 0
    order_timeouts: int = 0
    settle_timeouts: int = 0
    queued: int = 0
    held: int = 0
    connected: bool = False


_DRAIN_S: Final = 0.01  # a pause of the subscriber's reading that means it is caught up


class _Stale(Exception):
    """The subscriber connection stopped delivering (no heartbeat came back)."""


class RedisBus:
    """The bus for several handler processes; see the module docstring."""

    def __init__(
        self,
        config: BusConfig,
        *,
        prefix: str = "chat:",
        queue_size: int = _QUEUE_SIZE,
        heartbeat_s: float = _HEARTBEAT_S,
        order_hold_s: float = HOLD_S,
    ) -> None:
        self._url = config.url
        self._channels = Channels(prefix)
        self.node_id = secrets.token_hex(8)
        self._node_channel = self._channels.node(self.node_id)
        self._heartbeat_s = heartbeat_s
        self._users: set[str] = set()
        # Bumped by every subscribe: an unsubscribe that waited (for the marks) must not undo
        # a subscribe of the same user that happened meanwhile.
        self._subscriptions: dict[str, int] = {}
        self._sink: DeliverySink | None = None
        self._nursery: trio.Nursery | None = None
        self._client: coredis.Redis[bytes] | None = None
        self._pubsub: PubSub[bytes] | None = None
        self._ready = trio.Event()
        self._send, self._receive = trio.open_memory_channel[Outgoing](queue_size)
        self._settle = SettleExchange(
            self.node_id, self._channels, users=self._users, send_nowait=self._send.send_nowait
        )
        self._losses = LossLedger(self.node_id, self._channels)
        self._order = ChatOrder(hold_s=order_hold_s)
        self._repair = Repair(self._order, self._call_sink)
        self._order_changed = trio.Event()
        self._received = 0  # payloads read from the subscriber connection, ever
        self._stats = RedisBusStatistics()

    def statistics(self) -> RedisBusStatistics:
        stats = attrs.evolve(self._stats)
        stats.resyncs = self._repair.resyncs
        stats.settle_timeouts = self._settle.timeouts
        stats.queued = self._send.statistics().current_buffer_used
        stats.connected = self._pubsub is not None
        stats.held = self._order.held_count
        return stats

    # ------------------------------------------------------------------ lifecycle

    async def run(
        self,
        sink: DeliverySink,
        *,
        on_resync: ResyncHook | None = None,
        on_settle: SettleHook | None = None,
        on_disconnect: DisconnectHook | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Connect, then publish and receive until cancelled.

        `task_status.started()` comes after the first connection attempt; if Redis is down
        then, the bus starts degraded (subscribe and check fail) and keeps reconnecting.
        """
        self._sink = sink
        self._repair.on_resync = on_resync
        self._settle.on_settle = on_settle
        self._settle.on_disconnect = on_disconnect
        try:
            client: coredis.Redis[bytes] = coredis.Redis.from_url(
                self._url,
                retry_policy=NoRetryPolicy(),
                connect_timeout=_COMMAND_TIMEOUT_S,
                stream_timeout=_COMMAND_TIMEOUT_S,
            )
            async with client, trio.open_nursery() as nursery:
                self._client = client
                self._nursery = nursery
                nursery.start_soon(self._publisher, client)
                await nursery.start(self._subscriber, client)
                nursery.start_soon(self._heartbeat, client)
                nursery.start_soon(self._expire_held)
                task_status.started()
        finally:
            self._sink = None
            self._repair.on_resync = None
            self._settle.on_settle = None
            self._settle.on_disconnect = None
            self._nursery = None
            self._client = None
            self._pubsub = None

    # ------------------------------------------------------------------ subscriptions

    async def _wait_ready(self) -> PubSub[bytes]:
        """The live subscriber connection; waits briefly through a reconnect."""
        if self._client is None:
            raise BusUnavailable("the redis bus is not running")
        with trio.move_on_after(_READY_WAIT_S):
            await self._ready.wait()
        if self._pubsub is None:
            raise BusUnavailable("redis is unreachable")
        return self._pubsub

    async def subscribe(self, user_id: str) -> None:
        pubsub = await self._wait_ready()
        self._users.add(user_id)
        self._subscriptions[user_id] = self._subscriptions.get(user_id, 0) + 1
        try:
            with trio.fail_after(_COMMAND_TIMEOUT_S):
                await pubsub.subscribe(self._channels.user(user_id))
        except BaseException as error:
            reraise_cancellation(error)
            self._users.discard(user_id)
            raise BusUnavailable(f"redis subscribe failed: {error!r}") from None

    async def unsubscribe(self, user_id: str) -> None:
        # Marks first: once off the channel, this node no longer hears `settle` requests, so
        # what it wrote to the user must be committed before it leaves.
        subscription = self._subscriptions.get(user_id)
        await self._settle.commit_marks(user_id)
        if self._subscriptions.get(user_id) != subscription:
            return  # subscribed again meanwhile: that subscription stands
        self._subscriptions.pop(user_id, None)
        # Local first: from here on the user's events are ignored even before Redis confirms,
        # and a reconnect will not subscribe it again.
        self._users.discard(user_id)
        self._order.forget(user_id)
        pubsub = self._pubsub
        if pubsub is None:
            return
        try:
            with trio.fail_after(_COMMAND_TIMEOUT_S):
                await pubsub.unsubscribe(self._channels.user(user_id))
        except BaseException as error:
            reraise_cancellation(error)
            # Harmless: the channel is dropped on the next reconnect and ignored until then.
            log.info("redis unsubscribe failed: %r", error)

    def read_at(self, user_id: str, versions: Mapping[str, int]) -> None:
        if user_id in self._users:
            self._order.read_at(user_id, versions)

    # ------------------------------------------------------------------ delivery marks

    async def settle(self, user_id: str) -> None:
        client = self._client
        if client is None:
            return
        await self._settle.request(client.publish, user_id)

    async def disconnect(self, user_id: str) -> int:
        client = self._client
        if client is None:
            raise BusUnavailable("the redis bus is not running")
        return await self._settle.disconnect(client.publish, user_id)

    # ------------------------------------------------------------------ receiving

    async def _subscriber(
        self, client: coredis.Redis[bytes], task_status: trio.TaskStatus[None]
    ) -> None:
        """Keep one subscriber connection alive; after every reconnect, resync everyone."""
        started = False
        connected_before = False
        delay = 0.0
        while True:
            try:
                async with client.pubsub(
                    retry_policy=NoRetryPolicy(),
                    ignore_subscribe_messages=True,
                    subscription_timeout=_COMMAND_TIMEOUT_S,
                ) as pubsub:
                    with trio.fail_after(_COMMAND_TIMEOUT_S * 2):
                        users = await self._subscribe_all(pubsub)
                    self._pubsub = pubsub
                    self._ready.set()
                    delay = 0.0
                    if connected_before:
                        # Whatever was published while we were away is gone from pub/sub.
                        self._repair.resync(users)
                    connected_before = True
                    if not started:
                        task_status.started()
                        started = True
                    await self._consume(pubsub)
            except BaseException as error:
                reraise_cancellation(error)
                log.warning("redis subscriber connection lost: %r", error)
            finally:
                if self._pubsub is not None:
                    self._pubsub = None
                    self._ready = trio.Event()
            if not started:
                log.warning("redis is unreachable; the bus starts degraded and keeps retrying")
                task_status.started()
                started = True
            self._stats.reconnects += 1
            delay = min(max(delay * 2, _BACKOFF_MIN_S), _BACKOFF_MAX_S)
            await trio.sleep(delay)

    async def _subscribe_all(self, pubsub: PubSub[bytes]) -> tuple[str, ...]:
        users = tuple(self._users)
        await pubsub.subscribe(self._node_channel, self._channels.all)
        for start in range(0, len(users), _SUBSCRIBE_CHUNK):
            chunk = users[start : start + _SUBSCRIBE_CHUNK]
            await pubsub.subscribe(*(self._channels.user(user) for user in chunk))
        gone = [user for user in users if user not in self._users]
        if gone:  # unsubscribed while we were resubscribing
            await pubsub.unsubscribe(*(self._channels.user(user) for user in gone))
        return tuple(user for user in users if user in self._users)

    async def _consume(self, pubsub: PubSub[bytes]) -> None:
        silence = self._heartbeat_s * 3
        # One watchdog scope whose deadline every message pushes back (cheaper than a scope
        # per message): if even our own heartbeat stops arriving, the connection is dead.
        with trio.CancelScope(deadline=trio.current_time() + silence) as watchdog:
            while True:
                message = await pubsub.get_message()
                watchdog.deadline = trio.current_time() + silence
                if message is None:
                    continue
                self._received += 1
                if message["type"] != "message":
                    continue
                channel = message["channel"]
                data = message["data"]
                if not isinstance(channel, bytes) or not isinstance(data, bytes):
                    continue
                user_id = self._channels.user_of(channel)
                if user_id is not None:
                    self._receive_for_user(user_id, data)
                elif channel == self._node_channel:
                    self._receive_for_node(data)
                elif channel == self._channels.all and orjson.loads(data).get("o") != self.node_id:
                    self._repair.resync(tuple(self._users))
        raise _Stale(f"no heartbeat for {silence:.1f}s")

    def _receive_for_user(self, user_id: str, data: bytes) -> None:
        try:
            decoded = orjson.loads(data)
            if "d" in decoded:  # our own copy too: it is one of the answers to wait for
                self._settle.answer_disconnect(user_id, str(decoded["o"]), str(decoded["d"]))
                return
            if decoded.get("o") == self.node_id:
                return  # delivered locally when it was published
            if "s" in decoded:
                # Redis counted us among the receivers, so the requester waits for our answer,
                # even while we are leaving the user's channel.
                if self._nursery is not None:
                    self._nursery.start_soon(
                        self._settle.answer, user_id, str(decoded["o"]), str(decoded["s"])
                    )
                return
            if user_id not in self._users:
                return
            if decoded.get("r"):
                self._repair.resync((user_id,))
                return
            event = redis_codec.decode_event(decoded, user_id)
        except (orjson.JSONDecodeError, LookupError, TypeError, ValueError) as error:
            # (`redis_codec.MalformedPayload` is a ValueError.)
            log.warning("ignoring a malformed bus payload: %r", error)
            return
        if event is not None and self._sink is not None:
            self._stats.received += 1
            self._deliver(event, (user_id,))

    def _receive_for_node(self, data: bytes) -> None:
        """Our heartbeat, or another node's acknowledgement of one of our `settle` calls."""
        try:
            decoded = orjson.loads(data)
            token = decoded.get("a")
            closed = decoded.get("n", 0)
        except (orjson.JSONDecodeError, AttributeError) as error:
            log.warning("ignoring a malformed bus payload: %r", error)
            return
        if isinstance(token, str):
            valid = isinstance(closed, int) and not isinstance(closed, bool) and closed >= 0
            self._settle.acknowledged(token, closed if valid else 0)

    def _deliver(self, event: Delivery, users: Sequence[str]) -> None:
        """Pass an event on to the sink for `users` (bound here), in commit order per chat."""
        if event.message is None:
            if event.chat is not None:
                self._order.chat_created(users, event.chat.chat_id)
            group = event.group
            unblocked: list[Delivery] = []
            if group is not None and group.added:
                joined = [user for user in users if user in group.added]
                unblocked = self._order.chat_joined(joined, group.view.chat_id, group.version)
            self._call_sink(event)
            for follower in unblocked:  # a first message that came before its join
                self._call_sink(follower)
            return
        now = trio.current_time()
        admitted = [user for user in users if self._order.admit(user, event, now)]
        if len(admitted) == len(users):
            self._call_sink(event)
        else:
            for user in admitted:
                self._call_sink(attrs.evolve(event, recipients=(user,)))
            self._order_changed.set()  # something is held: the expiry task sets its timer
        for user in admitted:
            for follower in self._order.followers(user, event):
                self._call_sink(follower)

    async def _expire_held(self) -> None:
        """Release events whose predecessor did not come in time, and resync their users."""
        while True:
            self._order_changed = trio.Event()
            if self._order.next_deadline() > trio.current_time():
                with trio.move_on_at(self._order.next_deadline()):
                    await self._order_changed.wait()
                continue
            due = trio.current_time()
            await self._drain()
            released, users = self._order.expire(due)
            for event in released:
                self._call_sink(event)
            if users:
                self._stats.order_timeouts += 1
                log.warning(
                    "%d users waited over %.0f ms for a chat's previous message; resyncing",
                    len(users),
                    self._order.hold_s * 1000,
                )
                self._repair.resync(users)

    async def _drain(self) -> None:
        """Before giving up on a predecessor, let the subscriber read what has come in: a
        node whose loop was busy past the deadline (a big fan-out, a pause) has the
        predecessor waiting in its socket, not lost. Waits while reading makes progress, at
        most one more hold."""
        with trio.move_on_after(self._order.hold_s):
            while True:
                before = self._received
                await trio.sleep(_DRAIN_S)
                if self._received == before:
                    return

    def _call_sink(self, event: Delivery) -> None:
        assert self._sink is not None
        try:
            self._sink(event)
        except Exception:
            # One faulty delivery must not take the subscription (and everyone's events) down.
            log.exception("the delivery sink failed")

    # ------------------------------------------------------------------ publishing

    def publish_nowait(self, event: Delivery) -> None:
        if self._sink is not None:
            local = [user for user in event.recipients if user in self._users]
            if local:
                self._deliver(event, local)
        repaired = event.kind != "typing"  # a lost typing signal just expires
        try:
            payload = redis_codec.encode_event(self.node_id, event)
        except (TypeError, orjson.JSONEncodeError) as error:
            log.warning("cannot serialize a delivery: %r", error)
            if repaired:
                self._losses.lose(event.recipients)
            return
        outgoing = Outgoing(
            tuple(self._channels.user(u) for u in event.recipients), payload, repaired
        )
        try:
            self._send.send_nowait(outgoing)
        except trio.WouldBlock:
            # Slow-consumer policy for Redis itself: drop, remember whom, resync them later.
            self._stats.dropped += 1
            if repaired:
                self._losses.lose(event.recipients)

    async def _publisher(self, client: coredis.Redis[bytes]) -> None:
        delay = 0.0
        while True:
            batch = [await self._receive.receive()]
            while len(batch) < _MAX_PIPELINE:
                try:
                    batch.append(self._receive.receive_nowait())
                except trio.WouldBlock:
                    break
            owed = self._losses.owed()
            try:
                with trio.fail_after(_COMMAND_TIMEOUT_S):
                    await self._publish_batch(client, [*batch, *owed.notices])
            except BaseException as error:
                reraise_cancellation(error)
                # Possibly partly sent: treat the whole batch as lost and owe its recipients
                # a resync rather than risk sending anything twice.
                log.warning("redis publish failed (%d events): %r", len(batch), error)
                self._stats.lost_batches += 1
                self._losses.lose_batch(batch)
                delay = min(max(delay * 2, _BACKOFF_MIN_S), _BACKOFF_MAX_S)
                await trio.sleep(delay)
                continue
            delay = 0.0
            self._stats.published += len(batch)
            self._losses.paid(owed)

    async def _publish_batch(self, client: coredis.Redis[bytes], batch: Sequence[Outgoing]) -> None:
        async with client.pipeline(transaction=False) as pipe:
            for outgoing in batch:
                for channel in outgoing.channels:
                    pipe.publish(channel, outgoing.payload)

    async def _heartbeat(self, client: coredis.Redis[bytes]) -> None:
        """Publish to our own node channel, proving the subscriber path end to end."""
        beat = redis_codec.heartbeat(self.node_id)
        while True:
            await trio.sleep(self._heartbeat_s)
            if self._pubsub is None:
                continue
            try:
                with trio.fail_after(_COMMAND_TIMEOUT_S):
                    await client.publish(self._node_channel, beat)
            except BaseException as error:
                reraise_cancellation(error)
                log.info("redis heartbeat failed: %r", error)

    # ------------------------------------------------------------------ health

    async def check(self) -> None:
        client = self._client
        if client is None:
            raise BusUnavailable("the redis bus is not running")
        if self._pubsub is None:
            raise BusUnavailable("the redis subscriber is reconnecting")
        try:
            with trio.fail_after(2):
                await client.ping()
        except BaseException as error:
            reraise_cancellation(error)
            raise BusUnavailable(f"redis does not answer: {error!r}") from None


__all__ = ["RedisBus", "RedisBusStatistics", "ResyncHook"]
