"""Bare relays with no auth check, no storage: the yardsticks for the generator and the stack.

`python -m benchmarks.echo --stack STACK --port N` serves the subset of PROTOCOL.md the
scenarios use (`create_chat`, `send_message`, `fetch_chats` with no history, `ping`):

- `quart`: Quart-Trio on Hypercorn's trio worker, the same stack as the handler, so its
  throughput is what the stack itself allows (the issue's "bare relay reference").
- `raw`: trio sockets with the framing of `benchmarks.wire`; it does less work per frame than
  the generator, so a run against it shows the generator's own ceiling.
- `asgi`: a bare ASGI app on Hypercorn's trio worker: the handler's server without Quart, so
  the gap to `quart` is what the framework costs.
- `trio-websocket`: trio-websocket's server (wsproto on trio, no HTTP at all): another trio
  WebSocket stack to hold Hypercorn against. It cannot answer `/healthz`, see `NO_HTTP`.
- `websockets`: the asyncio `websockets` library, a widely used non-trio WebSocket server, to
  place the trio stacks among the alternatives.

All of them share `Relay` (the routing) and `Outbox` (a connection's queue and writer), so
they differ only in how their stack reads and writes a message. The user id is read from the
token's `sub` claim without checking the signature: the point is to cost nothing the handler
would not also pay.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar
from urllib.parse import parse_qs, urlsplit

import jwt
import orjson
import trio

from benchmarks import wire

if TYPE_CHECKING:
    from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
    from trio_websocket import WebSocketRequest
    from websockets.asyncio.server import ServerConnection
    from websockets.http11 import Request, Response

# Stacks that speak nothing but WebSocket: the harness sees them up by their open port.
NO_HTTP: Final = frozenset({"trio-websocket"})

_QUEUE: Final = 1024
_HEALTH: Final = b'{"status":"ok"}'
_clock = itertools.count(1)
_T = TypeVar("_T")


def user_of(token: str | None) -> str:
    """The `sub` of a JWT, unverified (see module doc)."""
    if not token:
        return "anonymous"
    try:
        return str(jwt.decode(token, options={"verify_signature": False})["sub"])
    except (jwt.PyJWTError, KeyError):
        return "anonymous"


def user_of_query(query: str) -> str:
    """The user of an upgrade request's query string (`token=...`)."""
    return user_of(parse_qs(query).get("token", [None])[0])


def user_of_target(target: str) -> str:
    """The user of an upgrade request's target (`/ws?token=...`)."""
    return user_of_query(urlsplit(target).query)


def _timestamp() -> str:
    return "2024-01-01T00:00:00.000Z"


class Relay:
    """Routing shared by every stack: user id -> outboxes of that user's connections."""

    def __init__(self) -> None:
        self.outboxes: defaultdict[str, set[Callable[[bytes], None]]] = defaultdict(set)

    @contextlib.contextmanager
    def connected(self, user: str, push: Callable[[bytes], None]) -> Iterator[None]:
        """A connection's lifetime: reachable by its user's peers, greeted as the handler
        greets a bound connection, forgotten when it ends."""
        self.outboxes[user].add(push)
        push(b'{"type":"authenticated","user_id":' + orjson.dumps(user) + b"}")
        try:
            yield
        finally:
            self.outboxes[user].discard(push)

    def handle(self, user: str, text: bytes, reply: Callable[[bytes], None]) -> None:
        """Answer one client frame, pushing to other connections through their outboxes."""
        try:
            frame: dict[str, Any] = orjson.loads(text)
        except orjson.JSONDecodeError:
            reply(orjson.dumps({"type": "error", "code": "bad_json", "message": "bad json"}))
            return
        kind = frame.get("type")
        request_id = frame.get("request_id")
        if kind == "send_message":
            recipient = str(frame.get("recipient_id"))
            message = {
                "type": "message",
                "chat_id": frame.get("chat_id"),
                "sender_id": user,
                "recipient_id": recipient,
                "content": frame.get("content"),
                "message_id": str(next(_clock)),
                "timestamp": _timestamp(),
            }
            plain = orjson.dumps(message)
            for push in self.outboxes.get(recipient, ()):
                push(plain)
            for push in self.outboxes.get(user, ()):
                # `!=`, not `is not`: a bound method is a new object at every access.
                if push != reply:
                    push(plain)
            reply(orjson.dumps({**message, "request_id": request_id}))
        elif kind == "create_chat":
            recipient = str(frame.get("recipient_id"))
            pair = sorted((user, recipient))
            chat = {
                "chat_id": "\x1f".join(pair),
                "participants": pair,
                "created_by": user,
                "created_at": _timestamp(),
            }
            pushed = orjson.dumps({"type": "new_chats", "data": [chat]})
            for push in self.outboxes.get(recipient, ()):
                push(pushed)
            reply(orjson.dumps({"type": "new_chats", "data": [chat], "request_id": request_id}))
        elif kind == "fetch_chats":
            reply(orjson.dumps({"type": "all_chats", "data": [], "request_id": request_id}))
        elif kind == "ping":
            reply(orjson.dumps({"type": "pong", "request_id": request_id}))
        else:
            reply(orjson.dumps({"type": "error", "code": "unknown_type", "message": "?"}))


