"""Who is online across the nodes, as one node sees it (pure: no trio, no I/O).

Every node keeps the same board: which nodes have each user bound (its own, and what the
other nodes announced). A user is online while any node has them, and for a grace period
after the last node let them go, so a quick reconnect (to any node) does not flicker. Every
node applies the grace itself, so each one reports the same transitions to its own users
without asking anyone.

`Transition`s are what the node tells its users' connections; `by` says which node's
announcement ended the user's last connection: that node records `last_seen` (or, if it
died, one of the live nodes does).
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Iterable

import attrs


@attrs.frozen
class Transition:
    user_id: str
    online: bool
    last_seen_ms: int | None = None  # when the last connection closed (offline only)
    by: str = ""  # the node whose announcement took the user offline


@attrs.define
class _Grace:
    deadline: float
    last_seen_ms: int
    by: str


def user_hash(user_id: str) -> int:
    """A stable 64-bit hash of a user id (the board's digests are the XOR of them)."""
    return int.from_bytes(hashlib.blake2b(user_id.encode(), digest_size=8).digest(), "big")


class PresenceBoard:
    """See the module docstring. `now` is monotonic seconds; `at` wall-clock epoch ms."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self._nodes_of: dict[str, set[str]] = {}
        self._users_of: dict[str, set[str]] = collections.defaultdict(set)
        self._digests: dict[str, int] = collections.defaultdict(int)
        # Users no node has, still online until their deadline; deadlines grow in insertion
        # order (one grace for all), so the oldest is first.
        self._grace: collections.OrderedDict[str, _Grace] = collections.OrderedDict()

    # ------------------------------------------------------------------ reading

    def online(self, user_id: str) -> bool:
        return user_id in self._nodes_of or user_id in self._grace

    def users_of(self, node: str) -> frozenset[str]:
        return frozenset(self._users_of.get(node, ()))

    def digest(self, node: str) -> tuple[int, int]:
        """(count, XOR of the user hashes) of what a node has: cheap to compare with what the
        node itself says it has."""
        return len(self._users_of.get(node, ())), self._digests.get(node, 0)

    def nodes(self) -> frozenset[str]:
        return frozenset(node for node, users in self._users_of.items() if users)

    def next_deadline(self) -> float | None:
        for grace in self._grace.values():
            return grace.deadline
        return None

    # ------------------------------------------------------------------ changes

    def up(self, node: str, user_id: str) -> Transition | None:
        """`node` has the user bound now."""
        nodes = self._nodes_of.get(user_id)
        if nodes is None:
            nodes = self._nodes_of[user_id] = set()
        if node in nodes:
            return None
        was_online = bool(nodes) or self._grace.pop(user_id, None) is not None
        nodes.add(node)
        self._users_of[node].add(user_id)
        self._digests[node] ^= user_hash(user_id)
        return None if was_online else Transition(user_id, True)

    def down(self, node: str, user_id: str, at_ms: int, now: float) -> None:
        """`node` let the user's last connection go at `at_ms`; offline after the grace if
        no node has them by then (`expire`)."""
        nodes = self._nodes_of.get(user_id)
        if nodes is None or node not in nodes:
            return
        nodes.discard(node)
        self._users_of[node].discard(user_id)
        self._digests[node] ^= user_hash(user_id)
        if not nodes:
            del self._nodes_of[user_id]
            self._grace[user_id] = _Grace(now + self.grace_s, at_ms, node)
            self._grace.move_to_end(user_id)

    def expire(self, now: float) -> list[Transition]:
        """The users whose grace ended: offline."""
        gone: list[Transition] = []
        while self._grace:
            user_id, grace = next(iter(self._grace.items()))
            if grace.deadline > now:
                break
            del self._grace[user_id]
            gone.append(Transition(user_id, False, grace.last_seen_ms, grace.by))
        return gone

    def replace(self, node: str, users: Iterable[str], at_ms: int, now: float) -> list[Transition]:
        """What `node` has is exactly `users` (a full copy, after a gap in its announcements):
        the ones it no longer has are let go at `at_ms`."""
        wanted = set(users)
        current = self._users_of.get(node, set())
        for user_id in list(current - wanted):
            self.down(node, user_id, at_ms, now)
        came = (self.up(node, user_id) for user_id in wanted - current)
        return [transition for transition in came if transition is not None]

    def drop_node(self, node: str, at_ms: int, now: float) -> None:
        """A node is gone (it stopped answering): all its users are let go at `at_ms`."""
        for user_id in list(self._users_of.get(node, ())):
            self.down(node, user_id, at_ms, now)
        self._users_of.pop(node, None)
        self._digests.pop(node, None)
