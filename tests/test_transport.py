"""Transport hardening, end to end: compression, frame limits, bad UTF-8, slow readers.

These drive the server with a raw wsproto client over a trio socket, because the cases need
control no high-level client gives: offering permessage-deflate, sending a compression bomb,
sending invalid UTF-8, and not reading at all.
"""

from __future__ import annotations

import contextlib
import json
import resource
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate

from handler.auth import TokenAuthority
from handler.config import Config, parse_config
from handler.server import serve
from tests.support import masked_frame

SECRET = "transport-test-secret-0123456789abcdef"


_OPEN_CLIENTS: list[RawClient] = []


class RawClient:
    """A minimal wsproto client: full control over frames, extensions and reading."""

    def __init__(self, stream: trio.SocketStream, ws: WSConnection) -> None:
        self.stream = stream
        self.ws = ws
        self.accepted: AcceptConnection | None = None
        self._events: list[Event] = []

    @classmethod
    async def connect(
        cls, port: int, path: str, *, deflate: bool = False, headers: list[Any] | None = None
    ) -> RawClient:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        ws = WSConnection(ConnectionType.CLIENT)
        client = cls(stream, ws)
        _OPEN_CLIENTS.append(client)
        extensions = [PerMessageDeflate()] if deflate else []
        await client._send(
            Request(
                host=f"127.0.0.1:{port}",
                target=path,
                extensions=extensions,
                extra_headers=headers or [],
            )
        )
        event = await client.next_event()
        if isinstance(event, AcceptConnection):
            client.accepted = event
        elif isinstance(event, RejectConnection):
            raise PermissionError(event.status_code)
        return client

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def _send(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def send_text(self, text: str) -> None:
        await self._send(TextMessage(data=text))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def next_event(self) -> Event:
        while not self._events:
            data = await self.stream.receive_some(65536)
            self.ws.receive_data(data or None)
            self._events.extend(self.ws.events())
            if not data and not self._events:
                raise EOFError("connection closed without a close frame")
        return self._events.pop(0)

    async def next_json(self) -> dict[str, Any]:
        """The next whole text message as JSON (wsproto may hand one over in parts), skipping
        the version 2 `receipt` frames these version 1 tests are not about."""
        parts: list[str] = []
        while True:
            event = await self.next_event()
            if isinstance(event, TextMessage):
                parts.append(event.data)
                if not event.message_finished:
                    continue
                frame: dict[str, Any] = json.loads("".join(parts))
                parts = []
                if frame.get("type") != "receipt":
                    return frame
            if isinstance(event, CloseConnection):
                raise ConnectionError(f"closed {event.code}")

    async def wait_close(self) -> int:
        """The close code the server sent, or -1 if it dropped the connection without one."""
        while True:
            try:
                event = await self.next_event()
            except (EOFError, trio.BrokenResourceError):
                return -1
            if isinstance(event, CloseConnection):
                return event.code


def _config(tmp_path: Path, **limits: Any) -> Config:
    return parse_config(
        {
            "handler_url": "127.0.0.1:0",
            "storage": {"path": str(tmp_path / "chat.db")},
            "auth": {"jwt_secret": SECRET},
            "limits": {"idle_timeout_s": 30, **limits},
        },
        base_dir=tmp_path,
    )


@pytest.fixture
async def server_port(
    request: pytest.FixtureRequest, tmp_path: Path, nursery: trio.Nursery
) -> AsyncIterator[int]:
    limits = getattr(request, "param", {})
    urls = await nursery.start(serve, _config(tmp_path, **limits))
    yield int(urls[0].rsplit(":", 1)[1])
    while _OPEN_CLIENTS:
        await _OPEN_CLIENTS.pop().aclose()


def _token(user: str) -> str:
    return TokenAuthority(
        parse_config(
            {"handler_url": "127.0.0.1:0", "auth": {"jwt_secret": SECRET}}, base_dir=Path(".")
        ).auth
    ).issue(user)


async def _bound(port: int, user: str, **kwargs: Any) -> RawClient:
    client = await RawClient.connect(port, f"/ws?token={_token(user)}", **kwargs)
    assert (await client.next_json())["type"] == "authenticated"
    return client


async def test_compression_not_negotiated_by_default(server_port: int) -> None:
    with trio.fail_after(5):
        client = await RawClient.connect(server_port, "/ws", deflate=True)
    assert client.accepted is not None
    assert client.accepted.extensions == []


@pytest.mark.parametrize("server_port", [{"compression": True}], indirect=True)
async def test_compression_works_when_enabled(server_port: int) -> None:
    with trio.fail_after(5):
        client = await _bound(server_port, "alice", deflate=True)
        assert client.accepted is not None
        assert [type(e) for e in client.accepted.extensions] == [PerMessageDeflate]
        await client.send_text(json.dumps({"type": "ping", "pad": "x" * 60000}))
        assert (await client.next_json())["type"] == "pong"


def _deflate_frame(*chunks: bytes, repeat: int = 1) -> bytes:
    """One masked, compressed (RSV1) text frame carrying the chunks deflated.

    Chunk by chunk, so a huge inflated size never exists in this process's memory.
    """
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts = [compressor.compress(chunks[0])]
    parts += [compressor.compress(chunks[1]) for _ in range(repeat)]
    parts += [compressor.compress(chunks[2]), compressor.flush(zlib.Z_SYNC_FLUSH)]
    body = b"".join(parts)[:-4]  # permessage-deflate strips the sync-flush tail
    header = bytearray([0x80 | 0x40 | 0x1])  # FIN, RSV1, text
    length = len(body)
    if length < 126:
        header.append(0x80 | length)
    elif length < 65536:
        header.append(0x80 | 126)
        header += length.to_bytes(2, "big")
    else:
        header.append(0x80 | 127)
        header += length.to_bytes(8, "big")
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(body))
    return bytes(header) + mask + masked


