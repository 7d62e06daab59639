"""The Quart-Trio application: HTTP routes, the `/ws` endpoint and the service lifecycle.

`ChatApp.__call__` routes `/ws` WebSocket scopes straight to the ASGI handler in
`handler.transport.websocket` (no per-frame Quart machinery) and wraps the lifespan so the
store, bus and hub are owned by one nursery that outlives every connection: they start before
Quart's startup completes and are flushed and closed before its shutdown completes.

Importable for Hypercorn: `hypercorn -k trio "handler.app:create_app()"` reads the config path
from `CHAT_CONFIG` (default `./config.json`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping
from functools import partial
from pathlib import Path
from typing import Any, Final

import orjson
import trio
import trio.lowlevel
from quart import Response, request
from quart_trio import QuartTrio

from handler.auth import TokenAuthority
from handler.bus import open_bus
from handler.config import DEFAULT_CONFIG_PATH, Config, load_config
from handler.errors import CloseCode, HandlerError, ProtocolError
from handler.hub import Hub
from handler.metrics import Metrics
from handler.session import ChatCache, Services
from handler.single_process import guard_local_bus
from handler.store import open_store
from handler.transport import hypercorn_guard
from handler.transport.websocket import Receive, Scope, Send, serve_websocket

log = logging.getLogger("handler.app")

WEB_ROOT: Final = Path(__file__).resolve().parent.parent / "web"
SHUTDOWN_GRACE_S: Final = 5.0


class ChatApp(QuartTrio):
    """Quart-Trio app that owns the chat services and serves `/ws` at the ASGI layer."""

    def __init__(self, config: Config) -> None:
        super().__init__(__name__, static_folder=str(WEB_ROOT), static_url_path="")
        self.chat_config = config
        self.services: Services | None = None
        self._stopped = trio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # type: ignore[override]
        kind = scope["type"]
        if kind == "websocket" and scope.get("path") == "/ws":
            if self.services is None:
                await receive()
                await send({"type": "websocket.close", "code": CloseCode.TRY_AGAIN_LATER})
                return
            await serve_websocket(scope, receive, send, self.services)
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)  # type: ignore[arg-type]

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with trio.open_nursery() as nursery:
            try:
                self.services = await start_services(self.chat_config, nursery)
            except HandlerError as error:
                log.error("startup failed: %s", error)
                await receive()
                await send({"type": "lifespan.startup.failed", "message": str(error)})
                nursery.cancel_scope.cancel()
                return

            async def receive_then_stop() -> MutableMapping[str, Any]:
                event = await receive()
                if event["type"] == "lifespan.shutdown":
                    await self.stop_services()
                return event

            await super().__call__(scope, receive_then_stop, send)  # type: ignore[arg-type]
            nursery.cancel_scope.cancel()

    async def begin_shutdown(self) -> None:
        """Close every connection with 1001 (bounded), before the server stops accepting."""
        if self.services is not None:
            await self.services.hub.close_all(CloseCode.GOING_AWAY, SHUTDOWN_GRACE_S)

    async def stop_services(self) -> None:
        services, self.services = self.services, None
        if services is None:
            return
        with trio.CancelScope(shield=True):
            await services.hub.close_all(CloseCode.GOING_AWAY, SHUTDOWN_GRACE_S)
            await services.hub.stop_marks()
            await services.store.aclose()
            if services.process_lock is not None:
                services.process_lock.release()
        log.info("services stopped; store closed")


async def start_services(config: Config, nursery: trio.Nursery) -> Services:
    """Open the store, start the bus and the delivery-mark writer in `nursery`."""
    metrics = Metrics()
    process_lock = guard_local_bus(config)
    store = open_store(config.storage)
    try:
        await store.open(nursery)
    except BaseException:
        if process_lock is not None:
            process_lock.release()
        raise
    bus = open_bus(config.bus)
    hub = Hub(
        store,
        bus,
        metrics,
        rate_per_s=config.limits.rate_per_s,
        rate_burst=config.limits.rate_burst,
    )
    await nursery.start(
        partial(bus.run, hub.deliver, on_resync=hub.resync, on_settle=hub.sync_marks)
    )
    await nursery.start(hub.run_marks)
    return Services(
        store=store,
        hub=hub,
        authority=TokenAuthority(config.auth),
        limits=config.limits,
        metrics=metrics,
        chats=ChatCache(store),
        allowed_origins=config.allowed_origins,
        process_lock=process_lock,
    )


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status=status, content_type="application/json")


def create_app(config: Config | None = None) -> ChatApp:
    """Build the app; without `config`, load the file named by `CHAT_CONFIG`."""
    hypercorn_guard.install()
    if config is None:
        config = load_config(Path(os.environ.get("CHAT_CONFIG", str(DEFAULT_CONFIG_PATH))))
    app = ChatApp(config)

    @app.route("/")
    async def index() -> Any:
        if (WEB_ROOT / "index.html").is_file():
            return await app.send_static_file("index.html")
        return Response("<!doctype html><title>Chat handler</title><p>WebSocket at /ws</p>")

    @app.route("/healthz")
    async def healthz() -> Response:
        services = app.services
        if services is None:
            return _json({"status": "starting"}, 503)
        problems = {}
        for name, component in (("store", services.store), ("bus", services.hub.bus)):
            try:
                with trio.fail_after(2):
                    await component.check()
            except (HandlerError, trio.TooSlowError) as error:
                problems[name] = str(error) or "timeout"
        if problems:
            return _json({"status": "unavailable", **problems}, 503)
        return _json({"status": "ok"})

    @app.route("/metrics")
    async def metrics() -> Response:
        if app.services is None:
            return Response("", status=503)
        body, content_type = app.services.metrics.render()
        return Response(body, content_type=content_type)

    @app.route("/auth/dev-token", methods=["POST"])
    async def dev_token() -> Response:
        services = app.services
        if services is None or not services.authority.dev_tokens:
            return _json({"error": "not_found"}, 404)
        body = await request.get_json(force=True, silent=True)
        user_id = body.get("user_id") if isinstance(body, dict) else None
        if not isinstance(user_id, str):
            return _json({"error": "bad_request", "message": "user_id must be a string"}, 400)
        try:
            token = services.authority.issue(user_id)
        except ProtocolError as error:
            return _json({"error": "bad_request", "message": error.message}, 400)
        return _json({"token": token, "user_id": user_id})

    return app
