"""Serve the app with Hypercorn's Trio worker; graceful shutdown on a trigger.

Shutdown order (PROTOCOL: stop accepting, close with 1001, lose nothing committed): when the
trigger fires, every connection is closed with 1001 within a grace period; then Hypercorn stops
listening and runs the lifespan shutdown, which drains the store's writer and closes it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from handler.app import SHUTDOWN_GRACE_S, ChatApp, create_app
from handler.config import Config
from handler.runtime import tune_gc

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
    hyper.keep_alive_timeout = 75
    hyper.backlog = 4096  # bursts of reconnecting clients must not overflow the SYN queue
    return hyper


async def serve(
    config: Config,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    app: ChatApp | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until `shutdown_trigger` returns (or forever); reports the bound URLs when ready."""
    chat_app = app or create_app(config)
    tune_gc()

    async def trigger() -> None:
        if shutdown_trigger is None:
            await trio.sleep_forever()
        else:
            await shutdown_trigger()
        await chat_app.begin_shutdown()

    await hypercorn_serve(
        chat_app,  # type: ignore[arg-type]  # a Quart app is an ASGI app
        hypercorn_config(config),
        shutdown_trigger=trigger,
        task_status=task_status,
    )
