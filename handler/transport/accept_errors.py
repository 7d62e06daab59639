"""Running out of file descriptors: logged at most once a second, one line, no traceback.

`trio.serve_listeners` (which Hypercorn's trio worker serves with) already survives `EMFILE`,
`ENFILE`, `ENOBUFS` and `ENOMEM` from `accept`: it sleeps 100 ms and retries, the pending
connection waiting in the listen backlog. But every retry logs an ERROR with a full traceback
to the `trio.serve_listeners` logger: ten tracebacks a second for as long as the process is
at its limit, which floods the log exactly when the operator needs it. A filter on that
logger (public logging API; trio is not patched) lets one line through per second and says
how many it held back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

ACCEPT_LOGGER: Final = "trio.serve_listeners"
INTERVAL_S: Final = 1.0


class OncePerInterval(logging.Filter):
    """Pass at most one record per `interval_s`, without its traceback; count the rest."""

    def __init__(
        self, interval_s: float = INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self._interval_s = interval_s
        self._clock = clock
        self._last: float | None = None
        self._held_back = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = self._clock()
        if self._last is not None and now - self._last < self._interval_s:
            self._held_back += 1
            return False
        message = record.getMessage()
        if self._held_back and self._last is not None:
            message += f" ({self._held_back} more like it in the last {now - self._last:.1f} s)"
        if record.exc_info and record.exc_info[1] is not None:
            message += f": {record.exc_info[1]!r}"
        record.msg, record.args = message, None
        record.exc_info = record.exc_text = None
        self._last, self._held_back = now, 0
        return True


def install() -> None:
    """Put the filter on trio's accept-loop logger (idempotent)."""
    logger = logging.getLogger(ACCEPT_LOGGER)
    if not any(isinstance(f, OncePerInterval) for f in logger.filters):
        logger.addFilter(OncePerInterval())
