"""One WebSocket connection's outbound side: a bounded outbox, its close request, its writer.

Theory of operation:
- Every frame for the socket goes through `outbox`, a trio memory channel read by the
  connection's single writer task, bounded twice: in frames (`send_queue`) and in bytes
  (`send_queue_bytes`; a single larger frame still goes alone when the queue is empty). Direct
  replies wait for room (with a deadline: a client that sends requests but never reads is
  dropped), so a large answer is produced only as fast as the client reads it; fan-out from
  other users never waits: when the outbox is full the connection is dropped (slow-consumer
  policy, close 1013) and what it missed stays undelivered in the store.
- The writer task lives in the connection's own nursery until the connection binds, then in
  its user's nursery (`Hub`), so that closing a user is one cancel. It moves at a clean point:
  the old writer takes `RETIRE_ITEM` after everything queued before it, and exits; the new
  one starts on the same outbox (`WriterHome`).
- The binding rules (parking fan-out, the snapshot's marks) are the session machine's; this
  module only queues what it is told to.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import trio

from handler.errors import CloseCode
from handler.session.outgoing import (
    CLOSE_AFTER,
    CLOSE_ITEM,
    MARK_ONLY,
    PING,
    PING_ITEM,
    RETIRE,
    RETIRE_ITEM,
    TYPING,
    Outgoing,
    Receipt,
    utf8_length,
)

__all__ = [
    "CLOSE_AFTER",
    "MARK_ONLY",
    "PING",
    "RETIRE",
    "Connection",
    "Outgoing",
    "Receipt",
    "WriterHome",
    "utf8_length",
]

log = logging.getLogger("handler.connection")

REPLY_ROOM_TIMEOUT_S: Final = 5.0
WRITER_STOP_TIMEOUT_S: Final = 2.0
DEFAULT_SEND_QUEUE_BYTES: Final = 1 << 20


def new_connection_id() -> str:
    return secrets.token_hex(8)


class Connection:
    """State shared by a connection's reader, writer and the hub."""

    # Slots: one of these lives as long as each idle connection (10,000 per worker).
    __slots__ = (
        "_byte_capacity",
        "_on_drop",
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
        "writer",
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
        self._byte_capacity = send_queue_bytes
        self._queued_bytes = 0  # UTF-8 bytes of the texts in the outbox
        self._room = trio.Event()  # set by the writer when it takes frames out
        self._send, self.outbox = trio.open_memory_channel[Outgoing](send_queue)
        self._on_drop = on_drop
        self.writer = WriterHome(self)

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
        await self.reply(CLOSE_ITEM)

    # ------------------------------------------------------------------ writes

    def push_nowait(self, item: Outgoing) -> None:
        """Fan-out path: never blocks; a full outbox drops the connection. Typing is
        discarded once the outbox is half full, and so never causes a drop."""
        if self.close_code is not None:
            return
        size = utf8_length(item.text)
        if item.frame_type == TYPING and self._half_full(size):
            return
        if not self._has_room(size):
            self.drop()
            return
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            self.drop()
        except trio.ClosedResourceError:
            pass
        else:
            self._queued_bytes += size

    def _half_full(self, size: int) -> bool:
        statistics = self._send.statistics()
        return (
            statistics.current_buffer_used * 2 >= statistics.max_buffer_size
            or (self._queued_bytes + size) * 2 > self._byte_capacity
        )

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

    def push_ping(self) -> None:
        """Queue a keep-alive ping for the writer (pings go through the one writer)."""
        self.last_sent = trio.current_time()  # one ping per quiet interval
        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
            self._send.send_nowait(PING_ITEM)

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
        self.drop()

    def drop(self) -> None:
        """Slow-consumer policy: close 1013; what was not written stays undelivered."""
        if self.close_code is None:
            self._on_drop(self)
        self.close(CloseCode.TRY_AGAIN_LATER, "send queue full: client is not reading")

    def close_outbox(self) -> None:
        self._send.close()


WriterTask = Callable[[], Awaitable[None]]
"""Drains the outbox until it ends, the client is gone, or it takes `RETIRE_ITEM`."""


class WriterHome:
    """Where the connection's one writer task runs, and moving it between nurseries.

    At most one writer exists at a time, started on demand: in the connection's nursery when
    an unbound connection has something to send, straight in the user's nursery when a
    connection binds before that (the usual `?token=` case: no move at all). `move_to`
    hands the socket over at a clean point (between writes), so frames queued before the
    move go out first, in order.
    """

    __slots__ = ("_connection", "_exited", "_scope", "nursery", "task")

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self.task: WriterTask | None = None  # set by the transport before the first start
        self._scope: trio.CancelScope | None = None
        self._exited = trio.Event()
        self._exited.set()
        self.nursery: trio.Nursery | None = None

    @property
    def running(self) -> bool:
        return not self._exited.is_set()

    async def ensure(self, nursery: trio.Nursery) -> None:
        """Start the writer in `nursery` unless one is running (anywhere)."""
        if not self.running:
            await self._start_in(nursery)

    async def move_to(self, nursery: trio.Nursery) -> None:
        """Retire the running writer (if any, and elsewhere) after what is queued, then run
        it in `nursery`."""
        if self.running and nursery is self.nursery:
            return
        await self.retire()
        await self._start_in(nursery)

    async def retire(self) -> None:
        """Let the writer finish what is queued, then stop it (no close)."""
        if self.running:
            await self._connection.reply(RETIRE_ITEM)
            await self._exited.wait()

    async def stop(self) -> None:
        """Stop the writer now (the connection is ending); a write under way is abandoned,
        which aborts the connection (`hypercorn_guard`). Bounded: the caller's teardown is
        shielded, and a writer that does not end must not keep the server from stopping."""
        if self._scope is not None:
            self._scope.cancel()
        with trio.move_on_after(WRITER_STOP_TIMEOUT_S) as waited:
            await self._exited.wait()
        if waited.cancelled_caught:
            log.error("writer of conn=%s did not stop in time", self._connection.id)

    async def _start_in(self, nursery: trio.Nursery) -> None:
        """Start the writer in `nursery`. `start_soon`, not `start`: the scope and the exit
        event exist before the task runs, so `stop()` and `running` hold at once, and a
        connection does not pay a scheduler round for the handshake."""
        assert self.task is not None, "the transport sets the writer's task first"
        exited = trio.Event()
        scope = trio.CancelScope()
        nursery.start_soon(self._run, self.task, scope, exited)  # raises if it is closed
        self.nursery, self._exited, self._scope = nursery, exited, scope

    async def _run(self, task: WriterTask, scope: trio.CancelScope, exited: trio.Event) -> None:
        try:
            with scope:
                await task()
        except trio.Cancelled:
            # Cancelled from outside (its user was closed, or the server is stopping): the
            # socket has no writer any more, so end the connection. The first close request
            # wins, so a user closed by the hub keeps the code it was given.
            self._connection.close(CloseCode.GOING_AWAY, "server shutting down")
            raise
        except Exception:
            # A writer bug must end its connection, never its user's nursery (and the hub).
            log.exception("writer failed conn=%s", self._connection.id)
            self._connection.close(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            if self._scope is scope:
                self._scope = None
            exited.set()
