"""Hypercorn's `WSStream`, made safe for a public chat gateway.

Hypercorn 0.18 (checked against its source; every replaced function is fingerprinted in the
tests) has these WebSocket faults:

1. It always negotiates permessage-deflate, and wsproto inflates with no cap: a small
   compressed frame can grow the process by hundreds of megabytes before any size check.
2. Its message-size limit defaults to 16 MiB and counts characters, not bytes.
3. When wsproto rejects a frame (bad UTF-8, an extension error) it drops the TCP connection
   without the close frame that tells the client why (1007, 1009).
4. After a message passed the size limit it sends 1009 but leaves its event loop with the
   oversized message still buffered: every later read fails on it again, so the client's
   Close (behind a pipelined frame) is never read and the socket stays open until some
   timeout (59.7 s measured).
5. A data frame sent after the close is dropped silently.

And it is slow where a chat gateway spends most of its time: every received message costs a
pass through wsproto's frame objects and a wake-up of the application (one ASGI receive
queue hand-off per message), and every sent frame a pass through wsproto's serializer. When
no extension is negotiated, `lean_frames` parses whole data frames and builds the server's
text frames directly, and every message parsed from one socket read reaches the application
in one `RECEIVE_MANY` event; anything unusual (control frames, fragments, bad input) still
goes through wsproto and the fixes above.

The application drives the fixes per connection through private keys of the ASGI
`websocket.accept` message (servers ignore unknown keys, so the app stays a plain ASGI app):
no compression unless asked for, and then inflation capped at the message limit; the byte
limit of our config; pings and batched writes from the application's single writer task
(Hypercorn's own pinger is a task per connection that also outlives its connection).

Upstream fixes these stand in for: make the extensions of `Handshake.accept` configurable
(`_accept`); in `_handle_events`, send the close frame wsproto's `CloseConnection` carries for
rejected input, and on `FrameTooLargeError` clear the buffer and keep reading (discarding data
frames) until the peer's Close; raise instead of dropping late frames in `app_send`.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterable
from typing import Any, Final, NotRequired, TypedDict

import trio
from hypercorn.protocol.events import Data, Response, StreamClosed
from hypercorn.protocol.ws_stream import (
    ASGIWebsocketState,
    FrameTooLargeError,
    Handshake,
    WSStream,
)
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import CloseConnection, Message, Ping, TextMessage
from wsproto.extensions import Extension, PerMessageDeflate
from wsproto.frame_protocol import CloseReason
from wsproto.handshake import server_extensions_handshake
from wsproto.utilities import LocalProtocolError, generate_accept_token

from handler.transport.lean_frames import Handoff, LeanReader, frame_texts
from handler.transport.patching import Patch

ACCEPT_OPTIONS_KEY: Final = "handler.transport"
# ASGI send events of our own: several text frames written with one socket write, and a
# WebSocket ping. A server without this guard rejects unknown types loudly instead of silently
# dropping frames.
SEND_MANY: Final = "handler.websocket.send_many"
SEND_PING: Final = "handler.websocket.ping"
# The ASGI receive event of our own, only for an application that passed `ACCEPT_OPTIONS_KEY`:
# every message of one socket read, in order ("messages": str for text, bytes for binary),
# each whole and within `max_message_bytes` (counted in bytes).
RECEIVE_MANY: Final = "handler.websocket.receive_many"
# Where a stream without extensions keeps its `LeanReader` (None: wsproto does all framing),
# and whether its application takes `RECEIVE_MANY`.
_LEAN_ATTR: Final = "_handler_lean"
_MANY_ATTR: Final = "_handler_receive_many"


class TransportOptions(TypedDict):
    """Per-connection transport settings, carried in the ASGI accept message."""

    max_message_bytes: int
    compression: bool
    # The application takes `RECEIVE_MANY` events (else one `websocket.receive` per message).
    receive_many: NotRequired[bool]


class CappedPerMessageDeflate(PerMessageDeflate):
    """permessage-deflate that refuses to inflate a message past `max_message_bytes`."""

    def __init__(self, max_message_bytes: int) -> None:
        super().__init__()
        self._max_message_bytes = max_message_bytes
        self._inflated = 0

    def frame_inbound_payload_data(self, proto: Any, data: bytes) -> bytes | CloseReason:
        if not self._inbound_compressed or not self._inbound_is_compressible:
            return data
        assert self._decompressor is not None
        room = self._max_message_bytes - self._inflated
        try:
            # Inflate at most one byte past the limit: enough to know it was passed.
            inflated = self._decompressor.decompress(bytes(data), room + 1)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        self._inflated += len(inflated)
        if self._inflated > self._max_message_bytes:
            return CloseReason.MESSAGE_TOO_BIG
        return inflated

    def frame_inbound_complete(self, proto: Any, fin: bool) -> bytes | CloseReason | None:
        result = super().frame_inbound_complete(proto, fin)
        if isinstance(result, bytes):
            self._inflated += len(result)
            if self._inflated > self._max_message_bytes:
                result = CloseReason.MESSAGE_TOO_BIG
        if fin:
            self._inflated = 0
        return result


def _accept_handshake(
    handshake: Handshake,
    subprotocol: str | None,
    additional_headers: Iterable[tuple[bytes, bytes]],
    extensions: list[Extension],
) -> tuple[int, list[tuple[bytes, bytes]], Connection]:
    """`Handshake.accept` with the extension list chosen by the application."""
    headers: list[tuple[bytes, bytes]] = []
    if subprotocol is not None:
        if handshake.subprotocols is None or subprotocol not in handshake.subprotocols:
            raise ValueError("Invalid Subprotocol")
        headers.append((b"sec-websocket-protocol", subprotocol.encode()))
    if extensions and handshake.extensions is not None:
        accepts = server_extensions_handshake(handshake.extensions, extensions)
        if accepts:
            headers.append((b"sec-websocket-extensions", accepts))
    else:
        extensions = []
    if handshake.key is not None:
        headers.append((b"sec-websocket-accept", generate_accept_token(handshake.key)))
    status_code = 200
    if handshake.http_version == "1.1":
        headers.extend([(b"upgrade", b"WebSocket"), (b"connection", b"Upgrade")])
        status_code = 101
    for name, value in additional_headers:
        if name == b"sec-websocket-protocol" or name.startswith(b":"):
            raise ValueError(f"Invalid additional header, {name.decode()}")
        headers.append((name, value))
    handshake.accepted = True
    return status_code, headers, Connection(ConnectionType.SERVER, extensions)


_original_accept = WSStream._accept
_original_handle = WSStream.handle
_original_app_send = WSStream.app_send
_original_handle_events = WSStream._handle_events


async def _guarded_accept(self: Any, message: dict[str, Any]) -> None:
    """Hypercorn's `_accept` with our extensions and byte limit (when the app asks)."""
    options: TransportOptions | None = message.get(ACCEPT_OPTIONS_KEY)
    if options is None:
        await _original_accept(self, message)  # type: ignore[arg-type]
        return
    self.state = ASGIWebsocketState.CONNECTED
    max_bytes = options["max_message_bytes"]
    extensions: list[Extension] = (
        [CappedPerMessageDeflate(max_bytes)] if options["compression"] else []
    )
    status_code, headers, self.connection = _accept_handshake(
        self.handshake, message.get("subprotocol"), message.get("headers", []), extensions
    )
    # Hypercorn's buffer counts characters for text; characters <= bytes, so this is a first
    # cut and the application checks the exact UTF-8 size.
    self.buffer.max_length = max_bytes
    negotiated = any(extension.enabled() for extension in extensions)
    setattr(self, _LEAN_ATTR, None if negotiated else LeanReader(max_bytes))
    setattr(self, _MANY_ATTR, options.get("receive_many", False))
    await self.send(Response(stream_id=self.stream_id, status_code=status_code, headers=headers))
    await self.config.log.access(
        self.scope, {"status": status_code, "headers": []}, time.time() - self.start_time
    )


