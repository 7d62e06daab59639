"""HTTP/1.1 (and WebSocket over it) only: Hypercorn's cleartext HTTP/2 entries, closed.

The gateway's contract is HTTP/1.1 + WebSocket (RFC 6455). Hypercorn 0.18 also serves
HTTP/2 on a plain TCP port, through two doors in `H11Protocol._check_protocol`: an
`Upgrade: h2c` request is answered `101 Switching Protocols`, and a prior-knowledge client's
preface (`PRI * HTTP/2.0`) switches the connection to HTTP/2, where WebSocket over HTTP/2
(RFC 8441) is served too. Neither is documented, tested or limited like the rest, and
Hypercorn has no setting for them (`alpn_protocols` only covers TLS).

- `_check_protocol`: `Upgrade: h2c` is ignored, as RFC 9110 7.8 allows, so the request is
  answered in HTTP/1.1; the prior-knowledge preface still raises `H2ProtocolAssumedError`.
- `ProtocolWrapper.handle`: that error is answered the HTTP/2 way, so an h2 client gets a
  clean refusal instead of a parse error: an empty SETTINGS frame (the server preface) and
  GOAWAY with `HTTP_1_1_REQUIRED` (RFC 9113 7), then the connection is closed.

Upstream fix these stand in for: a `Config` switch for cleartext HTTP/2 (h2c and prior
knowledge), like `alpn_protocols` for TLS. With TLS, `alpn_protocols = ["http/1.1"]` in the
server's config does the same (see `handler.server`).
"""

from __future__ import annotations

import struct
from typing import Any, Final

from hypercorn.events import Closed, RawData
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.h11 import H2CProtocolRequiredError, H2ProtocolAssumedError, H11Protocol

from handler.transport.patching import Patch

_original_check_protocol = H11Protocol._check_protocol
_original_wrapper_handle = ProtocolWrapper.handle

_SETTINGS: Final = 0x4
_GOAWAY: Final = 0x7
HTTP_1_1_REQUIRED: Final = 0xD


def _h2_frame(frame_type: int, payload: bytes) -> bytes:
    """An HTTP/2 frame on stream 0 (RFC 9113 4.1): 24-bit length, type, flags, stream id."""
    return struct.pack(">I", len(payload))[1:] + bytes([frame_type, 0]) + b"\0\0\0\0" + payload


H2_REFUSAL: Final = _h2_frame(_SETTINGS, b"") + _h2_frame(
    _GOAWAY, struct.pack(">II", 0, HTTP_1_1_REQUIRED)
)


async def _http11_check_protocol(self: Any, event: Any) -> None:
    """Hypercorn's check, without the h2c upgrade (the request stays HTTP/1.1)."""
    if event.method == b"PRI" and event.target == b"*" and event.http_version == b"2.0":
        raise H2ProtocolAssumedError(b"")


async def _http11_wrapper_handle(self: Any, event: Any) -> None:
    """Hypercorn's `ProtocolWrapper.handle`, refusing HTTP/2 instead of switching to it."""
    try:
        await self.protocol.handle(event)
    except (H2ProtocolAssumedError, H2CProtocolRequiredError):
        await self.send(RawData(data=H2_REFUSAL))
        await self.send(Closed())


PATCHES: Final = (
    Patch(H11Protocol, "_check_protocol", _http11_check_protocol, _original_check_protocol),
    Patch(ProtocolWrapper, "handle", _http11_wrapper_handle, _original_wrapper_handle),
)
