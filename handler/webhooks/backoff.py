"""When a failed delivery is tried again, and when it is given up. Pure: times are given.

The schedule of PROTOCOL.md: the first retry 1 s after the first failure, doubling up to one
hour between attempts, and no attempt once the event is 24 hours old. The bounds are fields so
tests can run the same schedule in milliseconds.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Backoff:
    first_s: float = 1.0
    max_s: float = 3600.0
    give_up_s: float = 24 * 3600.0

    def delay_s(self, failures: int) -> float:
        """The wait after the `failures`-th failed attempt (1, 2, ...)."""
        return min(self.first_s * 2.0 ** max(failures - 1, 0), self.max_s)

    def next_at_ms(self, failures: int, created_at_ms: int, now_ms: int) -> int | None:
        """When to try again after a failure at `now_ms`; None: give up (too old by then)."""
        at = now_ms + round(self.delay_s(failures) * 1000)
        if at - created_at_ms > self.give_up_s * 1000:
            return None
        return at
