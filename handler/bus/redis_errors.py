"""Which failures of a coredis call the Redis bus may handle, and which it must let through.

The bus never stops on a Redis error (it logs, reconnects, resyncs), but a cancellation or an
interrupt must still end it. coredis runs anyio task groups, so both can arrive grouped with
the errors they caused; this module is the one place that tells them apart.
"""

from __future__ import annotations


def reraise_cancellation(error: BaseException) -> None:
    """Re-raise a cancellation (or interrupt) alone; let the caller handle a Redis failure.

    coredis runs anyio task groups, so a cancellation can arrive grouped with the cleanup errors
    it caused (e.g. UNSUBSCRIBE on a connection being torn down); only the cancellation matters.
    """
    if isinstance(error, BaseExceptionGroup):
        # (The condition also sees the groups themselves: answer False so split recurses.)
        fatal, _ = error.split(lambda e: not isinstance(e, Exception | BaseExceptionGroup))
        if fatal is not None:
            raise fatal
    elif not isinstance(error, Exception):
        raise error
