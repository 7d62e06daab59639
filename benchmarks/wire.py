"""WebSocket client side of the load generator: framing, handshake, tokens.

Two interchangeable connection kinds speak PROTOCOL.md to the server:

- `RawConnection`: RFC 6455 framing written here over a trio `SocketStream`. It hands back
  every complete text message of one `receive_some` at once and sends several frames in one
  write, so the generator spends its core on the workload rather than on per-frame tasks and
  channels. It is the default because it is measurably cheaper (see the `ceiling` scenario).
- `TrioWebsocketConnection`: the same interface over trio-websocket, kept to compare against.

The framing functions are also used by the raw echo server (server side: unmasked frames out,
masked frames in), so they take `mask` as a parameter instead of assuming a role.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import random
import socket
import struct
import time
from collections.abc import Sequence
from typing import Any, Final, Protocol

import jwt
import trio

OP_CONT: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_RECEIVE_SIZE: Final = 256 * 1024


class ConnectionClosed(Exception):
    """The peer closed the connection (close frame or EOF); `code` is None for a bare EOF."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"connection closed ({code}) {reason}".strip())
        self.code = code
        self.reason = reason


class HandshakeError(Exception):
    """The upgrade was refused or answered with something that is not a WebSocket."""


def mint_token(user_id: str, secret: str, ttl_s: float = 7200.0) -> str:
    """An HS256 JWT with `sub` = user id, as `python -m handler token` prints."""
    now = int(time.time())
    return jwt.encode({"sub": user_id, "iat": now, "exp": now + int(ttl_s)}, secret, "HS256")


def accept_key(key: bytes) -> bytes:
    """The `Sec-WebSocket-Accept` value answering `Sec-WebSocket-Key` `key`."""
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