@pytest.mark.parametrize("server_port", [{"compression": True}], indirect=True)
async def test_compression_bomb_closes_1009_without_inflating(server_port: int) -> None:
    with trio.fail_after(20):
        client = await _bound(server_port, "alice", deflate=True)
        frame = _deflate_frame(b'{"type":"ping","pad":"', b"A" * 1_000_000, b'"}', repeat=300)
        assert len(frame) < 400_000  # 300 MB inflated from a few hundred KB on the wire
        # The server runs in this process: its peak memory must not grow by the bomb's size.
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with contextlib.suppress(trio.BrokenResourceError):
            await client.send_raw(frame)  # the server may hang up before it is all sent
        code = await client.wait_close()
        assert code in (1009, -1)
        growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
        assert growth_mib < 50, f"peak RSS grew by {growth_mib:.0f} MiB"


@pytest.mark.parametrize("server_port", [{"compression": True}], indirect=True)
async def test_compressed_message_at_the_limit_is_accepted(server_port: int) -> None:
    with trio.fail_after(10):
        client = await _bound(server_port, "alice", deflate=True)
        prefix, suffix = b'{"type":"ping","pad":"', b'"}'
        payload = prefix + b"A" * (65536 - len(prefix) - len(suffix)) + suffix
        assert len(payload) == 65536
        await client.send_raw(_deflate_frame(payload, b"", b""))
        assert (await client.next_json())["type"] == "pong"


async def test_invalid_utf8_closes_1007(server_port: int) -> None:
    with trio.fail_after(5):
        client = await _bound(server_port, "alice")
        payload = b'{"type":"ping","x":"\xff\xfe"}'
        mask = b"\x00\x00\x00\x00"
        await client.send_raw(bytes([0x81, 0x80 | len(payload)]) + mask + payload)
        assert await client.wait_close() == 1007


def _ping_request(request_id: int) -> bytes:
    return json.dumps({"type": "ping", "request_id": request_id}).encode()


async def _pongs(client: RawClient, count: int) -> tuple[list[int], list[bytes]]:
    """The request ids of the next `count` JSON pongs, and the WebSocket pongs among them."""
    ids: list[int] = []
    control: list[bytes] = []
    parts: list[str] = []
    while len(ids) < count:
        event = await client.next_event()
        if isinstance(event, Pong):
            control.append(bytes(event.payload))
        elif isinstance(event, TextMessage):
            parts.append(event.data)
            if event.message_finished:
                frame = json.loads("".join(parts))
                parts = []
                if frame["type"] == "pong":
                    ids.append(frame["request_id"])
        elif isinstance(event, CloseConnection):
            raise ConnectionError(f"closed {event.code}")
    return ids, control


