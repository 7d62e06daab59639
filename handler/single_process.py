"""Refuse set-ups where the in-process bus would silently split users between processes.

The local bus only reaches connections of its own process. With several Hypercorn workers, or
two handlers on one SQLite file, a message sent on one process would never be pushed to a
recipient connected to the other. Both are refused at startup with a message saying what to
use instead (PostgreSQL + Redis).

The SQLite file's lock is waited for briefly (`LOCK_WAIT_S`): a handler restarted right after
Ctrl+C finds the old process still closing connections, and the old process releases the
lock last, once its store is closed.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Final

import trio

from handler.config import Config
from handler.errors import ConfigError

log = logging.getLogger("handler.app")

_ADVICE = 'use storage.backend "postgres" with bus.backend "redis" to run several processes'
LOCK_WAIT_S: Final = 5.0
_LOCK_POLL_S: Final = 0.05
LOCK_SUFFIX: Final = ".lock"
HYPERCORN_DEFAULT_BIND: Final = "127.0.0.1:8000"


def _is_hypercorn(argv: Sequence[str]) -> bool:
    return bool(argv) and "hypercorn" in Path(argv[0]).name


def _option_values(argv: Sequence[str], short: str, long: str) -> list[str]:
    values: list[str] = []
    for index, arg in enumerate(argv):
        if arg in (short, long) and index + 1 < len(argv):
            values.append(argv[index + 1])
        elif arg.startswith(long + "="):
            values.append(arg.partition("=")[2])
    return values


def hypercorn_workers(argv: Sequence[str]) -> int:
    """The `--workers`/`-w` count of a `hypercorn` command line (1 when absent)."""
    if not _is_hypercorn(argv):
        return 1
    for value in _option_values(argv, "-w", "--workers"):
        if value.isdigit():
            return int(value)
    return 1


def hypercorn_binds(argv: Sequence[str]) -> list[str] | None:
    """The `--bind`/`-b` addresses of a `hypercorn` command line; None when not Hypercorn's,
    or when a Hypercorn config file (`-c`) may set them."""
    if not _is_hypercorn(argv):
        return None
    binds = _option_values(argv, "-b", "--bind")
    if binds:
        return binds
    if _option_values(argv, "-c", "--config"):
        return None
    return [HYPERCORN_DEFAULT_BIND]


class ProcessLock:
    """An exclusive lock on `<sqlite file>.lock`, held while this process serves it."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._file: IO[bytes] | None = None

    @property
    def path(self) -> Path:
        return self._path

    def try_acquire(self) -> bool:
        """Take the lock if it is free (never blocks)."""
        self._path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self._path, "ab")  # noqa: SIM115 - held for the process lifetime
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        handle.truncate(0)
        handle.write(str(os.getpid()).encode())
        handle.flush()
        self._file = handle
        return True

    async def acquire(self, wait_s: float = LOCK_WAIT_S) -> None:
        """Take the lock, polling for up to `wait_s` while another process holds it.

        Raises ConfigError naming the holder when it is still held after `wait_s`.
        """
        deadline = trio.current_time() + wait_s
        while not self.try_acquire():
            if trio.current_time() >= deadline:
                raise ConfigError(
                    "bus.backend",
                    f"another handler process{self._holder()} already serves"
                    f" {self._path.with_suffix('')} on the local bus (waited {wait_s:g} s);"
                    f" stop it first, or {_ADVICE}",
                )
            log.debug("waiting for %s", self._path)
            await trio.sleep(_LOCK_POLL_S)

    def _holder(self) -> str:
        try:
            pid = self._path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return ""
        return f" (pid {pid})" if pid.isdigit() else ""

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def guard_local_bus(config: Config, argv: Sequence[str] | None = None) -> ProcessLock | None:
    """Raise `ConfigError` for multi-process use of the local bus; return the SQLite file's
    lock, still to be acquired (`await lock.acquire()`)."""
    if config.bus.backend != "local":
        return None
    workers = hypercorn_workers(sys.argv if argv is None else argv)
    if workers > 1:
        raise ConfigError("bus.backend", f'"local" cannot serve {workers} workers; {_ADVICE}')
    if config.storage.backend != "sqlite":
        return None
    return ProcessLock(config.storage.path.with_name(config.storage.path.name + LOCK_SUFFIX))