class ClientGone(OSError):
    """A frame was sent after the WebSocket closed (ASGI: an OSError subclass).

    Hypercorn drops such frames silently; the application must know, or it would count a
    frame that never left as delivered.
    """


async def _guarded_app_send(self: Any, message: Any) -> None:
    """Hypercorn's `app_send`, plus `SEND_MANY` (one syscall for a burst of frames),
    `SEND_PING` (sent by the connection's writer, so pings cost no task of their own), and
    `ClientGone` instead of silence for data frames sent after the close."""
    kind = None if message is None else message.get("type")
    if kind != SEND_MANY and kind != SEND_PING and kind != "websocket.send":
        await _original_app_send(self, message)
        return
    if (
        self.closed
        or self.state != ASGIWebsocketState.CONNECTED
        or self.connection.state is not ConnectionState.OPEN
    ):
        if kind == SEND_PING:
            return
        raise ClientGone("the WebSocket is closed")
    if kind == "websocket.send":
        await _original_app_send(self, message)
        return
    if kind == SEND_MANY and self.__dict__.get(_LEAN_ATTR) is not None:
        # OPEN and no extension (checked above): wsproto would emit exactly these bytes.
        data = frame_texts(message["texts"])
    else:
        events = [Ping()] if kind == SEND_PING else [TextMessage(data=t) for t in message["texts"]]
        try:
            data = b"".join(self.connection.send(event) for event in events)
        except LocalProtocolError:
            return  # the WebSocket is closing; like Hypercorn, drop late frames
    await self.send(Data(stream_id=self.stream_id, data=data))


