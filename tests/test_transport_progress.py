"""`TcpProgress` on real sockets: what was written, what the peer's TCP stack took.

PROTOCOL "Delivery": bytes still unacknowledged in the server's send buffer when a connection
is aborted do not count. Checked here against the kernel: a reader acknowledges everything; a
client that does not read leaves bytes unacknowledged; after an abort, what the client can
still read is exactly what `acked()` reported (up to the write cut short by the abort).
"""

from __future__ import annotations

import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from functools import partial
from typing import Any, Final

import attrs
import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from support import serve_lifespan

from handler.transport.hypercorn_guard import (
    ACCEPT_OPTIONS_KEY,
    SEND_PING,
    TcpProgress,
    current_progress,
    install,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SIOCOUTQ is Linux only")

CHUNK: Final = 16 * 1024
BODY_CHUNKS: Final = 64
SMALL_RCVBUF: Final = 4096

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


@attrs.define
class Writer:
    """One response being written: its connection's progress, and a handle to cut it short."""

    progress: TcpProgress | None
    cancel_scope: trio.CancelScope
    chunks_sent: int = 0
    done: trio.Event = attrs.field(factory=trio.Event)


@attrs.define
class BulkApp:
    """An ASGI app that answers `GET /N` with N chunks of `CHUNK` bytes (`/0`: endless)."""

    writers: list[Writer] = attrs.field(factory=list)
    started: trio.Event = attrs.field(factory=trio.Event)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        if scope["type"] == "websocket":
            await self._websocket(receive, send)
            return
        chunks = int(scope["path"].strip("/") or 0)
        length = (chunks or 1_000_000) * CHUNK
        writer = Writer(current_progress(), trio.CancelScope())
        self.writers.append(writer)
        self.started.set()
        headers = [(b"content-length", str(length).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        with writer.cancel_scope:
            while chunks == 0 or writer.chunks_sent < chunks:
                await send({"type": "http.response.body", "body": b"x" * CHUNK, "more_body": True})
                writer.chunks_sent += 1
        if not writer.cancel_scope.cancelled_caught:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        writer.done.set()

    async def _websocket(self, receive: Receive, send: Send) -> None:
        """Accept, send one text frame and a ping, close when the client closes."""
        await receive()
        options = {"max_message_bytes": 1024, "compression": False}
        await send({"type": "websocket.accept", ACCEPT_OPTIONS_KEY: options})
        writer = Writer(current_progress(), trio.CancelScope())
        self.writers.append(writer)
        await send({"type": "websocket.send", "text": "hello"})
        await send({"type": SEND_PING})
        writer.done.set()
        while (await receive())["type"] != "websocket.disconnect":
            pass


@pytest.fixture
async def bulk(nursery: trio.Nursery) -> AsyncIterator[tuple[BulkApp, int]]:
    install()
    app = BulkApp()
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 2.0
    config.keep_alive_timeout = 1.0  # short, to tell a prompt close from the timer's
    stop = trio.Event()
    urls = await nursery.start(partial(hypercorn_serve, app, config, shutdown_trigger=stop.wait))
    yield app, int(urls[0].rsplit(":", 1)[1])
    stop.set()


def test_no_progress_outside_the_server() -> None:
    assert current_progress() is None


def test_an_uncountable_connection_reports_what_was_written() -> None:
    progress = TcpProgress(None)  # e.g. TLS: the socket's count is not the app's bytes
    progress.note_written(10)
    progress.note_sent(10)
    assert progress.unacked() is None
    assert progress.acked() == progress.bytes_sent == 10


async def test_a_reading_client_acknowledges_every_byte(bulk: tuple[BulkApp, int]) -> None:
    app, port = bulk
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /8 HTTP/1.1\r\nHost: x\r\n\r\n")
        received = 0
        while received < 8 * CHUNK:
            received += len(await stream.receive_some(65536))
        await app.started.wait()
        writer = app.writers[0]
        await writer.done.wait()
        progress = writer.progress
        assert progress is not None
        assert progress.bytes_sent > 8 * CHUNK  # the body and the response head
        for _ in range(400):  # the kernel's ACKs: nothing to wait on but the clock
            if progress.acked() == progress.bytes_sent:
                break
            await trio.sleep(0.01)
        assert progress.unacked() == 0
        assert not progress.closed.is_set()
        await stream.aclose()
        left = trio.current_time()
        await progress.closed.wait()  # closed normally once the client left
        assert trio.current_time() - left < 0.5  # not at the keep-alive timeout (1 s here)
        assert progress.acked() == progress.bytes_sent


async def test_requests_on_one_connection_share_one_progress(bulk: tuple[BulkApp, int]) -> None:
    app, port = bulk
    with trio.fail_after(5):
        first = await trio.open_tcp_stream("127.0.0.1", port)
        second = await trio.open_tcp_stream("127.0.0.1", port)
        for stream in (first, first, second):
            await stream.send_all(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while answer.count(b"x") < CHUNK:
                answer += await stream.receive_some(65536)
        await first.aclose()
        await second.aclose()
    progresses = [writer.progress for writer in app.writers]
    assert progresses[0] is progresses[1] is not None
    assert progresses[2] is not progresses[0]


async def test_a_websocket_task_sees_its_connection_and_every_byte_is_counted(
    bulk: tuple[BulkApp, int],
) -> None:
    """The ASGI task of a WebSocket inherits the connection's progress; the 101 response, the
    frames, the ping and the close frame are all in `bytes_sent`."""
    app, port = bulk
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        received = b""
        while not received.endswith(b"\x89\x00"):  # up to the ping
            data = await stream.receive_some(65536)
            assert data, received
            received += data
        await app.writers[0].done.wait()  # the server saw its writes complete
        progress = app.writers[0].progress
        assert progress is not None
        head, _, frames = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        assert frames == b"\x81\x05hello\x89\x00"
        assert progress.bytes_sent == len(received)
        # The client closes; the server answers with its own close frame (2 + 2 bytes).
        await stream.send_all(b"\x88\x82\x00\x00\x00\x00\x03\xe8")
        rest = b""
        while data := await stream.receive_some(65536):
            rest += data
        await progress.closed.wait()
    assert rest == b"\x88\x02\x03\xe8"
    assert progress.bytes_sent == len(received) + len(rest)
    # Counted at the close, just before the socket went: all but (at most) the close frame
    # written a moment earlier, whose ACK may still be on its way.
    assert progress.bytes_sent - len(rest) <= progress.acked() <= progress.bytes_sent


def _non_reading_client(port: int, rcvbuf: int | None = SMALL_RCVBUF) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /0 HTTP/1.1\r\nHost: x\r\n\r\n")
    return sock


def _read_until_reset(sock: socket.socket) -> int:
    sock.settimeout(5)
    total = 0
    try:
        while data := sock.recv(1 << 20):
            total += len(data)
    except ConnectionResetError:
        pass
    return total


async def _wait_stalled(writer: Writer, interval_s: float = 0.3) -> None:
    """Until the endless response stops advancing: the client's buffers are full."""
    last = -1
    while writer.chunks_sent != last:
        last = writer.chunks_sent
        await trio.sleep(interval_s)


async def test_a_client_that_does_not_read_leaves_bytes_unacknowledged(
    bulk: tuple[BulkApp, int],
) -> None:
    app, port = bulk
    with trio.fail_after(10):
        sock = _non_reading_client(port)
        try:
            await app.started.wait()
            writer = app.writers[0]
            await _wait_stalled(writer)
            progress = writer.progress
            assert progress is not None
            unacked = progress.unacked()
            assert unacked is not None
            assert unacked > 0
            # Part of the write in progress is in the kernel already (and in `unacked`), so
            # the peer may have acknowledged more than `bytes_sent - unacked`; never more
            # than the completed writes, though.
            assert progress.bytes_sent - unacked <= progress.acked() <= progress.bytes_sent
            assert not progress.closed.is_set()
        finally:
            sock.close()


async def test_after_an_abort_the_client_reads_exactly_what_was_acknowledged(
    bulk: tuple[BulkApp, int],
) -> None:
    """A write to a client that stopped reading is cancelled: the connection is reset after
    the delayed ACKs settled, and `acked()` is what the client can still read.

    The cancel comes 20 ms after the writes stalled, while the client's kernel still owes
    ACKs for data it took (without the wait, it read 49,152 bytes more than SIOCOUTQ said).
    """
    app, port = bulk
    with trio.fail_after(15):
        sock = _non_reading_client(port, rcvbuf=None)
        try:
            await app.started.wait()
            writer = app.writers[0]
            await _wait_stalled(writer, interval_s=0.02)
            progress = writer.progress
            assert progress is not None
            sent_before = progress.bytes_sent
            writer.cancel_scope.cancel()  # like the gateway dropping a slow consumer
            started = trio.current_time()
            await progress.closed.wait()
            waited = trio.current_time() - started
            readable = await trio.to_thread.run_sync(_read_until_reset, sock)
        finally:
            sock.close()
    assert waited < 2.0, waited  # the delayed-ACK wait is bounded
    assert progress.bytes_sent == sent_before  # the cut-short write does not count
    final = progress.unacked()
    assert final is not None
    assert final > 0
    acked = progress.acked()
    # The client got every acknowledged byte, and at most the part of the cut-short write
    # that its kernel had taken too.
    assert acked <= readable < acked + CHUNK, (acked, readable, progress.bytes_sent)
