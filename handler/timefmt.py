"""Wire timestamps: ISO-8601 UTC with milliseconds and `Z`, from integer epoch milliseconds."""

from __future__ import annotations

import functools
import time
from datetime import UTC, datetime


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@functools.lru_cache(maxsize=4096)
def _second(epoch_s: int) -> str:
    """The text of one whole second: messages and chat lists repeat a few seconds a lot."""
    return datetime.fromtimestamp(epoch_s, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.")


def format_ms(epoch_ms: int) -> str:
    """`1696163696789` -> `2023-10-01T12:34:56.789Z`."""
    seconds, millis = divmod(epoch_ms, 1000)
    return f"{_second(seconds)}{millis:03d}Z"