async def _guarded_handle(self: Any, event: Any) -> None:
    """Hypercorn's `handle`; received data of a stream without extensions goes through the
    `LeanReader`, its messages to the application in one `RECEIVE_MANY` event per read."""
    lean: LeanReader | None = self.__dict__.get(_LEAN_ATTR)
    if (
        lean is None
        or not lean.active
        or self.closed
        or not isinstance(event, Data)
        or self.connection.state is not ConnectionState.OPEN
    ):
        await _original_handle(self, event)
        return
    messages: list[str | bytes] = []
    for item in lean.feed(event.data):
        if isinstance(item, Handoff):
            await _put_messages(self, messages)
            messages = []
            self.connection.receive_data(item.data)
            await self._handle_events()
            if self.closed:
                return
        else:
            messages.append(item)
    await _put_messages(self, messages)


async def _put_messages(self: Any, messages: list[str | bytes]) -> None:
    if not messages:
        return
    if self.__dict__[_MANY_ATTR]:
        event = {"type": RECEIVE_MANY, "messages": messages}
        # `app_put` is the bound `send` of the app's queue: with room in it, hand the event
        # over without a pass of the run loop (the read loop yields while it waits for data).
        queue = getattr(self.app_put, "__self__", None)
        if isinstance(queue, trio.MemorySendChannel):
            try:
                queue.send_nowait(event)
                return
            except trio.WouldBlock:
                pass
        await self.app_put(event)
        return
    for message in messages:
        if isinstance(message, str):
            await self.app_put({"type": "websocket.receive", "bytes": None, "text": message})
        else:
            await self.app_put({"type": "websocket.receive", "bytes": message, "text": None})


async def _guarded_handle_events(self: Any) -> None:
    """Hypercorn's event loop, plus a close frame when wsproto rejects the input, and a
    close handshake that completes after an oversized message.

    Once our Close is out (state `LOCAL_CLOSING`), data frames are discarded (RFC 6455 5.5.1
    and 7.1.1: we only wait for the peer's Close), so the rest of an oversized message, or a
    frame pipelined behind it, can no longer stand between us and the client's Close.
    """
    for event in self.connection.events():
        if isinstance(event, Message):
            if self.connection.state is not ConnectionState.OPEN:
                self.buffer.clear()
                continue
            try:
                self.buffer.extend(event)
            except FrameTooLargeError:
                self.buffer.clear()
                await self._send_wsproto_event(CloseConnection(code=CloseReason.MESSAGE_TOO_BIG))
                continue
            if event.message_finished:
                await self.app_put(self.buffer.to_message())
                self.buffer.clear()
        elif isinstance(event, Ping):
            await self._send_wsproto_event(event.response())
        elif isinstance(event, CloseConnection):
            if self.connection.state == ConnectionState.REMOTE_CLOSING:
                await self._send_wsproto_event(event.response())
            elif self.connection.state is ConnectionState.OPEN:
                # wsproto yields this for input it rejects: unparsable frames (1002), invalid
                # UTF-8 (1007), our inflate cap (1009). Hypercorn would just drop the TCP
                # connection; tell the client why first.
                await self._send_wsproto_event(
                    CloseConnection(code=event.code, reason=event.reason)
                )
            # else: the peer's answer to our Close (or the TCP connection was lost).
            await self.send(StreamClosed(stream_id=self.stream_id))
            return


PATCHES: Final = (
    Patch(WSStream, "_accept", _guarded_accept, _original_accept),
    Patch(WSStream, "handle", _guarded_handle, _original_handle),
    Patch(WSStream, "_handle_events", _guarded_handle_events, _original_handle_events),
    Patch(WSStream, "app_send", _guarded_app_send, _original_app_send),
)
