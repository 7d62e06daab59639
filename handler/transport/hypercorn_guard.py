"""Make Hypercorn's trio server safe for a public chat gateway: the fence and its one switch.

Patching a third-party library is a last resort (STYLE #22); each fix here was the only way,
lives in one module with the upstream fix it stands in for, and replaces functions whose
source the tests fingerprint:

- `hypercorn_ws`: the WebSocket stream: no permessage-deflate unless asked, inflation capped,
  a byte limit, close frames for rejected input, a close handshake that completes after an
  oversized message, `ClientGone` for late frames, batched writes and pings, and lean
  framing with batched receives where no extension is negotiated.
- `hypercorn_tcp`: the TCP connection: cancellable, counted socket writes (`TcpProgress`,
  `current_progress()`), idle plain-HTTP connections that really close (Quart-Trio cancelled
  the close and the keep-alive timer), a socket closed as soon as its peer left, `send_eof`
  under the send lock, and one connection's fault never ending the server.
- `hypercorn_http1`: HTTP/1.1 only: no h2c upgrade, prior-knowledge HTTP/2 refused.
- `accept_errors`: running out of descriptors logged once a second, not ten tracebacks.

The upstream fix each one stands in for (the modules above tell the fault in full):
- `WSStream._accept`: let the application choose the extensions `Handshake.accept` offers.
- `WSStream.handle`: none (a speed-up, not a fix): whole data frames of a stream without
  extensions parsed directly, and handed to the application in one event per read.
- `WSStream._handle_events`: send the close frame of wsproto's `CloseConnection` for rejected
  input; after `FrameTooLargeError`, clear the buffer and read on to the peer's Close.
- `WSStream.app_send`: raise for a data frame sent after the close instead of dropping it
  (`SEND_MANY` and `SEND_PING` are ASGI extensions of ours, with no upstream counterpart).
- `TCPServer.run`: catch `Exception` per connection and log it, as the ASGI task wrapper does.
- `TCPServer.protocol_send`: do not shield socket writes; shield the connection's own close
  and keep-alive bookkeeping from the cancel scopes of the app's `send()`.
- `TCPServer._close`: take `send_lock` around `send_eof`.
- `TCPServer._read_data`: close the socket (and stop the idle timer) when `_read_data` ends.
- `TCPServer._initiate_server_close`: none; only our `TcpProgress` needs its final count.
- `H11Protocol._check_protocol`, `ProtocolWrapper.handle`: a `Config` switch for cleartext
  HTTP/2 (h2c and prior knowledge), like `alpn_protocols` for TLS.
- `accept_errors` (a log filter, no patch): trio's accept loop logging EMFILE once, not per
  retry.

`install()` is idempotent and called by `create_app()`, so both `python -m handler` and
`hypercorn -k trio "handler.app:create_app()"` get the same transport. It checks two version
ranges: Hypercorn's, whose functions the patches replace, and wsproto's, whose private state
and behaviour `hypercorn_ws` relies on (`PerMessageDeflate`'s inflate state, read by
`CappedPerMessageDeflate`; `Connection.events` reporting rejected input as a
`CloseConnection` while the state is still `OPEN`).
Outside either range it patches nothing and logs an error: the server then runs with
Hypercorn's public behaviour (no `TcpProgress`, so deliveries count once written; Hypercorn's
own limits and close handling).
"""

from __future__ import annotations

import importlib.metadata
import logging
from typing import Final

from handler.transport import accept_errors, hypercorn_http1, hypercorn_tcp, hypercorn_ws
from handler.transport.hypercorn_ws import (
    ACCEPT_OPTIONS_KEY,
    RECEIVE_MANY,
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
    "RECEIVE_MANY",
    "SEND_MANY",
    "SEND_PING",
    "SUPPORTED_HYPERCORN",
    "SUPPORTED_WSPROTO",
    "CappedPerMessageDeflate",
    "ClientGone",
    "TcpProgress",
    "TransportOptions",
    "current_progress",
    "hypercorn_supported",
    "install",
    "installed",
    "wsproto_supported",
]

log = logging.getLogger("handler.transport")

_Range = tuple[tuple[int, int], tuple[int, int]]

# The Hypercorn releases whose source the patches were checked against: [low, high).
SUPPORTED_HYPERCORN: Final[_Range] = ((0, 18), (0, 19))
# The wsproto releases whose private state `hypercorn_ws` was checked against: [low, high).
SUPPORTED_WSPROTO: Final[_Range] = ((1, 3), (1, 4))

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


def _in_range(version: str, supported: _Range) -> bool:
    low, high = supported
    return low <= _version_tuple(version) < high


def _range_text(supported: _Range) -> str:
    low, high = supported
    return f"{'.'.join(map(str, low))}..{'.'.join(map(str, high))}"


def hypercorn_supported(version: str | None = None) -> bool:
    """Whether this Hypercorn (default: the installed one) is one the patches fit."""
    if version is None:
        version = importlib.metadata.version("hypercorn")
    return _in_range(version, SUPPORTED_HYPERCORN)


def wsproto_supported(version: str | None = None) -> bool:
    """Whether this wsproto (default: the installed one) is one whose private state
    `hypercorn_ws` reads as it was checked."""
    if version is None:
        version = importlib.metadata.version("wsproto")
    return _in_range(version, SUPPORTED_WSPROTO)


def installed() -> bool:
    return _installed


def install() -> bool:
    """Apply the fixes (idempotent); False when this Hypercorn or wsproto is not one they fit."""
    global _installed
    if _installed:
        return True
    hypercorn = importlib.metadata.version("hypercorn")
    wsproto = importlib.metadata.version("wsproto")
    if not (hypercorn_supported(hypercorn) and wsproto_supported(wsproto)):
        log.error(
            "hypercorn %s, wsproto %s: outside the checked ranges (hypercorn %s, wsproto %s):"
            " transport guard NOT installed",
            hypercorn,
            wsproto,
            _range_text(SUPPORTED_HYPERCORN),
            _range_text(SUPPORTED_WSPROTO),
        )
        return False
    for patch in PATCHES:
        patch.apply()
    accept_errors.install()
    _installed = True
    return True
