"""Helpers for the end-to-end tests: configs, tokens, a JSON WebSocket client, a tiny HTTP client.

Everything here talks to a real server started by the fixtures in `conftest.py` on port 0; every
wait is bounded (`trio.fail_after`), so a broken server fails a test instead of hanging it.
"""

from __future__ import annotations

import functools
import json
import math
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import attrs
import h11
import jwt
import trio
import wsproto
import wsproto.events as ws_events
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url
from wsproto.connection import ConnectionState
from wsproto.extensions import Extension

from handler.app import ChatApp
from handler.asyncapi import ASYNCAPI, SERVER_FRAMES
from handler.config import Config, parse_config
from handler.store.base import Store

SECRET: Final = "test-secret-of-at-least-32-bytes-0123456789abcdef"
"""HS256 key of the test configs (32+ bytes, so PyJWT does not warn about its length)."""

RECV_TIMEOUT_S: Final = 5.0
CONNECT_TIMEOUT_S: Final = 5.0

Frame = dict[str, Any]

_TEST_LIMITS: Final[Mapping[str, Any]] = {
    # Generous enough that no test trips the rate limiter by accident; the rate-limit tests
    # set their own values.
    "rate_per_s": 10_000,
    "rate_burst": 10_000,
    # A closed connection's keep-alive ping task lingers until its next tick, and graceful
    # shutdown waits for it: a short interval keeps every server stop fast.
    "ping_interval_s": 0.1,
}


def make_config(tmp_path: Path, **overrides: Any) -> Config:
    """A config for a server on a free port with its own SQLite file under `tmp_path`.

    Keyword overrides replace top-level keys; a mapping given for a section (`auth`, `limits`,
    `storage`, `bus`) is merged into that section's test defaults, e.g.
    `make_config(tmp_path, limits={"auth_timeout_s": 0.3})`.
    """
    raw: dict[str, Any] = {
        "handler_url": "127.0.0.1:0",
        "storage": {"backend": "sqlite", "path": str(tmp_path / "chat.db")},
        "bus": {"backend": "local"},
        "auth": {"jwt_secret": SECRET, "dev_tokens": True},
        "limits": dict(_TEST_LIMITS),
    }
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return parse_config(raw, base_dir=tmp_path, environ={})


def sign(claims: Mapping[str, Any], key: Any = SECRET, algorithm: str = "HS256") -> str:
    """Sign arbitrary claims (a test may build any token, valid or not)."""
    return jwt.encode(dict(claims), key, algorithm=algorithm)


def make_token(user_id: str, ttl: float | None = 3600.0, **claims: Any) -> str:
    """An HS256 token for `user_id` with the test secret; `ttl=None` means no `exp`.

    `exp` is a whole number of seconds (PyJWT truncates fractions), rounded up: the token
    lives at least `ttl` and less than `ttl + 1` seconds.
    """
    payload: dict[str, Any] = {"sub": user_id}
    if ttl is not None:
        payload["exp"] = math.ceil(time.time() + ttl)
    payload.update(claims)
    return sign(payload)


# --------------------------------------------------------------------------- WebSocket client

# What the clients of the version 1 tests leave aside by default (see `Client.set_aside`):
# version 2's live notifications, which a version 1 client ignores.
SET_ASIDE: Final = frozenset({"receipt", "presence"})


def _registry() -> Registry[Any]:
    document = Resource.from_contents(ASYNCAPI, default_specification=DRAFT202012)
    return Registry().with_resource(_ASYNCAPI_URI, document)


_ASYNCAPI_URI: Final = "urn:chat:asyncapi"
_REGISTRY: Final = _registry()


@functools.cache
def _frame_validator(frame_type: str) -> Draft202012Validator:
    """One validator per server frame type, built once per process: the document is parsed
    into the registry once and every `$ref` resolves in it."""
    schema = {"$ref": f"{_ASYNCAPI_URI}#/components/schemas/{SERVER_FRAMES[frame_type]}"}
    return Draft202012Validator(schema, registry=_REGISTRY)


