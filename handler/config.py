"""Configuration: `config.json` parsed into frozen attrs classes, strictly.

An unknown key, a wrong type or an impossible value raises `ConfigError` naming the key, and the
command line turns that into exit code 2 with one line. Environment variables override the
secrets and addresses that deployments keep out of files (`CHAT_JWT_SECRET`,
`CHAT_DATABASE_URL`, `CHAT_REDIS_URL`, `CHAT_API_KEYS`).

With dev tokens on and no secret configured, `auth.secret_file` names where the generated
secret is kept: beside the SQLite file (`<storage.path>.secret`), or beside the config file
(`dev-tokens.secret`) for PostgreSQL.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal

import attrs

from handler import protocol
from handler.errors import ConfigError

DEFAULT_CONFIG_PATH: Final = Path("config.json")
DEV_SECRET_SUFFIX: Final = ".secret"
DEV_SECRET_NAME: Final = "dev-tokens.secret"


@attrs.frozen
class StorageConfig:
    backend: Literal["sqlite", "postgres"] = "sqlite"
    path: Path = Path("chat.db")
    synchronous: Literal["normal", "full"] = "normal"
    dsn: str = "postgresql://postgres@127.0.0.1:5432/test"
    pool_size: int = 8


@attrs.frozen
class BusConfig:
    backend: Literal["local", "redis"] = "local"
    url: str = "redis://127.0.0.1:6379/0"
    # Starts every Redis channel name, so deployments (or test runs) can share one Redis.
    prefix: str = "chat:"


@attrs.frozen
class AuthConfig:
    jwt_secret: str | None = None
    algorithms: tuple[str, ...] = ("HS256",)
    public_key: str | None = None
    issuer: str | None = None
    audience: str | None = None
    dev_tokens: bool = False
    # Where the generated dev-token secret is kept (set by `parse_config` when dev tokens are
    # on and no secret is configured); None: a random secret per process.
    secret_file: Path | None = None


@attrs.frozen
class LimitsConfig:
    max_message_chars: int = protocol.MAX_MESSAGE_CHARS
    max_frame_bytes: int = protocol.MAX_FRAME_BYTES
    history_limit: int = protocol.HISTORY_LIMIT
    rate_per_s: float = 20.0
    rate_burst: int = 40
    send_queue: int = 256
    send_queue_bytes: int = 1 << 20
    max_connections_per_user: int = 10
    auth_timeout_s: float = 10.0
    idle_timeout_s: float = 60.0
    ping_interval_s: float = 20.0
    compression: bool = False
    max_group_members: int = protocol.MAX_GROUP_MEMBERS
    presence: bool = True
    presence_grace_s: float = 5.0
    max_blocked_users: int = 1000

    def protocol_limits(self) -> protocol.Limits:
        return protocol.Limits(
            max_message_chars=self.max_message_chars,
            history_limit=self.history_limit,
            max_group_members=self.max_group_members,
        )


MIN_API_KEY_CHARS: Final = 16


@attrs.frozen
class ApiConfig:
    """The HTTP API for backends (`/api/v1/`); no key: the API does not exist (404)."""

    keys: tuple[str, ...] = attrs.field(default=(), repr=False)  # secrets: never printed
    # Per key and per node, like the WebSocket limits: a runaway backend cannot starve the
    # store's writer for everyone else.
    rate_per_s: float = 500.0
    rate_burst: int = 1000


WEBHOOK_EVENTS: Final = (
    "chat.created",
    "message.created",
    "message.updated",
    "message.read",
    "message.unread",
)
MIN_WEBHOOK_SECRET_CHARS: Final = 16


@attrs.frozen
class WebhookEndpoint:
    """One receiver: where events are POSTed, the key that signs them, which types it wants."""

    url: str
    secret: str = attrs.field(repr=False)  # never printed: it signs every event
    events: frozenset[str] = frozenset(WEBHOOK_EVENTS)


@attrs.frozen
class WebhooksConfig:
    """Webhooks for backends; no endpoint: nothing is written to the outbox at all."""

    endpoints: tuple[WebhookEndpoint, ...] = ()
    unread_delay_s: float = 30.0

    @property
    def enabled(self) -> bool:
        return bool(self.endpoints)


@attrs.frozen
class Config:
    handler_url: str = "127.0.0.1:8080"
    storage: StorageConfig = StorageConfig()
    bus: BusConfig = BusConfig()
    auth: AuthConfig = AuthConfig()
    limits: LimitsConfig = LimitsConfig()
    allowed_origins: tuple[str, ...] = ()
    api: ApiConfig = ApiConfig()
    webhooks: WebhooksConfig = WebhooksConfig()

    @property
    def host(self) -> str:
        return self.handler_url.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.handler_url.rpartition(":")[2])


_STORAGE_DEFAULTS: Final = StorageConfig()
_BUS_DEFAULTS: Final = BusConfig()
_SYNC_VALUES: Final = ("normal", "full")
_ALGORITHMS: Final = ("HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384")


class _Section:
    """Reads one JSON object, rejecting unknown keys and wrong types with the key's path."""

    def __init__(self, raw: Any, path: str, allowed: frozenset[str]) -> None:
        if not isinstance(raw, Mapping):
            raise ConfigError(path or "(root)", "must be a JSON object")
        for key in raw:
            if key not in allowed:
                raise ConfigError(_join(path, key), "unknown key")
        self._raw = raw
        self._path = path

    def key(self, name: str) -> str:
        return _join(self._path, name)

    def has(self, name: str) -> bool:
        return name in self._raw

    def get(self, name: str, kinds: type | tuple[type, ...], default: Any) -> Any:
        if name not in self._raw:
            return default
        value = self._raw[name]
        if isinstance(value, bool) and bool not in _as_tuple(kinds):
            raise ConfigError(self.key(name), f"must be {_kind_names(kinds)}")
        if not isinstance(value, kinds):
            raise ConfigError(self.key(name), f"must be {_kind_names(kinds)}")
        return value

    def positive(self, name: str, default: float, *, integer: bool = False) -> Any:
        kinds: tuple[type, ...] = (int,) if integer else (int, float)
        value = self.get(name, kinds, default)
        if value <= 0:
            raise ConfigError(self.key(name), "must be greater than 0")
        return value

    def raw(self, name: str) -> Any:
        return self._raw.get(name, {})


