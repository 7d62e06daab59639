"""One WebSocket connection's outbound side: a bounded outbox and the binding buffer.

Theory of operation:
- Every frame for the socket goes through `outbox`, a trio memory channel read by the
  connection's single writer task, bounded twice: in frames (`send_queue`) and in bytes
  (`send_queue_bytes`; a single larger frame still goes alone when the queue is empty). Direct
  replies wait for room (with a deadline: a client that sends requests but never reads is
  dropped), so a large answer is produced only as fast as the client reads it; fan-out from
  other users never waits: when the outbox is full the connection is dropped (slow-consumer
  policy, close 1013) and what it missed stays undelivered in the store.
- While the connection binds (reads its backlog), fan-out is parked in `_pending` instead; the
  binder then writes the backlog, replays the parked items that the backlog did not already
  contain, and only then switches to live. All of it happens on one Trio thread, so the switch
  itself needs no lock. This is what makes delivery exactly-once around a (re)connect.
"""

from __future__ import annotations

import collections
import contextlib
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Final

import attrs
import trio

from handler.errors import CloseCode

REPLY_ROOM_TIMEOUT_S: Final = 5.0
DEFAULT_SEND_QUEUE_BYTES: Final = 1 << 20
# How long a binding remembers its backlog's ids to drop late fan-out of the same items: far
# longer than a commit-to-publish delay, even across nodes.
BACKLOG_MEMORY_S: Final = 60.0


@attrs.frozen
class Receipt:
    """What counts as delivered to `user_id` once the frame carrying it is written."""

    user_id: str
    chat_ids: tuple[str, ...] = ()
    message_ids: tuple[str, ...] = ()


@attrs.frozen
class Outgoing:
    """An encoded frame on its way to the socket."""

    text: str
    frame_type: str
    receipt: Receipt | None = None
    published_at: float | None = None  # trio clock, for publish-to-deliver latency
    message_id: str | None = None  # for de-duplicating fan-out against the backlog
    chat_id: str | None = None  # same, for new chats


