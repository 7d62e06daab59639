"""Hypercorn's trio `TCPServer`, made safe: one connection never ends the server.

Replaced (each checked against Hypercorn 0.18's source, fingerprinted in the tests):

- `run`, wrapped: creates the connection's `TcpProgress` and makes it current for the tasks
  of the connection, and isolates faults. Upstream lets any exception that is not an
  `OSError` escape into `trio.serve_listeners`' handler nursery, which ends every listener
  (a `BusyResourceError` from one connection killed the process). Here an `Exception` is
  logged with a correlation id and that connection is closed; `Cancelled`, `KeyboardInterrupt`
  and other `BaseException`s still propagate. Upstream fix: catch `Exception` in `run` and
  log it, like the ASGI task wrapper (`trio/task_group.py` `_handle`) already does.
- `protocol_send`: socket writes are cancellable (a send to a client that stopped reading
  must not block its task forever; upstream shields them), counted exactly for
  `TcpProgress`, and a write cancelled midway aborts the connection after the delayed ACKs
  settled. The socket's close (`Closed`) and the keep-alive timer (`Updated`) are shielded:
  Hypercorn performs them inside the ASGI app's last `send()`, in the app's task, right
  after (still inside that `send()`) it delivered `http.disconnect` to the app; Quart-Trio
  cancels its request nursery the moment it receives `http.disconnect`, so the close of a
  `Connection: close` / HTTP/1.0 response and the start of the keep-alive timer were
  cancelled at their first checkpoint and the idle socket stayed open forever (a bare ASGI
  app, which does not cancel itself, was unaffected). Upstream fix: shield the connection's
  own bookkeeping from the cancel scopes of the app that triggered it (or run it outside
  the app's task).
- `_close`: `send_eof` under the send lock (upstream calls it while another task may be in
  `send_all`: `BusyResourceError`), never waiting for a writer that is stuck (closing the
  socket wakes it), shielded, and with the final `TcpProgress` count taken first.
  Upstream fix: take `send_lock` around `send_eof`.
- `_read_data`, wrapped: when the peer closed or reset the connection, the socket is closed
  at once (after the delayed ACKs settled) instead of when the last task of the connection
  ends; upstream kept a connection the client had left open (CLOSE_WAIT) until its
  keep-alive timer fired. Upstream fix: close (and stop the idle timer) when `_read_data`
  ends.
- `_initiate_server_close` (the keep-alive timeout): the final count is taken before the
  socket is closed.

Not fixes but the cost of a frame: trio's socket calls yield to the scheduler after every
successful `recv`/`send` (its "checkpoint sandwich"), so each read and each write costs one
more pass of the run loop than the I/O needs. The read loop and the counted write call the
socket directly and wait (`wait_readable`, or trio's `send`) only when it would block, or,
for reads, after a short read (the buffer is then most likely empty, and trying again would
cost a failing `recv`); the read loop waits at least every `READ_STREAK` reads, so a peer
that never stops sending cannot starve the others.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import secrets
import socket
import struct
from typing import Any, Final

import trio
from hypercorn.events import Closed, RawData, Updated
from hypercorn.protocol.events import Data
from hypercorn.protocol.h11 import STREAM_ID, H11Protocol, H11WSConnection
from hypercorn.protocol.ws_stream import WSStream
from hypercorn.trio.tcp_server import TCPServer

from handler.transport.patching import Patch
from handler.transport.tcp_progress import TcpProgress, enter_connection, leave_connection

log = logging.getLogger("handler.transport")

_original_run = TCPServer.run
_original_protocol_send = TCPServer.protocol_send
_original_close = TCPServer._close
_original_initiate_server_close = TCPServer._initiate_server_close
_original_read_data = TCPServer._read_data

_PROGRESS_ATTR: Final = "_handler_progress"
_CLOSED_ERRNOS: Final = frozenset({errno.EBADF, errno.ENOTSOCK})
# Hypercorn's read size (`hypercorn.trio.tcp_server.MAX_RECV`).
MAX_RECV: Final = 2**16
# Full reads in a row after which the read loop waits for readiness (and yields) anyway.
READ_STREAK: Final = 8


def _plain_socket(stream: Any) -> trio.socket.SocketType | None:
    """The socket of a plain TCP stream; None for TLS (its bytes are not the app's)."""
    if isinstance(stream, trio.SocketStream):
        return stream.socket
    return None


def _stdlib_socket(sock: trio.socket.SocketType | None) -> socket.socket | None:
    """The standard-library socket inside a trio socket (non-blocking), if it has one."""
    raw = getattr(sock, "_sock", None)
    return raw if isinstance(raw, socket.socket) else None


def progress_of(server: Any) -> TcpProgress | None:
    """The `TcpProgress` the guarded `run` attached to a `TCPServer`."""
    progress: TcpProgress | None = getattr(server, _PROGRESS_ATTR, None)
    return progress


def _split_faults(
    error: BaseException,
) -> tuple[BaseException | None, BaseException | None]:
    """(the `Exception`s, everything else) of an exception or exception group."""
    if isinstance(error, BaseExceptionGroup):
        return error.split(Exception)
    if isinstance(error, Exception):
        return error, None
    return None, error


def _only_socket_errors(faults: BaseException) -> bool:
    if isinstance(faults, BaseExceptionGroup):
        return faults.split(OSError)[1] is None
    return isinstance(faults, OSError)


def _peer(stream: Any) -> str:
    sock = _plain_socket(stream)
    if sock is None:
        sock = getattr(getattr(stream, "transport_stream", None), "socket", None)
    try:
        host, port = sock.getpeername()[:2] if sock is not None else ("-", 0)
    except OSError:
        return "-"
    return f"{host}:{port}"


async def _isolated_run(self: Any) -> None:
    """Hypercorn's `run`, with the connection's `TcpProgress` current and faults contained."""
    progress = TcpProgress(_plain_socket(self.stream))
    peer = _peer(self.stream)
    setattr(self, _PROGRESS_ATTR, progress)
    token = enter_connection(progress)
    try:
        await _original_run(self)
    except BaseException as error:  # split below; non-Exceptions re-raised
        faults, rest = _split_faults(error)
        if faults is not None:
            correlation_id = secrets.token_hex(6)
            # Socket errors are the peer's doing (upstream swallows them, but trio's strict
            # exception groups wrap them past its `except OSError`): not worth an ERROR.
            level = logging.DEBUG if _only_socket_errors(faults) else logging.ERROR
            log.log(
                level,
                "connection fault peer=%s correlation=%s",
                peer,
                correlation_id,
                exc_info=faults,
            )
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.stream)
        if rest is not None:
            if rest is error:
                raise
            raise rest from None
    finally:
        progress.set_closed()
        leave_connection(token)


