"""WebSocket framing for the common case, without wsproto's per-frame machinery (pure code).

When no extension is negotiated, almost every frame of a chat connection is a whole, masked
text frame from the client, or a whole, unmasked text frame from the server: a header and the
payload. wsproto parses and builds these through several layers of objects per frame, which
on this pure-Python stack is a large part of the cost of a message. This module does only that
common case and hands everything else to wsproto, so its limits and close handling stay the
ones that count:

- `frame_texts`: the server's text frames (RFC 6455 5.2: FIN, opcode 1, no mask).
- `LeanReader.feed`: splits received bytes into whole data messages (unmasked, UTF-8 checked,
  at most `max_message_bytes`) and `Handoff`s for wsproto: a whole control frame (ping, pong)
  to answer as usual, or, for anything else (a close, a fragment, reserved bits, an unmasked or
  oversized frame, invalid UTF-8), everything from that frame on, after which the reader stays
  out of the way (`active` false) and wsproto owns the stream.

The reader only hands over whole frames at frame boundaries, so wsproto's own buffer is empty
whenever the reader parses, and the two never split a frame between them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import attrs

_FIN_TEXT: Final = 0x81
_FIN_BINARY: Final = 0x82
_FIN_PING: Final = 0x89
_FIN_PONG: Final = 0x8A
_MASKED: Final = 0x80
_LENGTH: Final = 0x7F
_MAX_CONTROL_PAYLOAD: Final = 125
_HEADER_TEXT_16: Final = b"\x81\x7e"
_HEADER_TEXT_64: Final = b"\x81\x7f"


def frame_texts(texts: Sequence[str]) -> bytes:
    """The server's text frames for `texts`, in order, as one buffer for one socket write."""
    parts: list[bytes] = []
    append = parts.append
    for text in texts:
        payload = text.encode()
        size = len(payload)
        if size < 126:
            append(bytes((_FIN_TEXT, size)))
        elif size < 65536:
            append(_HEADER_TEXT_16 + size.to_bytes(2, "big"))
        else:
            append(_HEADER_TEXT_64 + size.to_bytes(8, "big"))
        append(payload)
    return b"".join(parts)


def unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR the payload with the repeated 4-byte masking key (RFC 6455 5.3)."""
    size = len(payload)
    if not size:
        return b""
    key = (mask * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
        size, "little"
    )


@attrs.frozen
class Handoff:
    """Bytes for wsproto: one whole control frame, or (`final`) the rest of the stream."""

    data: bytes
    final: bool


@attrs.define
class LeanReader:
    """Splits a client's byte stream into whole data messages and wsproto's share."""

    max_message_bytes: int
    active: bool = True
    # The start of a frame that has not fully arrived, and the size it must reach before
    # parsing is worth trying again (so a frame trickling in is not copied at every read).
    _pending: bytearray = attrs.field(factory=bytearray)
    _needed: int = 0

    def feed(self, data: bytes) -> list[str | bytes | Handoff]:
        """Messages (str for text, bytes for binary) and handoffs, in stream order."""
        if self._pending:
            self._pending += data
            if len(self._pending) < self._needed:
                return []
            data = bytes(self._pending)
            self._pending.clear()
            self._needed = 0
        out: list[str | bytes | Handoff] = []
        size = len(data)
        pos = 0
        while pos < size:
            if size - pos < 2:
                break
            first = data[pos]
            second = data[pos + 1]
            length = second & _LENGTH
            start = pos + 2
            if length == 126:
                start = pos + 4
                if size < start:
                    break
                length = int.from_bytes(data[pos + 2 : start], "big")
            elif length == 127:
                start = pos + 10
                if size < start:
                    break
                length = int.from_bytes(data[pos + 2 : start], "big")
            if not second & _MASKED:
                return self._give_up(out, data, pos)
            end = start + 4 + length
            if first in (_FIN_TEXT, _FIN_BINARY):
                if length > self.max_message_bytes:
                    return self._give_up(out, data, pos)
                if size < end:
                    self._needed = end - pos
                    break
                payload = unmask(data[start + 4 : end], data[start : start + 4])
                if first == _FIN_TEXT:
                    try:
                        out.append(payload.decode())
                    except UnicodeDecodeError:
                        return self._give_up(out, data, pos)
                else:
                    out.append(payload)
            elif first in (_FIN_PING, _FIN_PONG) and length <= _MAX_CONTROL_PAYLOAD:
                if size < end:
                    break
                out.append(Handoff(data[pos:end], final=False))
            else:  # a close, a fragment, reserved bits, an unknown opcode: wsproto's to judge
                return self._give_up(out, data, pos)
            pos = end
        if pos < size:
            self._pending += memoryview(data)[pos:]
        return out

    def _give_up(
        self, out: list[str | bytes | Handoff], data: bytes, pos: int
    ) -> list[str | bytes | Handoff]:
        self.active = False
        out.append(Handoff(data[pos:], final=True))
        return out