def check_server_frame(frame: Frame) -> None:
    """Fail unless `frame` matches the AsyncAPI schema of its `type`.

    Every frame the test clients receive comes through here, so the whole end-to-end suite
    (on one node and on two) holds the server to the document `GET /asyncapi.json` serves.
    """
    frame_type = frame.get("type")
    assert frame_type in SERVER_FRAMES, f"a server frame of no documented type: {frame!r}"
    error = best_match(_frame_validator(frame_type).iter_errors(frame))
    if error is not None:
        raise AssertionError(
            f"{frame_type} frame does not match the AsyncAPI schema at"
            f" {error.json_path}: {error.message}\nframe: {frame!r}"
        )


_UNCHECKED: Final[list[Frame]] = []  # received by the test clients, checked after the test


def received(message: str | bytes) -> Frame:
    """A message from the server: one JSON object, checked against its frame's schema once
    the test is over (`check_received_frames`): validating takes about ten times as long as
    parsing, and a test that reads thousands of frames, with the servers in the same
    process, must not be slowed while it runs."""
    assert isinstance(message, str), f"server sent a binary message: {message!r}"
    frame = json.loads(message)
    assert isinstance(frame, dict), frame
    _UNCHECKED.append(frame)
    return frame


def check_received_frames() -> None:
    """Fail unless every frame the test clients received since the last call matches the
    AsyncAPI schema of its type (called after every test, by an autouse fixture)."""
    frames = _UNCHECKED[:]
    _UNCHECKED.clear()
    for frame in frames:
        check_server_frame(frame)


class _Syncing:
    """`sync()` for any client that can `send` and `recv` JSON frames."""

    async def send(self, obj: Mapping[str, Any]) -> None:
        raise NotImplementedError

    async def recv(self, timeout: float = RECV_TIMEOUT_S) -> Frame:
        raise NotImplementedError

    async def sync(self, timeout: float = RECV_TIMEOUT_S) -> list[Frame]:
        """Send a `ping` and return every frame received before its `pong`."""
        marker = f"sync-{time.monotonic_ns()}"
        await self.send({"type": "ping", "request_id": marker})
        before: list[Frame] = []
        with trio.fail_after(timeout):
            while True:
                frame = await self.recv(timeout)
                if frame.get("type") == "pong" and frame.get("request_id") == marker:
                    return before
                before.append(frame)


def _answer_pings_only_while_open() -> None:
    """trio-websocket answers a ping even after it sent its own close frame, which wsproto
    refuses: the `LocalProtocolError` escapes the client's close (python-trio/trio-websocket
    issue 184; the fix proposed upstream, in its pull request 198, is this one). The servers
    under test ping every 0.1 s, so a test's close now and then meets one."""
    answer = WebSocketConnection._handle_ping_event

    async def answer_while_open(self: WebSocketConnection, event: ws_events.Ping) -> None:
        if self._wsproto.state == ConnectionState.OPEN:
            await answer(self, event)

    WebSocketConnection._handle_ping_event = answer_while_open  # type: ignore[method-assign]


_answer_pings_only_while_open()


