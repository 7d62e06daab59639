"""Plain HTTP on the gateway's port: idle connections close, descriptors never run out for
good, and only HTTP/1.1 is spoken.

- Quart-Trio cancelled Hypercorn's close of a `Connection: close` / HTTP/1.0 response and the
  start of its keep-alive timer (both ran inside the app's `send()`), so plain-HTTP sockets
  were never closed: 1,005 idle sockets locked every new client out of a process with
  `ulimit -n 1024`.
- At the descriptor limit, trio's accept loop logged a full traceback every 100 ms.
- Hypercorn answered `Upgrade: h2c` with `101` and switched a prior-knowledge client to
  HTTP/2 (with WebSocket over HTTP/2), none of it part of the contract.

The in-process tests lower Hypercorn's keep-alive timeout so they stay fast; the subprocess
test runs `python -m handler` itself, with a low `RLIMIT_NOFILE`.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
import trio
from conftest import StartServer
from support import SECRET, RunningServer

import handler.server
from handler.transport.accept_errors import ACCEPT_LOGGER, OncePerInterval

REPO_ROOT: Final = Path(__file__).resolve().parents[1]
KEEP_ALIVE_S: Final = 1.0
REQUEST: Final = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.fixture
def short_keep_alive(monkeypatch: pytest.MonkeyPatch) -> float:
    """Hypercorn's keep-alive timeout lowered to `KEEP_ALIVE_S` for the servers started next."""
    original = handler.server.hypercorn_config

    def config(*args: Any, **kwargs: Any) -> Any:
        hyper = original(*args, **kwargs)
        hyper.keep_alive_timeout = KEEP_ALIVE_S
        return hyper

    monkeypatch.setattr(handler.server, "hypercorn_config", config)
    return KEEP_ALIVE_S


async def _receive_or_end(stream: trio.SocketStream) -> bytes:
    """The next bytes from the server; b"" once it closed or reset the connection."""
    try:
        return await stream.receive_some(65536)
    except trio.BrokenResourceError:
        return b""


async def _seconds_until_closed(port: int, request: bytes, limit_s: float) -> tuple[bytes, float]:
    """Send `request`, read the answer; seconds from the answer until the server closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        answer = b""
        answered_at = None
        with trio.move_on_after(limit_s):
            while True:
                data = await _receive_or_end(stream)
                if not data:
                    assert answered_at is not None, "closed before answering"
                    return answer, trio.current_time() - answered_at
                answer += data
                if answered_at is None and b"\r\n\r\n" in answer:
                    answered_at = trio.current_time()
    return answer, float("inf")


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        b"GET /healthz HTTP/1.0\r\n\r\n",
    ],
    ids=["connection-close", "http-1.0"],
)
async def test_a_connection_that_asks_to_close_is_closed_at_once(
    short_keep_alive: float, start_server: StartServer, request_line: bytes
) -> None:
    server = await start_server()
    answer, seconds = await _seconds_until_closed(server.port, request_line, limit_s=5)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert seconds < 0.5, f"closed after {seconds:.2f} s"


async def test_an_idle_keep_alive_connection_is_closed_after_the_timeout(
    short_keep_alive: float, start_server: StartServer
) -> None:
    server = await start_server()
    answer, seconds = await _seconds_until_closed(server.port, REQUEST, limit_s=5)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert short_keep_alive - 0.1 <= seconds < short_keep_alive + 0.5, seconds


async def test_a_keep_alive_connection_still_serves_a_second_request(
    short_keep_alive: float, start_server: StartServer
) -> None:
    server = await start_server()
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            for _ in range(2):
                await stream.send_all(REQUEST)
                answer = b""
                while not answer.endswith(b"}"):
                    answer += await stream.receive_some(65536)
                assert answer.startswith(b"HTTP/1.1 200"), answer


# --------------------------------------------------------------------------- descriptors

FD_LIMIT: Final = 256
IDLE_CONNECTIONS: Final = 300  # more than the server process may hold
SUBPROCESS_KEEP_ALIVE_S: Final = 3.0
# `python -m handler`, with Hypercorn's keep-alive timeout lowered (the config file has no
# such setting; `handler.server.hypercorn_config` is what `serve` uses).
_SERVER_SCRIPT: Final = """
import sys
import handler.server
from handler.transport.accept_errors import ACCEPT_LOGGER, OncePerInterval
original = handler.server.hypercorn_config
def config(*args, **kwargs):
    hyper = original(*args, **kwargs)
    hyper.keep_alive_timeout = float(sys.argv[2])
    return hyper
