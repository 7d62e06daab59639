"""Make Hypercorn's trio server safe for a public chat gateway: the fence and its one switch.

Patching a third-party library is a last resort (STYLE #22); each fix here was the only way,
lives in one module with the upstream fix it stands in for, and replaces functions whose
source the tests fingerprint:

- `hypercorn_ws`: the WebSocket stream: no permessage-deflate unless asked, inflation capped,
  a byte limit, close frames for rejected input, a close handshake that completes after an
  oversized message, `ClientGone` for late frames, batched writes and pings.
- `hypercorn_tcp`: the TCP connection: cancellable, counted socket writes (`TcpProgress`,
  `current_progress()`), idle plain-HTTP connections that really close (Quart-Trio cancelled
  the close and the keep-alive timer), a socket closed as soon as its peer left, `send_eof`
  under the send lock, and one connection's fault never ending the server.
- `hypercorn_http1`: HTTP/1.1 only: no h2c upgrade, prior-knowledge HTTP/2 refused.
- `accept_errors`: running out of descriptors logged once a second, not ten tracebacks.

`install()` is idempotent and called by `create_app()`, so both `python -m handler` and
`hypercorn -k trio "handler.app:create_app()"` get the same transport. Outside the Hypercorn
versions the patches were checked against it patches nothing and logs an error: the server
then runs with Hypercorn's public behaviour (no `TcpProgress`, so deliveries count once
written; Hypercorn's own limits and close handling).
"""

from __future__ import annotations

import importlib.metadata
import logging
from typing import Final

from handler.transport import accept_errors, hypercorn_http1, hypercorn_tcp, hypercorn_ws
from handler.transport.hypercorn_ws import (
    ACCEPT_OPTIONS_KEY,
    SEND_MANY,
    SEND_PING,
    CappedPerMessageDeflate,
    ClientGone,
    TransportOptions,
)
from handler.transport.patching import Patch
from handler.transport.tcp_progress import TcpProgress, current_progress

__all__ = [
    "ACCEPT_OPTIONS_KEY",
    "PATCHES",
    "SEND_MANY",
    "SEND_PING",
    "SUPPORTED_HYPERCORN",
    "CappedPerMessageDeflate",
    "ClientGone",
    "TcpProgress",
    "TransportOptions",
    "current_progress",
    "install",
    "installed",
]

log = logging.getLogger("handler.transport")

# The Hypercorn releases whose source the patches were checked against: [low, high).
SUPPORTED_HYPERCORN: Final = ((0, 18), (0, 19))

PATCHES: Final[tuple[Patch, ...]] = (
    *hypercorn_ws.PATCHES,
    *hypercorn_tcp.PATCHES,
    *hypercorn_http1.PATCHES,
)

_installed = False


def _version_tuple(version: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in version.split("."):
        digits = "".join(c for c in piece if c.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def hypercorn_supported(version: str | None = None) -> bool:
    """Whether this Hypercorn (default: the installed one) is one the patches fit."""
    if version is None:
        version = importlib.metadata.version("hypercorn")
    low, high = SUPPORTED_HYPERCORN
    return low <= _version_tuple(version) < high


def installed() -> bool:
    return _installed


def install() -> bool:
    """Apply the fixes (idempotent); False when this Hypercorn is not one they fit."""
    global _installed
    if _installed:
        return True
    version = importlib.metadata.version("hypercorn")
    if not hypercorn_supported(version):
        log.error(
            "hypercorn %s is outside the checked range %s..%s: transport guard NOT installed",
            version,
            ".".join(map(str, SUPPORTED_HYPERCORN[0])),
            ".".join(map(str, SUPPORTED_HYPERCORN[1])),
        )
        return False
    for patch in PATCHES:
        patch.apply()
    accept_errors.install()
    _installed = True
    return True
