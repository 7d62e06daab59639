"""The handler's one error tree.

Pure module (no I/O, no trio): the protocol core raises these, the connection layer turns them
into `error` frames or close codes. Transport and storage faults are translated into these types
at the adapter that sees them, so upper layers never catch a driver's or trio's exceptions.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """Every `error.code` value of the wire protocol."""

    BAD_JSON = "bad_json"
    BAD_REQUEST = "bad_request"
    UNKNOWN_TYPE = "unknown_type"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    INTERNAL = "internal"


class CloseCode(enum.IntEnum):
    """WebSocket close codes the server uses, and why."""

    NORMAL = 1000
    GOING_AWAY = 1001  # server shutdown
    INVALID_PAYLOAD = 1007  # invalid UTF-8 in a text frame
    POLICY_VIOLATION = 1008  # auth timeout, token expiry, idle timeout
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013  # slow consumer dropped


class HandlerError(Exception):
    """Base of every error the handler raises on purpose."""


class ProtocolError(HandlerError):
    """A client frame broke a rule; carries everything the `error` frame needs.

    Like wsproto's `ParseFailed.code`, the exception carries the reply to send, so the layer
    that catches it needs no knowledge of which rule failed.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        field: str | None = None,
        request_id: str | int | None = None,
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.request_id = request_id
        self.retry_after_ms = retry_after_ms

    def with_request_id(self, request_id: str | int | None) -> ProtocolError:
        """Return the same error tagged with the frame's `request_id`."""
        self.request_id = request_id
        return self


class ConnectionLimitReached(ProtocolError):
    """The user has as many bound connections on this node as allowed: answered, then 1008."""

    close_reason = "too many connections"

    def __init__(self, limit: int) -> None:
        super().__init__(
            ErrorCode.RATE_LIMITED,
            f"too many connections: at most {limit} per user; close one first",
            field="token",
        )


class StoreUnavailable(HandlerError):
    """The storage backend cannot be reached right now; the client gets `internal`."""


class BusUnavailable(HandlerError):
    """The pub/sub backend cannot be reached right now."""


class StartupError(HandlerError):
    """The server cannot start; the message is one line naming the cause and the fix.

    Raised before the server listens, so a failed start never looks like a running one: the
    command line prints the message and exits non-zero, Hypercorn's lifespan refuses to run.
    """


class ConfigError(HandlerError):
    """The configuration is invalid; `key` names the offending setting."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config: {key}: {message}")
        self.key = key