class _Event(Protocol):
    """What `Outbox` needs of an event: trio's and asyncio's both qualify."""

    def set(self) -> None: ...

    def wait(self) -> Awaitable[object]: ...


class Outbox:
    """One connection's outgoing frames: `push` never blocks (a slow reader loses frames, the
    yardstick must never hold up the sender), `pump` is the connection's one writer.

    It needs only an event, so the trio relays and the asyncio one share it: `event` is
    `trio.Event` or `asyncio.Event`.
    """

    def __init__(self, event: Callable[[], _Event] = trio.Event) -> None:
        self._frames: deque[bytes] = deque()
        self._event = event
        self._ready = event()
        self._closed = False

    def push(self, frame: bytes) -> None:
        if not self._closed and len(self._frames) < _QUEUE:
            self._frames.append(frame)
            self._ready.set()

    def close(self) -> None:
        """No more frames: `pump` returns once the queued ones are written."""
        self._closed = True
        self._ready.set()

    async def pump(
        self, write: Callable[[bytes], Awaitable[None]], *, joined: bool = False
    ) -> None:
        """Write the frames in order until closed; `joined` hands everything queued since the
        last write to one `write` (a byte stream), else one frame per call (a message API)."""
        while True:
            await self._ready.wait()
            self._ready = self._event()
            batch = list(self._frames)
            self._frames.clear()
            if joined and batch:
                await write(b"".join(batch))
            elif not joined:
                for frame in batch:
                    await write(frame)
            if self._closed and not self._frames:
                return


async def read_frames(
    relay: Relay,
    user: str,
    push: Callable[[bytes], None],
    receive: Callable[[], Awaitable[str | bytes | None]],
) -> None:
    """The reader of a message-level stack: every message until `receive` gives None."""
    while (data := await receive()) is not None:
        relay.handle(user, data.encode() if isinstance(data, str) else data, push)


def text_writer(send: Callable[[str], Awaitable[None]]) -> Callable[[bytes], Awaitable[None]]:
    """A message API's `send` of text as `Outbox.pump` calls it: the frames are JSON, sent
    as text messages like the handler's."""

    async def write(frame: bytes) -> None:
        await send(frame.decode())

    return write


async def relay_messages(
    relay: Relay,
    user: str,
    receive: Callable[[], Awaitable[str | bytes | None]],
    send: Callable[[str], Awaitable[None]],
) -> None:
    """One connection of a trio stack with a message API: this task reads, a second one
    writes, as the handler does; the reader's end (None) ends the writer."""
    outbox = Outbox()
    with relay.connected(user, outbox.push):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outbox.pump, text_writer(send))
            await read_frames(relay, user, outbox.push, receive)
            nursery.cancel_scope.cancel()


def until_closed(
    receive: Callable[[], Awaitable[_T]], closed: type[Exception]
) -> Callable[[], Awaitable[_T | None]]:
    """`receive`, giving None once the library raises `closed` (the peer went away)."""

    async def next_or_none() -> _T | None:
        try:
            return await receive()
        except closed:
            return None

    return next_or_none


def ignore_closed(
    send: Callable[[str], Awaitable[None]], closed: type[Exception]
) -> Callable[[str], Awaitable[None]]:
    """`send`, dropping what goes to a closed connection: the reader notices the close."""

    async def send_or_drop(text: str) -> None:
        with contextlib.suppress(closed):
            await send(text)

    return send_or_drop


# ------------------------------------------------------------------ raw trio relay


async def _raw_connection(relay: Relay, stream: trio.SocketStream) -> None:
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return
        buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    target = lines[0].split(" ")[1]
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    if urlsplit(target).path == "/healthz" or "sec-websocket-key" not in headers:
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(_HEALTH)).encode()
            + b"\r\nConnection: close\r\n\r\n"
            + _HEALTH
        )
        return
    accept = wire.accept_key(headers["sec-websocket-key"].encode())
    await stream.send_all(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    user = user_of_target(target)
    outbox = Outbox()

    def push(text: bytes) -> None:
        outbox.push(wire.encode_frame(wire.OP_TEXT, text, mask=False))

    parser = wire.FrameParser()
    with relay.connected(user, push):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(outbox.pump, stream.send_all, joined=True))
            data = rest
            while True:
                messages, controls = parser.feed(data)
                for text in messages:
                    relay.handle(user, text, push)
                if any(op == wire.OP_CLOSE for op, _ in controls):
                    outbox.push(wire.encode_frame(wire.OP_CLOSE, b"\x03\xe8", mask=False))
                    break
                for op, payload in controls:
                    if op == wire.OP_PING:
                        outbox.push(wire.encode_frame(wire.OP_PONG, payload, mask=False))
                data = await stream.receive_some(256 * 1024)
                if not data:
                    break
            outbox.close()


async def serve_raw(port: int) -> None:
    """Serve the raw relay until cancelled."""
    relay = Relay()

    async def handler(stream: trio.SocketStream) -> None:
        try:
            await _raw_connection(relay, stream)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await stream.aclose()

    await trio.serve_tcp(handler, port, host="127.0.0.1", backlog=4096)


