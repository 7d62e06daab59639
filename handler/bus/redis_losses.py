"""Loss accounting of the Redis bus: what may have been lost, and the resyncs that repair it.

`handler.bus.redis` turns every way an event can be lost into a *resync* (see its theory of
operation); this module keeps the account of both ends:

- the publishing end, `LossLedger` (pure: no I/O, no clock): whom the publisher owes a resync
  notice, for events it could not queue or send; past `MAX_LOST_USERS` one notice to everyone
  (`{prefix}all`) replaces the names. A debt is settled only by a batch that was sent, and
  losses during that send are still owed.
- the receiving end, `Repair`: this node's users whose events it may have missed (after a
  reconnect, on a notice, or when a chat's previous message never came) get what the order
  gate held for them first, then the hub's resync hook.

The boundary: `handler.bus.redis` decides when something was lost and sends what is owed;
nothing here publishes, waits or reads a clock.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Final

import attrs

from handler.bus import redis_codec
from handler.bus.base import DeliverySink, ResyncHook
from handler.bus.order import ChatOrder
from handler.bus.redis_codec import Channels, Outgoing

log = logging.getLogger("handler.bus.redis")

MAX_LOST_USERS: Final = 10_000


@attrs.frozen
class Owed:
    """The debt when a batch left: its `notices` go out with the batch, and `paid` settles it."""

    losses: int
    users: frozenset[str]
    everyone: bool
    notices: tuple[Outgoing, ...]


class LossLedger:
    """The recipients owed a resync notice, for the publisher of one node."""

    def __init__(self, node_id: str, channels: Channels, *, max_users: int = MAX_LOST_USERS):
        self._node_id = node_id
        self._channels = channels
        self._max_users = max_users
        self._users: set[str] = set()
        self._everyone = False
        # Counts every loss, so `paid` can tell whether one came while the notices were out.
        self._losses = 0

    def lose(self, users: Iterable[str]) -> None:
        """Events for `users` were dropped or may not have reached Redis."""
        self._losses += 1
        if self._everyone:
            return
        self._users.update(users)
        if len(self._users) > self._max_users:
            self._users.clear()
            self._everyone = True

    def lose_batch(self, batch: Iterable[Outgoing]) -> None:
        """A batch that may have been sent only in part: its users' events count as lost."""
        for outgoing in batch:
            if outgoing.repaired:
                self.lose(self._channels.users_of(outgoing.channels))

    def owed(self) -> Owed:
        """The notices owed so far, to send after the events already queued: a resynchronized
        user has then been sent those events too."""
        notice = redis_codec.resync_notice(self._node_id)
        channels = [self._channels.all] if self._everyone else map(self._channels.user, self._users)
        notices = tuple(Outgoing((channel,), notice) for channel in channels)
        return Owed(self._losses, frozenset(self._users), self._everyone, notices)

    def paid(self, owed: Owed) -> None:
        """`owed.notices` were sent: settle what they covered, not what was lost since."""
        self._users -= owed.users
        if owed.everyone and self._losses == owed.losses:
            self._everyone = False


class Repair:
    """Resyncs this node's users: held events first, then the hub's hook (`on_resync`)."""

    def __init__(self, order: ChatOrder, call_sink: DeliverySink) -> None:
        """`call_sink` passes an event on to the hub (and logs a sink that fails)."""
        self._order = order
        self._call_sink = call_sink
        self.on_resync: ResyncHook | None = None
        self.resyncs = 0

    def resync(self, users: tuple[str, ...]) -> None:
        if not users:
            return
        self.resyncs += 1
        # What waits for a lost predecessor goes out now: the resync covers the gap.
        for event in self._order.release_users(users):
            self._call_sink(event)
        if self.on_resync is None:
            log.warning(
                "events for %d users may have been lost and no resync hook is set", len(users)
            )
            return
        try:
            self.on_resync(users)
        except Exception:
            log.exception("the resync hook failed")