def utf8_length(text: str) -> int:
    """Bytes of `text` in UTF-8, without encoding it in the common ASCII case."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


PING: Final = "ping"  # frame_type of the keep-alive item: a WebSocket ping, not a text frame
_PING_ITEM: Final = Outgoing("", PING)
# frame_type of the item after which the writer closes the connection (`close_when_written`).
CLOSE_AFTER: Final = "close"
_CLOSE_ITEM: Final = Outgoing("", CLOSE_AFTER)


def new_connection_id() -> str:
    return secrets.token_hex(8)


class Connection:
    """State shared by a connection's reader, writer and the hub."""

    # Slots: one of these lives as long as each idle connection (10,000 per worker).
    __slots__ = (
        "_backlog_ids_until",
        "_byte_capacity",
        "_capacity",
        "_high_water",
        "_on_drop",
        "_pending",
        "_queued_bytes",
        "_room",
        "_send",
        "cancel_scope",
        "close_code",
        "close_reason",
        "deferred_close",
        "id",
        "last_sent",
        "outbox",
        "user_id",
    )

    def __init__(
        self,
        send_queue: int,
        on_drop: Callable[[Connection], None],
        send_queue_bytes: int = DEFAULT_SEND_QUEUE_BYTES,
    ) -> None:
        self.id = new_connection_id()
        self.user_id: str | None = None
        self.close_code: CloseCode | None = None
        self.close_reason = ""
        self.deferred_close: tuple[CloseCode, str] | None = None
        self.cancel_scope = trio.CancelScope()
        self.last_sent = trio.current_time()  # by the writer; the reader schedules pings
        self._capacity = send_queue
        self._byte_capacity = send_queue_bytes
        self._queued_bytes = 0  # UTF-8 bytes of the texts in the outbox
        self._room = trio.Event()  # set by the writer when it takes frames out
        self._send, self.outbox = trio.open_memory_channel[Outgoing](send_queue)
        self._pending: collections.deque[Outgoing] | None = None
        self._on_drop = on_drop
        # What the binding's snapshot covered, for a while: a message can be committed (and so
        # be in the backlog, or already delivered to another connection of the user) a moment
        # before its fan-out is published, even from another node. Such late fan-out is
        # dropped: per chat, any message id up to the snapshot's newest one.
        self._high_water: Mapping[str, int] = {}
        self._backlog_ids_until = 0.0

    @property
    def binding(self) -> bool:
        return self._pending is not None

    def close(self, code: CloseCode, reason: str = "") -> None:
        """Ask the transport to close with `code`; the first request wins."""
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
        self.cancel_scope.cancel()

    async def close_when_written(self, code: CloseCode, reason: str) -> None:
        """Close with `code` once the frames queued so far are written (an error frame that
        explains the close must reach the client first)."""
        self.deferred_close = (code, reason)
        await self.reply(_CLOSE_ITEM)

    # ------------------------------------------------------------------ writes

    def push_nowait(self, item: Outgoing) -> None:
        """Fan-out path: never blocks; a full outbox drops the connection."""
        if self.close_code is not None or self._in_backlog(item):
            return
        if self._pending is not None:
            if len(self._pending) >= self._capacity:
                self._drop()
            else:
                self._pending.append(item)
            return
        size = utf8_length(item.text)
        if not self._has_room(size):
            self._drop()
            return
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            self._drop()
        except trio.ClosedResourceError:
            pass
        else:
            self._queued_bytes += size

    def _has_room(self, size: int) -> bool:
        queued = self._queued_bytes
        return queued == 0 or queued + size <= self._byte_capacity

    def taken(self, items: Sequence[Outgoing]) -> None:
        """Called by the writer for the frames it took out of the outbox."""
        for item in items:
            if item.text:
                self._queued_bytes -= utf8_length(item.text)
        self._room.set()
        self._room = trio.Event()

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    def _in_backlog(self, item: Outgoing) -> bool:
        if not self._backlog_ids_until:
            return False
        if trio.current_time() > self._backlog_ids_until:
            self._high_water = {}
            self._backlog_ids_until = 0.0
            return False
        newest = self._high_water.get(item.chat_id or "")
        if newest is None:
            return False  # a chat created after the snapshot
        return item.message_id is None or int(item.message_id) <= newest

    def push_ping(self) -> None:
        """Queue a keep-alive ping for the writer (pings go through the one writer)."""
        self.last_sent = trio.current_time()  # one ping per quiet interval
        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
            self._send.send_nowait(_PING_ITEM)

    async def reply(self, item: Outgoing) -> None:
        """Direct-reply path: waits for room (frames and bytes), but a client that does not
        read is dropped."""
        size = utf8_length(item.text)
        with trio.move_on_after(REPLY_ROOM_TIMEOUT_S):
            while not self._has_room(size):
                await self._room.wait()
            self._queued_bytes += size  # before the send: the writer may take it at once
            try:
                await self._send.send(item)
            except trio.ClosedResourceError:
                self._queued_bytes -= size
            except BaseException:
                self._queued_bytes -= size  # cancelled: trio guarantees it was not sent
                raise
            return
        self._drop()

    def _drop(self) -> None:
        self._on_drop(self)
        self.close(CloseCode.TRY_AGAIN_LATER, "send queue full: client is not reading")

    # ------------------------------------------------------------------ binding

    def start_binding(self) -> None:
        self._pending = collections.deque()

    async def finish_binding(self, high_water: Mapping[str, str]) -> None:
        """Replay parked fan-out the binding's snapshot did not cover, then go live."""
        pending = self._pending
        assert pending is not None
        self._high_water = {chat_id: int(newest) for chat_id, newest in high_water.items()}
        self._backlog_ids_until = trio.current_time() + BACKLOG_MEMORY_S
        while pending:
            item = pending.popleft()
            if not self._in_backlog(item):
                await self.reply(item)
        # No await between the empty check above and this line: nothing can slip in between.
        self._pending = None

    def abort_binding(self) -> None:
        self._pending = None

    def close_outbox(self) -> None:
        self._send.close()