# ------------------------------------------------------------------ Hypercorn relays


async def _hypercorn(app: Any, port: int) -> None:
    """Serve an ASGI app on Hypercorn's trio worker, configured as the handler's is."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.backlog = 4096
    config.accesslog = None
    await serve(app, config)


def make_quart_app() -> Any:
    """The relay as a Quart-Trio app: one reader and one writer per WebSocket."""
    from quart import websocket
    from quart_trio import QuartTrio

    app = QuartTrio(__name__)
    relay = Relay()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.websocket("/ws")
    async def ws() -> None:
        # Quart cancels this task when the client goes: `receive` never has to end it.
        await websocket.accept()
        await relay_messages(
            relay, user_of(websocket.args.get("token")), websocket.receive, websocket.send
        )

    return app


async def serve_quart(port: int) -> None:
    """Serve the Quart-Trio relay on Hypercorn's trio worker until cancelled."""
    await _hypercorn(make_quart_app(), port)


def make_asgi_app() -> Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]:
    """The relay as a bare ASGI app: `/healthz` over ASGI http, the relay over ASGI
    websocket events, one reader and one writer per connection, as the Quart app has."""
    relay = Relay()

    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = await receive()
                if event["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif event["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif scope["type"] == "http":
            found = scope["path"] == "/healthz"
            await send(
                {
                    "type": "http.response.start",
                    "status": 200 if found else 404,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send(
                {
                    "type": "http.response.body",
                    "body": _HEALTH if found else b"",
                    "more_body": False,
                }
            )
        elif (await receive())["type"] == "websocket.connect":
            await send({"type": "websocket.accept", "subprotocol": None, "headers": []})

            async def next_message() -> str | bytes | None:
                event = await receive()
                if event["type"] != "websocket.receive":
                    return None  # websocket.disconnect
                return event["text"] if event.get("text") is not None else event.get("bytes")

            async def send_text(text: str) -> None:
                await send({"type": "websocket.send", "text": text, "bytes": None})

            user = user_of_query(scope["query_string"].decode("latin-1"))
            await relay_messages(relay, user, next_message, send_text)

    return app


async def serve_asgi(port: int) -> None:
    """Serve the bare ASGI relay on Hypercorn's trio worker until cancelled."""
    await _hypercorn(make_asgi_app(), port)


# ------------------------------------------------------------------ trio-websocket relay


async def serve_trio_websocket(port: int) -> None:
    """Serve the relay with trio-websocket's `serve_websocket` until cancelled."""
    from trio_websocket import ConnectionClosed, serve_websocket

    relay = Relay()

    async def handler(request: WebSocketRequest) -> None:
        # An exception here would end the whole server: a vanished client must not.
        with contextlib.suppress(ConnectionClosed):
            ws = await request.accept()
            await relay_messages(
                relay,
                user_of_target(request.path),
                until_closed(ws.get_message, ConnectionClosed),
                ignore_closed(ws.send_message, ConnectionClosed),
            )

    await serve_websocket(handler, "127.0.0.1", port, None)


# ------------------------------------------------------------------ asyncio websockets relay


def _websockets_health(connection: ServerConnection, request: Request) -> Response | None:
    """`/healthz` over plain HTTP before the handshake, as the other relays answer it."""
    if urlsplit(request.path).path == "/healthz":
        return connection.respond(200, _HEALTH.decode())
    return None


async def _websockets_connection(relay: Relay, connection: ServerConnection) -> None:
    """One connection: this task reads, a second one writes, as in the trio relays."""
    from websockets.exceptions import ConnectionClosed

    assert connection.request is not None
    user = user_of_target(connection.request.path)
    outbox = Outbox(asyncio.Event)
    with relay.connected(user, outbox.push):
        send = text_writer(ignore_closed(connection.send, ConnectionClosed))
        writer = asyncio.create_task(outbox.pump(send))
        try:
            receive = until_closed(connection.recv, ConnectionClosed)
            await read_frames(relay, user, outbox.push, receive)
        finally:
            writer.cancel()


async def serve_websockets(port: int) -> None:
    """Serve the relay with `websockets.asyncio.server.serve` until cancelled (asyncio)."""
    from websockets.asyncio.server import serve

    async with serve(
        partial(_websockets_connection, Relay()),
        "127.0.0.1",
        port,
        process_request=_websockets_health,
        backlog=4096,
    ) as server:
        await server.serve_forever()


_TRIO_STACKS: Final[dict[str, Callable[[int], Awaitable[None]]]] = {
    "raw": serve_raw,
    "quart": serve_quart,
    "asgi": serve_asgi,
    "trio-websocket": serve_trio_websocket,
}
STACKS: Final = (*_TRIO_STACKS, "websockets")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stack", choices=STACKS, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        if args.stack == "websockets":
            asyncio.run(serve_websockets(args.port))
        else:
            trio.run(_TRIO_STACKS[args.stack], args.port)


if __name__ == "__main__":
    main()
