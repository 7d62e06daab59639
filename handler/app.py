"""The Quart-Trio application: HTTP routes, the `/ws` endpoint and the service lifecycle.

The HTTP API for backends (`/api/v1/`) lives in `handler.api`; `create_app` adds its routes.

`ChatApp.__call__` routes `/ws` WebSocket scopes straight to the ASGI handler in
`handler.transport.websocket` (no per-frame Quart machinery). The store, bus and hub are
opened by `running_services()` in one nursery that outlives every connection:

- `handler.server.serve()` (and so `python -m handler`) opens them itself BEFORE Hypercorn
  listens, so a failed start never reaches Hypercorn: it exits with one line;
- under `hypercorn -k trio "handler.app:create_app()"` the lifespan opens them, and any
  failure is reported as `lifespan.startup.failed`, so Hypercorn refuses to run.

Every startup failure becomes a `StartupError` or `ConfigError` whose one-line message names
the cause and the fix. What can be waited for (the SQLite lock of a process still shutting
down, PostgreSQL or Redis starting alongside) is waited for up to `STARTUP_WAIT_S`.

Importable for Hypercorn: the config path comes from `CHAT_CONFIG` (default `./config.json`).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import ipaddress
import logging
import mimetypes
import os
import re
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from contextlib import asynccontextmanager
from functools import partial
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Final, TypeVar

import attrs
import orjson
import trio
import trio.lowlevel
from quart import Response, request
from quart_trio import QuartTrio

from handler import api
from handler.asyncapi import ASYNCAPI
from handler.auth import TokenAuthority
from handler.bus import Bus, open_bus, open_presence_link
from handler.config import DEFAULT_CONFIG_PATH, Config, StorageConfig, load_config, redact
from handler.errors import (
    CloseCode,
    ConfigError,
    HandlerError,
    ProtocolError,
    StartupError,
    StoreUnavailable,
)
from handler.hub import COMMIT_QUEUE, Hub
from handler.metrics import Metrics
from handler.services import ChatCache, Services
from handler.single_process import guard_local_bus, hypercorn_binds
from handler.store import Store, open_store
from handler.store.base import CommitSender, Committed
from handler.store.schema import POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS
from handler.transport import hypercorn_guard
from handler.transport.websocket import Receive, Scope, Send, serve_websocket
from handler.webhooks.delivery import WebhookService
from handler.webhooks.queue import OutboxQueue

log = logging.getLogger("handler.app")

SHUTDOWN_GRACE_S: Final = 2.0
"""How long shutdown waits for clients to answer the 1001 close before dropping them."""
STARTUP_WAIT_S: Final = 5.0
"""How long a start waits for PostgreSQL, Redis or the port to become available."""
_STARTUP_POLL_S: Final = 0.25
_SCALE_EXTRA: Final = "pip install '.[scale]'"
LOG_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s %(message)s"

T = TypeVar("T")


class ChatApp(QuartTrio):
    """Quart-Trio app that owns the chat services and serves `/ws` at the ASGI layer."""

    def __init__(self, config: Config) -> None:
        # Static files are served by our own routes (`WebClient`): Quart's would be cached
        # for 12 hours, index.html included, so browsers kept old client code after upgrades.
        super().__init__(__name__, static_folder=None)
        self.chat_config = config
        self.services: Services | None = None
        self._stop: Callable[[], Awaitable[None]] | None = None

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

    def adopt(self, services: Services, stop: Callable[[], Awaitable[None]]) -> None:
        """Serve `services`, opened by the caller (`serve()`); `stop` closes them."""
        self.services = services
        self._stop = stop

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.services is not None:  # opened by `serve()`, which also closes them
            await super().__call__(scope, receive, send)  # type: ignore[arg-type]
            return
        opened = False
        try:
            async with running_services(self.chat_config) as (services, stop):
                opened = True
                self.adopt(services, stop)
                log_ready(self.chat_config, hypercorn_binds(sys.argv), under_hypercorn=True)

                async def receive_then_stop() -> MutableMapping[str, Any]:
                    event = await receive()
                    if event["type"] == "lifespan.shutdown":
                        await self.stop_services()
                    return event

                await super().__call__(scope, receive_then_stop, send)  # type: ignore[arg-type]
        except Exception as error:
            if opened:
                raise
            message = startup_message(error)
            log.error("%s", message)
            await receive()
            # Hypercorn raises here (LifespanFailureError) and refuses to serve.
            await send({"type": "lifespan.startup.failed", "message": message})

    async def begin_shutdown(self) -> None:
        """Close every connection with 1001 (bounded), before the server stops accepting."""
        if self.services is not None:
            await self.services.hub.close_all(CloseCode.GOING_AWAY, SHUTDOWN_GRACE_S)

    async def stop_services(self) -> None:
        """Close the connections left, flush and close the store; idempotent."""
        stop, self._stop = self._stop, None
        self.services = None
        if stop is not None:
            await stop()


# --------------------------------------------------------------------------- services


@asynccontextmanager
async def running_services(
    config: Config,
) -> AsyncIterator[tuple[Services, Callable[[], Awaitable[None]]]]:
    """Open the services in a nursery of their own; yield them and their (idempotent) stop.

    Raises `StartupError` or `ConfigError` when they cannot be opened, never a group.
    """
    stopped = False

    async def stop() -> None:
        nonlocal stopped
        if not stopped:
            stopped = True
            await _close(services)

    try:
        async with trio.open_nursery() as nursery:
            services = await start_services(config, nursery)
            try:
                yield services, stop
            finally:
                await stop()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise _single(group) from None


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception a nursery wrapped, or the group when several failed together."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        error = pending.pop()
        if isinstance(error, BaseExceptionGroup):
            pending.extend(error.exceptions)
        else:
            leaves.append(error)
    return leaves[0] if len(leaves) == 1 else group


async def _close(services: Services) -> None:
    with trio.CancelScope(shield=True):
        await services.hub.close_all(CloseCode.GOING_AWAY, SHUTDOWN_GRACE_S)
        await services.hub.presence.stop()
        await services.hub.marks.stop()
        if services.webhooks is not None:
            await services.webhooks.stop()
        await services.store.aclose()
        if services.process_lock is not None:
            services.process_lock.release()
    log.info("services stopped; store closed")


async def start_services(config: Config, nursery: trio.Nursery) -> Services:
    """Open the store, start the bus, the hub (publisher, users), the delivery-mark writer
    and, with endpoints configured, the webhook service in `nursery`.

    Raises `StartupError` (or `ConfigError`) with a one-line message on any failure; what was
    opened is closed again.
    """
    metrics = Metrics()
    authority = TokenAuthority(config.auth)  # a bad dev-secret file fails before anything opens
    store = _backend(
        partial(open_store, config.storage, config.webhooks), "storage", config.storage.backend
    )
    bus = _backend(partial(open_bus, config.bus), "bus", config.bus.backend)
    process_lock = guard_local_bus(config)
    if process_lock is not None:
        await process_lock.acquire()
    opened = False
    # The store hands its commits to the hub's publisher here, in commit order (bounded).
    send_commits, receive_commits = trio.open_memory_channel[Committed](COMMIT_QUEUE)
    try:
        await _open_store(store, config.storage, nursery, send_commits)
        opened = True
        await trio.to_thread.run_sync(check_schema_version, config.storage)
        if config.bus.backend == "redis":
            await _wait_for_redis(config.bus.url)
        hub = Hub(
            store,
            bus,
            metrics,
            rate_per_s=config.limits.rate_per_s,
            rate_burst=config.limits.rate_burst,
            max_connections_per_user=config.limits.max_connections_per_user,
            presence_link=open_presence_link(config.bus),
            presence=config.limits.presence,
            presence_grace_s=config.limits.presence_grace_s,
        )
        await nursery.start(
            partial(
                bus.run,
                hub.deliver,
                on_resync=hub.resync,
                on_settle=hub.marks.sync,
                on_disconnect=hub.disconnect_here,
            )
        )
        await nursery.start(hub.run, receive_commits)
        await nursery.start(hub.marks.run)
        await nursery.start(hub.acks.run)
        webhooks = None
        if config.webhooks.enabled:
            webhooks = WebhookService(config.webhooks, OutboxQueue.of(config.storage), metrics)
            await nursery.start(webhooks.run)
    except BaseException:
        with trio.CancelScope(shield=True):
            if opened:
                with trio.move_on_after(SHUTDOWN_GRACE_S):
                    await store.aclose()
            if process_lock is not None:
                process_lock.release()
        raise
    chats = ChatCache(store)
    hub.on_group_changed = chats.forget_group
    return Services(
        store=store,
        hub=hub,
        authority=authority,
        limits=config.limits,
        metrics=metrics,
        chats=chats,
        allowed_origins=config.allowed_origins,
        process_lock=process_lock,
        webhooks=webhooks,
    )


def _backend(factory: Callable[[], T], section: str, name: str) -> T:
    """Build a backend; a missing driver names the extra that installs it."""
    try:
        return factory()
    except ImportError as error:
        missing = error.name or "a driver"
        raise StartupError(
            f'{section}.backend "{name}" needs {missing}, which is not installed'
            f" ({error}): install the scale extra, {_SCALE_EXTRA}"
        ) from None


async def _open_store(
    store: Store, config: StorageConfig, nursery: trio.Nursery, commits: CommitSender
) -> None:
    """Open the store; PostgreSQL is retried for `STARTUP_WAIT_S` (it may be starting too)."""
    deadline = trio.current_time() + STARTUP_WAIT_S
    while True:
        try:
            await store.open(nursery, commits)
            return
        except StoreUnavailable as error:
            if config.backend == "sqlite":
                raise StartupError(
                    f"storage.path: {error}: check that the directory exists and is writable,"
                    " or choose another storage.path"
                ) from None
            if trio.current_time() >= deadline:
                raise StartupError(
                    f"storage: cannot reach PostgreSQL at {redact(config.dsn)} after"
                    f" {STARTUP_WAIT_S:g} s ({error}): start it, or fix storage.dsn"
                    " (or CHAT_DATABASE_URL)"
                ) from None
        await trio.sleep(_STARTUP_POLL_S)


def check_schema_version(config: StorageConfig) -> None:
    """Refuse a database whose schema is newer than this code's migrations.

    The stores migrate forward only and leave a newer schema alone; running on it would
    write rows in a shape the newer version does not expect. (Blocking: run in a thread.)
    """
    if config.backend == "sqlite":
        known = len(SQLITE_MIGRATIONS)
        found = _sqlite_schema_version(config.path)
        where = str(config.path)
    else:
        known = len(POSTGRES_MIGRATIONS)
        found = _postgres_schema_version(config.dsn)
        where = redact(config.dsn)
    if found > known:
        raise StartupError(
            f"storage: the database {where} has schema version {found}, newer than this"
            f" handler knows ({known}): it was written by a newer release; upgrade the"
            " handler, or point the storage at another database"
        )


def _sqlite_schema_version(path: Path) -> int:
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return 0
    try:
        row = connection.execute("SELECT MAX(version) FROM schema_version").fetchone()
    except sqlite3.Error:
        return 0
    finally:
        connection.close()
    return int(row[0]) if row and row[0] is not None else 0


def _postgres_schema_version(dsn: str) -> int:
    import psycopg

    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as connection:
            row = connection.execute("SELECT MAX(version) FROM schema_version").fetchone()
    except psycopg.Error as error:
        raise StartupError(
            f"storage: cannot read the schema version of {redact(dsn)}: {error}"
        ) from None
    return int(row[0]) if row and row[0] is not None else 0


async def _wait_for_redis(url: str) -> None:
    """Wait up to `STARTUP_WAIT_S` for Redis to answer a PING.

    At run time the bus rides out a Redis outage (it starts degraded and reconnects); at
    startup an unreachable Redis is almost always a wrong URL or a service not started, and
    serving with a dead bus would only look like a working server.
    """
    import coredis
    from coredis.retry import NoRetryPolicy

    deadline = trio.current_time() + STARTUP_WAIT_S
    while True:
        try:
            client: coredis.Redis[bytes] = coredis.Redis.from_url(
                url, retry_policy=NoRetryPolicy(), connect_timeout=1, stream_timeout=1
            )
            with trio.fail_after(2):
                async with client:
                    await client.ping()
            return
        except (Exception, trio.TooSlowError) as error:
            reason = _describe(error)
        if trio.current_time() >= deadline:
            raise StartupError(
                f"bus: cannot reach Redis at {redact(url)} after {STARTUP_WAIT_S:g} s"
                f" ({reason}): start it, or fix bus.url (or CHAT_REDIS_URL)"
            )
        await trio.sleep(_STARTUP_POLL_S)


def _describe(error: BaseException) -> str:
    if isinstance(error, BaseExceptionGroup):
        error = _single(error)
    if isinstance(error, trio.TooSlowError):
        return "no answer"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def startup_message(error: BaseException) -> str:
    """One line for any startup failure; ours already name the cause and the fix."""
    if isinstance(error, StartupError | ConfigError):
        return str(error)
    return f"startup failed: {_describe(error)} (run with --log-level DEBUG for the traceback)"


# --------------------------------------------------------------------------- logging


def log_ready(config: Config, binds: Sequence[str] | None, *, under_hypercorn: bool) -> None:
    """The startup line: where it listens, on what storage and bus, dev tokens or not; a
    warning when dev tokens are reachable from other machines."""
    storage = config.storage
    where = str(storage.path) if storage.backend == "sqlite" else redact(storage.dsn)
    bus = "local" if config.bus.backend == "local" else f"redis {redact(config.bus.url)}"
    if binds is None:
        address = "the addresses of Hypercorn's config file"
    elif under_hypercorn:  # the port Hypercorn bound is in its "Running on" line
        address = f"{', '.join(binds)} (Hypercorn's --bind)"
    else:
        address = ", ".join(binds)
    log.info(
        "serving on %s: storage %s %s, bus %s, dev tokens %s",
        address,
        storage.backend,
        where,
        bus,
        "on" if config.auth.dev_tokens else "off",
    )
    if config.auth.dev_tokens:
        exposed = [bind for bind in binds or () if not _is_loopback(bind)]
        if exposed:
            log.warning(
                "dev tokens are on and the server listens on %s, not only on loopback: anyone"
                " who can reach it can sign in as any user; set auth.dev_tokens to false"
                " (and auth.jwt_secret) for anything but local development",
                ", ".join(exposed),
            )


def _is_loopback(bind: str) -> bool:
    """Whether `bind` ("http://host:port", "host:port", "unix:...") is reachable from this
    machine only."""
    address = bind.partition("://")[2] or bind
    if address.startswith(("unix:", "fd://")):
        return True
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name, or "" (every interface)


def configure_logging() -> None:
    """Show the handler's INFO lines when nothing configured logging (e.g. under Hypercorn's
    CLI, which only sets up its own loggers); never adds a second handler."""
    root = logging.getLogger()
    ours = logging.getLogger("handler")
    if root.handlers or ours.handlers or ours.level != logging.NOTSET:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)


# --------------------------------------------------------------------------- browser client

WEB_PACKAGE: Final = "handler.web"
SOURCE_WEB_ROOT: Final = Path(__file__).resolve().parent.parent / "web"
NO_CACHE: Final = "no-cache"
IMMUTABLE: Final = "public, max-age=31536000, immutable"
_WEB_SUFFIXES: Final = frozenset(
    {".html", ".js", ".css", ".svg", ".png", ".ico", ".webp", ".json", ".txt", ".map", ".woff2"}
)
_HTML_REFERENCE: Final = re.compile(r"""(\b(?:src|href)\s*=\s*["'])(?:\./)?([^"'?#/:]+)(["'])""")
_JS_IMPORT: Final = re.compile(r"""(\b(?:from|import)\s*\(?\s*["'])\./([^"'?#/:]+)(["'])""")
_STUB_PAGE: Final = b"<!doctype html><title>Chat handler</title><p>WebSocket at /ws</p>"


def find_web_root() -> Traversable | None:
    """The browser client's files: the `handler.web` package of an installed wheel, else
    the repository's `web/` folder (a source checkout or an editable install)."""
    try:
        packaged: Traversable | None = importlib.resources.files(WEB_PACKAGE)
    except ModuleNotFoundError:
        packaged = None
    for root in (packaged, SOURCE_WEB_ROOT):
        if root is not None and root.joinpath("index.html").is_file():
            return root
    return None


@attrs.frozen
class _Asset:
    body: bytes
    content_type: str
    version: str  # a short hash of `body`: the ETag, and `?v=` in the URLs that name it


def _content_type(name: str) -> str:
    if name.endswith(".js"):
        return "text/javascript; charset=utf-8"
    guessed = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return f"{guessed}; charset=utf-8" if guessed.startswith("text/") else guessed


def _version(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()[:12]


def build_assets(files: dict[str, bytes]) -> dict[str, _Asset]:
    """Each file, with the sibling files it references (HTML `src`/`href`, JS relative
    imports) rewritten to `name?v=<hash>`. A hash covers the rewritten body, so a change in
    an imported module changes the URL of every file that imports it."""
    assets: dict[str, _Asset] = {}
    visiting: set[str] = set()

    def version_of(name: str) -> str | None:
        if name not in files:
            return None
        if name in assets:
            return assets[name].version
        if name in visiting:  # an import cycle: the raw content still changes with edits
            return _version(files[name])
        visiting.add(name)
        body = files[name]
        pattern = _HTML_REFERENCE if name.endswith(".html") else _JS_IMPORT
        if name.endswith((".html", ".js")):

            def versioned(match: re.Match[str]) -> str:
                version = version_of(match.group(2))
                if version is None:
                    return match.group(0)
                prefix = "" if pattern is _HTML_REFERENCE else "./"
                return f"{match.group(1)}{prefix}{match.group(2)}?v={version}{match.group(3)}"

            body = pattern.sub(versioned, body.decode("utf-8")).encode("utf-8")
        visiting.discard(name)
        assets[name] = _Asset(body, _content_type(name), _version(body))
        return assets[name].version

    for name in files:
        version_of(name)
    return assets


class WebClient:
    """Serves the browser client from memory: `index.html` (and any file requested without
    its current `?v=`) with `Cache-Control: no-cache` and an ETag, so a browser always
    revalidates it; a file requested with its current `?v=` is cached for a year.

    Files on disk are re-read when they change (checked per request, in a worker thread), so
    editing `web/` needs no restart.
    """

    def __init__(self, root: Traversable | None) -> None:
        self._root = root
        self._signature: tuple[tuple[str, int, int], ...] | None = None
        self._assets: dict[str, _Asset] = {}
        self._lock = trio.Lock()

    def _files(self) -> list[Traversable]:
        if self._root is None:
            return []
        return sorted(
            (
                entry
                for entry in self._root.iterdir()
                if entry.is_file()
                and not entry.name.startswith(".")
                and Path(entry.name).suffix in _WEB_SUFFIXES
            ),
            key=lambda entry: entry.name,
        )

    def _refresh(self) -> None:
        if self._signature is not None and not isinstance(self._root, Path):
            return  # inside an archive: it cannot change under us
        entries = self._files()
        signature = tuple((entry.name, *_stat(entry)) for entry in entries)
        if signature != self._signature:
            self._assets = build_assets({entry.name: entry.read_bytes() for entry in entries})
            self._signature = signature

    async def respond(self, name: str) -> Response:
        async with self._lock:
            await trio.to_thread.run_sync(self._refresh)
        asset = self._assets.get(name)
        if asset is None:
            if name == "index.html":  # nothing packaged: say where the endpoint is
                return Response(_STUB_PAGE, content_type="text/html; charset=utf-8")
            return Response("not found", status=404, content_type="text/plain")
        etag = f'"{asset.version}"'
        cache = IMMUTABLE if request.args.get("v") == asset.version else NO_CACHE
        headers = {"Cache-Control": cache, "ETag": etag}
        if etag in request.headers.get("If-None-Match", ""):
            return Response(b"", status=304, headers=headers)
        return Response(asset.body, content_type=asset.content_type, headers=headers)


def _stat(entry: Traversable) -> tuple[int, int]:
    if isinstance(entry, Path):
        info = entry.stat()
        return info.st_mtime_ns, info.st_size
    return 0, 0


# --------------------------------------------------------------------------- routes


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status=status, content_type="application/json")


def _bad_request(message: str) -> Response:
    return _json({"error": "bad_request", "message": message}, 400)


def create_app(config: Config | None = None) -> ChatApp:
    """Build the app; without `config`, load the file named by `CHAT_CONFIG`."""
    hypercorn_guard.install()
    configure_logging()
    if config is None:
        config = load_config(Path(os.environ.get("CHAT_CONFIG", str(DEFAULT_CONFIG_PATH))))
    app = ChatApp(config)
    web = WebClient(find_web_root())

    @app.route("/")
    async def index() -> Response:
        return await web.respond("index.html")

    @app.route("/<string:name>")
    async def static_file(name: str) -> Response:
        return await web.respond(name)

    @app.route("/healthz")
    async def healthz() -> Response:
        services = app.services
        if services is None:
            return _json({"status": "starting"}, 503)
        problems = {}
        components: tuple[tuple[str, Store | Bus], ...] = (
            ("store", services.store),
            ("bus", services.hub.bus),
        )
        for name, component in components:
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

    @app.route("/asyncapi.json")
    async def asyncapi_document() -> Response:
        return _json(ASYNCAPI)

    @app.route("/auth/dev-token", methods=["POST"])
    async def dev_token() -> Response:
        services = app.services
        if services is None or not services.authority.dev_tokens:
            return _json({"error": "not_found"}, 404)
        # orjson, not Quart's json: it refuses nesting deeper than 1024 with a ValueError
        # where the stdlib parser recurses until RecursionError (a 500 with a traceback).
        try:
            body = orjson.loads(await request.get_data())
        except orjson.JSONDecodeError:
            return _bad_request("the body must be a JSON object")
        user_id = body.get("user_id") if isinstance(body, dict) else None
        if not isinstance(user_id, str):
            return _bad_request("user_id must be a string")
        try:
            token = services.authority.issue(user_id)
        except ProtocolError as error:
            return _bad_request(error.message)
        return _json({"token": token, "user_id": user_id})

    api.install(app, config.api, lambda: app.services)
    return app
