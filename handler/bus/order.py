"""Per-chat order for events that reach a node from several publishers.

Pure bookkeeping (no I/O, no clock of its own: callers pass `now`), used by the Redis bus.

Why: each node publishes its own commits, and Redis keeps order per publisher only. Two
messages of one chat committed one after the other by two processes can reach a third node in
the opposite order. Every change of a chat (a new message, an edit, a delete) takes the chat's
next version under the chat lock, so each event names its predecessor (`Delivery.position`
and `Delivery.previous`, version - 1), and a node can put them back in commit order for each of
its users. Receipts are not ordered: they carry no position.

Theory of operation, per (user, chat):
- `last` is the position of the newest change passed on to the user on this node. With no `last`
  yet (the first event since the user was subscribed here, or after the state was evicted),
  an event is passed on at once: whatever came before it was delivered or is in the backlog
  the binding read.
- A new chat starts empty: when its `chat` event passes, `last` becomes "0" (no message yet),
  so a later message of that chat that arrives before its predecessor is held, not passed on
  out of order (two nodes' first messages of a new chat race otherwise). A first message's
  predecessor is "0".
- An event whose predecessor is `last` (or that has none) is passed on, and so is every held
  event that was waiting for it, in chain order.
- Any other event is *held*. If its predecessor has not come within `hold_s`, that user's held
  events of the chat are released in chain order and the user is reported for a resync: the
  predecessor was lost (or never published, e.g. its commit outcome was unknown), and only
  the store can supply it.
- Bounded: at most `chats_per_user` chats are remembered per user (least recently used go),
  and a user with more than `held_per_user` held events is released and resynchronized at
  once. `forget(user)` drops everything of a user (on unsubscribe).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Mapping
from typing import Final

import attrs

from handler.bus.base import Delivery

HOLD_S: Final = 0.25
EMPTY_CHAT: Final = "0"  # `last` of a chat with no message yet
CHATS_PER_USER: Final = 1024
HELD_PER_USER: Final = 256


@attrs.define
class _UserOrder:
    # chat id -> position of the newest change passed on (least recently used first)
    last: collections.OrderedDict[str, str] = attrs.field(factory=collections.OrderedDict)
    # chat id -> the version a binding of the user read the chat at (`read_at`): changes up to
    # it are in that backlog or reached the user before, so they pass (the binding covers them)
    floor: dict[str, int] = attrs.field(factory=dict)
    # (chat id, previous message id) -> the held event, narrowed to this user
    held: dict[tuple[str, str], Delivery] = attrs.field(factory=dict)


class ChatOrder:
    """Restores commit order per (user, chat); see the module docstring."""

    def __init__(
        self,
        *,
        hold_s: float = HOLD_S,
        chats_per_user: int = CHATS_PER_USER,
        held_per_user: int = HELD_PER_USER,
    ) -> None:
        self.hold_s = hold_s
        self._chats_per_user = chats_per_user
        self._held_per_user = held_per_user
        self._users: dict[str, _UserOrder] = {}
        # (deadline, user, chat, previous id, message id) in arrival order; the hold is the
        # same for all, so deadlines never decrease. Entries of released events go stale and
        # are skipped.
        self._deadlines: collections.deque[tuple[float, str, str, str, str]] = collections.deque()
        self._overflowing: set[str] = set()

    @property
    def held_count(self) -> int:
        return sum(len(state.held) for state in self._users.values())

    def admit(self, user: str, event: Delivery, now: float) -> bool:
        """True: pass `event` on to `user` now (then call `followers`). False: it is held."""
        message = event.message
        previous, position = event.previous, event.position
        if message is None or previous is None or position is None:
            return True
        state = self._users.get(user)
        if state is None:
            state = self._users[user] = _UserOrder()
        chat = message.chat_id
        floor = state.floor.get(chat)
        if floor is not None and int(position) <= floor:
            return True  # read by a binding already: it drops what it covered
        last = state.last.get(chat)
        if last is None or last == previous:
            self._remember(state, chat, position)
            return True
        if previous == EMPTY_CHAT:
            # The chat's first message, arriving after later ones: nothing to wait for, and
            # `last` stays the newest.
            return True
        state.held[(chat, previous)] = attrs.evolve(event, recipients=(user,))
        self._deadlines.append((now + self.hold_s, user, chat, previous, position))
        if len(state.held) > self._held_per_user:
            self._overflowing.add(user)
        return False

    def chat_created(self, users: Iterable[str], chat_id: str) -> None:
        """A new chat reached these users here: it has no message yet."""
        for user in users:
            state = self._users.get(user)
            if state is None:
                state = self._users[user] = _UserOrder()
            if chat_id not in state.last:
                self._remember(state, chat_id, EMPTY_CHAT)

    def read_at(self, user: str, versions: Mapping[str, int]) -> None:
        """A binding of `user` read these chats at these versions: a chat's next change
        follows that one. (Without it the first event after subscribing would pass at once,
        and a newer one from this node could overtake an older one still on its way from
        another.)"""
        state = self._users.get(user)
        if state is None:
            state = self._users[user] = _UserOrder()
        for chat_id, version in versions.items():
            if version > state.floor.get(chat_id, -1):
                state.floor[chat_id] = version
            last = state.last.get(chat_id)
            if last is None or int(last) < version:
                self._remember(state, chat_id, str(version))

    def chat_joined(self, users: Iterable[str], chat_id: str, version: int) -> list[Delivery]:
        """These users joined a group here at `version`: its next change follows that one
        (and what came before their join never reaches them, so nothing older is awaited).
        Returns the events held for them that the join unblocks (their first message came
        before the join did), in chain order."""
        released: list[Delivery] = []
        for user in users:
            state = self._users.get(user)
            if state is None:
                state = self._users[user] = _UserOrder()
            last = state.last.get(chat_id)
            if last is None or int(last) < version:
                self._remember(state, chat_id, str(version))
                released += self._release_after(state, chat_id, str(version))
        return released

    def followers(self, user: str, event: Delivery) -> list[Delivery]:
        """Held events of `user` that `event` (just passed on) unblocks, in chain order."""
        state = self._users.get(user)
        message = event.message
        if state is None or not state.held or message is None:
            return []
        return self._release_after(state, message.chat_id, event.position)

    def _release_after(self, state: _UserOrder, chat: str, position: str | None) -> list[Delivery]:
        """The held events that follow `position` (just passed on), in chain order."""
        released: list[Delivery] = []
        current = position
        while current is not None and (follower := state.held.pop((chat, current), None)):
            current = follower.position
            released.append(follower)
        if released and current is not None:
            self._remember(state, chat, current)
        return released

    def next_deadline(self) -> float:
        """When `expire` may have something to release (inf: nothing held)."""
        if self._overflowing:
            return -math.inf
        return self._deadlines[0][0] if self._deadlines else math.inf

    def expire(self, now: float) -> tuple[list[Delivery], tuple[str, ...]]:
        """Release what waited too long: the events to pass on (in order) and the users to
        resynchronize."""
        released: list[Delivery] = []
        users: list[str] = []
        for user in sorted(self._overflowing):
            released += self._release_user(user)
            users.append(user)
        self._overflowing.clear()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, user, chat, previous, position = self._deadlines.popleft()
            state = self._users.get(user)
            if state is None:
                continue
            waiting = state.held.get((chat, previous))
            if waiting is None or waiting.message is None:
                continue
            if waiting.position != position:
                continue  # stale: that slot was released and taken by a newer event
            released += self._release_chat(state, chat)
            if user not in users:
                users.append(user)
        return released, tuple(users)

    def release_users(self, users: Iterable[str]) -> list[Delivery]:
        """Release everything held for `users` (they are being resynchronized anyway)."""
        released: list[Delivery] = []
        for user in users:
            self._overflowing.discard(user)
            released += self._release_user(user)
        return released

    def forget(self, user: str) -> None:
        """Drop a user's state (unsubscribed); stale deadline entries are skipped later."""
        self._users.pop(user, None)
        self._overflowing.discard(user)

    # ------------------------------------------------------------------ internals

    def _remember(self, state: _UserOrder, chat: str, position: str) -> None:
        state.last[chat] = position
        state.last.move_to_end(chat)
        if len(state.last) > self._chats_per_user:
            state.last.popitem(last=False)

    def _release_user(self, user: str) -> list[Delivery]:
        state = self._users.get(user)
        if state is None:
            return []
        released: list[Delivery] = []
        for chat in dict.fromkeys(chat for chat, _ in state.held):
            released += self._release_chat(state, chat)
        return released

    def _release_chat(self, state: _UserOrder, chat: str) -> list[Delivery]:
        """Every held event of the chat, chain by chain; chains start in arrival order."""
        group = {prev: event for (c, prev), event in state.held.items() if c == chat}
        for prev in group:
            del state.held[(chat, prev)]
        positions = {event.position for event in group.values()}
        released: list[Delivery] = []
        for prev, head in group.items():
            if prev in positions:
                continue  # not a chain head: released after its predecessor below
            event: Delivery | None = head
            while event is not None and event.position is not None:
                released.append(event)
                event = group.get(event.position)
        last = released[-1].position if released else None
        if last is not None:
            self._remember(state, chat, last)
        return released