class Client(_Syncing):
    """A JSON-speaking WebSocket client with bounded waits."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.backlog: list[Frame] = []
        """Frames between `authenticated` and the sync `pong` of `connect()`."""
        self.set_aside: frozenset[str] = SET_ASIDE
        """Frame types `recv` puts in `aside` instead of returning them: by default the
        version 2 `receipt`, which a version 1 client ignores (as the protocol lets it), so
        the version 1 tests read the frames they are about."""
        self.aside: list[Frame] = []

    async def send(self, obj: Mapping[str, Any]) -> None:
        await self.ws.send_message(json.dumps(obj))

    async def send_raw(self, message: str | bytes) -> None:
        await self.ws.send_message(message)

    async def recv(self, timeout: float = RECV_TIMEOUT_S) -> Frame:
        with trio.fail_after(timeout):
            while True:
                frame = received(await self.ws.get_message())
                if frame.get("type") not in self.set_aside:
                    return frame
                self.aside.append(frame)

    async def recv_aside(
        self, predicate: Callable[[Frame], bool], timeout: float = RECV_TIMEOUT_S
    ) -> Frame:
        """The first frame that matches `predicate`, among those set aside so far and then
        those that arrive (others are set aside as `recv` would, or dropped)."""
        with trio.fail_after(timeout):
            for index, frame in enumerate(self.aside):
                if predicate(frame):
                    return self.aside.pop(index)
            while True:
                frame = received(await self.ws.get_message())
                if predicate(frame):
                    return frame
                if frame.get("type") in self.set_aside:
                    self.aside.append(frame)

    async def recv_until(
        self, frame_type: str, timeout: float = RECV_TIMEOUT_S, skipped: list[Frame] | None = None
    ) -> Frame:
        """Return the next frame of `frame_type`; earlier frames go to `skipped` if given."""
        with trio.fail_after(timeout):
            while True:
                frame = await self.recv(timeout=timeout)
                if frame.get("type") == frame_type:
                    return frame
                if skipped is not None:
                    skipped.append(frame)

    async def expect_no_frame(self, seconds: float = 0.2) -> None:
        """Fail if any message (other than a set-aside one) arrives within `seconds`."""
        with trio.move_on_after(seconds):
            frame = await self.recv(timeout=seconds + 1)
            raise AssertionError(f"unexpected frame: {frame!r}")

    async def request(self, obj: Mapping[str, Any], timeout: float = RECV_TIMEOUT_S) -> Frame:
        """Send a frame and return the next frame received."""
        await self.send(obj)
        return await self.recv(timeout)

    async def recv_event_or_close(self, timeout: float = RECV_TIMEOUT_S) -> Frame | int | None:
        """The next frame, reduced to `type` and `code` for errors, or the close code."""
        try:
            frame = await self.recv(timeout)
        except ConnectionClosed as closed:
            return None if closed.reason is None else closed.reason.code
        if frame.get("type") == "error":
            return {"type": "error", "code": frame.get("code")}
        return frame

    async def wait_closed(self, timeout: float = RECV_TIMEOUT_S) -> int | None:
        """Read (and discard) until the server closes; return the close code."""
        with trio.fail_after(timeout):
            try:
                while True:
                    received(await self.ws.get_message())
            except ConnectionClosed as closed:
                return None if closed.reason is None else closed.reason.code

    @property
    def closed_code(self) -> int | None:
        reason = self.ws.closed
        return None if reason is None else reason.code

    # -- protocol shortcuts -----------------------------------------------------------------

    async def create_chat(self, recipient_id: str, **extra: Any) -> Frame:
        """`create_chat` and its `new_chats` reply; returns the chat object."""
        reply = await self.request({"type": "create_chat", "recipient_id": recipient_id, **extra})
        assert reply["type"] == "new_chats", reply
        assert len(reply["data"]) == 1, reply
        chat: Frame = reply["data"][0]
        return chat

    async def send_message(
        self, chat_id: str, recipient_id: str, content: str, **extra: Any
    ) -> Frame:
        """`send_message` and its acknowledgement (the sender's own `message` copy)."""
        reply = await self.request(
            {
                "type": "send_message",
                "chat_id": chat_id,
                "recipient_id": recipient_id,
                "content": content,
                **extra,
            }
        )
        assert reply["type"] == "message", reply
        return reply

    async def fetch_chats(self, **extra: Any) -> tuple[Frame, list[Frame]]:
        """`fetch_chats`: the `all_chats` frame and the `all_messages` frames that follow."""
        await self.send({"type": "fetch_chats", **extra})
        all_chats = await self.recv()
        assert all_chats["type"] == "all_chats", all_chats
        pages = [await self.recv() for _ in all_chats["data"]]
        assert all(page["type"] == "all_messages" for page in pages), pages
        return all_chats, pages


@attrs.define
class RunningServer:
    """A server started by the `start_server` fixture."""

    config: Config
    http_url: str  # "http://127.0.0.1:PORT"
    app: ChatApp
    stop_event: trio.Event
    stopped: trio.Event

    async def stop(self, timeout: float = 15.0) -> None:
        """Trigger a graceful shutdown and wait for `serve` to return."""
        self.stop_event.set()
        with trio.fail_after(timeout):
            await self.stopped.wait()

    @property
    def port(self) -> int:
        return int(self.http_url.rpartition(":")[2])

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}/ws"

    def token(self, user_id: str, ttl: float | None = 3600.0, **claims: Any) -> str:
        return make_token(user_id, ttl, **claims)

    @asynccontextmanager
    async def open(
        self,
        *,
        token: str | None = None,
        query: str | None = None,
        headers: Sequence[tuple[bytes, bytes]] = (),
        max_message_size: int = 2**20,
    ) -> AsyncIterator[Client]:
        """A raw connection to `/ws` (optionally with `?token=`); nothing is read for you."""
        url = self.ws_url
        if token is not None:
            url += "?token=" + urllib.parse.quote(token, safe="")
        elif query is not None:
            url += "?" + query
        async with open_websocket_url(
            url,
            extra_headers=list(headers),
            max_message_size=max_message_size,
            connect_timeout=CONNECT_TIMEOUT_S,
            disconnect_timeout=CONNECT_TIMEOUT_S,
        ) as ws:
            yield Client(ws)

    @asynccontextmanager
    async def open_raw(
        self,
        *,
        token: str | None = None,
        headers: Sequence[tuple[bytes, bytes]] = (),
        extensions: Sequence[Extension] = (),
    ) -> AsyncIterator[RawClient]:
        """A connection driven by wsproto directly (see `RawClient`)."""
        target = "/ws"
        if token is not None:
            target += "?token=" + urllib.parse.quote(token, safe="")
        client = await RawClient.connect(self, target, headers, extensions)
        try:
            yield client
        finally:
            await client.stream.aclose()

    @asynccontextmanager
    async def connect(self, user_id: str, *, token: str | None = None) -> AsyncIterator[Client]:
        """A connection bound with `?token=`: `authenticated` is consumed and the frames that
        follow it up to a sync `pong` (the backlog, plus any live frame) are in `.backlog`."""
        async with self.open(token=token or self.token(user_id)) as client:
            first = await client.recv()
            assert first == {"type": "authenticated", "user_id": user_id}, first
            client.backlog = await client.sync()
            yield client


