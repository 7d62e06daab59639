"""Configuration: strict parsing, defaults that match PROTOCOL.md, and the CLI's exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from handler.config import Config, LimitsConfig, load_config, parse_config
from handler.errors import ConfigError

SECRET = "config-test-secret-0123456789abcdef0123"


def minimal(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"handler_url": "127.0.0.1:8080", "auth": {"jwt_secret": SECRET}}
    raw.update(overrides)
    return raw


def parse(raw: Any, environ: dict[str, str] | None = None) -> Config:
    return parse_config(raw, base_dir=Path("/srv/chat"), environ=environ or {})


def test_defaults_are_the_protocol_defaults() -> None:
    config = parse(minimal())
    assert config.limits == LimitsConfig()
    limits = config.limits
    assert limits.max_message_chars == 4096
    assert limits.max_frame_bytes == 65536
    assert limits.history_limit == 1000
    assert limits.rate_per_s == 20
    assert limits.rate_burst == 40
    assert limits.send_queue == 256
    assert limits.auth_timeout_s == 10
    assert limits.idle_timeout_s == 60
    assert limits.ping_interval_s == 20
    assert limits.compression is False
    assert config.allowed_origins == ()
    assert config.storage.backend == "sqlite"
    assert config.bus.backend == "local"
    assert config.auth.algorithms == ("HS256",)
    assert config.auth.dev_tokens is False
    assert (config.host, config.port) == ("127.0.0.1", 8080)


def test_a_full_config_is_read() -> None:
    raw = {
        "handler_url": "[::1]:9000",
        "storage": {"backend": "sqlite", "path": "/var/chat.db", "synchronous": "full"},
        "bus": {"backend": "local"},
        "auth": {
            "jwt_secret": SECRET,
            "algorithms": ["HS256", "HS512"],
            "issuer": "iss",
            "audience": "aud",
            "dev_tokens": True,
        },
        "limits": {
            "max_message_chars": 10,
            "max_frame_bytes": 2048,
            "history_limit": 7,
            "rate_per_s": 0.5,
            "rate_burst": 3,
            "send_queue": 4,
            "auth_timeout_s": 1,
            "idle_timeout_s": 2.5,
            "ping_interval_s": 3,
            "compression": True,
        },
        "allowed_origins": ["https://chat.example"],
    }
    config = parse(raw)
    assert (config.host, config.port) == ("::1", 9000)
    assert config.storage.path == Path("/var/chat.db")
    assert config.storage.synchronous == "full"
    assert config.auth.algorithms == ("HS256", "HS512")
    assert (config.auth.issuer, config.auth.audience, config.auth.dev_tokens) == (
        "iss",
        "aud",
        True,
    )
    assert config.limits == LimitsConfig(
        max_message_chars=10,
        max_frame_bytes=2048,
        history_limit=7,
        rate_per_s=0.5,
        rate_burst=3,
        send_queue=4,
        auth_timeout_s=1,
        idle_timeout_s=2.5,
        ping_interval_s=3,
        compression=True,
    )
    assert config.limits.protocol_limits().max_message_chars == 10
    assert config.limits.protocol_limits().history_limit == 7
    assert config.allowed_origins == ("https://chat.example",)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ([], "(root)"),
        ("config", "(root)"),
        ({"auth": {"jwt_secret": SECRET}}, "handler_url"),
        (minimal(handler_url=8080), "handler_url"),
        (minimal(handler_url="localhost"), "handler_url"),
        (minimal(handler_url=":8080"), "handler_url"),
        (minimal(handler_url="localhost:http"), "handler_url"),
        (minimal(handler_url="localhost:65536"), "handler_url"),
        (minimal(handler_url="localhost:-1"), "handler_url"),
        (minimal(port=8080), "port"),
        (minimal(Limits={}), "Limits"),
        (minimal(storage=[]), "storage"),
        (minimal(storage={"backend": "mysql"}), "storage.backend"),
        (minimal(storage={"backend": 1}), "storage.backend"),
        (minimal(storage={"path": 5}), "storage.path"),
        (minimal(storage={"path": None}), "storage.path"),
        (minimal(storage={"synchronous": "off"}), "storage.synchronous"),
        (minimal(storage={"pool_size": 0}), "storage.pool_size"),
        (minimal(storage={"pool_size": 1.5}), "storage.pool_size"),
        (minimal(storage={"pool_size": True}), "storage.pool_size"),
        (minimal(storage={"file": "x.db"}), "storage.file"),
        (minimal(bus="local"), "bus"),
        (minimal(bus={"backend": "kafka"}), "bus.backend"),
        (minimal(bus={"url": 6379}), "bus.url"),
        (minimal(bus={"host": "x"}), "bus.host"),
        (minimal(bus={"prefix": ""}), "bus.prefix"),
        (minimal(bus={"prefix": 1}), "bus.prefix"),
        (minimal(auth={"jwt_secret": 5}), "auth.jwt_secret"),
        (minimal(auth={"jwt_secret": SECRET, "algorithms": "HS256"}), "auth.algorithms"),
        (minimal(auth={"jwt_secret": SECRET, "algorithms": []}), "auth.algorithms"),
        (minimal(auth={"jwt_secret": SECRET, "algorithms": ["none"]}), "auth.algorithms"),
        (minimal(auth={"jwt_secret": SECRET, "algorithms": [256]}), "auth.algorithms"),
        (minimal(auth={"jwt_secret": SECRET, "algorithms": ["RS256"]}), "auth.public_key"),
        (minimal(auth={"jwt_secret": SECRET, "algorithms": ["ES256"]}), "auth.public_key"),
        (minimal(auth={"jwt_secret": SECRET, "dev_tokens": "yes"}), "auth.dev_tokens"),
        (minimal(auth={"jwt_secret": SECRET, "dev_tokens": 1}), "auth.dev_tokens"),
        (minimal(auth={"jwt_secret": SECRET, "issuer": 1}), "auth.issuer"),
        (minimal(auth={"jwt_secret": SECRET, "audience": ["a"]}), "auth.audience"),
        (minimal(auth={"jwt_secret": SECRET, "secret": "x"}), "auth.secret"),
        (minimal(auth={}), "auth.jwt_secret"),
        (minimal(auth={"jwt_secret": None}), "auth.jwt_secret"),
        (minimal(auth={"jwt_secret": ""}), "auth.jwt_secret"),
        (minimal(limits=5), "limits"),
        (minimal(limits={"rate_per_s": -1}), "limits.rate_per_s"),
        (minimal(limits={"rate_per_s": 0}), "limits.rate_per_s"),
        (minimal(limits={"rate_per_s": "20"}), "limits.rate_per_s"),
        (minimal(limits={"rate_per_s": True}), "limits.rate_per_s"),
        (minimal(limits={"rate_burst": 0}), "limits.rate_burst"),
        (minimal(limits={"rate_burst": 2.5}), "limits.rate_burst"),
        (minimal(limits={"max_message_chars": 0}), "limits.max_message_chars"),
        (minimal(limits={"max_message_chars": 4096.5}), "limits.max_message_chars"),
        (minimal(limits={"max_frame_bytes": 100}), "limits.max_frame_bytes"),
        (minimal(limits={"max_frame_bytes": None}), "limits.max_frame_bytes"),
        (minimal(limits={"history_limit": -5}), "limits.history_limit"),
        (minimal(limits={"send_queue": 0}), "limits.send_queue"),
        (minimal(limits={"auth_timeout_s": 0}), "limits.auth_timeout_s"),
        (minimal(limits={"auth_timeout_s": "10"}), "limits.auth_timeout_s"),
        (minimal(limits={"idle_timeout_s": -1}), "limits.idle_timeout_s"),
        (minimal(limits={"ping_interval_s": []}), "limits.ping_interval_s"),
        (minimal(limits={"compression": 1}), "limits.compression"),
        (minimal(limits={"compression": "false"}), "limits.compression"),
        (minimal(limits={"max_chars": 5}), "limits.max_chars"),
        (minimal(allowed_origins="https://a.example"), "allowed_origins"),
        (minimal(allowed_origins=[""]), "allowed_origins"),
        (minimal(allowed_origins=[1]), "allowed_origins"),
        (minimal(allowed_origins=None), "allowed_origins"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_invalid_config_names_the_key(raw: Any, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(raw)
    assert info.value.key == key
    assert key in str(info.value)


def test_no_secret_and_no_dev_tokens_refuses() -> None:
    with pytest.raises(ConfigError) as info:
        parse(minimal(auth={"dev_tokens": False}))
    assert info.value.key == "auth.jwt_secret"


def test_dev_tokens_alone_is_enough() -> None:
    config = parse(minimal(auth={"dev_tokens": True}))
    assert config.auth.jwt_secret is None
    assert config.auth.dev_tokens is True


def test_a_public_key_alone_is_enough() -> None:
    config = parse(minimal(auth={"algorithms": ["RS256"], "public_key": "PEM"}))
    assert config.auth.public_key == "PEM"
    assert config.auth.jwt_secret is None


def test_environment_secret_overrides_the_file() -> None:
    env_secret = "from-the-environment-0123456789abcdef"
    config = parse(minimal(), environ={"CHAT_JWT_SECRET": env_secret})
    assert config.auth.jwt_secret == env_secret
    config = parse(minimal(auth={"dev_tokens": False}), environ={"CHAT_JWT_SECRET": env_secret})
    assert config.auth.jwt_secret == env_secret


def test_empty_environment_secret_does_not_override() -> None:
    assert parse(minimal(), environ={"CHAT_JWT_SECRET": ""}).auth.jwt_secret == SECRET


def test_environment_urls_override_the_file() -> None:
    config = parse(
        minimal(storage={"dsn": "postgresql://file"}, bus={"url": "redis://file"}),
        environ={"CHAT_DATABASE_URL": "postgresql://env", "CHAT_REDIS_URL": "redis://env"},
    )
    assert config.storage.dsn == "postgresql://env"
    assert config.bus.url == "redis://env"


def test_bus_prefix() -> None:
    assert parse(minimal()).bus.prefix == "chat:"
    assert parse(minimal(bus={"backend": "redis", "prefix": "staging:"})).bus.prefix == "staging:"


def test_relative_sqlite_path_is_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = config_dir / "config.json"
    path.write_text(json.dumps(minimal(storage={"path": "data/chat.db"})))
    assert load_config(path, environ={}).storage.path == config_dir.resolve() / "data/chat.db"
    relative = Path("..") / "etc" / "config.json"
    assert load_config(relative, environ={}).storage.path == config_dir.resolve() / "data/chat.db"


def test_absolute_sqlite_path_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(minimal(storage={"path": "/var/lib/chat/chat.db"})))
    assert load_config(path, environ={}).storage.path == Path("/var/lib/chat/chat.db")


def test_default_sqlite_path_is_next_to_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(minimal()))
    assert load_config(path, environ={}).storage.path == tmp_path.resolve() / "chat.db"


def test_load_config_unreadable_or_not_json(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_config(tmp_path / "missing.json", environ={})
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError) as info:
        load_config(broken, environ={})
    assert str(broken) in str(info.value)


def test_the_shipped_config_is_valid() -> None:
    shipped = Path(__file__).resolve().parent.parent / "config.json"
    config = load_config(shipped, environ={})
    assert config.limits == LimitsConfig()


# --------------------------------------------------------------------------- command line


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CHAT_")}
    return subprocess.run(
        [sys.executable, "-m", "handler", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=env,
        check=False,
    )


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        (minimal(limits={"rate_per_s": -1}), "limits.rate_per_s"),
        (minimal(surprise=True), "surprise"),
        (minimal(auth={"dev_tokens": False}), "auth.jwt_secret"),
        (minimal(storage={"backend": "oracle"}), "storage.backend"),
    ],
    ids=["impossible-value", "unknown-key", "nobody-can-sign-in", "wrong-choice"],
)
def test_cli_exits_2_with_one_line_naming_the_key(
    tmp_path: Path, raw: dict[str, Any], key: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    result = _run_cli("--config", str(path), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert key in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_cli_exits_2_for_a_missing_config(tmp_path: Path) -> None:
    result = _run_cli("--config", str(tmp_path / "nope.json"), cwd=tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_token_prints_a_token_the_server_accepts(tmp_path: Path) -> None:
    from handler.auth import TokenAuthority

    path = tmp_path / "config.json"
    path.write_text(json.dumps(minimal()))
    result = _run_cli("--config", str(path), "token", "alice", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    identity = TokenAuthority(load_config(path, environ={}).auth).verify(token)
    assert identity.user_id == "alice"


API_KEY = "backend-key-0123456789"


def test_api_keys_default_to_none_so_the_api_is_off() -> None:
    api = parse(minimal()).api
    assert api.keys == ()
    assert (api.rate_per_s, api.rate_burst) == (500, 1000)


def test_api_keys_and_rate_are_read() -> None:
    raw = minimal(api={"keys": [API_KEY, API_KEY + "x"], "rate_per_s": 5, "rate_burst": 7})
    api = parse(raw).api
    assert api.keys == (API_KEY, API_KEY + "x")
    assert (api.rate_per_s, api.rate_burst) == (5, 7)
    assert API_KEY not in repr(api)  # a config printed in a log shows no key


def test_environment_api_keys_override_the_file() -> None:
    raw = minimal(api={"keys": [API_KEY]})
    environ = {"CHAT_API_KEYS": " first-key-0123456789 ,second-key-0123456789,"}
    assert parse(raw, environ).api.keys == ("first-key-0123456789", "second-key-0123456789")
    assert parse(raw, {"CHAT_API_KEYS": ""}).api.keys == (API_KEY,)


@pytest.mark.parametrize(
    ("api", "environ", "key"),
    [
        ({"keys": API_KEY}, {}, "api.keys"),
        ({"keys": [5]}, {}, "api.keys"),
        ({"keys": ["short"]}, {}, "api.keys"),
        ({"keys": ["has a space in it, sadly"]}, {}, "api.keys"),
        ({"keys": ["non-ascii-key-\u00e9\u00e9\u00e9\u00e9"]}, {}, "api.keys"),
        ({}, {"CHAT_API_KEYS": "short"}, "CHAT_API_KEYS"),
        ({"rate_per_s": 0}, {}, "api.rate_per_s"),
        ({"rate_burst": 0.5}, {}, "api.rate_burst"),
        ({"key": [API_KEY]}, {}, "api.key"),
    ],
)
def test_invalid_api_config_names_the_key_never_the_secret(
    api: dict[str, Any], environ: dict[str, str], key: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        parse(minimal(api=api), environ)
    assert raised.value.key == key
    keys = api.get("keys", [])
    for secret in (*(keys if isinstance(keys, list) else [keys]), *environ.values()):
        if isinstance(secret, str):
            assert secret not in str(raised.value)
