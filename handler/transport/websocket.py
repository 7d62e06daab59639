"""The `/ws` endpoint at the ASGI layer: one reader and one writer per connection.

It bypasses Quart's per-frame websocket machinery (queues and tasks per message) and speaks
ASGI directly, which is all a JSON-over-WebSocket protocol needs. Per connection:

- the reader (the ASGI task itself) receives messages, enforces the byte limit, and feeds
  them to the session's driver (`transport.driver`); its receive waits under the session's
  next deadline (idle, auth, token expiry), so timers cost no extra task;
- the writer drains the connection's outbox to the socket; it starts when there is something
  to send, in the connection's nursery before binding, in its user's nursery once bound
  (`WriterHome`);
- the reader runs under `Connection.cancel_scope`: closing a connection (slow consumer,
  timeout, shutdown, its user closed) cancels it; it stops the writer, then a close frame is
  attempted within `CLOSE_TIMEOUT_S`. Thanks to `hypercorn_guard`, cancelling a write that a
  client does not read aborts the TCP connection. Without the guard (an untested Hypercorn)
  the writer speaks standard ASGI only.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Awaitable, Callable, MutableMapping
from functools import partial
from typing import Any, Final

import trio

from handler.config import LimitsConfig
from handler.connection import (
    CLOSE_AFTER,
    MARK_ONLY,
    PING,
    RETIRE,
    Connection,
    Outgoing,
    utf8_length,
)
from handler.errors import CloseCode
from handler.services import Services
from handler.transport import hypercorn_guard
from handler.transport.acks import SentFrames
from handler.transport.driver import SessionDriver
from handler.transport.hypercorn_guard import (
    ACCEPT_OPTIONS_KEY,
    RECEIVE_MANY,
    SEND_MANY,
    SEND_PING,
    ClientGone,
    TransportOptions,
    current_progress,
)

log = logging.getLogger("handler.ws")

CLOSE_TIMEOUT_S: Final = 2.0
CLOSE_ACK_WAIT_S: Final = 1.0
WRITE_BATCH: Final = 64
# Writes in a row without waiting for the outbox, after which the writer yields anyway.
WRITE_STREAK: Final = 8

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def origin_allowed(scope: Scope, allowed_origins: tuple[str, ...]) -> bool:
    """Browsers must come from an allowed origin; non-browser clients send no Origin."""
    headers = dict(scope.get("headers") or ())
    origin_raw = headers.get(b"origin")
    if origin_raw is None:
        return True
    origin = origin_raw.decode("latin-1").rstrip("/")
    if allowed_origins:
        return origin in allowed_origins or "*" in allowed_origins
    host = headers.get(b"host", b"").decode("latin-1")
    parsed = urllib.parse.urlsplit(origin)
    return bool(host) and parsed.netloc == host


def _query_token(scope: Scope) -> str | None:
    query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
    values = query.get("token")
    return values[0] if values else None


async def serve_websocket(scope: Scope, receive: Receive, send: Send, services: Services) -> None:
    """Run one WebSocket connection from handshake to close."""
    limits = services.limits
    connect = await receive()
    if connect["type"] != "websocket.connect":
        return
    hub = services.hub
    if not origin_allowed(scope, services.allowed_origins):
        log.info("refused upgrade: origin not allowed")
        await send({"type": "websocket.close", "code": CloseCode.POLICY_VIOLATION})  # -> 403
        return
    if hub.closing:
        await send({"type": "websocket.close", "code": CloseCode.GOING_AWAY})
        return
    guarded = hypercorn_guard.installed()
    accept: dict[str, Any] = {"type": "websocket.accept"}
    if guarded:
        options: TransportOptions = {
            "max_message_bytes": limits.max_frame_bytes,
            "compression": limits.compression,
            "receive_many": True,
        }
        accept[ACCEPT_OPTIONS_KEY] = options
    await send(accept)

    connection = Connection(limits.send_queue, hub.drop_slow, limits.send_queue_bytes)
    sent = SentFrames(
        hub.marks, hub.sent, current_progress(), hub.acks, exact_sizes=not limits.compression
    )
    hub.attach(connection)
    client = scope.get("client")
    # DEBUG, not INFO: two log lines per connection are a measurable part of a reconnect
    # storm's cost; the connection metrics count them at INFO's level of detail.
    log.debug("open conn=%s peer=%s", connection.id, client[0] if client else "-")
    disconnected = False
    driver: SessionDriver | None = None
    try:
        with connection.cancel_scope:
            async with trio.open_nursery() as nursery:
                connection.writer.task = partial(_write, connection, send, services, sent, guarded)
                driver = SessionDriver(connection, services, nursery)
                await driver.opened(_query_token(scope))
                disconnected = await _read(receive, driver, connection, limits)
                nursery.cancel_scope.cancel()
    finally:
        user_id = connection.user_id
        with trio.CancelScope(shield=True):
            await connection.writer.stop()
            if not disconnected:
                if connection.close_code is None:  # cancelled from outside: server stopping
                    connection.close(CloseCode.GOING_AWAY, "server shutting down")
                if connection.close_code != CloseCode.TRY_AGAIN_LATER:
                    # A clean close: the client reads; let it acknowledge the last frames, or
                    # the socket's close would leave them counted as undelivered.
                    await sent.wait_acked(CLOSE_ACK_WAIT_S)
                await _send_close(send, connection, services)
            connection.close_outbox()
            await sent.settle()
            if driver is not None:
                driver.closing()
            await hub.detach(connection)
        log.debug(
            "close conn=%s user=%s code=%s",
            connection.id,
            user_id,
            "client" if disconnected else connection.close_code,
        )


async def _read(
    receive: Receive, driver: SessionDriver, connection: Connection, limits: LimitsConfig
) -> bool:
    """Feed client messages to the session; True when the client disconnected.

    The receive waits under the next deadline: the session's timers (idle, authentication,
    token expiry) and the keep-alive ping, which is queued for the writer when the connection
    has sent nothing for `ping_interval_s`.
    """
    max_bytes = limits.max_frame_bytes
    ping_interval = limits.ping_interval_s
    machine = driver.machine
    queued = _queued_events(receive)
    while True:
        event: MutableMapping[str, Any] | None = None
        deadline = min(machine.next_deadline(), connection.last_sent + ping_interval)
        if queued is not None and trio.current_time() < deadline:
            try:
                event = queued()  # already there: no pass of the run loop to fetch it
            except (trio.WouldBlock, trio.EndOfChannel):
                event = None
        if event is None:
            # Only the wait runs under the deadline: a frame that came just before a ping was
            # due must not have its handling (reply and all) cancelled when that time passes.
            with trio.move_on_at(deadline):
                event = await receive()
        if event is not None:
            kind = event["type"]
            if kind == RECEIVE_MANY:
                # Whole messages within the byte limit (the guard counted their bytes).
                for message in event["messages"]:
                    await driver.frame(message)
                    if connection.close_code is not None:
                        return False
                continue
            if kind == "websocket.disconnect":
                return True
            if kind != "websocket.receive":
                continue
            text = event.get("text")
            payload: str | bytes = text if text is not None else (event.get("bytes") or b"")
            size = utf8_length(payload) if isinstance(payload, str) else len(payload)
            if size > max_bytes:
                connection.close(CloseCode.MESSAGE_TOO_BIG, "message too big")
                return False
            await driver.frame(payload)
            continue
        now = trio.current_time()
        if now >= machine.next_deadline():
            await driver.deadline()
            if connection.close_code is not None:
                return False
        if now >= connection.last_sent + ping_interval:
            await driver.keepalive()


def _queued_events(receive: Receive) -> Callable[[], MutableMapping[str, Any]] | None:
    """`receive_nowait` of the channel behind Hypercorn's ASGI `receive`, if it is one."""
    channel = getattr(receive, "__self__", None)
    if isinstance(channel, trio.MemoryReceiveChannel):
        nowait: Callable[[], MutableMapping[str, Any]] = channel.receive_nowait
        return nowait
    return None