async def wait_until(
    predicate: Callable[[], object],
    timeout: float = 10.0,
    *,
    changed: Callable[[], Awaitable[object]] | None = None,
) -> None:
    """Return once `predicate()` is true; `trio.TooSlowError` after `timeout` seconds.

    Why: a test that sleeps for a guessed time is slow when the guess is long and flaky when it
    is short; this waits for the condition itself. `predicate` may be async (a check that has
    to ask a server). It is checked again after every `changed()`, for state whose owner
    announces changes (`changed` is called anew for each wait, so it may return the `wait()` of
    an event that is replaced on every change), or else every 10 ms, for state that nothing
    announces (a Tk window, a bus reconnecting).
    """
    with trio.fail_after(timeout):
        while True:
            done = predicate()
            if isinstance(done, Awaitable):
                done = await done
            if done:
                return
            if changed is None:
                await trio.sleep(0.01)  # nothing announces a change: look again shortly
            else:
                await changed()


async def wait_marked(
    server: RunningServer,
    user_id: str,
    chat_ids: Sequence[str] = (),
    message_ids: Sequence[str] = (),
    timeout: float = 2.0,
) -> None:
    """Wait until the store no longer offers these items to `user_id`.

    The server records deliveries asynchronously (batched after the write). Tests whose subject
    is not that timing wait here before the next binding; the tests of an immediate rebind do
    not wait, on purpose.
    """
    store = _store_of(server)

    async def marked() -> bool:
        backlog = await store.backlog(user_id)
        return not (set(chat_ids) & backlog.chat_ids or set(message_ids) & backlog.message_ids)

    await wait_until(marked, timeout)


