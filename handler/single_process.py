"""Refuse set-ups where the in-process bus would silently split users between processes.

The local bus only reaches connections of its own process. With several Hypercorn workers, or
two handlers on one SQLite file, a message sent on one process would never be pushed to a
recipient connected to the other. Both are refused at startup with a message saying what to
use instead (PostgreSQL + Redis).
"""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from handler.config import Config
from handler.errors import ConfigError

_ADVICE = 'use storage.backend "postgres" with bus.backend "redis" to run several processes'


def hypercorn_workers(argv: Sequence[str]) -> int:
    """The `--workers`/`-w` count of a `hypercorn` command line (1 when absent)."""
    if not argv or "hypercorn" not in Path(argv[0]).name:
        return 1
    for index, arg in enumerate(argv):
        value: str | None = None
        if arg in ("-w", "--workers") and index + 1 < len(argv):
            value = argv[index + 1]
        elif arg.startswith("--workers="):
            value = arg.partition("=")[2]
        if value is not None and value.isdigit():
            return int(value)
    return 1


class ProcessLock:
    """An exclusive lock on `<sqlite file>.lock`, held while this process serves it."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._file: IO[bytes] | None = None

    def acquire(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self._path, "ab")  # noqa: SIM115 - held for the process lifetime
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise ConfigError(
                "bus.backend",
                f"another handler process already serves {self._path.with_suffix('')} on the"
                f" local bus; {_ADVICE}",
            ) from None
        handle.truncate(0)
        handle.write(str(os.getpid()).encode())
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def guard_local_bus(config: Config, argv: Sequence[str] | None = None) -> ProcessLock | None:
    """Raise `ConfigError` for multi-process use of the local bus; lock the SQLite file."""
    if config.bus.backend != "local":
        return None
    workers = hypercorn_workers(sys.argv if argv is None else argv)
    if workers > 1:
        raise ConfigError("bus.backend", f'"local" cannot serve {workers} workers; {_ADVICE}')
    if config.storage.backend != "sqlite":
        return None
    lock = ProcessLock(config.storage.path.with_name(config.storage.path.name + ".lock"))
    lock.acquire()
    return lock
