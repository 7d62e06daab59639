"""The lean WebSocket framing against wsproto, the reference it stands in for.

`frame_texts` must write exactly wsproto's bytes; `LeanReader` must read exactly wsproto's
messages however the stream is cut into reads, and hand wsproto everything it does not handle
itself, at frame boundaries.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.frame_protocol import FrameProtocol

from handler.transport.lean_frames import Handoff, LeanReader, frame_texts
from tests.support import masked_frame

LIMIT = 4096


def client_frame(opcode_byte: int, payload: bytes, *, masked: bool = True) -> bytes:
    """A client frame: `opcode_byte` is the first byte (FIN, RSV, opcode)."""
    if masked:
        return masked_frame(opcode_byte, payload)
    assert len(payload) < 126
    return bytes((opcode_byte, len(payload))) + payload


def text(value: str) -> bytes:
    return client_frame(0x81, value.encode())


def split_feed(reader: LeanReader, data: bytes, cuts: list[int]) -> list[str | bytes | Handoff]:
    out: list[str | bytes | Handoff] = []
    start = 0
    for cut in [*sorted({min(max(c, 0), len(data)) for c in cuts}), len(data)]:
        out.extend(reader.feed(data[start:cut]))
        start = cut
    return out


@given(st.lists(st.text(max_size=300), max_size=8))
def test_server_frames_are_wsprotos_bytes(texts: list[str]) -> None:
    server = FrameProtocol(client=False, extensions=[])
    expected = b"".join(bytes(server.send_data(t, True)) for t in texts)
    assert frame_texts(texts) == expected


def test_long_server_frames_use_the_extended_lengths() -> None:
    for size in (125, 126, 65535, 65536, 70000):
        payload = "x" * size
        server = FrameProtocol(client=False, extensions=[])
        assert frame_texts([payload]) == bytes(server.send_data(payload, True))


@settings(max_examples=200)
@given(
    st.lists(st.one_of(st.text(max_size=200), st.binary(max_size=200)), max_size=10),
    st.lists(st.integers(min_value=0, max_value=3000), max_size=6),
)
def test_messages_match_wsproto_however_the_reads_are_cut(
    messages: list[str | bytes], cuts: list[int]
) -> None:
    data = b"".join(
        client_frame(0x81, m.encode()) if isinstance(m, str) else client_frame(0x82, m)
        for m in messages
    )
    reader = LeanReader(LIMIT)
    assert split_feed(reader, data, cuts) == messages
    assert reader.active

    reference = Connection(ConnectionType.SERVER)
    reference.receive_data(data)
    seen = [e.data for e in reference.events()]
    assert seen == messages


def test_a_ping_between_messages_is_handed_over_whole_and_reading_goes_on() -> None:
    ping = client_frame(0x89, b"hi")
    reader = LeanReader(LIMIT)
    out = reader.feed(text("a") + ping + text("b"))
    assert out == ["a", Handoff(ping, final=False), "b"]
    assert reader.active


def test_a_ping_cut_in_two_reads_is_handed_over_once_whole() -> None:
    ping = client_frame(0x89, b"payload")
    reader = LeanReader(LIMIT)
    assert reader.feed(ping[:3]) == []
    assert reader.feed(ping[3:] + text("x")) == [Handoff(ping, final=False), "x"]


def test_everything_unusual_goes_to_wsproto_from_that_frame_on() -> None:
    unusual = {
        "close": client_frame(0x88, struct.pack(">H", 1000)),
        "fragment": client_frame(0x01, b"par"),
        "continuation": client_frame(0x80, b"t"),
        "reserved bit": client_frame(0xC1, b"x"),
        "unknown opcode": client_frame(0x83, b"x"),
        "unmasked": client_frame(0x81, b"x", masked=False),
        "oversized": client_frame(0x81, b"x" * (LIMIT + 1)),
        "bad utf-8": client_frame(0x81, b"\xff\xfe"),
        "long ping": client_frame(0x89, b"p" * 126),
    }
    for name, frame in unusual.items():
        reader = LeanReader(LIMIT)
        tail = text("after")
        out = reader.feed(text("before") + frame + tail)
        assert out == ["before", Handoff(frame + tail, final=True)], name
        assert not reader.active, name


def test_an_oversized_frame_is_handed_over_from_its_header_without_waiting_for_it() -> None:
    reader = LeanReader(LIMIT)
    header = client_frame(0x81, b"y" * (LIMIT * 2))[:8]
    assert reader.feed(header) == [Handoff(header, final=True)]


def test_a_message_at_the_limit_is_read_and_one_byte_more_is_not() -> None:
    at_limit = "z" * LIMIT
    reader = LeanReader(LIMIT)
    assert reader.feed(text(at_limit)) == [at_limit]
    # The limit counts bytes: 2,049 two-byte characters are 4,098 bytes.
    wide = text("é" * (LIMIT // 2 + 1))
    assert reader.feed(wide) == [Handoff(wide, final=True)]


def test_a_frame_trickling_in_byte_by_byte_is_read_once_complete() -> None:
    frame = text("slow" * 100)
    reader = LeanReader(LIMIT)
    for byte in frame[:-1]:
        assert reader.feed(bytes((byte,))) == []
    assert reader.feed(frame[-1:]) == ["slow" * 100]
