"""Serve the app with Hypercorn's Trio worker; graceful shutdown on a trigger.

Startup order (a failed start must never look like a running server): bind the port (not
yet listening), open the services (SQLite lock, store, bus, hub), and only then hand the
sockets to Hypercorn, which listens. Any failure before that is one `StartupError` or
`ConfigError`, and Hypercorn never printed `Running on`.

Shutdown order (PROTOCOL: stop accepting, close with 1001, lose nothing committed): when the
trigger fires, every connection is closed with 1001 within a grace period; then Hypercorn stops
listening and waits for its connections; then the store's writer is drained and closed, and
the SQLite lock released last, so a process started meanwhile can take over at once.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from typing import Final

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from handler.app import (
    SHUTDOWN_GRACE_S,
    STARTUP_WAIT_S,
    ChatApp,
    create_app,
    log_ready,
    running_services,
)
from handler.config import Config
from handler.errors import StartupError
from handler.runtime import tune_gc

_BIND_POLL_S: Final = 0.25

# Hypercorn's defaults wait 3 s for stragglers; ours closes them itself first.
_HYPERCORN_GRACE_S: Final = SHUTDOWN_GRACE_S + 1.0


def hypercorn_config(config: Config) -> HypercornConfig:
    """Hypercorn settings derived from ours; the WebSocket limits are applied per connection."""
    hyper = HypercornConfig()
    hyper.bind = [config.handler_url]
    hyper.accesslog = None
    hyper.errorlog = logging.getLogger("hypercorn.error")
    hyper.graceful_timeout = _HYPERCORN_GRACE_S
    hyper.websocket_max_message_size = config.limits.max_frame_bytes
    hyper.websocket_ping_interval = None  # sent per connection by the transport guard
    # PROTOCOL: idle plain-HTTP connections are closed after a few seconds, so idle sockets
    # cannot use up the descriptors.
    hyper.keep_alive_timeout = 5
    hyper.alpn_protocols = ["http/1.1"]  # HTTP/1.1 and WebSocket only, also under TLS
    hyper.backlog = 4096  # bursts of reconnecting clients must not overflow the SYN queue
    return hyper


async def serve(
    config: Config,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    app: ChatApp | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until `shutdown_trigger` returns (or forever); reports the bound URLs when ready.

    Raises `StartupError` or `ConfigError` (one line: the cause and the fix) when the server
    cannot start; nothing has listened then.
    """
    chat_app = app or create_app(config)
    tune_gc()
    hyper = hypercorn_config(config)

    async def trigger() -> None:
        if shutdown_trigger is None:
            await trio.sleep_forever()
        else:
            await shutdown_trigger()
        await chat_app.begin_shutdown()

    # Bound first (not listening: a client is refused as if nothing ran), so a port in use
    # fails before anything opens; opened next, so nothing listens until everything works.
    sockets = await _bind(hyper, config)
    try:
        async with running_services(config) as (services, stop):
            chat_app.adopt(services, stop)
            for sock in sockets.insecure_sockets:
                sock.listen(hyper.backlog)

            def started(binds: list[str]) -> None:
                log_ready(config, binds, under_hypercorn=False)
                task_status.started(binds)

            # Hypercorn's own `serve()` minus the socket creation, which is ours (above): the
            # same call its CLI worker makes with pre-bound sockets.
            try:
                await worker_serve(
                    wrap_app(chat_app, hyper.wsgi_max_body_size, None),  # type: ignore[arg-type]
                    hyper,
                    sockets=sockets,
                    shutdown_trigger=trigger,
                    task_status=_Started(started),
                )
            finally:
                _close_sockets(sockets)  # before the services: the lock is released last
                await chat_app.stop_services()
    finally:
        _close_sockets(sockets)


class _Started(trio.TaskStatus[list[str]]):
    """A `task_status` that runs a callback: the startup line is logged with the URLs that
    Hypercorn reports once it listens (port 0 resolved)."""

    def __init__(self, callback: Callable[[list[str]], None]) -> None:
        self._callback = callback

    def started(self, value: list[str] | None = None) -> None:
        self._callback([] if value is None else value)


def _close_sockets(sockets: Sockets) -> None:
    for sock in sockets.insecure_sockets:
        sock.close()


async def _bind(hyper: HypercornConfig, config: Config) -> Sockets:
    """Bind (not yet listen) `handler_url`; a port still held, e.g. by a process shutting
    down, is retried for `STARTUP_WAIT_S`."""
    deadline = trio.current_time() + STARTUP_WAIT_S
    while True:
        try:
            sockets: Sockets = hyper.create_sockets()
            return sockets
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise StartupError(
                    f"handler_url: cannot listen on {config.handler_url}"
                    f" ({error.strerror or error}): choose another host or port"
                ) from None
            if trio.current_time() >= deadline:
                raise StartupError(
                    f"handler_url: {config.handler_url} is already in use (waited"
                    f" {STARTUP_WAIT_S:g} s): stop the process that holds it, or choose"
                    " another port"
                ) from None
        await trio.sleep(_BIND_POLL_S)


__all__ = ["hypercorn_config", "serve"]