handler.server.hypercorn_config = config
from handler.__main__ import main
sys.exit(main(["--config", sys.argv[1]]))
"""
_RUNNING: Final = re.compile(r"Running on http://127\.0\.0\.1:(\d+)")
_TIMESTAMP: Final = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def _low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


@pytest.fixture
def low_fd_server(tmp_path: Path) -> Iterator[tuple[int, Path, subprocess.Popen[bytes]]]:
    """`python -m handler` in a process limited to `FD_LIMIT` descriptors: (port, log, proc)."""
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "handler_url": "127.0.0.1:0",
                "storage": {"backend": "sqlite", "path": str(tmp_path / "chat.db")},
                "bus": {"backend": "local"},
                "auth": {"jwt_secret": SECRET},
            }
        )
    )
    log_path = tmp_path / "server.log"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-c", _SERVER_SCRIPT, str(config), str(SUBPROCESS_KEEP_ALIVE_S)],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=_low_fd_limit,
        )
    try:
        deadline = time.monotonic() + 20
        while not (match := _RUNNING.search(log_path.read_text(errors="replace"))):
            assert process.poll() is None, log_path.read_text(errors="replace")
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        yield int(match.group(1)), log_path, process
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _open_idle(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(REQUEST)
    sock.setblocking(False)
    return sock


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def _healthz(port: int, timeout: float) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = b""
        while data := sock.recv(65536):
            answer += data
        return answer


def _emfile_times(log_path: Path) -> tuple[list[float], str]:
    text = log_path.read_text(errors="replace")
    times = []
    for line in text.splitlines():
        if "EMFILE" in line and (match := _TIMESTAMP.match(line)):
            parsed = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
            times.append(parsed.timestamp())
    return times, text


@pytest.mark.slow
def test_idle_http_connections_cannot_lock_new_clients_out(
    low_fd_server: tuple[int, Path, subprocess.Popen[bytes]],
) -> None:
    """More idle connections than the process has descriptors: the server sits at EMFILE
    (logging it at most once a second, one line each), the keep-alive timeout frees the
    descriptors, and a new client is served."""
    port, log_path, process = low_fd_server
    started = time.monotonic()
    idle = [_open_idle(port) for _ in range(IDLE_CONNECTIONS)]
    try:
        time.sleep(SUBPROCESS_KEEP_ALIVE_S * 0.8)  # at the limit, logging EMFILE
        answer = _healthz(port, timeout=4 * SUBPROCESS_KEEP_ALIVE_S)
        served_after = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 200"), answer
        deadline = time.monotonic() + 3 * SUBPROCESS_KEEP_ALIVE_S
        open_ones = idle
        while open_ones and time.monotonic() < deadline:
            open_ones = [sock for sock in open_ones if not _closed_by_server(sock)]
            time.sleep(0.1)
        assert not open_ones, f"{len(open_ones)} idle connections still open"
    finally:
        for sock in idle:
            sock.close()
    assert process.poll() is None, "the server stopped"
    assert served_after < 3 * SUBPROCESS_KEEP_ALIVE_S, served_after
    times, text = _emfile_times(log_path)
    assert times, f"the server never reached its descriptor limit:\n{text[-2000:]}"
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert all(gap >= 0.95 for gap in gaps), f"EMFILE logged at {times}"
    assert "Traceback" not in text, text[-3000:]
    assert _healthz(port, timeout=5).startswith(b"HTTP/1.1 200")


def test_accept_errors_are_logged_once_a_second_in_one_line() -> None:
    """The filter on trio's accept-loop logger, driven by a fake clock at trio's 100 ms."""
    now = [0.0]
    line_filter = OncePerInterval(clock=lambda: now[0])
    passed = []
    for step in range(25):
        now[0] = step * 0.1
        try:
            raise OSError(24, "Too many open files")
        except OSError:
            record = logging.LogRecord(
                ACCEPT_LOGGER,
                logging.ERROR,
                __file__,
                1,
                "accept returned %s",
                ("EMFILE",),
                sys.exc_info(),
            )
        if line_filter.filter(record):
            passed.append((now[0], record.getMessage(), record.exc_info))
    assert [round(t, 1) for t, _, _ in passed] == [0.0, 1.0, 2.0]
    assert all(exc_info is None for _, _, exc_info in passed)
    assert "9 more like it" in passed[1][1]
    assert "Too many open files" in passed[0][1]


# --------------------------------------------------------------------------- HTTP/2


async def test_an_h2c_upgrade_is_answered_in_http_1_1(server: RunningServer) -> None:
    request = (
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    )
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(request)
            answer = b""
            while not answer.endswith(b"}"):
                data = await stream.receive_some(65536)
                assert data, answer
                answer += data
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert b'{"status":"ok"}' in answer


@pytest.mark.parametrize("target", ["http", "websocket"])
async def test_prior_knowledge_http2_is_refused(server: RunningServer, target: str) -> None:
    """An HTTP/2 client (prior knowledge; also WebSocket over HTTP/2, RFC 8441) gets the
    server preface and GOAWAY(HTTP_1_1_REQUIRED), then the connection closes."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    headers = [(":scheme", "http"), (":authority", server.host)]
    if target == "http":
        headers += [(":method", "GET"), (":path", "/healthz")]
    else:
        headers += [(":method", "CONNECT"), (":protocol", "websocket"), (":path", "/ws")]
        headers += [("sec-websocket-version", "13")]
    client.send_headers(1, headers, end_stream=target == "http")
    events: list[h2.events.Event] = []
    with trio.fail_after(2):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(client.data_to_send())
            while True:
                data = await _receive_or_end(stream)
                if not data:
                    break
                events += client.receive_data(data)
    kinds = [type(event) for event in events]
    assert h2.events.ResponseReceived not in kinds, events
    terminated = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert terminated, events
    assert terminated[0].error_code == h2.errors.ErrorCodes.HTTP_1_1_REQUIRED