async def wait_nothing_pending(server: RunningServer, user_id: str, timeout: float = 2.0) -> None:
    """Wait until the store has nothing undelivered for `user_id` (see `wait_marked`)."""
    store = _store_of(server)

    async def nothing_pending() -> bool:
        backlog = await store.backlog(user_id)
        return not backlog.chats and not backlog.messages

    await wait_until(nothing_pending, timeout)


async def wait_committed(server: RunningServer, user_id: str, timeout: float = 2.0) -> None:
    """Wait until the store offers `user_id` at least one undelivered message."""
    store = _store_of(server)

    async def committed() -> bool:
        return bool((await store.backlog(user_id)).messages)

    await wait_until(committed, timeout)


def _store_of(server: RunningServer) -> Store:
    services = server.app.services
    assert services is not None
    return services.store


async def expect_silence(*clients: Client, seconds: float = 0.15) -> None:
    """Fail if any of the clients receives a frame within `seconds` (checked concurrently)."""
    async with trio.open_nursery() as nursery:
        for client in clients:
            nursery.start_soon(client.expect_no_frame, seconds)


def backlog_messages(frames: Sequence[Frame]) -> list[Frame]:
    """Every message carried by `new_messages` frames, in order."""
    return [m for f in frames if f["type"] == "new_messages" for m in f["data"]]


# --------------------------------------------------------------------------- raw client