async def _send_counted(stream: Any, data: bytes, progress: TcpProgress | None) -> None:
    """`stream.send_all(data)`, counting exactly what the kernel took even if cancelled.

    For a plain `trio.SocketStream` this is its `send_all` loop (same errors), done here so a
    cancelled write still reports how much of it left; the caller holds the send lock, which
    is what `send_all`'s conflict detector would enforce. Other streams (TLS) use `send_all`.
    """
    sock = _plain_socket(stream)
    if sock is None or progress is None:
        await stream.send_all(data)
        if progress is not None:
            progress.note_written(len(data))
            progress.note_sent(len(data))
        return
    if sock.did_shutdown_SHUT_WR or sock.fileno() < 0:
        raise trio.ClosedResourceError("the socket was closed")
    with memoryview(data) as view:
        if not view:
            await trio.lowlevel.checkpoint()
        raw = _stdlib_socket(sock)
        await trio.lowlevel.checkpoint_if_cancelled()
        total = 0
        while total < len(view):
            try:
                with view[total:] as rest:
                    try:
                        if raw is None:
                            raise BlockingIOError
                        count = raw.send(rest)
                    except BlockingIOError:
                        count = await sock.send(rest)  # waits until the socket takes some
            except OSError as error:
                if error.errno in _CLOSED_ERRNOS:
                    raise trio.ClosedResourceError("the socket was closed") from None
                raise trio.BrokenResourceError(f"socket connection broken: {error}") from error
            total += count
            progress.note_written(count)
    progress.note_sent(len(data))


def _reset(stream: Any) -> None:
    """Reset the TCP connection now: no FIN handshake with a peer that is not reading."""
    sock = _plain_socket(stream)
    if sock is None:
        sock = getattr(getattr(stream, "transport_stream", None), "socket", None)
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def _abort(self: Any) -> None:
    """Abort the connection, having first let the peer's delayed ACKs arrive (bounded)."""
    progress = progress_of(self)
    if progress is not None:
        await progress.wait_settled()
        progress.freeze()
    _reset(self.stream)
    if progress is not None:
        progress.set_closed()


async def _guarded_protocol_send(self: Any, event: Any) -> None:
    """Hypercorn's `protocol_send` with cancellable, counted writes and shielded bookkeeping."""
    if isinstance(event, RawData):
        async with self.send_lock:
            try:
                await _send_counted(self.stream, event.data, progress_of(self))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            except trio.Cancelled:
                # The peer did not take the bytes in time; a partly written frame cannot be
                # completed later, so the connection is over. Resetting it also wakes every
                # task waiting on this socket.
                await _abort(self)
                raise
            else:
                return
        await self.protocol.handle(Closed())
    elif isinstance(event, Closed):
        # Often called from inside the app's `send()`, in the app's task: the app's cancel
        # scopes must not cancel the close of the socket (`_close` shields itself). Telling
        # the protocol stays cancellable: it may wait on the app's receive queue.
        progress = progress_of(self)
        if progress is not None:
            # The close handshake just wrote its last frame: let the peer's ACKs of what it
            # got arrive before the final count (bounded, shielded), or frames it did get
            # would count as undelivered and come again in its next backlog.
            await progress.wait_settled()
        await self._close()
        await self.protocol.handle(Closed())
    elif isinstance(event, Updated):
        # Likewise for the keep-alive timer: (re)started or stopped, never cancelled halfway
        # (a lock and a `nursery.start` that returns at once).
        with trio.CancelScope(shield=True):
            await _original_protocol_send(self, event)
    else:
        await _original_protocol_send(self, event)


