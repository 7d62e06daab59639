"""In-process bus: events go straight to this process's hub. The embedded default."""

from __future__ import annotations

from collections.abc import Mapping

import trio

from handler.bus.base import Delivery, DeliverySink, DisconnectHook, ResyncHook, SettleHook


class LocalBus:
    """Synchronous fan-out within one process; cannot reach another worker (see server.py)."""

    def __init__(self) -> None:
        self._sink: DeliverySink | None = None
        self._subscribed: set[str] = set()

    async def run(
        self,
        sink: DeliverySink,
        *,
        on_resync: ResyncHook | None = None,  # nothing is ever lost in-process
        on_settle: SettleHook | None = None,  # there is no other node
        on_disconnect: DisconnectHook | None = None,  # likewise
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self._sink = sink
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            self._sink = None

    async def subscribe(self, user_id: str) -> None:
        self._subscribed.add(user_id)

    async def unsubscribe(self, user_id: str) -> None:
        self._subscribed.discard(user_id)

    async def settle(self, user_id: str) -> None:
        return None

    async def disconnect(self, user_id: str) -> int:
        return 0  # no other node: the hub closes this process's connections itself

    def read_at(self, user_id: str, versions: Mapping[str, int]) -> None:
        """One process publishes in commit order already: nothing to put back in order."""

    def publish_nowait(self, event: Delivery) -> None:
        if self._sink is not None and any(u in self._subscribed for u in event.recipients):
            self._sink(event)

    async def check(self) -> None:
        return None