def xor_mask(payload: bytes, mask: bytes) -> bytes:
    """Apply a 4-byte WebSocket mask; one big-integer XOR is far cheaper than a byte loop."""
    size = len(payload)
    if not size:
        return payload
    key = (mask * ((size + 3) // 4))[:size]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(size, "big")


def encode_frame(opcode: int, payload: bytes, *, mask: bool) -> bytes:
    """One final frame; clients must mask (RFC 6455 5.3), servers must not."""
    size = len(payload)
    first = 0x80 | opcode
    mask_bit = 0x80 if mask else 0
    if size < 126:
        header = bytes((first, mask_bit | size))
    elif size < 65536:
        header = bytes((first, mask_bit | 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((first, mask_bit | 127)) + size.to_bytes(8, "big")
    if not mask:
        return header + payload
    key = random.randbytes(4)
    return header + key + xor_mask(payload, key)


class FrameParser:
    """Incremental frame decoder: bytes in, complete messages and control frames out.

    Fragmented messages are reassembled; control frames may arrive between fragments. Masked
    frames (client to server) are unmasked, so one parser serves both roles. No size limit:
    the generator must accept whatever the server sends (`fetch_chats` replies are large).
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._fragments: list[bytes] | None = None

    def feed(self, data: bytes) -> tuple[list[bytes], list[tuple[int, bytes]]]:
        """Add received bytes; return (complete data messages, control frames) in order."""
        buf = self._buffer
        buf += data
        messages: list[bytes] = []
        controls: list[tuple[int, bytes]] = []
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            first = buf[pos]
            second = buf[pos + 1]
            size = second & 0x7F
            header = 2
            if size == 126:
                if end - pos < 4:
                    break
                size = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                header = 4
            elif size == 127:
                if end - pos < 10:
                    break
                size = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                header = 10
            key = b""
            if second & 0x80:
                key = bytes(buf[pos + header : pos + header + 4])
                header += 4
            if end - pos < header + size:
                break
            payload = bytes(buf[pos + header : pos + header + size])
            pos += header + size
            if key:
                payload = xor_mask(payload, key)
            opcode = first & 0x0F
            if opcode >= OP_CLOSE:
                controls.append((opcode, payload))
            elif opcode == OP_CONT:
                if self._fragments is not None:
                    self._fragments.append(payload)
                    if first & 0x80:
                        messages.append(b"".join(self._fragments))
                        self._fragments = None
            elif first & 0x80:
                messages.append(payload)
            else:
                self._fragments = [payload]
        if pos:
            del buf[:pos]
        return messages, controls


def close_payload(payload: bytes) -> tuple[int | None, str]:
    """Decode a close frame's (code, reason)."""
    if len(payload) < 2:
        return None, ""
    return int.from_bytes(payload[:2], "big"), payload[2:].decode("utf-8", "replace")


class Connection(Protocol):
    """What a scenario needs from a WebSocket: batched text in and out, and a close."""

    bytes_received: int

    async def send_texts(self, texts: Sequence[bytes]) -> None:
        """Send each item (UTF-8 JSON) as one text message."""

    async def receive_batch(self) -> list[bytes]:
        """Wait for at least one text message; return every one already received.

        Raises `ConnectionClosed` when the server closes.
        """

    async def aclose(self) -> None:
        """Close politely if possible, never raising."""


class RawConnection:
    """A client WebSocket over a trio stream with hand-written framing (see module doc)."""

    def __init__(self, stream: trio.SocketStream, leftover: bytes) -> None:
        self._stream = stream
        self._parser = FrameParser()
        self._send_lock = trio.Lock()
        self._leftover = leftover
        self.bytes_received = len(leftover)
        self.close_code: int | None = None

    async def send_texts(self, texts: Sequence[bytes]) -> None:
        await self._send_raw(b"".join([encode_frame(OP_TEXT, text, mask=True) for text in texts]))

    async def _send_raw(self, data: bytes) -> None:
        try:
            async with self._send_lock:
                await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
            raise ConnectionClosed(self.close_code, f"send failed: {error}") from None

    async def receive_batch(self) -> list[bytes]:
        while True:
            if self._leftover:
                data, self._leftover = self._leftover, b""
            else:
                try:
                    data = await self._stream.receive_some(_RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
                    raise ConnectionClosed(self.close_code, f"reset: {error}") from None
                if not data:
                    raise ConnectionClosed(self.close_code, "EOF")
                self.bytes_received += len(data)
            messages, controls = self._parser.feed(data)
            for opcode, payload in controls:
                if opcode == OP_PING:
                    await self._send_raw(encode_frame(OP_PONG, payload, mask=True))
                elif opcode == OP_CLOSE:
                    code, reason = close_payload(payload)
                    self.close_code = code
                    with trio.move_on_after(1), contextlib.suppress(ConnectionClosed):
                        await self._send_raw(encode_frame(OP_CLOSE, payload[:2], mask=True))
                    await self._stream.aclose()
                    raise ConnectionClosed(code, reason)
            if messages:
                return messages

    async def aclose(self) -> None:
        with trio.move_on_after(2):
            try:
                await self._send_raw(encode_frame(OP_CLOSE, (1000).to_bytes(2, "big"), mask=True))
                # Wait for the server's close (or EOF) so the server, not us, ends TCP first.
                while await self._stream.receive_some(_RECEIVE_SIZE):
                    pass
            except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        await self._stream.aclose()

    async def abort(self) -> None:
        """Reset the TCP connection: no close handshake and no TIME_WAIT left behind, so that
        thousands of connections per run do not exhaust the ephemeral ports."""
        with contextlib.suppress(OSError):
            self._stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await self._stream.aclose()


async def open_tcp(host: str, port: int, local_address: str | None) -> trio.SocketStream:
    """A TCP connection to a numeric IPv4 address, without `open_tcp_stream`'s resolver and
    happy-eyeballs tasks: in a connect storm those cost the generator more than the rest."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if local_address is not None:
            with contextlib.suppress(AttributeError, OSError):
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_BIND_ADDRESS_NO_PORT, 1)
            await sock.bind((local_address, 0))
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def connect_raw(
    host: str, port: int, path: str, *, local_address: str | None = None
) -> RawConnection:
    """Open TCP, send the upgrade request, check the 101 answer."""
    stream = await open_tcp(host, port, local_address)
    try:
        key = base64.b64encode(os.urandom(16))
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        await stream.send_all(request)
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            chunk = await stream.receive_some(_RECEIVE_SIZE)
            if not chunk:
                raise HandshakeError("connection closed during the handshake")
            buffer += chunk
            if len(buffer) > 65536:
                raise HandshakeError("response head too large")
        head, _, rest = buffer.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status + b" ":
            raise HandshakeError(status.decode("latin-1"))
        if accept_key(key) not in head:
            raise HandshakeError("bad Sec-WebSocket-Accept")
    except BaseException:
        await stream.aclose()
        raise
    return RawConnection(stream, rest)


class TrioWebsocketConnection:
    """The `Connection` interface over trio-websocket, to compare generator costs."""

    def __init__(self, ws: Any) -> None:
        self._ws = ws
        self.bytes_received = 0

    async def send_texts(self, texts: Sequence[bytes]) -> None:
        import trio_websocket

        try:
            for text in texts:
                await self._ws.send_message(text.decode())
        except trio_websocket.ConnectionClosed as error:
            raise ConnectionClosed(getattr(error.reason, "code", None), "closed") from None

    async def receive_batch(self) -> list[bytes]:
        import trio_websocket

        try:
            message = await self._ws.get_message()
        except trio_websocket.ConnectionClosed as error:
            reason = error.reason
            raise ConnectionClosed(getattr(reason, "code", None), "closed") from None
        data = message.encode() if isinstance(message, str) else message
        self.bytes_received += len(data)
        return [data]

    async def aclose(self) -> None:
        with trio.move_on_after(2):
            await self._ws.aclose()

    async def abort(self) -> None:
        await self.aclose()


async def connect(
    kind: str,
    nursery: trio.Nursery,
    host: str,
    port: int,
    path: str,
    *,
    local_address: str | None = None,
) -> RawConnection | TrioWebsocketConnection:
    """Open a connection of `kind` ("raw" or "trio-websocket")."""
    if kind == "raw":
        return await connect_raw(host, port, path, local_address=local_address)
    import trio_websocket

    try:
        ws = await trio_websocket.connect_websocket(
            nursery, host, port, path, use_ssl=False, max_message_size=2**30
        )
    except trio_websocket.HandshakeError as error:
        raise HandshakeError(str(error)) from None
    return TrioWebsocketConnection(ws)
