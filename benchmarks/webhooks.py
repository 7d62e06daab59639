"""A webhook receiver that hangs, for `--vary webhooks`: the worst receiver a server can have.

It listens on 127.0.0.1, accepts every connection and reads every request, and never answers:
each of the server's POSTs runs into its timeout (10 s, 4 in flight per endpoint), so the
events pile up in the outbox while the benchmark runs. It is a plain-socket loop in a thread
of the orchestrator (no process to leak: leaving `hung_receiver` stops it and closes every
socket), started before each server of the side that has webhooks and stopped after that
server stopped. What it saw is written to its log, one line per run.
"""

from __future__ import annotations

import contextlib
import secrets
import selectors
import socket
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

# Every event type of docs/backends.md "Webhooks" (handler.config.WEBHOOK_EVENTS).
EVENTS: Final = (
    "chat.created",
    "message.created",
    "message.updated",
    "message.read",
    "message.unread",
)


@dataclass
class Seen:
    """What the receiver got: connections accepted, requests begun, bytes read."""

    connections: int = 0
    requests: int = 0
    bytes: int = 0


class _Receiver:
    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.listener.setblocking(False)
        self.port: int = self.listener.getsockname()[1]
        self.seen = Seen()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hung-receiver", daemon=True)

    def _loop(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self.listener, selectors.EVENT_READ)
            try:
                while not self._stop.is_set():
                    for key, _ in selector.select(timeout=0.1):
                        sock: socket.socket = key.fileobj  # type: ignore[assignment]
                        if sock is self.listener:
                            with contextlib.suppress(BlockingIOError):
                                conn, _ = sock.accept()
                                conn.setblocking(False)
                                selector.register(conn, selectors.EVENT_READ)
                                self.seen.connections += 1
                            continue
                        try:
                            data = sock.recv(65536)
                        except BlockingIOError:
                            continue
                        except OSError:
                            data = b""
                        if not data:  # the server gave up on it: let it go
                            selector.unregister(sock)
                            sock.close()
                            continue
                        self.seen.bytes += len(data)
                        self.seen.requests += data.count(b"POST ")
            finally:
                for key in list(selector.get_map().values()):
                    with contextlib.suppress(OSError):
                        key.fileobj.close()  # type: ignore[union-attr]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            self.listener.close()


@contextlib.contextmanager
def hung_receiver(log_path: Path) -> Iterator[Mapping[str, Any]]:
    """Run a receiver that never answers; yields the config section pointing a server at it
    (one endpoint, every event type). On the way out it stops, and appends what it saw to
    `log_path`."""
    receiver = _Receiver()
    receiver.start()
    try:
        yield {
            "webhooks": {
                "endpoints": [
                    {
                        "url": f"http://127.0.0.1:{receiver.port}/hook",
                        "secret": secrets.token_hex(16),
                        "events": list(EVENTS),
                    }
                ]
            }
        }
    finally:
        receiver.stop()
        seen = receiver.seen
        with log_path.open("a") as log:
            log.write(
                f"hung receiver on 127.0.0.1:{receiver.port}: {seen.connections} connections, "
                f"{seen.requests} requests ({seen.bytes} bytes) read, none answered\n"
            )


SUMMARY: Final = (
    "`webhooks.endpoints`: one endpoint for every event type, its receiver on 127.0.0.1 "
    "reading each request and never answering"
)
