"""The Redis bus's wire format (`handler.bus.redis_codec`): pure tables, no Redis.

Nodes of one cluster may run different releases during a rolling upgrade, so the bytes are
pinned here, and so is reading what older nodes publish.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from handler.bus import redis_codec
from handler.bus.base import Delivery
from handler.bus.redis_codec import Channels, MalformedPayload, Outgoing
from handler.protocol import Chat, Message

WHEN = "2026-01-01T00:00:00.000Z"
MESSAGE = Message("12", "7", "bob", "alice", "hi", WHEN, "client-1")
CHAT = Chat("7", ("alice", "bob"), "bob", WHEN)


def message_event(message: Message = MESSAGE, previous: str | None = "11") -> Delivery:
    return Delivery(
        "message",
        ("alice", "bob"),
        message=message,
        origin_connection="conn-1",
        origin_request_id="r-1",
        prev_message_id=previous,
    )


# --------------------------------------------------------------------------- events


def test_a_message_event_is_pinned_to_its_bytes() -> None:
    assert redis_codec.encode_event("n1", message_event()) == (
        b'{"o":"n1","m":["12","7","bob","alice","hi","2026-01-01T00:00:00.000Z","client-1","11"]}'
    )


def test_a_chat_event_is_pinned_to_its_bytes() -> None:
    event = Delivery("chat", ("alice", "bob"), chat=CHAT)
    assert redis_codec.encode_event("n1", event) == (
        b'{"o":"n1","c":["7",["alice","bob"],"bob","2026-01-01T00:00:00.000Z"]}'
    )


@pytest.mark.parametrize(
    "event",
    [
        message_event(),
        message_event(previous=None),
        message_event(Message("1", "7", "bob", "alice", "hi", WHEN)),  # no client id
        message_event(
            Message("2", "7", "bob", "ünï 😀", 'a\x00b \ufeff \U0010ffff \r\n "q"', WHEN)
        ),
        Delivery("chat", ("alice", "bob"), chat=CHAT),
    ],
    ids=["message", "first-of-chat", "no-client-id", "odd-text", "chat"],
)
def test_a_remote_copy_is_narrowed_to_the_channels_user(event: Delivery) -> None:
    decoded = redis_codec.decode_event(orjson.loads(redis_codec.encode_event("n1", event)), "bob")
    # Recipients come from the channel; the origin connection stays on the publishing node.
    assert decoded == Delivery(
        event.kind,
        ("bob",),
        message=event.message,
        chat=event.chat,
        prev_message_id=event.prev_message_id,
    )


def test_an_older_nodes_message_without_its_predecessor_decodes() -> None:
    older = {"o": "n0", "m": ["12", "7", "bob", "alice", "hi", WHEN, None]}
    assert redis_codec.decode_event(older, "alice") == Delivery(
        "message", ("alice",), message=Message("12", "7", "bob", "alice", "hi", WHEN)
    )


@pytest.mark.parametrize(
    "payload",
    [{"o": "n1"}, {"o": "n1", "r": 1}, {"o": "n1", "s": "t"}, {"o": "n1", "x": [1]}, {}],
    ids=["heartbeat", "resync-notice", "settle-request", "unknown-kind", "empty"],
)
def test_a_payload_without_an_event_decodes_to_none(payload: dict[str, Any]) -> None:
    assert redis_codec.decode_event(payload, "alice") is None


@pytest.mark.parametrize(
    "payload",
    [
        {"m": ["12", "7", "bob", "alice", "hi", WHEN]},  # cut short: no client id
        {"m": []},
        {"m": None},
        {"m": 12},
        {"m": {"0": "12"}},
        {"c": ["7", ["alice"], "bob", WHEN]},  # one participant
        {"c": ["7", "a", "bob", WHEN]},  # participants not a pair
        {"c": ["7", ["alice", "bob"], "bob"]},  # no creation time
        {"c": ["7", None, "bob", WHEN]},
        {"c": 7},
    ],
    ids=[
        "message-short",
        "message-empty",
        "message-null",
        "message-number",
        "message-object",
        "chat-one-participant",
        "chat-participants-string",
        "chat-short",
        "chat-participants-null",
        "chat-number",
    ],
)
def test_a_malformed_event_raises_one_error(payload: dict[str, Any]) -> None:
    with pytest.raises(MalformedPayload):
        redis_codec.decode_event(payload, "alice")


def test_the_malformed_error_is_a_value_error() -> None:
    # The bus's receive path catches ValueError for a bad payload and goes on with the next.
    assert issubclass(MalformedPayload, ValueError)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=9) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(st.sampled_from(["o", "m", "c", "r", "s", "a"]) | st.text(), json_values))
def test_any_decoded_payload_yields_an_event_none_or_the_one_error(payload: dict[str, Any]) -> None:
    try:
        result = redis_codec.decode_event(payload, "alice")
    except MalformedPayload:
        return
    assert result is None or result.recipients == ("alice",)


@pytest.mark.parametrize(
    "content",
    ["\ud800", "lone \udfff surrogate"],
    ids=["lone-high", "lone-low"],
)
def test_what_json_cannot_carry_raises_an_encode_error(content: str) -> None:
    event = message_event(Message("1", "7", "bob", "alice", content, WHEN))
    with pytest.raises((TypeError, orjson.JSONEncodeError)):
        redis_codec.encode_event("n1", event)


# --------------------------------------------------------------------------- control payloads


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (redis_codec.resync_notice("n1"), b'{"o":"n1","r":1}'),
        (redis_codec.settle_request("n1", "t1"), b'{"o":"n1","s":"t1"}'),
        (redis_codec.settle_answer("n1", "t1"), b'{"o":"n1","a":"t1"}'),
        (redis_codec.heartbeat("n1"), b'{"o":"n1"}'),
    ],
    ids=["resync-notice", "settle-request", "settle-answer", "heartbeat"],
)
def test_control_payloads_are_pinned_to_their_bytes(payload: bytes, expected: bytes) -> None:
    assert payload == expected


# --------------------------------------------------------------------------- channels


@pytest.mark.parametrize(
    ("channel", "expected"),
    [
        (Channels("chat:").user("alice"), b"chat:u:alice"),
        (Channels("chat:").user("ü \ud800"), "chat:u:ü \ud800".encode("utf-8", "surrogatepass")),
        (Channels("chat:").node("0123abcd"), b"chat:n:0123abcd"),
        (Channels("chat:").all, b"chat:all"),
        (Channels("t-1:").user("alice"), b"t-1:u:alice"),
    ],
    ids=["user", "user-odd-text", "node", "all", "other-prefix"],
)
def test_channel_names(channel: bytes, expected: bytes) -> None:
    assert channel == expected


@pytest.mark.parametrize(
    ("channel", "user"),
    [
        (b"chat:u:alice", "alice"),
        (b"chat:u:", ""),
        ("chat:u:ü \ud800".encode("utf-8", "surrogatepass"), "ü \ud800"),
        (b"chat:n:alice", None),
        (b"chat:all", None),
        (b"other:u:alice", None),
    ],
    ids=["user", "empty-user", "odd-text", "node", "all", "other-prefix"],
)
def test_the_user_of_a_channel(channel: bytes, user: str | None) -> None:
    assert Channels("chat:").user_of(channel) == user


def test_users_of_keeps_user_channels_in_order() -> None:
    channels = Channels("chat:")
    outgoing = Outgoing(
        (channels.user("bob"), channels.node("n1"), channels.all, channels.user("alice")), b"{}"
    )
    assert channels.users_of(outgoing.channels) == ["bob", "alice"]
