"""The request exchanges of the Redis bus: settle (delivery marks committed across nodes) and
disconnect (a user's connections closed on every node), each asked on the user's channel and
answered on the asker's node channel.

A binding reads its user's backlog from the store, so what other nodes have just written to
the user must be marked delivered first, or it would be offered again. Theory of operation:
- `request(user)` publishes a settle request on the user's channel; PUBLISH answers how many
  subscribers got it, i.e. how many nodes serve the user (ours among them when the user is
  bound here).
- Each other node commits the marks it holds for the user (`on_settle`) and answers on the
  requester's node channel (`answer`), always, even when committing failed: the requester
  waits for it.
- `request` returns once every other node has answered (`acknowledged`), or after
  `SETTLE_WAIT_S`: a node that does not answer is not waited for forever (the worst case is an
  item offered once more).
- A node commits its marks for a user before leaving the user's channel (`commit_marks`, from
  `RedisBus.unsubscribe`), so a node that no longer gets the request has nothing left to
  commit.

Disconnect is the same exchange with a count: `disconnect(user)` publishes a disconnect request
on the user's channel; every node that got it closes the user's connections there
(`on_disconnect`) and answers how many. Unlike settle, this node's own copy of the request is
waited for too, and answers 0 without a round trip (the hub closed this node's connections
itself): so the count PUBLISH returns is the number of answers to wait for, whether this node
was still on the user's channel at that instant or had just left it. The total is what the
nodes answered within `SETTLE_WAIT_S`.

The boundary: this module owns the waiters and the hooks; `handler.bus.redis` routes the
payloads to it, starts the answers in its nursery and sends what it queues.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Container
from typing import Final

import attrs
import trio

from handler.bus import redis_codec
from handler.bus.base import DisconnectHook, SettleHook
from handler.bus.redis_codec import Channels, Outgoing
from handler.bus.redis_errors import reraise_cancellation
from handler.errors import BusUnavailable

log = logging.getLogger("handler.bus.redis")

SETTLE_WAIT_S: Final = 2.0
_PUBLISH_TIMEOUT_S: Final = 5.0

Publish = Callable[[bytes, bytes], Awaitable[int]]
"""PUBLISH on the bus's client: (channel, payload) -> how many subscribers received it."""


@attrs.define(eq=False)
class _Settle:
    """One `request` waiting for the other nodes' acknowledgements."""

    acks: int = 0
    closed: int = 0  # a disconnect's: the connections the answering nodes closed
    changed: trio.Event = attrs.field(factory=trio.Event)


class SettleExchange:
    """Both sides of the exchange for one node: the requests it waits on, the answers it owes."""

    def __init__(
        self,
        node_id: str,
        channels: Channels,
        *,
        users: Container[str],
        send_nowait: Callable[[Outgoing], None],
    ) -> None:
        """`users` is the bus's live set of users bound here; `send_nowait` queues a payload
        on the bus's publisher (raising `trio.WouldBlock` when the queue is full)."""
        self._node_id = node_id
        self._channels = channels
        self._users = users
        self._send_nowait = send_nowait
        self._settles: dict[str, _Settle] = {}
        self.on_settle: SettleHook | None = None
        self.on_disconnect: DisconnectHook | None = None
        self.timeouts = 0

    async def request(self, publish: Publish, user_id: str) -> None:
        """Return once the other nodes serving `user_id` have committed their marks for it."""
        token = secrets.token_hex(8)
        waiter = self._settles[token] = _Settle()
        request = redis_codec.settle_request(self._node_id, token)
        try:
            with trio.move_on_after(SETTLE_WAIT_S) as waited:
                receivers = await publish(self._channels.user(user_id), request)
                # Our own subscriber is one of them (the binding subscribed first).
                others = receivers - (1 if user_id in self._users else 0)
                while waiter.acks < others:
                    await waiter.changed.wait()
            if waited.cancelled_caught:
                self.timeouts += 1
                log.warning("settle user=%s: not every node answered in time", user_id)
        except BaseException as error:
            reraise_cancellation(error)
            # No worse than a node that does not answer: an item may be offered once more.
            log.warning("settle user=%s failed: %r", user_id, error)
        finally:
            del self._settles[token]

    async def disconnect(self, publish: Publish, user_id: str) -> int:
        """How many connections of the user the other nodes closed, as they answered within
        `SETTLE_WAIT_S`; `BusUnavailable` when the request could not be published."""
        token = secrets.token_hex(8)
        waiter = self._settles[token] = _Settle()
        request = redis_codec.disconnect_request(self._node_id, token)
        try:
            try:
                with trio.fail_after(_PUBLISH_TIMEOUT_S):
                    receivers = await publish(self._channels.user(user_id), request)
            except BaseException as error:
                reraise_cancellation(error)
                raise BusUnavailable(f"redis publish failed: {error!r}") from None
            with trio.move_on_after(SETTLE_WAIT_S) as waited:
                while waiter.acks < receivers:
                    await waiter.changed.wait()
            if waited.cancelled_caught:
                self.timeouts += 1
                log.warning("disconnect user=%s: not every node answered in time", user_id)
            return waiter.closed
        finally:
            del self._settles[token]

    def answer_disconnect(self, user_id: str, node: str, token: str) -> None:
        """Close the user's connections here and tell the node that asked how many (our own
        request: only count the answer, the hub closed them already)."""
        if node == self._node_id:
            self.acknowledged(token)
            return
        closed = 0
        try:
            if self.on_disconnect is not None:
                closed = self.on_disconnect(user_id)
        except Exception:
            log.exception("closing the connections of a user failed")
        finally:
            answer = redis_codec.disconnect_answer(self._node_id, token, closed)
            with contextlib.suppress(trio.WouldBlock):
                self._send_nowait(Outgoing((self._channels.node(node),), answer))

    def acknowledged(self, token: str, closed: int = 0) -> None:
        """Another node answered one of our requests (tokens of finished ones are ignored)."""
        waiter = self._settles.get(token)
        if waiter is not None:
            waiter.acks += 1
            waiter.closed += closed
            waiter.changed.set()
            waiter.changed = trio.Event()

    async def commit_marks(self, user_id: str) -> None:
        """Have the hub commit the marks this node holds for the user (bounded, never raises
        an `Exception`: the caller goes on either way)."""
        if self.on_settle is None:
            return
        try:
            with trio.move_on_after(SETTLE_WAIT_S):
                await self.on_settle(user_id)
        except Exception:
            log.exception("committing the delivery marks of a user failed")

    async def answer(self, user_id: str, node: str, token: str) -> None:
        """Commit our marks for the user, then tell the node that asked (always: it waits)."""
        try:
            await self.commit_marks(user_id)
        finally:
            answer = redis_codec.settle_answer(self._node_id, token)
            with contextlib.suppress(trio.WouldBlock):
                self._send_nowait(Outgoing((self._channels.node(node),), answer))
