"""Presence on one node: who is online, told to the contacts bound here, and `last_seen` kept.

Theory of operation:
- The hub calls `connected(user)` when a user's first connection binds here and
  `disconnected(user)` when the last one leaves. Both go on this node's board at once and to
  the other nodes through the link (`link`), in batches.
- Every node's board applies the grace itself (`board`): a user no node has stays online for
  `grace_s`, so a reconnect, to any node, is no change at all and nobody is told.
- A change is told only to the contacts bound here who may see it (`Relations.watchers_of`,
  minus blocks), one `presence` frame per connection, encoded once: the cost follows the
  online contacts, whatever the number of offline ones.
- `last_seen` is written (batched, only forward) by the node whose announcement ended the
  user's last connection; for a node that died, by the first of the live nodes in id order.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Collection, Sequence
from typing import Final, Protocol

import trio

from handler import protocol
from handler.presence.board import PresenceBoard, Transition
from handler.presence.link import Change, PresenceLink
from handler.relations import Relations
from handler.session.outgoing import Outgoing
from handler.timefmt import format_ms, now_ms

log = logging.getLogger("handler.presence")

RECENT_CONTACTS: Final = protocol.MAX_PRESENCE_IDS
_RECENT_LAST_SEEN: Final = 10_000
_WRITE_EVERY_S: Final = 0.2
_WRITE_RETRY_S: Final = 1.0

Push = Callable[[str, Outgoing], None]
"""Hand an item to every open connection of a user bound here."""


class LastSeenStore(Protocol):
    async def save_last_seen(self, entries: Sequence[tuple[str, int]]) -> None: ...

    async def last_seen_of(self, user_ids: Sequence[str]) -> dict[str, int]: ...

    async def recent_contacts(self, user_id: str, limit: int) -> list[tuple[str, int | None]]: ...


class Presence:
    """See the module docstring. With `enabled` False it tracks nothing and tells nobody
    anything (every answer says offline, never seen)."""

    def __init__(
        self,
        store: LastSeenStore,
        link: PresenceLink,
        relations: Relations,
        push: Push,
        *,
        grace_s: float,
        enabled: bool,
    ) -> None:
        self.enabled = enabled
        self.board = PresenceBoard(grace_s)
        self._store = store
        self._link = link
        self._relations = relations
        self._push = push
        self._local: set[str] = set()
        self._changed = trio.Event()
        self._unsaved: dict[str, int] = {}
        # The last-seen times this node announced lately: newer than the store until written.
        self._recent: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._nursery: trio.Nursery | None = None
        self.frames_sent = 0

    @property
    def node_id(self) -> str:
        return self._link.node_id

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if not self.enabled:
            task_status.started()
            await trio.sleep_forever()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self._link.run, self)
                nursery.start_soon(self._expire)
                nursery.start_soon(self._write_last_seen)
                task_status.started()
        finally:
            self._nursery = None

    async def stop(self) -> None:
        """On the way down, before the store closes: whoever this node let go (or still
        has) is saved as last seen."""
        if self.enabled:
            await self._save_on_stop()

    # ------------------------------------------------------------------ this node's users

    def connected(self, user_id: str) -> None:
        if not self.enabled:
            return
        self._local.add(user_id)
        self._link.announce(user_id, True, now_ms())
        transition = self.board.up(self.node_id, user_id)
        if transition is not None:
            self._tell(transition)

    def disconnected(self, user_id: str) -> None:
        if not self.enabled or user_id not in self._local:
            return
        self._local.discard(user_id)
        at = now_ms()
        self._link.announce(user_id, False, at)
        self.board.down(self.node_id, user_id, at, trio.current_time())
        self._changed.set()

    # ------------------------------------------------------------------ the link's sink

    def remote_changes(self, node: str, changes: Sequence[Change]) -> None:
        now = trio.current_time()
        for user_id, online, at in changes:
            if online:
                transition = self.board.up(node, user_id)
                if transition is not None:
                    self._tell(transition)
            else:
                self.board.down(node, user_id, at, now)
        self._changed.set()

    def remote_full(self, node: str, users: Collection[str], at_ms: int) -> None:
        for transition in self.board.replace(node, users, at_ms, trio.current_time()):
            self._tell(transition)
        self._changed.set()

    def node_gone(self, node: str, at_ms: int) -> None:
        log.warning("presence: node %s is gone; its users go offline after the grace", node)
        self.board.drop_node(node, at_ms, trio.current_time())
        self._changed.set()

    def digest(self, node: str) -> tuple[int, int]:
        return self.board.digest(node)

    def local_users(self) -> Collection[str]:
        return tuple(self._local)

    # ------------------------------------------------------------------ telling

    async def _expire(self) -> None:
        while True:
            self._changed = trio.Event()
            deadline = self.board.next_deadline()
            if deadline is None or deadline > trio.current_time():
                with trio.move_on_at(deadline if deadline is not None else float("inf")):
                    await self._changed.wait()
                continue
            live = self._link.live_nodes()
            writer = min(live) if live else self.node_id
            for transition in self.board.expire(trio.current_time()):
                self._remember(transition)
                self._tell(transition)
                by = transition.by
                if by == self.node_id or (by not in live and writer == self.node_id):
                    assert transition.last_seen_ms is not None
                    self._unsaved[transition.user_id] = transition.last_seen_ms

    def _remember(self, transition: Transition) -> None:
        if transition.last_seen_ms is None:
            return
        recent = self._recent
        recent[transition.user_id] = transition.last_seen_ms
        recent.move_to_end(transition.user_id)
        if len(recent) > _RECENT_LAST_SEEN:
            recent.popitem(last=False)

    def _last_seen(self, user_id: str, stored: int | None) -> str | None:
        recent = self._recent.get(user_id)
        if recent is not None and (stored is None or recent > stored):
            return format_ms(recent)
        return _format(stored)

    def _tell(self, transition: Transition) -> None:
        """One change to every connection here that may see it."""
        user_id = transition.user_id
        relations = self._relations
        text: str | None = None
        now = trio.current_time()
        for watcher in relations.watchers_of(user_id):
            seen = relations.get(watcher)
            # Not loaded yet: its blocks are unknown (its `fetch_presence` waits for them).
            if seen is None or not seen.ready.is_set() or seen.apart(user_id):
                continue
            if text is None:
                last_seen = transition.last_seen_ms
                entry = protocol.PresenceEntry(
                    user_id,
                    transition.online,
                    None if transition.online or last_seen is None else format_ms(last_seen),
                )
                text = protocol.encode(protocol.PresenceFrame((entry,)))
            self.frames_sent += 1
            self._push(watcher, Outgoing(text, "presence", None, now))

    def block_changed(self, change: protocol.BlockChange, users: Collection[str]) -> None:
        """Each side (of `users`, whom the event is for here) stops, or starts again, seeing
        the other: a stranger's entry while the block stands, the real one once lifted."""
        if not self.enabled or self._nursery is None:
            return
        for viewer, other in ((change.blocker, change.blocked), (change.blocked, change.blocker)):
            if viewer not in users:
                continue
            relations = self._relations.get(viewer)
            if relations is not None and other in relations.contacts:
                self._nursery.start_soon(self._reveal, viewer, other)

    async def _reveal(self, viewer: str, other: str) -> None:
        try:
            (entry,) = await self.answer(viewer, (other,))
        except Exception as error:
            log.warning("presence after a block change failed: %r", error)
            return
        text = protocol.encode(protocol.PresenceFrame((entry,)))
        self._push(viewer, Outgoing(text, "presence", None, trio.current_time()))

    # ------------------------------------------------------------------ answers

    async def answer(
        self, user_id: str, asked: tuple[str, ...] | None
    ) -> tuple[protocol.PresenceEntry, ...]:
        """`fetch_presence`: what the user may see of `asked`, or of their most recently
        active contacts."""
        if not self.enabled:
            return tuple(protocol.PresenceEntry(other) for other in asked or ())
        relations = await self._relations.ready(user_id)
        if relations is None:  # the user left meanwhile
            return tuple(protocol.PresenceEntry(other) for other in asked or ())
        board = self.board
        if asked is None:
            recent: list[tuple[str, int | None]] = []
            online_now = sum(board.online(c) for c in relations.contacts)
            if online_now < len(relations.contacts):  # someone offline: when were they last seen
                recent = await self._store.recent_contacts(user_id, RECENT_CONTACTS + online_now)
            # Decided after the read, with no wait until the reply: a contact who came or went
            # meanwhile (and was told live already) is answered as they are now.
            visible = [c for c in relations.contacts if not relations.apart(c)]
            online = sorted(c for c in visible if board.online(c))[:RECENT_CONTACTS]
            entries = [protocol.PresenceEntry(c, True) for c in online]
            taken = set(online)
            for contact, seen in recent:
                if len(entries) >= RECENT_CONTACTS:
                    break
                if contact in taken or relations.apart(contact) or board.online(contact):
                    continue
                last_seen = self._last_seen(contact, seen)
                entries.append(protocol.PresenceEntry(contact, False, last_seen))
            return tuple(entries)
        shown = {
            other
            for other in asked
            if other == user_id or (other in relations.contacts and not relations.apart(other))
        }
        offline = [other for other in shown if other != user_id and not board.online(other)]
        seen_at = await self._store.last_seen_of(offline) if offline else {}
        result = []
        for other in asked:
            if other not in shown:
                result.append(protocol.PresenceEntry(other))
            elif other == user_id or board.online(other):
                result.append(protocol.PresenceEntry(other, True))
            else:
                last_seen = self._last_seen(other, seen_at.get(other))
                result.append(protocol.PresenceEntry(other, False, last_seen))
        return tuple(result)

    # ------------------------------------------------------------------ last_seen

    async def _write_last_seen(self) -> None:
        while True:
            await trio.sleep(_WRITE_EVERY_S)
            if not self._unsaved:
                continue
            entries, self._unsaved = self._unsaved, {}
            try:
                await self._store.save_last_seen(sorted(entries.items()))
            except Exception as error:
                log.warning("saving last_seen of %d users failed: %r", len(entries), error)
                for user_id, at in entries.items():
                    self._unsaved.setdefault(user_id, at)
                await trio.sleep(_WRITE_RETRY_S)

    async def _save_on_stop(self) -> None:
        """On the way down: whoever this node let go (or still has) was last seen now."""
        at = now_ms()
        for transition in self.board.expire(float("inf")):
            if transition.by == self.node_id and transition.last_seen_ms is not None:
                self._unsaved[transition.user_id] = transition.last_seen_ms
        for user_id in self._local:
            self._unsaved[user_id] = at
        if self._unsaved:
            entries, self._unsaved = self._unsaved, {}
            try:
                await self._store.save_last_seen(sorted(entries.items()))
            except Exception as error:
                log.warning("saving last_seen on stop failed: %r", error)


def _format(at_ms: int | None) -> str | None:
    return None if at_ms is None else format_ms(at_ms)
