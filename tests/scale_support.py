"""PostgreSQL and Redis for the scale-out tests: the shared services, or throwaway ones.

Shared services come from `CHAT_TEST_DATABASE_URL` and `CHAT_TEST_REDIS_URL`; a test that needs
one skips, naming the variable, when it is unset. Each test gets its own PostgreSQL schema (via
`search_path` in the DSN) and its own Redis channel prefix, so runs never see each other's data.

Outage tests need servers they may stop: `ThrowawayRedis` and `ThrowawayPostgres` start private
instances on free ports from the installed binaries (skipping when there are none) and can stop
and restart them on the same port.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import psycopg
import pytest
import trio

DATABASE_URL_ENV: Final = "CHAT_TEST_DATABASE_URL"
REDIS_URL_ENV: Final = "CHAT_TEST_REDIS_URL"
EXAMPLE_DATABASE_URL: Final = "postgresql://postgres@127.0.0.1:5432/test"
EXAMPLE_REDIS_URL: Final = "redis://127.0.0.1:6379/0"
SERVICE_START_TIMEOUT_S: Final = 30.0


def database_url() -> str:
    """The shared PostgreSQL, or skip the test with the reason."""
    url = os.environ.get(DATABASE_URL_ENV)
    if not url:
        pytest.skip(f"PostgreSQL tests need {DATABASE_URL_ENV} (e.g. {EXAMPLE_DATABASE_URL})")
    return url


def redis_url() -> str:
    """The shared Redis, or skip the test with the reason."""
    url = os.environ.get(REDIS_URL_ENV)
    if not url:
        pytest.skip(f"Redis tests need {REDIS_URL_ENV} (e.g. {EXAMPLE_REDIS_URL})")
    return url


def unique_prefix() -> str:
    """A Redis channel prefix no other test run uses."""
    return f"test:{secrets.token_hex(6)}:"


def with_search_path(url: str, schema: str) -> str:
    """`url` with `options=-csearch_path=<schema>` added (a URL or a key=value DSN)."""
    option = f"-csearch_path={schema}"
    if "://" in url:
        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qsl(parts.query)
        query.append(("options", option))
        return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
    return f"{url} options='{option}'"


@contextlib.contextmanager
def fresh_schema(url: str) -> Iterator[str]:
    """A new empty schema, dropped afterwards; yields a DSN whose search_path is that schema."""
    schema = f"chat_test_{secrets.token_hex(6)}"
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    try:
        yield with_search_path(url, schema)
    finally:
        with psycopg.connect(url, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_for_port(port: int, timeout: float = SERVICE_START_TIMEOUT_S) -> None:
    """External servers announce readiness only by accepting connections; poll, bounded."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on port {port}") from None
            time.sleep(0.02)


# --------------------------------------------------------------------------- throwaway Redis


class ThrowawayRedis:
    """A private redis-server on a free port; `stop()` and `start()` keep the port."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("the Redis outage tests need redis-server on PATH")
        self._binary = binary
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def _start_sync(self) -> None:
        command = [self._binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no"]  # nothing to persist
        self._process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for_port(self.port)

    def _stop_sync(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    async def start(self) -> None:
        await trio.to_thread.run_sync(self._start_sync)

    async def stop(self) -> None:
        """Kill it (SIGKILL): connections break the way they do when a server dies."""
        await trio.to_thread.run_sync(self._stop_sync)

    def close(self) -> None:
        self._stop_sync()


# --------------------------------------------------------------------------- throwaway PostgreSQL


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return None if initdb is None else Path(initdb).parent


class ThrowawayPostgres:
    """A private cluster in a temporary directory on a free port (fsync off: it is disposable).

    PostgreSQL refuses to run as root, so under root the commands run as the `postgres` user.
    """

    def __init__(self) -> None:
        bin_dir = _postgres_bin()
        if bin_dir is None:
            pytest.skip("the PostgreSQL outage tests need the PostgreSQL server binaries")
        self._bin = bin_dir
        self.port = free_port()
        self._root = Path(tempfile.mkdtemp(prefix="chat-pg-"))
        self._data = self._root / "data"
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as: list[str] = []
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                pytest.skip("running PostgreSQL as root needs runuser")
            self._as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self._root, "postgres", "postgres")

    def _run(self, *command: str) -> None:
        subprocess.run(
            [*self._as, *command],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=SERVICE_START_TIMEOUT_S,
        )

    def _init_sync(self) -> None:
        self._run(
            str(self._bin / "initdb"), "-D", str(self._data), "-U", "postgres",
            "-A", "trust", "--no-sync", "-E", "UTF8",
        )  # fmt: skip

    def _start_sync(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self._root}"
            " -c fsync=off -c full_page_writes=off"
        )
        self._run(
            str(self._bin / "pg_ctl"), "-D", str(self._data), "-o", options,
            "-l", str(self._root / "log"), "-w", "-t", "30", "start",
        )  # fmt: skip

    def _stop_sync(self, mode: str = "immediate") -> None:
        self._run(str(self._bin / "pg_ctl"), "-D", str(self._data), "-m", mode, "-w", "stop")

    async def start(self) -> None:
        if not self._data.exists():
            await trio.to_thread.run_sync(self._init_sync)
        await trio.to_thread.run_sync(self._start_sync)

    async def stop(self) -> None:
        """Stop in `immediate` mode: like a crash, nothing is flushed politely."""
        await trio.to_thread.run_sync(self._stop_sync)

    def close(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._stop_sync("immediate")
        shutil.rmtree(self._root, ignore_errors=True)
