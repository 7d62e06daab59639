"""API keys: who may call the API, and how fast.

A key is compared in constant time against every configured key: the SHA-256 digests are
compared (equal lengths, so `hmac.compare_digest` leaks nothing about the length either), and
every key is compared whatever matched before, so the time taken tells neither whether nor
which key matched. Keys are never logged; a key is known by its position in the config.
Each key has its own token bucket (per node, like the WebSocket limits).
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Sequence

from handler.errors import ErrorCode, ProtocolError
from handler.ratelimit import TokenBucket

_SCHEME = "bearer"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class ApiKeys:
    """The configured keys and their rate limits."""

    def __init__(self, keys: Sequence[str], rate_per_s: float, rate_burst: float) -> None:
        self._digests = tuple(_digest(key) for key in keys)
        self._buckets = [TokenBucket(rate_per_s, rate_burst) for _ in keys]
        self._rate_per_s = rate_per_s

    @property
    def enabled(self) -> bool:
        """No key configured: the API does not exist."""
        return bool(self._digests)

    def identify(self, authorization: str | None) -> int | None:
        """The position of the key an `Authorization: Bearer <key>` header presents, or None."""
        if authorization is None:
            return None
        scheme, _, presented = authorization.strip().partition(" ")
        if scheme.lower() != _SCHEME or not presented.strip():
            return None
        digest = _digest(presented.strip())
        found = -1
        for index, known in enumerate(self._digests):
            # No early exit, no branch on the outcome: every key costs the same.
            match = hmac.compare_digest(digest, known)
            found = max(found, index * match - (not match))
        return None if found < 0 else found

    def admit(self, authorization: str | None, now: float) -> None:
        """Raise `ProtocolError`: `unauthorized` for a missing or wrong key, `rate_limited`
        when the key is over its rate."""
        index = self.identify(authorization)
        if index is None:
            raise ProtocolError(
                ErrorCode.UNAUTHORIZED,
                "a valid API key is required: Authorization: Bearer <key>",
            )
        wait_s = self._buckets[index].take(now)
        if wait_s > 0:
            raise ProtocolError(
                ErrorCode.RATE_LIMITED,
                f"too many requests; limit is {self._rate_per_s:g} per second per key",
                retry_after_ms=max(1, math.ceil(wait_s * 1000)),
            )
