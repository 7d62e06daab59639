"""How a node's presence reaches the other nodes: the contract, and the one-node link.

A link carries each node's own changes (a user's first connection bound on it, its last one
closed) to every other node, and tells its node what the others have: their changes as they
come, a full copy of a node's users when its changes cannot be trusted (a gap, a newcomer),
and that a node is gone (it stopped answering: killed, cut off). The board (`board`) turns
that into who is online; the link only moves it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Final, Protocol

import trio

LOCAL_NODE: Final = "local"

Change = tuple[str, bool, int]
"""(user id, online, at epoch ms) as a node announces it."""


class PresenceSink(Protocol):
    """What a link tells its node (the presence service)."""

    def remote_changes(self, node: str, changes: Sequence[Change]) -> None: ...

    def remote_full(self, node: str, users: Collection[str], at_ms: int) -> None: ...

    def node_gone(self, node: str, at_ms: int) -> None: ...

    def digest(self, node: str) -> tuple[int, int]:
        """(count, XOR of user hashes) of what the board holds for a node."""
        ...

    def local_users(self) -> Collection[str]:
        """The users bound on this node now."""
        ...


class PresenceLink(Protocol):
    node_id: str

    async def run(
        self, sink: PresenceSink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Carry announcements both ways until cancelled."""

    def announce(self, user_id: str, online: bool, at_ms: int) -> None:
        """This node's change for one user; never blocks (sent in batches)."""

    def live_nodes(self) -> frozenset[str]:
        """The nodes heard from lately, this one included."""


class LocalPresenceLink:
    """One node: nobody else to tell."""

    node_id = LOCAL_NODE

    async def run(
        self, sink: PresenceSink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        await trio.sleep_forever()

    def announce(self, user_id: str, online: bool, at_ms: int) -> None:
        return None

    def live_nodes(self) -> frozenset[str]:
        return frozenset((LOCAL_NODE,))