class RawClient(_Syncing):
    """A WebSocket client on wsproto, for what trio-websocket cannot do or hides.

    It can send fragmented messages and hand-made frames, offer extensions, and close
    gracefully while still reading: `close_and_drain()` sends a close frame and returns every
    message the server wrote before its own close frame (trio-websocket discards those), which
    is exactly what the server has written to this connection.
    """

    def __init__(self, stream: trio.SocketStream, ws: wsproto.WSConnection) -> None:
        self.stream = stream
        self.ws = ws
        self.accepted: ws_events.AcceptConnection | None = None
        self.close_code: int | None = None
        self.pings_received = 0
        self._events: list[ws_events.Event] = []
        self._text: list[str] = []

    @classmethod
    async def connect(
        cls,
        server: RunningServer,
        target: str,
        headers: Sequence[tuple[bytes, bytes]] = (),
        extensions: Sequence[Extension] = (),
    ) -> RawClient:
        with trio.fail_after(CONNECT_TIMEOUT_S):
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            client = cls(stream, wsproto.WSConnection(wsproto.ConnectionType.CLIENT))
            request = ws_events.Request(
                host=server.host,
                target=target,
                extensions=list(extensions),
                extra_headers=list(headers),
            )
            await stream.send_all(client.ws.send(request))
            event = await client._next_event()
            if not isinstance(event, ws_events.AcceptConnection):
                await stream.aclose()
                raise AssertionError(f"upgrade refused: {event!r}")
            client.accepted = event
        return client

    async def _next_event(self) -> ws_events.Event:
        while not self._events:
            for event in self.ws.events():
                if isinstance(event, ws_events.Ping):
                    self.pings_received += 1
                    if self.ws.state == ConnectionState.OPEN:  # not after our own close frame
                        await self._write(self.ws.send(event.response()))
                elif isinstance(event, ws_events.CloseConnection):
                    self.close_code = event.code
                    if self.ws.state == ConnectionState.REMOTE_CLOSING:
                        await self._write(self.ws.send(event.response()))
                    self._events.append(event)
                elif not isinstance(event, ws_events.Pong):
                    self._events.append(event)
            if self._events:
                break
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            self.ws.receive_data(data or None)
            if not data and not self._events:
                raise ConnectionError("connection lost without a close frame")
        return self._events.pop(0)

    async def _write(self, data: bytes) -> None:
        # Shielded: a frame cut in half by a cancelled read would corrupt the stream.
        with trio.CancelScope(shield=True):
            await self.stream.send_all(data)

    async def send_text(self, text: str, fragments: int = 1) -> None:
        """Send one text message, split into `fragments` frames."""
        size = max(1, -(-len(text) // fragments))
        parts = [text[i : i + size] for i in range(0, len(text), size)] or [""]
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            message = ws_events.TextMessage(data=part, message_finished=last)
            await self.stream.send_all(self.ws.send(message))

    async def send(self, obj: Mapping[str, Any]) -> None:
        await self.send_text(json.dumps(obj))

    async def send_frame(self, opcode: int, payload: bytes) -> None:
        """Write one hand-made, masked, final frame (e.g. a text frame of invalid UTF-8)."""
        await self.stream.send_all(masked_frame(0x80 | opcode, payload))

    async def recv_event(self, timeout: float = RECV_TIMEOUT_S) -> Frame | int:
        """The next JSON message, or the close code once the server closed."""
        with trio.fail_after(timeout):
            while True:
                event = await self._next_event()
                if isinstance(event, ws_events.CloseConnection):
                    return event.code
                if isinstance(event, ws_events.TextMessage):
                    self._text.append(event.data)
                    if event.message_finished:
                        text, self._text = "".join(self._text), []
                        return received(text)

    async def recv(self, timeout: float = RECV_TIMEOUT_S) -> Frame:
        """The next frame that is not set aside (receipts, as `Client.recv`)."""
        with trio.fail_after(timeout):
            while True:
                event = await self.recv_event(timeout)
                assert not isinstance(event, int), f"closed with {event}"
                if event.get("type") not in SET_ASIDE:
                    return event

    async def wait_closed(self, timeout: float = RECV_TIMEOUT_S) -> int:
        """Read (and discard) until the server closes; return the close code."""
        with trio.fail_after(timeout):
            while True:
                event = await self.recv_event(timeout)
                if isinstance(event, int):
                    return event

    async def close_and_drain(self, timeout: float = RECV_TIMEOUT_S) -> list[Frame]:
        """Close with 1000 and return every message received before the server's close."""
        await self._write(self.ws.send(ws_events.CloseConnection(code=1000)))
        frames: list[Frame] = []
        with trio.fail_after(timeout):
            while True:
                event = await self.recv_event(timeout)
                if isinstance(event, int):
                    return frames
                frames.append(event)


def static(chat: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a chat object that does not change with its messages and marks."""
    keys = ("chat_id", "kind", "title", "participants", "created_by", "created_at")
    return {key: chat[key] for key in keys if key in chat}


# --------------------------------------------------------------------------- HTTP client


def masked_frame(first_byte: int, payload: bytes) -> bytes:
    """A client frame (masked, as RFC 6455 requires) with the given FIN/RSV/opcode byte."""
    length = len(payload)
    header = bytes([first_byte])
    if length < 126:
        header += bytes([0x80 | length])
    elif length < 65536:
        header += bytes([0x80 | 126]) + length.to_bytes(2, "big")
    else:
        header += bytes([0x80 | 127]) + length.to_bytes(8, "big")
    mask = b"\x11\x22\x33\x44"
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def serve_lifespan(
    receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
    send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
) -> None:
    """The lifespan protocol of a test ASGI app: complete startup and shutdown."""
    while True:
        event = await receive()
        await send({"type": event["type"] + ".complete"})
        if event["type"] == "lifespan.shutdown":
            return


@attrs.frozen
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def http_request(
    server: RunningServer,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: Sequence[tuple[str, str]] = (),
    timeout: float = RECV_TIMEOUT_S,
) -> HttpResponse:
    """One HTTP/1.1 request on a fresh connection (`Connection: close`)."""
    connection = h11.Connection(h11.CLIENT)
    all_headers = [("Host", server.host), ("Connection", "close"), *headers]
    if body is not None:
        all_headers.append(("Content-Length", str(len(body))))
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            data = connection.send(h11.Request(method=method, target=path, headers=all_headers))
            if body is not None:
                data += connection.send(h11.Data(data=body))
            data += connection.send(h11.EndOfMessage())
            await stream.send_all(data)
            status = 0
            response_headers: dict[str, str] = {}
            chunks: list[bytes] = []
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    connection.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    response_headers = {k.decode(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
    return HttpResponse(status, response_headers, b"".join(chunks))