async def _write(
    connection: Connection, send: Send, services: Services, sent: SentFrames, guarded: bool
) -> None:
    """Drain the outbox; frames queued together go out in one socket write.

    The receipts of written frames are released by the hub's `AckWatch` once the client's
    TCP stack acknowledged them. Returns at `RETIRE` (the writer moves to another nursery), at
    the end of the outbox, when the client is gone, or after a deferred close. Without the
    transport guard the frames go out as standard ASGI `websocket.send` events, one each, and
    keep-alive pings are skipped.
    """
    count_out = services.metrics.count_out
    outbox = connection.outbox
    streak = 0
    while True:
        first = None
        if streak < WRITE_STREAK:
            try:
                first = outbox.receive_nowait()  # queued while writing: no pass of the run loop
                streak += 1
            except trio.WouldBlock:
                pass
            except trio.EndOfChannel:
                return
        if first is None:
            streak = 0
            first = await _next(outbox)
        if first is _END:
            return
        batch = [first]
        while len(batch) < WRITE_BATCH and batch[-1].frame_type != RETIRE:
            try:
                batch.append(outbox.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        connection.taken(batch)
        # Receipt-only items (`MARK_ONLY`) write nothing but keep their place for the marks.
        frames = [item for item in batch if item.text or item.receipt is not None]
        texts = [item.text for item in frames if item.text]
        try:
            if texts and guarded:  # one frame too: the guard's path is the lean one
                await send({"type": SEND_MANY, "texts": texts})
            else:
                for text in texts:
                    await send({"type": "websocket.send", "text": text})
        except ClientGone:
            return  # never written: not counted, not marked delivered
        except trio.Cancelled:
            sent.sent_partially(frames)  # the connection is being dropped mid-write
            raise
        sent.sent(frames)
        try:
            if guarded and any(item.frame_type == PING for item in batch):
                await send({"type": SEND_PING})
        except ClientGone:
            return
        connection.last_sent = trio.current_time()
        for item in batch:
            if item.frame_type not in _CONTROL:
                count_out(item.frame_type)
        if connection.deferred_close is not None and any(
            item.frame_type == CLOSE_AFTER for item in batch
        ):
            connection.close(*connection.deferred_close)
            return
        if batch[-1].frame_type == RETIRE:
            return


_CONTROL: Final = frozenset({CLOSE_AFTER, RETIRE, MARK_ONLY})
_END: Final = Outgoing("", "end")


async def _next(outbox: trio.MemoryReceiveChannel[Outgoing]) -> Outgoing:
    try:
        return await outbox.receive()
    except trio.EndOfChannel:
        return _END


async def _send_close(send: Send, connection: Connection, services: Services) -> None:
    code = connection.close_code or CloseCode.NORMAL
    services.metrics.closes.labels(str(int(code))).inc()
    with trio.move_on_after(CLOSE_TIMEOUT_S):
        await send(
            {"type": "websocket.close", "code": int(code), "reason": connection.close_reason}
        )