async def _guarded_close(self: Any) -> None:
    """Close the socket: FIN under the send lock (unless a writer holds it), then close."""
    with trio.CancelScope(shield=True):
        progress = progress_of(self)
        if progress is not None:
            progress.freeze()  # before the FIN, which the kernel counts as one byte
        try:
            self.send_lock.acquire_nowait()
        except trio.WouldBlock:
            pass  # a writer is mid-write (perhaps stuck): closing the socket wakes it
        else:
            try:
                await self.stream.send_eof()
            except (
                trio.BrokenResourceError,
                trio.BusyResourceError,
                trio.ClosedResourceError,
                AttributeError,  # a TLS stream has no send_eof
            ):
                pass
            finally:
                self.send_lock.release()
        await self.stream.aclose()
        if progress is not None:
            progress.set_closed()


async def _read_then_close(self: Any) -> None:
    """Hypercorn's read loop; once it ends (the peer closed or reset, or we closed), close.

    Upstream leaves the socket open until every task of the connection ended: the app after
    its disconnect, and the keep-alive timer, which holds a connection the client already
    left (CLOSE_WAIT) for the whole keep-alive timeout. Its protocol already treats the
    peer's EOF as the end (the app gets its disconnect), so nothing is lost by closing now,
    and `TcpProgress.closed` is set when the connection really ended, not seconds later.
    """
    raw = _stdlib_socket(_plain_socket(self.stream))
    if raw is None or self.config.read_timeout:
        await _original_read_data(self)
    else:
        await _read_directly(self, raw)
    with trio.CancelScope(shield=True):
        await self.idle_task.stop()
        progress = progress_of(self)
        if progress is not None:
            await progress.wait_settled()  # a half-closed peer may still be acknowledging
        await self._close()


def _websocket_of(protocol: Any) -> WSStream | None:
    """The WebSocket stream behind an upgraded HTTP/1.1 connection, when the bytes read can
    go to it directly: Hypercorn's `H11Protocol` would pass them through unchanged (its
    `H11WSConnection` buffers nothing between reads)."""
    inner = getattr(protocol, "protocol", None)
    if type(inner) is not H11Protocol:
        return None
    connection = inner.connection
    if type(connection) is not H11WSConnection or connection.buffer:
        return None
    stream = inner.stream
    return stream if type(stream) is WSStream else None


async def _read_directly(self: Any, raw: socket.socket) -> None:
    """Hypercorn's read loop (no read timeout), reading the socket directly: it waits only
    when there is nothing to read, and does not yield after every successful read. Once the
    connection is a WebSocket, data goes straight to its stream (what `H11Protocol` does,
    without its layers per read)."""
    handle = self.protocol.handle
    websocket: WSStream | None = None
    streak = 0
    while True:
        try:
            data = raw.recv(MAX_RECV)
        except BlockingIOError:
            data = None
        except OSError:  # reset by the peer, or closed here (what trio reports as broken)
            break
        if data is not None:
            if not data:
                await handle(RawData(data))
                break
            websocket = websocket or _websocket_of(self.protocol)
            if websocket is not None:
                await websocket.handle(Data(stream_id=STREAM_ID, data=data))
            else:
                await handle(RawData(data))
            if len(data) == MAX_RECV and streak < READ_STREAK:
                streak += 1
                continue  # more is probably waiting: read it without a pass of the run loop
        # The buffer is most likely empty after a short read: wait rather than try again.
        streak = 0
        if raw.fileno() < 0:
            break  # closed while its data was handled (trio would raise for a closed socket)
        try:
            await trio.lowlevel.wait_readable(raw)
        except trio.ClosedResourceError:
            break
    await handle(Closed())


async def _guarded_initiate_server_close(self: Any) -> None:
    """The keep-alive timeout's close, with the final count taken before the socket goes."""
    progress = progress_of(self)
    if progress is not None:
        progress.freeze()
    await _original_initiate_server_close(self)
    if progress is not None:
        progress.set_closed()


PATCHES: Final = (
    Patch(TCPServer, "run", _isolated_run, _original_run),
    Patch(TCPServer, "protocol_send", _guarded_protocol_send, _original_protocol_send),
    Patch(TCPServer, "_close", _guarded_close, _original_close),
    Patch(TCPServer, "_read_data", _read_then_close, _original_read_data),
    Patch(
        TCPServer,
        "_initiate_server_close",
        _guarded_initiate_server_close,
        _original_initiate_server_close,
    ),
)
