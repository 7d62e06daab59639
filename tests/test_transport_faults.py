"""One connection's fault never ends the server; close handshakes that complete.

Attacks found by review, each bounded in count and time, on 127.0.0.1:

- a valid text frame and a frame with an RSV bit set, in one write: the server's reader sends
  1002 and closes while the app writes its reply; Hypercorn's `send_eof` ran without the send
  lock, the write hit `BusyResourceError`, which is no `OSError`, escaped `TCPServer.run` and
  ended every listener (the process died within 1-5 such connections);
- any other exception inside a connection: logged with a correlation id, that connection
  closed, the server keeps serving;
- an oversized frame with another frame behind it in the same write: the server sent 1009 but
  never read the client's Close, so the socket stayed open until the idle timeout (59.7 s).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from functools import partial
from typing import Any, Final

import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from support import RawClient, RunningServer, masked_frame, serve_lifespan

from handler.transport.hypercorn_guard import ACCEPT_OPTIONS_KEY, install

ATTACK_CONNECTIONS: Final = 50
CONCURRENCY: Final = 10

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


TEXT: Final = 0x81  # FIN, text
TEXT_RSV1: Final = 0xC1  # FIN, RSV1 (no extension negotiated: a protocol error), text
PING_FRAME: Final = masked_frame(TEXT, json.dumps({"type": "ping"}).encode())
RSV_ATTACK: Final = PING_FRAME + masked_frame(TEXT_RSV1, b"x")


async def _echo_app(scope: Scope, receive: Receive, send: Send) -> None:
    """A WebSocket echo through the guarded transport; plain-HTTP requests get `ok`."""
    if scope["type"] == "lifespan":
        await serve_lifespan(receive, send)
        return
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    await receive()  # websocket.connect
    options = {"max_message_bytes": 65536, "compression": False}
    await send({"type": "websocket.accept", ACCEPT_OPTIONS_KEY: options})
    while True:
        event = await receive()
        if event["type"] != "websocket.receive":
            return
        await send({"type": "websocket.send", "text": event.get("text") or "?"})


@pytest.fixture
async def echo_port(nursery: trio.Nursery) -> AsyncIterator[int]:
    """The echo app on Hypercorn's trio worker with the guard installed; port 0."""
    install()
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 2.0
    config.websocket_ping_interval = None
    stop = trio.Event()
    urls = await nursery.start(
        partial(hypercorn_serve, _echo_app, config, shutdown_trigger=stop.wait)
    )
    yield int(urls[0].rsplit(":", 1)[1])
    stop.set()


async def _upgrade(port: int, target: str = "/ws") -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        data = await stream.receive_some(65536)
        assert data, f"closed during the upgrade: {head!r}"
        head += data
    assert head.startswith(b"HTTP/1.1 101"), head
    return stream


async def _drain(stream: trio.SocketStream) -> None:
    """Read until the server closes (EOF or reset)."""
    try:
        while await stream.receive_some(65536):
            pass
    except trio.BrokenResourceError:
        pass
    finally:
        await stream.aclose()


async def _attack(port: int, target: str, count: int) -> None:
    """`count` connections, `CONCURRENCY` at a time, each sending text + RSV in one write."""
    limiter = trio.CapacityLimiter(CONCURRENCY)

    async def one() -> None:
        async with limiter:
            stream = await _upgrade(port, target)
            await stream.send_all(RSV_ATTACK)
            await _drain(stream)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(one)


async def test_text_and_rsv_frame_in_one_write_never_kill_the_echo_server(echo_port: int) -> None:
    await _attack(echo_port, "/ws", ATTACK_CONNECTIONS)
    with trio.fail_after(5):
        stream = await _upgrade(echo_port)
        await stream.send_all(PING_FRAME)
        reply = await stream.receive_some(65536)
        assert reply[:1] == b"\x81", reply
        assert b'"ping"' in reply, reply
        await stream.aclose()


