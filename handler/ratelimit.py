"""Token-bucket rate limiting: pure arithmetic over a caller-supplied clock."""

from __future__ import annotations

import math

import attrs


@attrs.define
class TokenBucket:
    """`rate` tokens per second, at most `burst` banked; one token per frame."""

    rate: float
    burst: float
    tokens: float = attrs.field(default=math.nan)
    updated: float = 0.0

    def __attrs_post_init__(self) -> None:
        if math.isnan(self.tokens):
            self.tokens = self.burst

    def take(self, now: float) -> float:
        """Spend one token; return 0.0 if allowed, else seconds until one is available."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate
