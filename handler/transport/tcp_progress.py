"""How far a TCP connection's bytes got: written by the server, acknowledged by the peer.

PROTOCOL "Delivery": a frame counts as delivered only once the client's TCP stack took it.
Bytes still unacknowledged in the server's socket send buffer when a connection is aborted
are thrown away by the kernel, so "written" alone is not "delivered".

Theory of operation:
- One `TcpProgress` per TCP connection served by Hypercorn's trio `TCPServer`; the guarded
  `TCPServer.run` creates it and puts it in a `ContextVar`, so the ASGI app task (spawned from
  that task, hence running in a copy of its context) finds it with `current_progress()`.
- The guarded `protocol_send` counts every byte it hands to the kernel (`note_written`, exact
  even when a write is cancelled halfway) and every completed write (`note_sent`).
- While the socket is open, `unacked()` asks the kernel (`SIOCOUTQ`, Linux): bytes written
  but not yet acknowledged. Just before the socket is closed the value is frozen (`freeze`),
  then `closed` is set. Before an abort (`SO_LINGER` 0 reset) the transport first waits for
  delayed ACKs to settle (`wait_settled`): a receiver with a full window ACKs what its kernel
  took up to ~200 ms later, and SIOCOUTQ read at once would under-count what it got.
- With TLS (the socket's count does not map onto the application's bytes), on other systems,
  or when the ioctl fails, `unacked()` is None and `acked()` falls back to `bytes_sent`.
"""

from __future__ import annotations

import contextvars
import fcntl
import struct
import sys
import termios
from typing import Final

import trio

# TIOCOUTQ == SIOCOUTQ on Linux: for a TCP socket, bytes not yet acknowledged by the peer.
_SIOCOUTQ: Final[int | None] = (
    getattr(termios, "TIOCOUTQ", None) if sys.platform == "linux" else None
)
_INT: Final = struct.Struct("i")
# The ioctl's result, read at once after each call (one thread reads counts: the event loop's).
_OUTQ: Final = bytearray(_INT.size)

# Waiting for delayed ACKs before an abort: poll, stop once the count held still this long,
# and never wait longer than the cap in total.
SETTLE_POLL_S: Final = 0.025
SETTLE_STABLE_S: Final = 0.25
SETTLE_MAX_S: Final = 1.5

_CURRENT: Final[contextvars.ContextVar[TcpProgress | None]] = contextvars.ContextVar(
    "handler_tcp_progress", default=None
)


class TcpProgress:
    """Bytes written to one TCP connection and how many of them the peer acknowledged."""

    __slots__ = ("_final_unacked", "_frozen", "_socket", "_written", "bytes_sent", "closed")

    def __init__(self, sock: trio.socket.SocketType | None) -> None:
        """`sock` is the connection's plain TCP socket, or None when it is not countable."""
        self.bytes_sent = 0
        """Every byte whose write (`send_all`) completed on this connection."""
        self.closed = trio.Event()
        """Set once the socket was closed (aborted or normally) and its final count recorded."""
        self._socket = sock if _SIOCOUTQ is not None else None
        self._written = 0  # handed to the kernel, including a write cancelled halfway
        self._frozen = False
        self._final_unacked: int | None = None

    def __repr__(self) -> str:
        return (
            f"<TcpProgress sent={self.bytes_sent} unacked={self.unacked()} "
            f"closed={self.closed.is_set()}>"
        )

    def unacked(self) -> int | None:
        """Bytes written but not yet acknowledged by the peer; None when unknown.

        Read from the kernel while the socket is open; after the close, the value taken just
        before it.
        """
        if self._frozen:
            return self._final_unacked
        return self._read_unacked()

    def acked(self) -> int:
        """Bytes of completed writes the peer acknowledged (`bytes_sent` when unknown)."""
        unacked = self.unacked()
        if unacked is None:
            return self.bytes_sent
        # `_written` rather than `bytes_sent`: the kernel's count includes the part of a
        # cancelled write it took. Capped: a partly written frame never counts.
        return max(0, min(self.bytes_sent, self._written - unacked))

    @property
    def written(self) -> int:
        """Bytes handed to the kernel, including the taken part of a write cancelled halfway."""
        return self._written

    def acked_written(self) -> int:
        """Bytes the peer acknowledged, counting the taken part of a write cancelled halfway
        (`bytes_sent` when unknown). For a caller that knows where its frames end on the
        wire: a frame counts once this reaches its end."""
        unacked = self.unacked()
        if unacked is None:
            return self.bytes_sent
        return max(0, self._written - unacked)

    # -- for the transport ------------------------------------------------------------------

    def note_written(self, count: int) -> None:
        """The kernel took `count` more bytes (part of a write, perhaps)."""
        self._written += count

    def note_sent(self, count: int) -> None:
        """A write of `count` bytes completed."""
        self.bytes_sent += count

    def freeze(self) -> None:
        """Record the final unacknowledged count; call just before closing the socket."""
        if not self._frozen:
            self._final_unacked = self._read_unacked()
            self._frozen = True

    def set_closed(self) -> None:
        """The socket is closed: freeze (if not done) and wake the waiters on `closed`."""
        self.freeze()
        self.closed.set()

    async def wait_settled(self) -> None:
        """Wait (bounded) until the unacknowledged count stops moving: delayed ACKs arrived.

        Shielded: it runs while the connection is being torn down by a cancellation.
        """
        if self._frozen or self._read_unacked() is None:
            return
        with trio.CancelScope(shield=True):
            start = last_change = trio.current_time()
            last = self._read_unacked()
            while last:
                now = trio.current_time()
                if now - last_change >= SETTLE_STABLE_S or now - start >= SETTLE_MAX_S:
                    return
                await trio.sleep(SETTLE_POLL_S)
                value = self._read_unacked()
                if value != last:
                    last, last_change = value, trio.current_time()

    def _read_unacked(self) -> int | None:
        sock = self._socket
        if sock is None or _SIOCOUTQ is None:
            return None
        fd = sock.fileno()
        if fd < 0:
            return None
        try:
            fcntl.ioctl(fd, _SIOCOUTQ, _OUTQ, True)  # into the shared buffer: no allocation
        except OSError:
            return None
        value: int = _INT.unpack_from(_OUTQ)[0]
        return value


def current_progress() -> TcpProgress | None:
    """The `TcpProgress` of the connection the calling task serves.

    None outside Hypercorn's trio TCP server (or when the transport guard is not installed).
    """
    return _CURRENT.get()


def enter_connection(progress: TcpProgress) -> contextvars.Token[TcpProgress | None]:
    """Make `progress` current for this task and the tasks it spawns from now on."""
    return _CURRENT.set(progress)


def leave_connection(token: contextvars.Token[TcpProgress | None]) -> None:
    _CURRENT.reset(token)
