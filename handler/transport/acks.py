"""Delivery receipts that wait for the client's TCP acknowledgement.

PROTOCOL "Delivery": a frame counts as delivered once the client's TCP stack took it. Bytes that
are still unacknowledged in the server's socket send buffer when a connection is aborted (a
dropped slow reader, a reset) are thrown away by the kernel, so a receipt recorded when the
frame entered the send buffer would mark as delivered what the client never got.

Theory of operation:
- The writer reports every write to `SentFrames.sent` with the connection's byte count after
  it (`TcpProgress.bytes_sent`). Each frame that carries a `Receipt` is kept with the byte
  offset at which it ends on the wire (server frames are unmasked, so a text frame is a 2-, 4-
  or 10-byte header and its UTF-8 payload).
- `release()` compares those offsets with what the peer acknowledged (`TcpProgress.acked()`,
  SIOCOUTQ on Linux) and hands the receipts of fully acknowledged frames to the delivery
  marks. One `AckWatch` task per process calls it every `ACK_POLL_S` for every connection
  with something pending: one wake-up per tick for all of them, instead of a timer and an
  ioctl per write on each connection (the marks are written every 100 ms anyway).
- When the connection ends, `settle()` waits (bounded) for the transport to record its final
  count (taken after the delayed ACKs settled, see `hypercorn_guard`), releases what the peer
  got, and forgets the rest: those items stay undelivered and come back in the next backlog.
- Until a receipt is released or forgotten, the marks count the write as in flight for its user,
  so a binding elsewhere waits for it (bounded) before reading the backlog.

Without Hypercorn's trio TCP server (or with TLS, where the socket's count does not map onto
frames) there is no count, and a frame counts as delivered once written, as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import trio

from handler.session.outgoing import Outgoing, Receipt, utf8_length

if TYPE_CHECKING:
    from handler.delivery_marks import DeliveryMarks
    from handler.transport.hypercorn_guard import TcpProgress

# How often the pending receipts of every connection are checked against the peers' ACKs.
ACK_POLL_S: Final = 0.01
# A clean close waits for the last ACKs this often (one connection, bounded).
CLOSE_POLL_S: Final = 0.005
# How long the end of a connection waits for the transport's final count.
SETTLE_TIMEOUT_S: Final = 3.0


def frame_wire_size(payload_bytes: int) -> int:
    """Bytes an unmasked, uncompressed WebSocket text frame takes on the wire (RFC 6455 5.2)."""
    if payload_bytes <= 125:
        return 2 + payload_bytes
    if payload_bytes <= 0xFFFF:
        return 4 + payload_bytes
    return 10 + payload_bytes


class AckWatch:
    """Releases the acknowledged receipts of every connection that has some pending."""

    __slots__ = ("_idle", "_waiting")

    def __init__(self) -> None:
        self._waiting: dict[SentFrames, None] = {}  # insertion-ordered set
        self._idle = trio.Event()

    def watch(self, frames: SentFrames) -> None:
        self._waiting[frames] = None
        self._idle.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            if not self._waiting:
                await self._idle.wait()
                self._idle = trio.Event()
            await trio.sleep(ACK_POLL_S)
            for frames in list(self._waiting):
                frames.release()
                if not frames.pending:
                    del self._waiting[frames]


class SentFrames:
    """Receipts of written frames, released once the peer acknowledged their last byte."""

    __slots__ = ("_exact_sizes", "_marks", "_on_sent", "_pending", "_progress", "_watch")

    def __init__(
        self,
        marks: DeliveryMarks,
        on_sent: Callable[[Outgoing], None],
        progress: TcpProgress | None,
        watch: AckWatch,
        *,
        exact_sizes: bool,
    ) -> None:
        self._marks = marks
        self._on_sent = on_sent
        self._watch = watch
        # Without a count of acknowledged bytes (TLS, another server) there is nothing to wait
        # for; decided once here, not with an extra ioctl per write.
        self._progress = (
            progress if progress is not None and progress.unacked() is not None else None
        )
        # With permessage-deflate the wire size of a frame is unknown: every frame of a write
        # then waits for the end of the whole write (later, never too early).
        self._exact_sizes = exact_sizes
        # A list, not a deque: an idle connection's empty list is a tenth of an empty deque's
        # memory, and releases take their acknowledged head in one slice.
        self._pending: list[tuple[int, Receipt]] = []

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def sent(self, batch: list[Outgoing]) -> None:
        """`batch` was written in one go; the byte count now includes all of it."""
        marks = self._marks
        on_sent = self._on_sent
        progress = self._progress
        if progress is None:
            for item in batch:
                on_sent(item)
                if item.receipt is not None:
                    marks.acknowledged(item.receipt)
            return
        end = progress.bytes_sent
        offsets: list[int] = []
        for item in reversed(batch):
            offsets.append(end)
            if self._exact_sizes and item.text:
                end -= frame_wire_size(utf8_length(item.text))
        for item, offset in zip(batch, reversed(offsets), strict=True):
            on_sent(item)
            if item.receipt is not None:
                marks.begin_write(item.receipt.user_id)
                self._pending.append((offset, item.receipt))
        if self._pending:
            self._watch.watch(self)

    def sent_partially(self, batch: list[Outgoing]) -> None:
        """A write of `batch` was cancelled halfway (the connection is being aborted): the
        frames the kernel took whole may still have reached the client."""
        progress = self._progress
        if progress is None or not self._exact_sizes:
            return
        start = progress.bytes_sent  # writes are serialized: ours began where the last ended
        if progress.written <= start:
            return  # it never began
        offset = start
        for item in batch:
            if item.text:
                offset += frame_wire_size(utf8_length(item.text))
            if offset > progress.written:
                break  # this frame and the rest never reached the kernel whole
            if item.receipt is not None:
                self._marks.begin_write(item.receipt.user_id)
                self._pending.append((offset, item.receipt))

    def release(self) -> None:
        """Hand the receipts of acknowledged frames to the delivery marks."""
        pending = self._pending
        if not pending:
            return
        assert self._progress is not None
        acked = self._progress.acked_written()
        marks = self._marks
        count = 0
        for offset, receipt in pending:
            if offset > acked:
                break
            marks.acknowledged(receipt)
            marks.end_write(receipt.user_id)
            count += 1
        del pending[:count]

    async def wait_acked(self, timeout_s: float) -> None:
        """Before a clean close: give the peer a moment to acknowledge what it was sent."""
        with trio.move_on_after(timeout_s):
            while self._pending:
                await trio.sleep(CLOSE_POLL_S)
                self.release()

    async def settle(self) -> None:
        """The connection is over: release what the peer got, forget the rest."""
        if not self._pending:
            return
        assert self._progress is not None
        with trio.move_on_after(SETTLE_TIMEOUT_S):
            await self._progress.closed.wait()
        self.release()
        for _, receipt in self._pending:
            self._marks.end_write(receipt.user_id)  # never acknowledged: stays undelivered
        self._pending.clear()
