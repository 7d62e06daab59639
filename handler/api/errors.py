"""The API's error answers: `{"code", "message", "field"?}` with the WebSocket protocol's codes.

A request that breaks a rule raises the same `ProtocolError` a frame would; this module only
chooses its HTTP status and writes the body, so the two doors cannot drift apart.
"""

from __future__ import annotations

import math
from typing import Any, Final

import orjson
from quart import Response

from handler.errors import ErrorCode, ProtocolError

STATUS: Final[dict[ErrorCode, int]] = {
    ErrorCode.BAD_JSON: 400,
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.TOO_LARGE: 400,
    ErrorCode.UNKNOWN_TYPE: 400,  # never for a request (the API picks the frame type)
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.INTERNAL: 500,
}


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


def error_response(error: ProtocolError) -> Response:
    """The answer to a request that broke a rule."""
    body: dict[str, Any] = {"code": str(error.code), "message": error.message}
    if error.field is not None:
        body["field"] = error.field
    headers: dict[str, str] = {}
    if error.retry_after_ms is not None:
        body["retry_after_ms"] = error.retry_after_ms
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_ms / 1000)))
    if error.code is ErrorCode.UNAUTHORIZED:
        headers["WWW-Authenticate"] = "Bearer"
    return json_response(body, STATUS[error.code], headers)


def not_found(message: str = "no such endpoint; see GET /api/v1/openapi.json") -> ProtocolError:
    return ProtocolError(ErrorCode.NOT_FOUND, message)


def internal(correlation_id: str) -> ProtocolError:
    """The `internal` answer; the message quotes the id the log line carries."""
    return ProtocolError(
        ErrorCode.INTERNAL, f"internal server error (correlation id {correlation_id}); try again"
    )