async def test_many_frames_in_one_write_are_all_answered_in_order(server_port: int) -> None:
    """Whole frames of one read reach the session together; a WebSocket ping among them is
    answered, and a fragmented message among them still goes through wsproto, in order."""
    with trio.fail_after(10):
        client = await _bound(server_port, "alice")
        burst = b"".join(masked_frame(0x81, _ping_request(n)) for n in range(1, 31))
        await client.send_raw(burst)
        assert await _pongs(client, 30) == (list(range(1, 31)), [])
        fragmented = _ping_request(102)
        await client.send_raw(
            masked_frame(0x81, _ping_request(100))
            + masked_frame(0x89, b"heartbeat")
            + masked_frame(0x81, _ping_request(101))
            + masked_frame(0x01, fragmented[:5])
            + masked_frame(0x80, fragmented[5:])
            + masked_frame(0x81, _ping_request(103))
        )
        ids, control = await _pongs(client, 4)
        assert ids == [100, 101, 102, 103]
        if not control:  # the ping's pong may come after the replies before it
            event = await client.next_event()
            control = [bytes(event.payload)] if isinstance(event, Pong) else []
        assert control == [b"heartbeat"]
        # After the fragmented message wsproto reads the stream; it goes on working.
        await client.send_raw(masked_frame(0x81, _ping_request(104)))
        assert await _pongs(client, 1) == ([104], [])


async def test_frames_cut_at_every_byte_are_read_whole(server_port: int) -> None:
    with trio.fail_after(10):
        client = await _bound(server_port, "alice")
        burst = b"".join(masked_frame(0x81, _ping_request(n)) for n in range(1, 4))
        for offset in range(len(burst)):
            await client.send_raw(burst[offset : offset + 1])
            await trio.sleep(0.002)  # one read per byte, mostly
        assert await _pongs(client, 3) == ([1, 2, 3], [])


async def test_an_unmasked_frame_behind_good_ones_in_one_read_closes_1002(
    server_port: int,
) -> None:
    """The frames before it are the session's; the bad one is wsproto's to refuse (RFC 6455
    5.1: a server must close on an unmasked frame), and the close goes out at once."""
    with trio.fail_after(5):
        client = await _bound(server_port, "alice")
        unmasked = bytes([0x81, len(_ping_request(2))]) + _ping_request(2)
        await client.send_raw(masked_frame(0x81, _ping_request(1)) + unmasked)
        assert await client.wait_close() == 1002
        other = await _bound(server_port, "bob")
        await other.send_raw(masked_frame(0x81, _ping_request(3)))
        assert await _pongs(other, 1) == ([3], [])


@pytest.mark.parametrize(
    "server_port",
    [{"send_queue": 16, "rate_per_s": 100000, "rate_burst": 100000}],
    indirect=True,
)
async def test_reader_that_stops_reading_is_dropped_and_others_keep_latency(
    server_port: int,
) -> None:
    """A client that never reads fills its queue and is dropped; a reader is unaffected."""
    with trio.fail_after(30):
        sender = await _bound(server_port, "sender")
        await sender.send_text(json.dumps({"type": "create_chat", "recipient_id": "sloth"}))
        chat = (await sender.next_json())["data"][0]["chat_id"]
        await sender.send_text(json.dumps({"type": "create_chat", "recipient_id": "reader"}))
        reader_chat = (await sender.next_json())["data"][0]["chat_id"]

        sloth = await _bound(server_port, "sloth")  # reads its backlog, then nothing more
        reader = await _bound(server_port, "reader")
        big = "x" * 4000
        latencies = []
        for i in range(2500):
            await sender.send_text(
                json.dumps(
                    {
                        "type": "send_message",
                        "chat_id": chat,
                        "recipient_id": "sloth",
                        "content": big,
                        "request_id": i,
                    }
                )
            )
            await sender.next_json()
            if i % 100 == 0:
                started = trio.current_time()
                await sender.send_text(
                    json.dumps(
                        {
                            "type": "send_message",
                            "chat_id": reader_chat,
                            "recipient_id": "reader",
                            "content": f"probe {i}",
                        }
                    )
                )
                while (await reader.next_json()).get("content") != f"probe {i}":
                    pass
                await sender.next_json()
                latencies.append(trio.current_time() - started)
        assert max(latencies) < 1.0, latencies
        # The sloth's socket buffers are full; the server must have let it go.
        code = await sloth.wait_close()
        assert code in (1013, -1)
