"""Bare relays with no auth check, no storage: the yardsticks for the generator and the stack.

`python -m benchmarks.echo --stack quart|raw --port N` serves the subset of PROTOCOL.md the
scenarios use (`create_chat`, `send_message`, `fetch_chats` with no history, `ping`):

- `quart`: Quart-Trio on Hypercorn's trio worker, the same stack as the handler, so its
  throughput is what the stack itself allows (the issue's "bare relay reference").
- `raw`: trio sockets with the framing of `benchmarks.wire`; it does less work per frame than
  the generator, so a run against it shows the generator's own ceiling.

The user id is read from the token's `sub` claim without checking the signature: the point is
to cost nothing the handler would not also pay.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import jwt
import orjson
import trio

from benchmarks import wire

_QUEUE: Final = 1024
_clock = itertools.count(1)


def user_of(token: str | None) -> str:
    """The `sub` of a JWT, unverified (see module doc)."""
    if not token:
        return "anonymous"
    try:
        return str(jwt.decode(token, options={"verify_signature": False})["sub"])
    except (jwt.PyJWTError, KeyError):
        return "anonymous"


def _timestamp() -> str:
    return "2024-01-01T00:00:00.000Z"


class Relay:
    """Routing shared by both stacks: user id -> outboxes of that user's connections."""

    def __init__(self) -> None:
        self.outboxes: defaultdict[str, set[Callable[[bytes], None]]] = defaultdict(set)

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
                if push is not reply:
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
    url = urlsplit(target)
    if url.path == "/healthz" or "sec-websocket-key" not in headers:
        body = b'{"status":"ok"}'
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\nConnection: close\r\n\r\n"
            + body
        )
        return
    accept = wire.accept_key(headers["sec-websocket-key"].encode())
    await stream.send_all(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    user = user_of(parse_qs(url.query).get("token", [None])[0])
    send, receive = trio.open_memory_channel[bytes](_QUEUE)

    def push(text: bytes) -> None:
        # A slow reader loses frames: the yardstick must never block the sender.
        with contextlib.suppress(trio.WouldBlock):
            send.send_nowait(wire.encode_frame(wire.OP_TEXT, text, mask=False))

    async def writer() -> None:
        async with receive:
            async for first in receive:
                batch = [first]
                with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
                    while True:
                        batch.append(receive.receive_nowait())
                await stream.send_all(b"".join(batch))

    relay.outboxes[user].add(push)
    parser = wire.FrameParser()
    push(b'{"type":"authenticated","user_id":' + orjson.dumps(user) + b"}")
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            data = rest
            while True:
                messages, controls = parser.feed(data)
                for text in messages:
                    relay.handle(user, text, push)
                if any(op == wire.OP_CLOSE for op, _ in controls):
                    send.send_nowait(wire.encode_frame(wire.OP_CLOSE, b"\x03\xe8", mask=False))
                    break
                for op, payload in controls:
                    if op == wire.OP_PING:
                        send.send_nowait(wire.encode_frame(wire.OP_PONG, payload, mask=False))
                data = await stream.receive_some(256 * 1024)
                if not data:
                    break
            send.close()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        relay.outboxes[user].discard(push)


async def serve_raw(port: int) -> None:
    """Serve the raw relay until cancelled."""
    relay = Relay()

    async def handler(stream: trio.SocketStream) -> None:
        try:
            await _raw_connection(relay, stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await stream.aclose()

    await trio.serve_tcp(handler, port, host="127.0.0.1", backlog=4096)


# ------------------------------------------------------------------ Quart-Trio relay


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
        user = user_of(websocket.args.get("token"))
        send, receive = trio.open_memory_channel[bytes](_QUEUE)

        def push(text: bytes) -> None:
            with contextlib.suppress(trio.WouldBlock):
                send.send_nowait(text)

        async def writer() -> None:
            async with receive:
                async for text in receive:
                    await websocket.send(text.decode())

        relay.outboxes[user].add(push)
        try:
            await websocket.accept()
            push(b'{"type":"authenticated","user_id":' + orjson.dumps(user) + b"}")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                while True:
                    data = await websocket.receive()
                    relay.handle(user, data.encode() if isinstance(data, str) else data, push)
        finally:
            relay.outboxes[user].discard(push)

    return app


async def serve_quart(port: int) -> None:
    """Serve the Quart-Trio relay on Hypercorn's trio worker until cancelled."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.backlog = 4096
    config.accesslog = None
    await serve(make_quart_app(), config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stack", choices=["quart", "raw"], required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    runner = serve_quart if args.stack == "quart" else serve_raw
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(runner, args.port)


if __name__ == "__main__":
    main()