@pytest.mark.parametrize("bound", [True, False], ids=["bound", "unbound"])
async def test_text_and_rsv_frame_in_one_write_never_kill_the_gateway(
    server: RunningServer, bound: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The reply to the text frame races the server's 1002 close: no write may collide with
    the close (`BusyResourceError` used to kill the process or fail the app's writer)."""
    caplog.set_level(logging.ERROR)
    target = "/ws?token=" + server.token("rsv-attacker") if bound else "/ws"
    await _attack(server.port, target, ATTACK_CONNECTIONS)
    assert not server.stopped.is_set()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    async with server.connect("after-attack") as client:
        assert (await client.request({"type": "ping"}))["type"] == "pong"


async def test_a_fault_in_one_connection_is_logged_and_closes_only_that_connection(
    echo_port: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception escaping Hypercorn's per-connection code (here a fault injected into its
    HTTP stream) is contained: one log line with a correlation id, that socket closed."""
    from hypercorn.protocol.http_stream import HTTPStream

    original = HTTPStream.handle

    async def faulty(self: Any, event: Any) -> None:
        if getattr(event, "raw_path", b"") == b"/boom":
            raise RuntimeError("injected fault")
        await original(self, event)

    monkeypatch.setattr(HTTPStream, "handle", faulty)
    caplog.set_level(logging.ERROR, logger="handler.transport")
    with trio.fail_after(5):
        for _ in range(3):
            stream = await trio.open_tcp_stream("127.0.0.1", echo_port)
            await stream.send_all(b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
            await _drain(stream)  # closed by the server, no answer
        stream = await trio.open_tcp_stream("127.0.0.1", echo_port)
        await stream.send_all(b"GET /fine HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while data := await stream.receive_some(65536):
            answer += data
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert b"\r\nok\r\n" in answer, answer
    faults = [r for r in caplog.records if "connection fault" in r.getMessage()]
    assert len(faults) == 3
    assert all("correlation=" in r.getMessage() and r.exc_info for r in faults)


def test_fault_split_keeps_cancellation_and_interrupts() -> None:
    from handler.transport.hypercorn_tcp import _only_socket_errors, _split_faults

    boom = ValueError("boom")
    assert _split_faults(boom) == (boom, None)
    assert not _only_socket_errors(boom)
    assert _only_socket_errors(ExceptionGroup("x", [ConnectionResetError(), OSError()]))
    assert not _only_socket_errors(ExceptionGroup("x", [OSError(), ValueError()]))
    interrupt = KeyboardInterrupt()
    assert _split_faults(interrupt) == (None, interrupt)
    faults, rest = _split_faults(BaseExceptionGroup("x", [ValueError("a"), KeyboardInterrupt()]))
    assert isinstance(faults, ExceptionGroup)
    assert isinstance(rest, BaseExceptionGroup)
    assert [type(e) for e in rest.exceptions] == [KeyboardInterrupt]


async def test_oversized_frame_with_a_frame_behind_it_completes_the_close_handshake(
    server: RunningServer,
) -> None:
    """70,000 bytes (limit 65,536) and a small frame in one write: 1009, then the client's
    Close is read and the TCP connection ends at once (it used to wait for the idle timeout)."""
    async with server.open_raw(token=server.token("oversized")) as client:
        assert (await client.recv())["type"] == "authenticated"
        await client.sync()
        payload = json.dumps({"type": "ping", "pad": "x" * 70_000}).encode()
        started = trio.current_time()
        await client.stream.send_all(masked_frame(TEXT, payload) + PING_FRAME)
        with trio.fail_after(5):
            code = await client.wait_closed()  # answers the server's Close with its own
        assert code == 1009
        with trio.fail_after(1):
            await _drain_raw(client)
        elapsed = trio.current_time() - started
    assert elapsed < 1.0, elapsed


async def _drain_raw(client: RawClient) -> None:
    try:
        while await client.stream.receive_some(65536):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