def _as_tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _kind_names(kinds: type | tuple[type, ...]) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        list: "a list",
    }
    return " or ".join(names.get(kind, kind.__name__) for kind in _as_tuple(kinds))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def parse_config(raw: Any, *, base_dir: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Build a `Config` from parsed JSON; relative paths are resolved against `base_dir`."""
    environ = os.environ if environ is None else environ
    root = _Section(
        raw,
        "",
        frozenset(
            {
                "handler_url",
                "storage",
                "bus",
                "auth",
                "limits",
                "allowed_origins",
                "api",
                "webhooks",
            }
        ),
    )
    if not root.has("handler_url"):
        raise ConfigError("handler_url", "is required")
    handler_url = root.get("handler_url", str, "")
    _check_handler_url(handler_url)
    storage = _parse_storage(root.raw("storage"), base_dir, environ)
    auth = _parse_auth(root.raw("auth"), environ)
    if auth.dev_tokens and auth.jwt_secret is None:
        auth = attrs.evolve(auth, secret_file=_dev_secret_file(storage, base_dir))
    config = Config(
        handler_url=handler_url,
        storage=storage,
        bus=_parse_bus(root.raw("bus"), environ),
        auth=auth,
        limits=_parse_limits(root.raw("limits")),
        allowed_origins=_parse_origins(root),
        api=_parse_api(root.raw("api"), environ),
        webhooks=_parse_webhooks(root.raw("webhooks")),
    )
    return config


def _dev_secret_file(storage: StorageConfig, base_dir: Path) -> Path:
    """Beside the data it protects: a new SQLite file starts with a new secret, as it starts
    with no users; PostgreSQL has no local file, so the config's directory."""
    if storage.backend == "sqlite":
        return storage.path.with_name(storage.path.name + DEV_SECRET_SUFFIX)
    return base_dir / DEV_SECRET_NAME


def _check_handler_url(value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError("handler_url", 'must be "host:port" with a port 0..65535')


def _parse_storage(raw: Any, base_dir: Path, environ: Mapping[str, str]) -> StorageConfig:
    section = _Section(
        raw, "storage", frozenset({"backend", "path", "synchronous", "dsn", "pool_size"})
    )
    backend = section.get("backend", str, "sqlite")
    if backend not in ("sqlite", "postgres"):
        raise ConfigError(section.key("backend"), 'must be "sqlite" or "postgres"')
    path = Path(section.get("path", str, "chat.db"))
    if not path.is_absolute():
        path = base_dir / path
    synchronous = section.get("synchronous", str, "normal")
    if synchronous not in _SYNC_VALUES:
        raise ConfigError(section.key("synchronous"), 'must be "normal" or "full"')
    dsn = environ.get("CHAT_DATABASE_URL") or section.get("dsn", str, _STORAGE_DEFAULTS.dsn)
    pool_size = section.positive("pool_size", _STORAGE_DEFAULTS.pool_size, integer=True)
    return StorageConfig(
        backend=backend, path=path, synchronous=synchronous, dsn=dsn, pool_size=pool_size
    )


def _parse_bus(raw: Any, environ: Mapping[str, str]) -> BusConfig:
    section = _Section(raw, "bus", frozenset({"backend", "url", "prefix"}))
    backend = section.get("backend", str, "local")
    if backend not in ("local", "redis"):
        raise ConfigError(section.key("backend"), 'must be "local" or "redis"')
    url = environ.get("CHAT_REDIS_URL") or section.get("url", str, _BUS_DEFAULTS.url)
    prefix = section.get("prefix", str, _BUS_DEFAULTS.prefix)
    if not prefix:
        raise ConfigError(section.key("prefix"), "must not be empty")
    return BusConfig(backend=backend, url=url, prefix=prefix)


def _parse_auth(raw: Any, environ: Mapping[str, str]) -> AuthConfig:
    section = _Section(
        raw,
        "auth",
        frozenset({"jwt_secret", "algorithms", "public_key", "issuer", "audience", "dev_tokens"}),
    )
    secret = environ.get("CHAT_JWT_SECRET") or section.get("jwt_secret", (str, type(None)), None)
    if secret == "":
        secret = None
    algorithms = section.get("algorithms", list, ["HS256"])
    if not algorithms or not all(isinstance(alg, str) for alg in algorithms):
        raise ConfigError(section.key("algorithms"), "must be a non-empty list of strings")
    for alg in algorithms:
        if alg not in _ALGORITHMS:
            raise ConfigError(
                section.key("algorithms"), f"{alg!r} is not one of {', '.join(_ALGORITHMS)}"
            )
    public_key = section.get("public_key", (str, type(None)), None)
    if public_key is None and any(not alg.startswith("HS") for alg in algorithms):
        raise ConfigError(section.key("public_key"), "is required for RS*/ES* algorithms")
    dev_tokens = section.get("dev_tokens", bool, False)
    if secret is None and public_key is None and not dev_tokens:
        raise ConfigError(
            section.key("jwt_secret"),
            "no secret or public key configured and dev_tokens is false: nobody could sign in",
        )
    return AuthConfig(
        jwt_secret=secret,
        algorithms=tuple(algorithms),
        public_key=public_key,
        issuer=section.get("issuer", (str, type(None)), None),
        audience=section.get("audience", (str, type(None)), None),
        dev_tokens=dev_tokens,
    )


def _parse_limits(raw: Any) -> LimitsConfig:
    fields = attrs.fields_dict(LimitsConfig)
    section = _Section(raw, "limits", frozenset(fields))
    defaults = LimitsConfig()
    values: dict[str, Any] = {}
    for name, field in fields.items():
        default = getattr(defaults, name)
        if field.type in ("bool", bool):
            values[name] = section.get(name, bool, default)
        else:
            values[name] = section.positive(name, default, integer=field.type in ("int", int))
    if values["max_frame_bytes"] < 1024:
        raise ConfigError("limits.max_frame_bytes", "must be at least 1024")
    if values["rate_burst"] < 1:
        raise ConfigError("limits.rate_burst", "must be at least 1")
    if values["max_group_members"] < 2:
        raise ConfigError("limits.max_group_members", "must be at least 2")
    return LimitsConfig(**values)


def _parse_api(raw: Any, environ: Mapping[str, str]) -> ApiConfig:
    section = _Section(raw, "api", frozenset({"keys", "rate_per_s", "rate_burst"}))
    from_env = environ.get("CHAT_API_KEYS")
    if from_env:
        key_name = "CHAT_API_KEYS"
        keys = [key.strip() for key in from_env.split(",") if key.strip()]
    else:
        key_name = section.key("keys")
        keys = section.get("keys", list, [])
    for index, key in enumerate(keys):
        # Errors name the key's position, never the key: config errors end up in logs.
        if not isinstance(key, str):
            raise ConfigError(key_name, f"key {index + 1} must be a string")
        if len(key) < MIN_API_KEY_CHARS:
            raise ConfigError(
                key_name, f"key {index + 1} must be at least {MIN_API_KEY_CHARS} characters"
            )
        if not (key.isascii() and key.isprintable()) or " " in key:
            raise ConfigError(
                key_name,
                f"key {index + 1} must be printable ASCII without spaces (it travels in an"
                " Authorization header)",
            )
    defaults = ApiConfig()
    rate_burst = section.positive("rate_burst", defaults.rate_burst, integer=True)
    if rate_burst < 1:
        raise ConfigError(section.key("rate_burst"), "must be at least 1")
    return ApiConfig(
        keys=tuple(keys),
        rate_per_s=section.positive("rate_per_s", defaults.rate_per_s),
        rate_burst=rate_burst,
    )


def _parse_webhooks(raw: Any) -> WebhooksConfig:
    section = _Section(raw, "webhooks", frozenset({"endpoints", "unread_delay_s"}))
    endpoints = []
    urls = set()
    for index, item in enumerate(section.get("endpoints", list, [])):
        entry = _Section(
            item, f"webhooks.endpoints[{index}]", frozenset({"url", "secret", "events"})
        )
        for name in ("url", "secret"):
            if not entry.has(name):
                raise ConfigError(entry.key(name), "is required")
        url = entry.get("url", str, "")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(entry.key("url"), "must be an http:// or https:// URL")
        if url in urls:
            raise ConfigError(entry.key("url"), "is listed twice")
        urls.add(url)
        # Errors never quote the secret: config errors end up in logs.
        secret = entry.get("secret", str, "")
        if len(secret) < MIN_WEBHOOK_SECRET_CHARS:
            raise ConfigError(
                entry.key("secret"), f"must be at least {MIN_WEBHOOK_SECRET_CHARS} characters"
            )
        events = entry.get("events", list, list(WEBHOOK_EVENTS))
        unknown = [event for event in events if event not in WEBHOOK_EVENTS]
        if not events or unknown:
            raise ConfigError(
                entry.key("events"), f"must be a non-empty list of {', '.join(WEBHOOK_EVENTS)}"
            )
        endpoints.append(WebhookEndpoint(url, secret, frozenset(events)))
    delay = section.positive("unread_delay_s", WebhooksConfig().unread_delay_s)
    return WebhooksConfig(endpoints=tuple(endpoints), unread_delay_s=delay)


def _parse_origins(root: _Section) -> tuple[str, ...]:
    origins = root.get("allowed_origins", list, [])
    if not all(isinstance(origin, str) and origin for origin in origins):
        raise ConfigError("allowed_origins", "must be a list of non-empty strings")
    return tuple(origins)


_KEYWORD_PASSWORD: Final = re.compile(r"""\s*\bpassword\s*=\s*('(?:[^'\\]|\\.)*'|\S*)""")


def redact(url: str) -> str:
    """`url` (a URL or a key=value DSN) without its password, for logs."""
    if "://" not in url:
        return _KEYWORD_PASSWORD.sub("", url).strip()
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}@{host}" if user else host
    query = urllib.parse.urlencode(
        [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if k.lower() != "password"]
    )
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(str(path), f"cannot read: {error.strerror}") from None
    try:
        raw = json.loads(text)
    except ValueError as error:
        raise ConfigError(str(path), f"is not valid JSON: {error}") from None
    return parse_config(raw, base_dir=path.resolve().parent, environ=environ)
