"""Delivery marks: receipts of acknowledged frames, coalesced and written to the store.

Theory of operation:
- The transport reports each frame carrying a `Receipt` twice: `begin_write` when it is
  written (its bytes may still sit unacknowledged in the socket buffer) and `acknowledged`
  once the client's TCP stack took it (then `end_write`), or only `end_write` when it never
  got there. Until then the write is *in flight* for its user.
- `run()` coalesces receipts for `MARK_FLUSH_INTERVAL_S` and writes them in one batch, so
  delivery tracking costs one small write per batch rather than one per message: per user and
  chat only the highest mark is written. A delivered mark that moves becomes one `receipt` for
  the chat's other members, so they too get at most one per chat and user per interval.
- `sync(user)` is what a binding needs before its backlog snapshot: it waits (bounded) for
  the user's writes in flight and commits the user's receipts, so what another connection of
  the user has just received is not offered again. The bus calls it for other nodes' bindings.
- Receipts the store could not record (e.g. during a database outage) are kept, up to
  `MAX_KEPT_RECEIPTS`, and retried every `MARK_RETRY_S`: a dropped one would offer a delivered
  item again. Marks are idempotent, so a retry is always safe.
"""

from __future__ import annotations

import collections
import logging
from typing import Final

import trio

from handler.errors import HandlerError
from handler.session.outgoing import Receipt, SeqMark
from handler.store.base import Store

log = logging.getLogger("handler.marks")

MARK_FLUSH_INTERVAL_S: Final = 0.1
IN_FLIGHT_WAIT_S: Final = 2.0
MARK_RETRY_S: Final = 0.5
MAX_KEPT_RECEIPTS: Final = 100_000


class DeliveryMarks:
    """See the module docstring."""

    def __init__(self, store: Store) -> None:
        self._store = store
        # Receipts waiting to be recorded. A plain list rather than a channel: a binding must
        # be able to take *all* of them, including those the periodic writer is about to take.
        self._receipts: list[Receipt] = []
        self._queued = trio.Event()
        self._stopping = False
        self._done = trio.Event()
        self._lock = trio.Lock()
        self._in_flight: collections.Counter[str] = collections.Counter()
        # Receipts per user taken for recording but not yet known to be committed.
        self._unsettled: collections.Counter[str] = collections.Counter()
        self._landed = trio.Event()

    # ------------------------------------------------------------------ from the transport

    def begin_write(self, user_id: str) -> None:
        """A frame carrying a receipt for `user_id` is written, not yet acknowledged."""
        self._in_flight[user_id] += 1

    def end_write(self, user_id: str) -> None:
        self._in_flight[user_id] -= 1
        if not self._in_flight[user_id]:
            del self._in_flight[user_id]
            self._landed.set()
            self._landed = trio.Event()

    def acknowledged(self, receipt: Receipt) -> None:
        """The frame carrying `receipt` reached the client (its TCP stack acknowledged it)."""
        self._receipts.append(receipt)
        self._unsettled[receipt.user_id] += 1
        self._queued.set()

    # ------------------------------------------------------------------ bindings

    async def sync(self, user_id: str) -> None:
        """Commit every receipt of the user's finished writes (see the module docstring).
        Writes under way are waited for, bounded: a stuck one is dropped by the slow-consumer
        policy, and its items simply stay undelivered."""
        with trio.move_on_after(IN_FLIGHT_WAIT_S):
            while self._in_flight.get(user_id):
                await self._landed.wait()
        if self._unsettled.get(user_id):  # else nothing of this user awaits recording
            await self._record_queued()  # also waits for a batch being recorded now

    # ------------------------------------------------------------------ the writer task

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                await self._queued.wait()
                self._queued = trio.Event()  # only this loop replaces it
                if not self._stopping:
                    await trio.sleep(MARK_FLUSH_INTERVAL_S)  # coalesce a burst into one write
                if not await self._record_queued():
                    await trio.sleep(MARK_RETRY_S)  # the store is failing: try again later
                    self._queued.set()
                    continue
                if self._stopping:
                    return
        finally:
            self._done.set()

    async def stop(self) -> None:
        """Write the receipts still queued, then stop `run()`."""
        self._stopping = True
        self._queued.set()
        await self._done.wait()

    async def _record_queued(self) -> bool:
        """False when the store failed and the receipts were kept for a retry."""
        async with self._lock:  # one batch at a time, in the order they were taken
            receipts, self._receipts = self._receipts, []
            return not receipts or await self._flush(receipts)

    async def _flush(self, batch: list[Receipt]) -> bool:
        chats: dict[str, list[str]] = collections.defaultdict(list)
        marks: dict[str, list[SeqMark]] = collections.defaultdict(list)
        for receipt in batch:
            chats[receipt.user_id].extend(receipt.chat_ids)
            marks[receipt.user_id].extend(receipt.marks)
        try:
            for user_id in chats.keys() | marks.keys():
                await self._store.mark_delivered(user_id, chats[user_id], marks[user_id])
            await self._store.flush()
        except HandlerError as error:
            if not self._stopping and len(batch) + len(self._receipts) <= MAX_KEPT_RECEIPTS:
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
