"""The pure protocol core: decoding, validation and encoding tables, and decoder properties.

Every rule of PROTOCOL.md that a single frame can break is a row here; the end-to-end suites
check that the server applies the same rules on the wire.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handler import protocol
from handler.errors import ErrorCode, ProtocolError
from handler.protocol import (
    AddMembers,
    AllChats,
    AllMessages,
    Authenticated,
    BlockedFrame,
    BlockUser,
    Chat,
    ChatUpdated,
    ChatView,
    CreateChat,
    CreateGroup,
    DeleteMessage,
    EditMessage,
    ErrorFrame,
    FetchBlocked,
    FetchChats,
    FetchMessages,
    FetchPresence,
    GroupChange,
    Limits,
    MarkRead,
    Message,
    MessageEvent,
    MessageUpdated,
    NewChats,
    NewMessages,
    Ping,
    Pong,
    PresenceEntry,
    PresenceFrame,
    ReceiptFrame,
    RemoveMember,
    SendMessage,
    Typing,
    TypingEvent,
    UnblockUser,
    UpdatedMessages,
    decode,
    encode,
)

EMOJI = "\U0001f600"  # astral: 1 code point, 2 UTF-16 units, 4 UTF-8 bytes
E_ACUTE = "\u00e9"  # 2 UTF-8 bytes


def dumps(obj: Any, *, ascii_only: bool = True) -> str:
    return json.dumps(obj, ensure_ascii=ascii_only)


def error_of(frame: Any, limits: Limits = protocol.DEFAULT_LIMITS) -> ProtocolError:
    """The error `decode` raises for `frame` (a dict is serialized first)."""
    # decode() is annotated `str | bytes` but must refuse any binary buffer at run time.
    text: Any = frame if isinstance(frame, str | bytes | bytearray | memoryview) else dumps(frame)
    with pytest.raises(ProtocolError) as info:
        decode(text, limits)
    return info.value


def send(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "send_message",
        "chat_id": "1",
        "recipient_id": "bob",
        "content": "hi",
    }
    base.update(fields)
    return {key: value for key, value in base.items() if value is not _MISSING}


_MISSING: Any = object()

# The frames of version 2 that name a message of a chat, with valid fields.
MARK_READ: dict[str, Any] = {"type": "mark_read", "chat_id": "1", "message_id": "5"}
EDIT: dict[str, Any] = {"type": "edit_message", "chat_id": "1", "message_id": "5", "content": "hi"}
DELETE: dict[str, Any] = {"type": "delete_message", "chat_id": "1", "message_id": "5"}


def with_fields(base: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """`base` with `fields` set (`_MISSING`: removed)."""
    frame = {**base, **fields}
    return {key: value for key, value in frame.items() if value is not _MISSING}


# --------------------------------------------------------------------------- bad_json


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("not json", id="garbage"),
        pytest.param('{"type": "ping"', id="truncated"),
        pytest.param("{'type': 'ping'}", id="single-quotes"),
        pytest.param('{"type": "ping",}', id="trailing-comma"),
        pytest.param('[{"type": "ping"}]', id="array"),
        pytest.param('"ping"', id="string"),
        pytest.param("42", id="number"),
        pytest.param("null", id="null"),
        pytest.param("true", id="true"),
        pytest.param('{"type": "ping", "x": NaN}', id="nan"),
        pytest.param('{"type": "ping", "x": Infinity}', id="infinity"),
        pytest.param('{"type": "ping", "x": -Infinity}', id="minus-infinity"),
        pytest.param('{"type": "ping"} {"type": "ping"}', id="two-objects"),
        pytest.param("\ufeff{}", id="bom"),
        pytest.param("\ud800", id="only-a-lone-surrogate"),
        pytest.param('{"type": "ping", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", id="deep"),
        pytest.param("[" * 100_000, id="deep-unclosed"),
        pytest.param('{"type": "ping", "x": ' + "9" * 5000 + "}", id="5000-digit-int"),
    ],
)
def test_not_a_json_object_is_bad_json(text: str) -> None:
    error = error_of(text)
    assert error.code == ErrorCode.BAD_JSON
    assert error.request_id is None
    assert error.message


@pytest.mark.parametrize(
    "payload",
    [b'{"type": "ping"}', bytearray(b'{"type": "ping"}'), memoryview(b'{"type":"ping"}'), b""],
    ids=["bytes", "bytearray", "memoryview", "empty"],
)
def test_binary_is_bad_json_even_when_it_is_json(payload: bytes) -> None:
    assert error_of(payload).code == ErrorCode.BAD_JSON


def test_moderately_deep_extra_field_is_fine_or_bad_json() -> None:
    """Nesting within the parser's depth is an ignored extra field; deeper is bad_json."""
    assert decode('{"type":"ping","x":' + "[" * 100 + "]" * 100 + "}") == Ping()
    assert error_of('{"type":"ping","x":' + "[" * 3000 + "]" * 3000 + "}").code == "bad_json"


# --------------------------------------------------------------------------- type


@pytest.mark.parametrize(
    "frame",
    [
        {},
        {"request_id": "r"},
        {"type": None},
        {"type": 1},
        {"type": ["ping"]},
        {"type": {"name": "ping"}},
        {"type": True},
        {"type": ""},
        {"type": "PING"},
        {"type": " ping"},
        {"type": "pong"},
        {"type": "message"},
        {"type": "authenticated"},
        {"type": "error"},
        {"type": "all_chats"},
        {"type": "delete_chat"},
    ],
    ids=repr,
)
def test_missing_or_unknown_type(frame: dict[str, Any]) -> None:
    error = error_of(frame)
    assert error.code == ErrorCode.UNKNOWN_TYPE
    assert error.request_id == frame.get("request_id")


def test_client_frame_types() -> None:
    assert protocol.CLIENT_FRAME_TYPES == (
        "add_members",
        "block_user",
        "create_chat",
        "create_group",
        "delete_message",
        "edit_message",
        "fetch_blocked",
        "fetch_chats",
        "fetch_messages",
        "fetch_presence",
        "mark_read",
        "ping",
        "remove_member",
        "send_message",
        "typing",
        "unblock_user",
    )


# --------------------------------------------------------------------------- request_id


@pytest.mark.parametrize(
    "request_id",
    [
        "r",
        "x" * 64,
        EMOJI * 64,
        E_ACUTE * 64,
        " spaces are fine ",
        "\u0000",
        0,
        -1,
        7,
        2**63 - 1,
        -(2**63 - 1),
    ],
    ids=[
        "one-char",
        "64-ascii",
        "64-astral",
        "64-two-byte",
        "spaces",
        "nul",
        "0",
        "-1",
        "7",
        "int64-max",
        "int64-min+1",
    ],
)
def test_valid_request_id_is_kept(request_id: str | int) -> None:
    frame = decode(dumps({"type": "ping", "request_id": request_id}))
    assert frame == Ping(request_id=request_id)
    assert type(frame.request_id) is type(request_id)


def test_null_request_id_is_absent() -> None:
    assert decode('{"type": "ping", "request_id": null}') == Ping()


@pytest.mark.parametrize(
    "raw",
    [
        '""',
        '"' + "x" * 65 + '"',
        '"' + EMOJI * 65 + '"',
        "true",
        "false",
        "1.5",
        "1.0",
        "[]",
        '["r"]',
        "{}",
        '"\\ud800"',
        str(2**63),
        str(-(2**63)),
        str(2**64),
        "1" + "0" * 30,
    ],
    ids=[
        "empty",
        "65-ascii",
        "65-astral",
        "true",
        "false",
        "float",
        "float-integral",
        "list",
        "list-of-str",
        "object",
        "lone-surrogate",
        "2**63",
        "-2**63",
        "2**64",
        "1e30-int",
    ],
)
def test_invalid_request_id_is_bad_request(raw: str) -> None:
    error = error_of('{"type": "ping", "request_id": ' + raw + "}")
    assert (error.code, error.field, error.request_id) == ("bad_request", "request_id", None)


def test_request_id_is_read_before_type_so_every_error_quotes_it() -> None:
    assert error_of({"request_id": "q"}).request_id == "q"
    assert error_of({"type": "nope", "request_id": 5}).request_id == 5
    error = error_of(send(content="", request_id="abc"))
    assert (error.code, error.field, error.request_id) == ("bad_request", "content", "abc")
    error = error_of({"type": "ping", "token": 5, "request_id": "t"})
    assert (error.field, error.request_id) == ("token", "t")


# --------------------------------------------------------------------------- token


@pytest.mark.parametrize("frame_type", protocol.CLIENT_FRAME_TYPES)
def test_every_frame_type_carries_a_token(frame_type: str) -> None:
    frame: dict[str, Any] = {
        "type": frame_type,
        "recipient_id": "bob",
        "chat_id": "1",
        "message_id": "5",
        "content": "x",
        "title": "t",
        "member_ids": ["carol"],
        "user_id": "carol",
        "token": "a.b.c",
    }
    assert decode(dumps(frame)).token == "a.b.c"


@pytest.mark.parametrize(
    "token",
    [5, True, ["a"], {"a": 1}, "", "t" * (protocol.MAX_TOKEN_CHARS + 1)],
    ids=["int", "bool", "list", "object", "empty", "too-long"],
)
def test_malformed_token_field_is_bad_request(token: Any) -> None:
    error = error_of({"type": "ping", "token": token})
    assert (error.code, error.field) == ("bad_request", "token")


def test_null_token_is_absent() -> None:
    assert decode('{"type": "ping", "token": null}') == Ping()


# --------------------------------------------------------------------------- create_chat


def test_create_chat() -> None:
    assert decode(dumps({"type": "create_chat", "recipient_id": "bob"})) == CreateChat("bob")
    assert decode(
        dumps({"type": "create_chat", "recipient_id": "bob", "token": "t", "request_id": 3})
    ) == CreateChat("bob", token="t", request_id=3)


VALID_USER_IDS = [
    "b",
    "bob",
    "x" * 128,
    EMOJI * 128,
    E_ACUTE * 128,
    "bob smith",
    "bob\u00a0smith",
    "\u0411\u043e\u0431",
    "bob@example.com",
]

INVALID_USER_IDS = [
    "",
    "x" * 129,
    EMOJI * 129,
    " bob",
    "bob ",
    "\tbob",
    "bob\n",
    "\u00a0bob",
    "bob\u3000",
    "bo\u0000b",
    "bo\u001fb",
    "bo\u007fb",
    "bo\u0085b",
    "bo\u009fb",
    "bo\ud800b",
    " ",
    # Format and separator characters: one user could pose as another with them.
    "bob\u200b",  # zero-width space (Cf)
    "\u202ebob",  # right-to-left override (Cf)
    "bo\u2028b",  # line separator (Zl)
    "bo\u2029b",  # paragraph separator (Zp)
    "bob\ufeff",  # zero-width no-break space (Cf)
]


@pytest.mark.parametrize("user_id", VALID_USER_IDS, ids=repr)
def test_valid_recipient_id(user_id: str) -> None:
    for ascii_only in (True, False):
        text = dumps({"type": "create_chat", "recipient_id": user_id}, ascii_only=ascii_only)
        assert decode(text) == CreateChat(user_id)


@pytest.mark.parametrize("user_id", INVALID_USER_IDS, ids=repr)
def test_invalid_recipient_id(user_id: str) -> None:
    for frame in ({"type": "create_chat", "recipient_id": user_id}, send(recipient_id=user_id)):
        error = error_of(frame)
        assert (error.code, error.field) == ("bad_request", "recipient_id")


@pytest.mark.parametrize("value", [_MISSING, None, 5, True, ["bob"], {"id": "bob"}])
def test_recipient_id_missing_or_wrong_type(value: Any) -> None:
    frame = (
        {"type": "create_chat"}
        if value is _MISSING
        else {
            "type": "create_chat",
            "recipient_id": value,
        }
    )
    error = error_of(frame)
    assert (error.code, error.field) == ("bad_request", "recipient_id")


@pytest.mark.parametrize("user_id", VALID_USER_IDS + INVALID_USER_IDS, ids=repr)
def test_validate_user_id_agrees_with_the_decoder(user_id: str) -> None:
    if user_id in VALID_USER_IDS:
        assert protocol.validate_user_id(user_id, "sub") == user_id
    else:
        with pytest.raises(ProtocolError) as info:
            protocol.validate_user_id(user_id, "sub")
        assert (info.value.code, info.value.field) == ("bad_request", "sub")


# --------------------------------------------------------------------------- send_message


def test_send_message() -> None:
    assert decode(dumps(send())) == SendMessage("1", "bob", "hi")
    assert decode(
        dumps(send(client_message_id="c1", request_id="r", token="t", extra={"x": 1}))
    ) == SendMessage("1", "bob", "hi", client_message_id="c1", token="t", request_id="r")


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("chat_id", _MISSING, "bad_request"),
        ("chat_id", None, "bad_request"),
        ("chat_id", "", "bad_request"),
        ("chat_id", 1, "bad_request"),
        ("chat_id", ["1"], "bad_request"),
        ("chat_id", "c" * 129, "bad_request"),
        ("chat_id", "\ud800", "bad_request"),
        # Missing or null: decodes (a group message has none); the machine refuses it in a
        # direct chat (test_session_machine: test_send_message_recipient_id_follows_the_kind).
        ("recipient_id", "", "bad_request"),
        ("recipient_id", 7, "bad_request"),
        ("recipient_id", ["bob"], "bad_request"),
        ("recipient_id", " bob", "bad_request"),
        ("content", _MISSING, "bad_request"),
        ("content", None, "bad_request"),
        ("content", "", "bad_request"),
        ("content", 5, "bad_request"),
        ("content", ["hi"], "bad_request"),
        ("content", {"text": "hi"}, "bad_request"),
        ("content", True, "bad_request"),
        ("content", "\ud800", "bad_request"),
        ("content", "ok \udfff ok", "bad_request"),
        ("content", "x" * 4097, "too_large"),
        ("content", EMOJI * 4097, "too_large"),
        ("content", E_ACUTE * 4097, "too_large"),
        ("client_message_id", "", "bad_request"),
        ("client_message_id", 5, "bad_request"),
        ("client_message_id", ["c"], "bad_request"),
        ("client_message_id", "c" * 129, "bad_request"),
        ("client_message_id", "\ud800", "bad_request"),
    ],
    ids=lambda value: repr(value)[:20],
)
def test_send_message_field_rules(field: str, value: Any, code: str) -> None:
    error = error_of(send(**{field: value}, request_id="rq"))
    assert (error.code, error.field, error.request_id) == (code, field, "rq")


@pytest.mark.parametrize(
    "content",
    [
        "x",
        " ",
        "\u0000",
        "\u0000" * 4096,
        "x" * 4096,
        EMOJI * 4096,
        E_ACUTE * 4096,
        "\u20ac" * 4096,  # 3 UTF-8 bytes each
        "a" + EMOJI * 4095,
        "line\nbreak\ttab\r\n",
        "\ufeffbom",
        "\U0010ffff",
        "e\u0301",  # combining: 2 code points, 1 grapheme
        "\U0001f468\u200d\U0001f469\u200d\U0001f467",  # ZWJ family: 5 code points
    ],
    ids=lambda c: f"{len(c)}:{c[:3]!r}",
)
def test_content_limits_count_code_points(content: str) -> None:
    for ascii_only in (True, False):  # \ud83d\ude00 escapes and raw characters alike
        frame = decode(dumps(send(content=content), ascii_only=ascii_only))
        assert isinstance(frame, SendMessage)
        assert frame.content == content


def test_content_boundary_follows_the_configured_limit() -> None:
    limits = Limits(max_message_chars=10)
    assert decode(dumps(send(content=EMOJI * 10)), limits) == SendMessage("1", "bob", EMOJI * 10)
    error = error_of(send(content=EMOJI * 11), limits)
    assert (error.code, error.field) == ("too_large", "content")


def test_chat_id_is_opaque_up_to_128_characters() -> None:
    for chat_id in ("0", "abc", "c" * 128, EMOJI * 128, " padded "):
        frame = decode(dumps(send(chat_id=chat_id)))
        assert isinstance(frame, SendMessage)
        assert frame.chat_id == chat_id


def test_fields_are_validated_in_declaration_order() -> None:
    assert error_of({"type": "send_message"}).field == "chat_id"
    # recipient_id may be absent, but a present one is checked before content.
    assert error_of({"type": "send_message", "chat_id": "1", "recipient_id": 5}).field == (
        "recipient_id"
    )
    assert error_of({"type": "send_message", "chat_id": "1"}).field == "content"
    error = error_of({"type": "send_message", "chat_id": "1", "recipient_id": "b"})
    assert error.field == "content"


@pytest.mark.parametrize("absent", [_MISSING, None], ids=["missing", "null"])
def test_send_message_without_recipient_id_decodes(absent: Any) -> None:
    """A group message has no recipient_id; whether the chat needs one is decided once it is
    known (the machine refuses a direct chat's message without one)."""
    assert decode(dumps(send(recipient_id=absent))) == SendMessage("1", None, "hi")
    assert decode(
        dumps(send(recipient_id=absent, client_message_id="c", token="t", request_id=2))
    ) == SendMessage("1", None, "hi", "c", token="t", request_id=2)


# --------------------------------------------------------------------------- fetch_chats


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        (_MISSING, 1000),
        (None, 1000),
        (0, 0),  # version 2: the chat list alone
        (1, 1),
        (999, 999),
        (1000, 1000),
        (1001, 1000),
        (10**9, 1000),
        (2**63 - 1, 1000),
    ],
)
def test_fetch_chats_limit_is_capped_at_the_history_limit(limit: Any, expected: int) -> None:
    frame: dict[str, Any] = {"type": "fetch_chats"}
    if limit is not _MISSING:
        frame["limit"] = limit
    assert decode(dumps(frame)) == FetchChats(limit=expected)


def test_fetch_chats_limit_beyond_64_bits_is_still_an_integer() -> None:
    assert decode(dumps({"type": "fetch_chats", "limit": 2**64})) == FetchChats(limit=1000)


def test_fetch_chats_limit_follows_the_configured_history_limit() -> None:
    limits = Limits(history_limit=5)
    assert decode('{"type": "fetch_chats"}', limits) == FetchChats(limit=5)
    assert decode('{"type": "fetch_chats", "limit": 50}', limits) == FetchChats(limit=5)
    assert decode('{"type": "fetch_chats", "limit": 3}', limits) == FetchChats(limit=3)
    assert decode('{"type": "fetch_chats", "limit": 0}', limits) == FetchChats(limit=0)


def test_fetch_chats_limit_0_asks_for_the_chat_list_alone() -> None:
    assert decode(dumps({"type": "fetch_chats", "limit": 0, "request_id": "z"})) == FetchChats(
        limit=0, request_id="z"
    )
    # Not a float, not a boolean: only the integer 0.
    for zero in (0.0, False, "0", -0.0):
        error = error_of({"type": "fetch_chats", "limit": zero})
        assert (error.code, error.field) == ("bad_request", "limit")


BAD_LIMITS = [-1, -(2**63), -(2**64), 1.0, 2.5, "10", True, False, [], {}]


@pytest.mark.parametrize("limit", BAD_LIMITS, ids=repr)
def test_fetch_chats_bad_limit(limit: Any) -> None:
    error = error_of({"type": "fetch_chats", "limit": limit, "request_id": 1})
    assert (error.code, error.field, error.request_id) == ("bad_request", "limit", 1)


def test_fetch_chats_negative_limit_names_the_bound() -> None:
    assert ">= 0" in error_of({"type": "fetch_chats", "limit": -1}).message


# --------------------------------------------------------------------------- fetch_messages


def test_fetch_messages() -> None:
    assert decode('{"type": "fetch_messages", "chat_id": "7"}') == FetchMessages("7", limit=100)
    assert decode(
        dumps({"type": "fetch_messages", "chat_id": "7", "before": "42", "limit": 1000})
    ) == FetchMessages("7", before="42", limit=1000)
    assert decode(
        dumps({"type": "fetch_messages", "chat_id": "7", "before": None, "limit": 1})
    ) == FetchMessages("7", limit=1)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("chat_id", _MISSING),
        ("chat_id", None),
        ("chat_id", ""),
        ("chat_id", 7),
        ("before", ""),
        ("before", 42),
        ("before", ["42"]),
        ("before", "b" * 129),
        ("limit", 0),
        ("limit", 1001),
        ("limit", 2**63 - 1),
        ("limit", -5),
        ("limit", 10.0),
        ("limit", "10"),
        ("limit", True),
    ],
    ids=repr,
)
def test_fetch_messages_field_rules(field: str, value: Any) -> None:
    frame: dict[str, Any] = {"type": "fetch_messages", "chat_id": "7", "request_id": "f"}
    if value is _MISSING:
        del frame[field]
    else:
        frame[field] = value
    error = error_of(frame)
    assert (error.code, error.field, error.request_id) == ("bad_request", field, "f")


# --------------------------------------------------------------------------- mark_read, edits


def test_mark_read() -> None:
    assert decode(dumps(MARK_READ)) == MarkRead("1", "5")
    assert decode(
        dumps(with_fields(MARK_READ, token="t", request_id=8, content="ignored", seq=3))
    ) == MarkRead("1", "5", token="t", request_id=8)


def test_edit_message() -> None:
    assert decode(dumps(EDIT)) == EditMessage("1", "5", "hi")
    assert decode(
        dumps(with_fields(EDIT, token="t", request_id="e", recipient_id=5, deleted=True))
    ) == EditMessage("1", "5", "hi", token="t", request_id="e")


def test_delete_message() -> None:
    assert decode(dumps(DELETE)) == DeleteMessage("1", "5")
    assert decode(dumps(with_fields(DELETE, token="t", request_id=0, content=""))) == DeleteMessage(
        "1", "5", token="t", request_id=0
    )


BAD_IDS = [
    pytest.param(_MISSING, id="missing"),
    pytest.param(None, id="null"),
    pytest.param("", id="empty"),
    pytest.param(5, id="int"),
    pytest.param(True, id="bool"),
    pytest.param(["5"], id="list"),
    pytest.param({"id": "5"}, id="object"),
    pytest.param("i" * 129, id="129-chars"),
    pytest.param(EMOJI * 129, id="129-astral"),
    pytest.param("\ud800", id="lone-surrogate"),
    pytest.param("ok \udfff", id="lone-low-surrogate"),
]


@pytest.mark.parametrize("value", BAD_IDS)
@pytest.mark.parametrize("field", ["chat_id", "message_id"])
@pytest.mark.parametrize("base", [MARK_READ, EDIT, DELETE], ids=["mark_read", "edit", "delete"])
def test_version_2_id_field_rules(base: dict[str, Any], field: str, value: Any) -> None:
    error = error_of(with_fields(base, **{field: value}, request_id="v2"))
    assert (error.code, error.field, error.request_id) == ("bad_request", field, "v2")


@pytest.mark.parametrize("base", [MARK_READ, EDIT, DELETE], ids=["mark_read", "edit", "delete"])
def test_version_2_ids_are_opaque_up_to_128_characters(base: dict[str, Any]) -> None:
    for value in ("0", "abc", "i" * 128, EMOJI * 128, " padded "):
        frame = decode(dumps(with_fields(base, chat_id=value, message_id=value)))
        assert isinstance(frame, MarkRead | EditMessage | DeleteMessage)
        assert (frame.chat_id, frame.message_id) == (value, value)


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (_MISSING, "bad_request"),
        (None, "bad_request"),
        ("", "bad_request"),
        (5, "bad_request"),
        (["hi"], "bad_request"),
        ({"text": "hi"}, "bad_request"),
        (True, "bad_request"),
        ("\ud800", "bad_request"),
        ("ok \udfff ok", "bad_request"),
        ("x" * 4097, "too_large"),
        (EMOJI * 4097, "too_large"),
        (E_ACUTE * 4097, "too_large"),
    ],
    ids=lambda value: repr(value)[:20],
)
def test_edit_message_content_rules_are_send_messages(value: Any, code: str) -> None:
    error = error_of(with_fields(EDIT, content=value, request_id="c"))
    assert (error.code, error.field, error.request_id) == (code, "content", "c")
    # The same answer as send_message gives for the same content.
    same = error_of(send(content=value, request_id="c"))
    assert (same.code, same.field) == (error.code, error.field)


@pytest.mark.parametrize(
    "content",
    ["x", " ", "\u0000" * 4096, EMOJI * 4096, E_ACUTE * 4096, "a" + EMOJI * 4095, "\ufeffbom"],
    ids=lambda c: f"{len(c)}:{c[:3]!r}",
)
def test_edit_message_content_counts_code_points(content: str) -> None:
    for ascii_only in (True, False):
        frame = decode(dumps(with_fields(EDIT, content=content), ascii_only=ascii_only))
        assert frame == EditMessage("1", "5", content)


def test_edit_message_content_follows_the_configured_limit() -> None:
    limits = Limits(max_message_chars=10)
    assert decode(dumps(with_fields(EDIT, content=EMOJI * 10)), limits) == EditMessage(
        "1", "5", EMOJI * 10
    )
    error = error_of(with_fields(EDIT, content=EMOJI * 11), limits)
    assert (error.code, error.field) == ("too_large", "content")


@pytest.mark.parametrize(
    ("frame", "field"),
    [
        ({"type": "mark_read"}, "chat_id"),
        ({"type": "mark_read", "chat_id": "1"}, "message_id"),
        ({"type": "edit_message"}, "chat_id"),
        ({"type": "edit_message", "chat_id": "1"}, "message_id"),
        ({"type": "edit_message", "chat_id": "1", "message_id": "5"}, "content"),
        ({"type": "edit_message", "chat_id": "1", "content": "x" * 5000}, "message_id"),
        ({"type": "delete_message"}, "chat_id"),
        ({"type": "delete_message", "chat_id": "1"}, "message_id"),
        ({"type": "delete_message", "chat_id": 1, "message_id": 5}, "chat_id"),
    ],
    ids=repr,
)
def test_version_2_fields_are_validated_in_declaration_order(
    frame: dict[str, Any], field: str
) -> None:
    error = error_of(frame)
    assert (error.code, error.field) == ("bad_request", field)


# --------------------------------------------------------------------------- groups

CREATE_GROUP: dict[str, Any] = {"type": "create_group", "title": "Team", "member_ids": ["bob"]}
ADD_MEMBERS: dict[str, Any] = {"type": "add_members", "chat_id": "1", "member_ids": ["bob"]}
REMOVE_MEMBER: dict[str, Any] = {"type": "remove_member", "chat_id": "1", "user_id": "bob"}
MEMBER_FRAMES = [
    pytest.param(CREATE_GROUP, id="create_group"),
    pytest.param(ADD_MEMBERS, id="add_members"),
]
SMALL = Limits(max_group_members=4)  # the creator and at most 3 others


def test_create_group() -> None:
    assert decode(dumps(CREATE_GROUP)) == CreateGroup("Team", ("bob",))
    assert decode(
        dumps(
            with_fields(
                CREATE_GROUP,
                member_ids=["carol", "bob", EMOJI],
                token="t",
                request_id=4,
                recipient_id=5,
                extra=[1],
            )
        )
    ) == CreateGroup("Team", ("carol", "bob", EMOJI), token="t", request_id=4)


def test_add_members() -> None:
    assert decode(dumps(ADD_MEMBERS)) == AddMembers("1", ("bob",))
    assert decode(
        dumps(with_fields(ADD_MEMBERS, member_ids=["dave", "carol"], token="t", request_id="a"))
    ) == AddMembers("1", ("dave", "carol"), token="t", request_id="a")


def test_remove_member() -> None:
    assert decode(dumps(REMOVE_MEMBER)) == RemoveMember("1", "bob")
    assert decode(
        dumps(with_fields(REMOVE_MEMBER, token="t", request_id=0, member_ids=5))
    ) == RemoveMember("1", "bob", token="t", request_id=0)


@pytest.mark.parametrize(
    "title",
    ["T", " ", "t" * 128, EMOJI * 128, E_ACUTE * 128, "\u0000", "line\nbreak", "\u202eTeam"],
    ids=lambda t: f"{len(t)}:{t[:3]!r}",
)
def test_a_title_is_1_to_128_code_points_of_any_unicode(title: str) -> None:
    for ascii_only in (True, False):
        text = dumps(with_fields(CREATE_GROUP, title=title), ascii_only=ascii_only)
        assert decode(text) == CreateGroup(title, ("bob",))


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(_MISSING, id="missing"),
        pytest.param(None, id="null"),
        pytest.param("", id="empty"),
        pytest.param("t" * 129, id="129-chars"),
        pytest.param(EMOJI * 129, id="129-astral"),
        pytest.param(5, id="int"),
        pytest.param(True, id="bool"),
        pytest.param(["Team"], id="list"),
        pytest.param({"text": "Team"}, id="object"),
        pytest.param("\ud800", id="lone-surrogate"),
        pytest.param("Team \udfff", id="lone-low-surrogate"),
    ],
)
def test_create_group_title_rules(value: Any) -> None:
    error = error_of(with_fields(CREATE_GROUP, title=value, request_id="g"))
    assert (error.code, error.field, error.request_id) == ("bad_request", "title", "g")


BAD_MEMBER_IDS = [
    pytest.param(_MISSING, id="missing"),
    pytest.param(None, id="null"),
    pytest.param("bob", id="a-string"),
    pytest.param({"0": "bob"}, id="object"),
    pytest.param(5, id="int"),
    pytest.param(True, id="bool"),
    pytest.param([], id="empty"),
    pytest.param(["bob", "carol", "dave", "erin"], id="too-many"),  # with SMALL
    pytest.param(["b" + str(n) for n in range(300)], id="far-too-many"),
    pytest.param([5], id="int-member"),
    pytest.param(["bob", None], id="null-member"),
    pytest.param(["bob", ["carol"]], id="list-member"),
    pytest.param(["bob", {"id": "carol"}], id="object-member"),
    pytest.param(["bob", "bob"], id="duplicate"),
    pytest.param(["bob", "carol", "bob"], id="duplicate-apart"),
    *(pytest.param(["bob", user], id=f"invalid-{user!r}") for user in INVALID_USER_IDS),
]


@pytest.mark.parametrize("value", BAD_MEMBER_IDS)
@pytest.mark.parametrize("base", MEMBER_FRAMES)
def test_member_ids_rules(base: dict[str, Any], value: Any) -> None:
    error = error_of(with_fields(base, member_ids=value, request_id="m"), SMALL)
    assert (error.code, error.field, error.request_id) == ("bad_request", "member_ids", "m")
    assert error.message


@pytest.mark.parametrize("base", MEMBER_FRAMES)
def test_member_ids_follow_the_configured_group_size(base: dict[str, Any]) -> None:
    """At most max_group_members - 1 others: the requester makes the group one larger."""
    most = ["bob", "carol", "dave"]
    frame = decode(dumps(with_fields(base, member_ids=most)), SMALL)
    assert isinstance(frame, CreateGroup | AddMembers)
    assert frame.member_ids == tuple(most)
    error = error_of(with_fields(base, member_ids=[*most, "erin"]), SMALL)
    assert (error.code, error.field) == ("bad_request", "member_ids")
    assert "4" in error.message  # names the limit
    # The default: 256 members, the creator included.
    members = [f"user {n}" for n in range(protocol.MAX_GROUP_MEMBERS)]
    assert protocol.MAX_GROUP_MEMBERS == 256
    frame = decode(dumps(with_fields(base, member_ids=members[:255])))
    assert isinstance(frame, CreateGroup | AddMembers)
    assert frame.member_ids == tuple(members[:255])
    error = error_of(with_fields(base, member_ids=members))
    assert (error.code, error.field) == ("bad_request", "member_ids")


@pytest.mark.parametrize("base", MEMBER_FRAMES)
def test_member_ids_keep_valid_user_ids_and_their_order(base: dict[str, Any]) -> None:
    valid = VALID_USER_IDS[:5]
    for ascii_only in (True, False):
        text = dumps(with_fields(base, member_ids=valid), ascii_only=ascii_only)
        frame = decode(text)
        assert isinstance(frame, CreateGroup | AddMembers)
        assert frame.member_ids == tuple(valid)


@pytest.mark.parametrize("value", BAD_IDS)
@pytest.mark.parametrize("base", [ADD_MEMBERS, REMOVE_MEMBER], ids=["add_members", "remove_member"])
def test_group_frames_chat_id_rules(base: dict[str, Any], value: Any) -> None:
    error = error_of(with_fields(base, chat_id=value, request_id=7))
    assert (error.code, error.field, error.request_id) == ("bad_request", "chat_id", 7)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(_MISSING, id="missing"),
        pytest.param(None, id="null"),
        pytest.param(5, id="int"),
        pytest.param(["bob"], id="list"),
        pytest.param({"id": "bob"}, id="object"),
        *(pytest.param(user, id=f"invalid-{user!r}") for user in INVALID_USER_IDS),
    ],
)
def test_remove_member_user_id_rules(value: Any) -> None:
    error = error_of(with_fields(REMOVE_MEMBER, user_id=value, request_id="u"))
    assert (error.code, error.field, error.request_id) == ("bad_request", "user_id", "u")


@pytest.mark.parametrize("user_id", VALID_USER_IDS, ids=repr)
def test_remove_member_takes_any_valid_user_id(user_id: str) -> None:
    assert decode(dumps(with_fields(REMOVE_MEMBER, user_id=user_id))) == RemoveMember("1", user_id)


@pytest.mark.parametrize(
    ("frame", "field"),
    [
        ({"type": "create_group"}, "title"),
        ({"type": "create_group", "member_ids": []}, "title"),
        ({"type": "create_group", "title": "T"}, "member_ids"),
        ({"type": "add_members"}, "chat_id"),
        ({"type": "add_members", "member_ids": 5}, "chat_id"),
        ({"type": "add_members", "chat_id": "1"}, "member_ids"),
        ({"type": "remove_member"}, "chat_id"),
        ({"type": "remove_member", "user_id": ""}, "chat_id"),
        ({"type": "remove_member", "chat_id": "1"}, "user_id"),
    ],
    ids=repr,
)
def test_group_fields_are_validated_in_declaration_order(frame: dict[str, Any], field: str) -> None:
    error = error_of(frame)
    assert (error.code, error.field) == ("bad_request", field)


@pytest.mark.parametrize(
    "base", [CREATE_GROUP, ADD_MEMBERS, REMOVE_MEMBER], ids=["create", "add", "remove"]
)
def test_group_frames_quote_the_request_id_and_check_the_token(base: dict[str, Any]) -> None:
    assert decode(dumps(with_fields(base, token="a.b.c", request_id=3))).token == "a.b.c"
    error = error_of(with_fields(base, token=5, request_id=3))
    assert (error.code, error.field, error.request_id) == ("bad_request", "token", 3)
    error = error_of(with_fields(base, request_id=""))
    assert (error.code, error.field, error.request_id) == ("bad_request", "request_id", None)


# --------------------------------------------------------------------------- typing

TYPING: dict[str, Any] = {"type": "typing", "chat_id": "7"}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, Typing("7", True)),  # `active` defaults to true
        ({"active": None}, Typing("7", True)),  # null is absent, as for every optional field
        ({"active": True}, Typing("7", True)),
        ({"active": False}, Typing("7", False)),
        (
            {"active": False, "token": "t", "request_id": 9},
            Typing("7", False, token="t", request_id=9),
        ),
        # Extra fields are ignored, as on every frame; the server sets `expires_in_ms`.
        ({"user_id": 5, "expires_in_ms": "x", "content": ""}, Typing("7", True)),
    ],
    ids=["default", "null", "true", "false", "token-and-request-id", "extras"],
)
def test_typing(fields: dict[str, Any], expected: Typing) -> None:
    assert decode(dumps(with_fields(TYPING, **fields))) == expected


@pytest.mark.parametrize(
    "active",
    [1, 0, -1, 1.0, 0.0, "true", "false", "", [], [True], {}, {"active": True}],
    ids=repr,
)
def test_typing_active_must_be_a_boolean(active: Any) -> None:
    error = error_of(with_fields(TYPING, active=active, request_id="ty"))
    assert (error.code, error.field, error.request_id) == ("bad_request", "active", "ty")


@pytest.mark.parametrize("value", BAD_IDS)
def test_typing_chat_id_rules(value: Any) -> None:
    error = error_of(with_fields(TYPING, chat_id=value, request_id=2))
    assert (error.code, error.field, error.request_id) == ("bad_request", "chat_id", 2)


def test_typing_chat_id_is_opaque_up_to_128_characters() -> None:
    for chat_id in ("0", "abc", "c" * 128, EMOJI * 128, " padded "):
        assert decode(dumps(with_fields(TYPING, chat_id=chat_id))) == Typing(chat_id)


def test_typing_checks_chat_id_before_active() -> None:
    error = error_of({"type": "typing", "active": "yes"})
    assert (error.code, error.field) == ("bad_request", "chat_id")


# --------------------------------------------------------------------------- fetch_presence


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, FetchPresence()),  # the user's contacts
        ({"user_ids": None}, FetchPresence()),
        ({"user_ids": ["bob"]}, FetchPresence(("bob",))),
        # The asked order is kept: the answer has one entry per id, in that order.
        ({"user_ids": ["carol", "bob", EMOJI]}, FetchPresence(("carol", "bob", EMOJI))),
        (
            {"user_ids": ["bob"], "token": "t", "request_id": "p"},
            FetchPresence(("bob",), token="t", request_id="p"),
        ),
        ({"user_id": 5, "chat_id": []}, FetchPresence()),  # extras are ignored
    ],
    ids=["contacts", "null", "one", "order-kept", "token-and-request-id", "extras"],
)
def test_fetch_presence(fields: dict[str, Any], expected: FetchPresence) -> None:
    assert decode(dumps({"type": "fetch_presence", **fields})) == expected


def test_fetch_presence_takes_up_to_200_distinct_valid_user_ids() -> None:
    assert protocol.MAX_PRESENCE_IDS == 200
    users = [f"user {n}" for n in range(200)]
    assert decode(dumps({"type": "fetch_presence", "user_ids": users})) == FetchPresence(
        tuple(users)
    )
    for ascii_only in (True, False):
        text = dumps({"type": "fetch_presence", "user_ids": VALID_USER_IDS}, ascii_only=ascii_only)
        assert decode(text) == FetchPresence(tuple(VALID_USER_IDS))


def test_fetch_presence_limit_is_not_the_group_size() -> None:
    users = [f"user {n}" for n in range(10)]
    frame = decode(dumps({"type": "fetch_presence", "user_ids": users}), SMALL)
    assert frame == FetchPresence(tuple(users))


BAD_USER_IDS_LISTS = [
    pytest.param([], id="empty"),
    pytest.param([f"user {n}" for n in range(201)], id="201-items"),
    pytest.param(["bob", "bob"], id="duplicate"),
    pytest.param(["bob", "carol", "bob"], id="duplicate-apart"),
    pytest.param([5], id="int-member"),
    pytest.param(["bob", None], id="null-member"),
    pytest.param(["bob", True], id="bool-member"),
    pytest.param(["bob", ["carol"]], id="list-member"),
    pytest.param(["bob", {"id": "carol"}], id="object-member"),
    pytest.param("bob", id="a-string"),
    pytest.param({"0": "bob"}, id="object"),
    pytest.param(5, id="int"),
    pytest.param(True, id="true"),
    pytest.param(False, id="false"),
    *(pytest.param(["bob", user], id=f"invalid-{user!r}") for user in INVALID_USER_IDS),
]


@pytest.mark.parametrize("value", BAD_USER_IDS_LISTS)
def test_fetch_presence_user_ids_rules(value: Any) -> None:
    error = error_of({"type": "fetch_presence", "user_ids": value, "request_id": "fp"})
    assert (error.code, error.field, error.request_id) == ("bad_request", "user_ids", "fp")
    assert error.message


# --------------------------------------------------------------------------- blocking

BLOCK_FRAMES = [
    pytest.param(("block_user", BlockUser), id="block_user"),
    pytest.param(("unblock_user", UnblockUser), id="unblock_user"),
]


@pytest.mark.parametrize("user_id", VALID_USER_IDS, ids=repr)
@pytest.mark.parametrize("kind", BLOCK_FRAMES)
def test_block_and_unblock_take_any_valid_user_id(
    kind: tuple[str, type[BlockUser | UnblockUser]], user_id: str
) -> None:
    frame_type, cls = kind
    for ascii_only in (True, False):
        text = dumps({"type": frame_type, "user_id": user_id}, ascii_only=ascii_only)
        assert decode(text) == cls(user_id)
    text = dumps({"type": frame_type, "user_id": user_id, "token": "t", "request_id": 0, "x": 1})
    assert decode(text) == cls(user_id, token="t", request_id=0)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(_MISSING, id="missing"),
        pytest.param(None, id="null"),
        pytest.param(5, id="int"),
        pytest.param(True, id="bool"),
        pytest.param(["bob"], id="list"),
        pytest.param({"id": "bob"}, id="object"),
        *(pytest.param(user, id=f"invalid-{user!r}") for user in INVALID_USER_IDS),
    ],
)
@pytest.mark.parametrize("kind", BLOCK_FRAMES)
def test_block_and_unblock_user_id_rules(
    kind: tuple[str, type[BlockUser | UnblockUser]], value: Any
) -> None:
    frame = with_fields({"type": kind[0], "user_id": value}, request_id="b")
    error = error_of(frame)
    assert (error.code, error.field, error.request_id) == ("bad_request", "user_id", "b")


def test_a_block_of_yourself_decodes_the_machine_refuses_it() -> None:
    """Who "yourself" is depends on the connection (test_session_machine)."""
    assert decode('{"type": "block_user", "user_id": "alice"}') == BlockUser("alice")


def test_fetch_blocked() -> None:
    assert decode('{"type": "fetch_blocked"}') == FetchBlocked()
    assert decode(
        dumps({"type": "fetch_blocked", "token": "t", "request_id": "fb", "user_id": 5})
    ) == FetchBlocked(token="t", request_id="fb")


@pytest.mark.parametrize(
    "base",
    [
        TYPING,
        {"type": "fetch_presence", "user_ids": ["bob"]},
        {"type": "block_user", "user_id": "bob"},
        {"type": "unblock_user", "user_id": "bob"},
        {"type": "fetch_blocked"},
    ],
    ids=["typing", "fetch_presence", "block_user", "unblock_user", "fetch_blocked"],
)
def test_new_frames_quote_the_request_id_and_check_the_token(base: dict[str, Any]) -> None:
    assert decode(dumps(with_fields(base, token="a.b.c", request_id=3))).token == "a.b.c"
    error = error_of(with_fields(base, token=5, request_id=3))
    assert (error.code, error.field, error.request_id) == ("bad_request", "token", 3)
    error = error_of(with_fields(base, request_id=""))
    assert (error.code, error.field, error.request_id) == ("bad_request", "request_id", None)


# --------------------------------------------------------------------------- ping, extras


def test_ping() -> None:
    assert decode('{"type": "ping"}') == Ping()
    assert decode('{"type": "ping", "request_id": "p", "token": "t"}') == Ping("t", "p")


@pytest.mark.parametrize(
    "text",
    [
        '{"type": "ping", "x": 1}',
        '{"type": "ping", "data": {"deep": [1, 2, {"a": null}]}}',
        '{"type": "ping", "recipient_id": 5, "content": ""}',
        '{"type": "ping", "x": 1e400}',
        '{"type": "ping", "x": "\\ud800"}',
        '{"type": "ping", "x": "\ud800"}',
        '{"type": "ping", "x": ' + "9" * 100 + "}",
        '{"type": "ping", "TYPE": "nope", "Type": 1}',
    ],
)
def test_extra_fields_are_ignored(text: str) -> None:
    assert decode(text) == Ping()


def test_extra_fields_are_ignored_on_every_type() -> None:
    frame = decode(dumps(send(flags=["x"], version=2, **{"": 1})))
    assert frame == SendMessage("1", "bob", "hi")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"type": "nope", "type": "ping"}', Ping()),
        ('{"type": "ping", "request_id": "a", "request_id": "b"}', Ping(request_id="b")),
        (
            '{"type": "create_chat", "recipient_id": "a", "recipient_id": "b"}',
            CreateChat("b"),
        ),
    ],
)
def test_duplicate_keys_last_one_wins(text: str, expected: protocol.ClientFrame) -> None:
    assert decode(text) == expected


def test_duplicate_key_can_make_a_frame_invalid() -> None:
    error = error_of('{"type": "ping", "type": "nope"}')
    assert error.code == ErrorCode.UNKNOWN_TYPE


def test_escaped_surrogate_pair_is_one_astral_character() -> None:
    frame = decode(
        '{"type": "send_message", "chat_id": "1", "recipient_id": "b", "content": "\\ud83d\\ude00"}'
    )
    assert isinstance(frame, SendMessage)
    assert frame.content == EMOJI


def test_frames_are_immutable() -> None:
    frame = decode('{"type": "ping"}')
    with pytest.raises(AttributeError):
        frame.token = "x"  # type: ignore[misc]


# --------------------------------------------------------------------------- encode

CHAT = Chat("c1", ("alice", "bob"), "alice", "2023-10-01T12:34:56.789Z")
MESSAGE = Message(
    "m1", "c1", "alice", "bob", "hi \u0000 " + EMOJI, "2023-10-01T12:34:57.000Z", seq=1, version=1
)
MESSAGE_WIRE = {
    "message_id": "m1",
    "chat_id": "c1",
    "sender_id": "alice",
    "recipient_id": "bob",
    "content": "hi \u0000 " + EMOJI,
    "timestamp": "2023-10-01T12:34:57.000Z",
    "seq": 1,
}
MESSAGE_WITH_ID = Message(
    "m2", "c1", "bob", "alice", "yo", "2023-10-01T12:34:58.000Z", "cm", seq=2, version=2
)
MESSAGE_WITH_ID_WIRE = {
    "message_id": "m2",
    "chat_id": "c1",
    "sender_id": "bob",
    "recipient_id": "alice",
    "content": "yo",
    "timestamp": "2023-10-01T12:34:58.000Z",
    "seq": 2,
    "client_message_id": "cm",
}
EDITED = Message(
    "m2",
    "c1",
    "bob",
    "alice",
    "yo!",
    "2023-10-01T12:34:58.000Z",
    "cm",
    seq=2,
    version=4,
    edited_at="2023-10-01T12:40:00.000Z",
)
EDITED_WIRE = {**MESSAGE_WITH_ID_WIRE, "content": "yo!", "edited_at": "2023-10-01T12:40:00.000Z"}
TOMBSTONE = Message(
    "m2",
    "c1",
    "bob",
    "alice",
    "",
    "2023-10-01T12:34:58.000Z",
    "cm",
    seq=2,
    version=5,
    edited_at="2023-10-01T12:40:00.000Z",
    deleted=True,
)
TOMBSTONE_WIRE = {**EDITED_WIRE, "content": "", "deleted": True}
# A chat object is the chat with its server state for the user it is sent to.
VIEW = ChatView(
    CHAT,
    last_message=MESSAGE_WITH_ID,
    unread_count=1,
    read_up_to=(("alice", 1), ("bob", 2)),
    delivered_up_to=(("alice", 2), ("bob", 2)),
)
CHAT_WIRE = {
    "chat_id": "c1",
    "kind": "direct",
    "title": None,
    "participants": ["alice", "bob"],
    "created_by": "alice",
    "created_at": "2023-10-01T12:34:56.789Z",
    "last_message": MESSAGE_WITH_ID_WIRE,
    "unread_count": 1,
    "read_up_to": {"alice": 1, "bob": 2},
    "delivered_up_to": {"alice": 2, "bob": 2},
}
FRESH_CHAT_WIRE = {
    **CHAT_WIRE,
    "last_message": None,
    "unread_count": 0,
    "read_up_to": {"alice": 0, "bob": 0},
    "delivered_up_to": {"alice": 0, "bob": 0},
}
RECEIPT = ReceiptFrame("c1", "bob", "read", 2, "m2", "2023-10-01T12:41:00.000Z")
RECEIPT_WIRE = {
    "type": "receipt",
    "chat_id": "c1",
    "user_id": "bob",
    "kind": "read",
    "seq": 2,
    "message_id": "m2",
    "timestamp": "2023-10-01T12:41:00.000Z",
}


@pytest.mark.parametrize(
    ("frame", "wire"),
    [
        (Authenticated("alice"), {"type": "authenticated", "user_id": "alice"}),
        (AllChats(()), {"type": "all_chats", "data": []}),
        (AllChats((VIEW,), 1), {"type": "all_chats", "data": [CHAT_WIRE], "request_id": 1}),
        (
            AllChats((VIEW, ChatView.fresh(CHAT))),
            {"type": "all_chats", "data": [CHAT_WIRE, FRESH_CHAT_WIRE]},
        ),
        (NewChats((ChatView.fresh(CHAT),)), {"type": "new_chats", "data": [FRESH_CHAT_WIRE]}),
        (NewChats((VIEW,), "r"), {"type": "new_chats", "data": [CHAT_WIRE], "request_id": "r"}),
        (
            AllMessages("c1", (MESSAGE,), False),
            {"type": "all_messages", "chat_id": "c1", "data": [MESSAGE_WIRE], "has_more": False},
        ),
        (
            AllMessages("c1", (), True, "r"),
            {
                "type": "all_messages",
                "chat_id": "c1",
                "data": [],
                "has_more": True,
                "request_id": "r",
            },
        ),
        (
            NewMessages("c1", (MESSAGE,)),
            {"type": "new_messages", "chat_id": "c1", "data": [MESSAGE_WIRE]},
        ),
        (MessageEvent(MESSAGE), {"type": "message", **MESSAGE_WIRE}),
        (MessageEvent(MESSAGE, 9), {"type": "message", **MESSAGE_WIRE, "request_id": 9}),
        (
            MessageEvent(MESSAGE_WITH_ID, "r"),
            {
                "type": "message",
                "message_id": "m2",
                "chat_id": "c1",
                "sender_id": "bob",
                "recipient_id": "alice",
                "content": "yo",
                "timestamp": "2023-10-01T12:34:58.000Z",
                "seq": 2,
                "client_message_id": "cm",
                "request_id": "r",
            },
        ),
        (
            AllMessages("c1", (MESSAGE, TOMBSTONE), False),
            {
                "type": "all_messages",
                "chat_id": "c1",
                "data": [MESSAGE_WIRE, TOMBSTONE_WIRE],
                "has_more": False,
            },
        ),
        (MessageUpdated(EDITED), {"type": "message_updated", **EDITED_WIRE}),
        (
            MessageUpdated(TOMBSTONE, "d"),
            {"type": "message_updated", **TOMBSTONE_WIRE, "request_id": "d"},
        ),
        (
            UpdatedMessages("c1", (EDITED, TOMBSTONE)),
            {"type": "updated_messages", "chat_id": "c1", "data": [EDITED_WIRE, TOMBSTONE_WIRE]},
        ),
        (
            UpdatedMessages("c1", ()),
            {"type": "updated_messages", "chat_id": "c1", "data": []},
        ),
        (RECEIPT, RECEIPT_WIRE),
        (
            ReceiptFrame("c1", "bob", "delivered", 2, "m2", "2023-10-01T12:41:00.000Z", 7),
            {**RECEIPT_WIRE, "kind": "delivered", "request_id": 7},
        ),
        (
            ReceiptFrame("c1", "alice", "read", 0, None, "2023-10-01T12:41:00.000Z", "q"),
            {
                **RECEIPT_WIRE,
                "user_id": "alice",
                "seq": 0,
                "message_id": None,
                "request_id": "q",
            },
        ),
        (Pong(), {"type": "pong"}),
        (Pong("p"), {"type": "pong", "request_id": "p"}),
        (Pong(0), {"type": "pong", "request_id": 0}),
        (
            ErrorFrame(ErrorCode.BAD_JSON, "bad"),
            {"type": "error", "code": "bad_json", "message": "bad"},
        ),
        (
            ErrorFrame(ErrorCode.BAD_REQUEST, "m", field="content", request_id="r"),
            {
                "type": "error",
                "code": "bad_request",
                "message": "m",
                "field": "content",
                "request_id": "r",
            },
        ),
        (
            ErrorFrame(ErrorCode.RATE_LIMITED, "slow", request_id=4, retry_after_ms=250),
            {
                "type": "error",
                "code": "rate_limited",
                "message": "slow",
                "retry_after_ms": 250,
                "request_id": 4,
            },
        ),
    ],
    ids=lambda value: type(value).__name__,
)
def test_encode(frame: protocol.ServerFrame, wire: dict[str, Any]) -> None:
    text = encode(frame)
    assert isinstance(text, str)
    assert json.loads(text) == wire


def test_encode_error_from_protocol_error() -> None:
    error = ProtocolError(
        ErrorCode.TOO_LARGE, "too long", field="content", request_id="x", retry_after_ms=None
    )
    assert json.loads(encode(ErrorFrame.from_error(error))) == {
        "type": "error",
        "code": "too_large",
        "message": "too long",
        "field": "content",
        "request_id": "x",
    }


def test_every_error_code_encodes_as_its_wire_name() -> None:
    assert sorted(code.value for code in ErrorCode) == sorted(
        [
            "bad_json",
            "bad_request",
            "unknown_type",
            "unauthorized",
            "forbidden",
            "not_found",
            "too_large",
            "rate_limited",
            "internal",
        ]
    )
    for code in ErrorCode:
        assert json.loads(encode(ErrorFrame(code, "m")))["code"] == code.value


def test_encode_keeps_content_exactly() -> None:
    content = "\u0000\u0001\u001f\u007f\u2028\u2029" + EMOJI + '"\\/' + "\U0010ffff"
    message = Message("m", "c", "a", "b", content, "2023-10-01T12:34:56.789Z")
    assert json.loads(encode(MessageEvent(message)))["content"] == content


def test_chat_helpers() -> None:
    assert CHAT.other_participant("alice") == "bob"
    assert CHAT.other_participant("bob") == "alice"
    assert (CHAT.kind, CHAT.title) == ("direct", None)
    assert VIEW.chat_id == "c1"
    assert ChatView.fresh(CHAT) == ChatView(
        CHAT, None, 0, (("alice", 0), ("bob", 0)), (("alice", 0), ("bob", 0))
    )


@pytest.mark.parametrize(
    ("message", "wire"),
    [
        (MESSAGE, MESSAGE_WIRE),
        (MESSAGE_WITH_ID, MESSAGE_WITH_ID_WIRE),
        (EDITED, EDITED_WIRE),
        (TOMBSTONE, TOMBSTONE_WIRE),
        # Deleted without an edit before: `deleted` alone.
        (
            Message(
                "m3", "c1", "bob", "alice", "", "2023-10-01T12:34:59.000Z", seq=3, deleted=True
            ),
            {
                "message_id": "m3",
                "chat_id": "c1",
                "sender_id": "bob",
                "recipient_id": "alice",
                "content": "",
                "timestamp": "2023-10-01T12:34:59.000Z",
                "seq": 3,
                "deleted": True,
            },
        ),
    ],
    ids=["plain", "client-id", "edited", "tombstone", "deleted-unedited"],
)
def test_message_object_fields(message: Message, wire: dict[str, Any]) -> None:
    """`seq` always; `edited_at` and `deleted` only when set; the internal `version` never."""
    assert message.to_wire() == wire
    assert "version" not in json.loads(encode(MessageEvent(message)))


def test_chat_object_marks_are_objects_of_every_participant() -> None:
    wire = json.loads(encode(AllChats((VIEW,))))["data"][0]
    assert wire == CHAT_WIRE
    assert set(wire["read_up_to"]) == set(wire["delivered_up_to"]) == set(CHAT.participants)


# --------------------------------------------------------------------------- encode: groups

GROUP = Chat("g1", ("alice", "bob", "carol"), "alice", "2023-10-01T12:34:56.789Z", "group", "Team")
GROUP_MESSAGE = Message(
    "m5", "g1", "bob", None, "hello all", "2023-10-01T12:35:00.000Z", seq=3, version=4
)
GROUP_MESSAGE_WIRE = {
    "message_id": "m5",
    "chat_id": "g1",
    "sender_id": "bob",
    "content": "hello all",
    "timestamp": "2023-10-01T12:35:00.000Z",
    "seq": 3,
}
GROUP_VIEW = ChatView(
    GROUP,
    last_message=GROUP_MESSAGE,
    unread_count=2,
    read_up_to=(("alice", 1), ("bob", 3), ("carol", 0)),
    delivered_up_to=(("alice", 3), ("bob", 3), ("carol", 3)),
    joined_seq=(("alice", 0), ("bob", 0), ("carol", 1)),  # carol joined after message 1
)
GROUP_WIRE = {
    "chat_id": "g1",
    "kind": "group",
    "title": "Team",
    "participants": ["alice", "bob", "carol"],
    "created_by": "alice",
    "created_at": "2023-10-01T12:34:56.789Z",
    "last_message": GROUP_MESSAGE_WIRE,
    "unread_count": 2,
    "read_up_to": {"alice": 1, "bob": 3, "carol": 0},
    "delivered_up_to": {"alice": 3, "bob": 3, "carol": 3},
    "joined_seq": {"alice": 0, "bob": 0, "carol": 1},  # (ext) a group's only
}


def test_a_group_message_has_no_recipient_id_key_anywhere() -> None:
    assert GROUP_MESSAGE.to_wire() == GROUP_MESSAGE_WIRE
    edited = Message(
        "m5",
        "g1",
        "bob",
        None,
        "",
        "2023-10-01T12:35:00.000Z",
        "cm",
        seq=3,
        version=6,
        edited_at="2023-10-01T12:36:00.000Z",
        deleted=True,
    )
    edited_wire = {
        **GROUP_MESSAGE_WIRE,
        "content": "",
        "client_message_id": "cm",
        "edited_at": "2023-10-01T12:36:00.000Z",
        "deleted": True,
    }
    assert edited.to_wire() == edited_wire
    frames: list[tuple[protocol.ServerFrame, dict[str, Any]]] = [
        (MessageEvent(GROUP_MESSAGE), {"type": "message", **GROUP_MESSAGE_WIRE}),
        (
            MessageEvent(GROUP_MESSAGE, "r"),
            {"type": "message", **GROUP_MESSAGE_WIRE, "request_id": "r"},
        ),
        (MessageUpdated(edited, 2), {"type": "message_updated", **edited_wire, "request_id": 2}),
        (
            NewMessages("g1", (GROUP_MESSAGE,)),
            {"type": "new_messages", "chat_id": "g1", "data": [GROUP_MESSAGE_WIRE]},
        ),
        (
            AllMessages("g1", (GROUP_MESSAGE, edited), False),
            {
                "type": "all_messages",
                "chat_id": "g1",
                "data": [GROUP_MESSAGE_WIRE, edited_wire],
                "has_more": False,
            },
        ),
        (
            UpdatedMessages("g1", (edited,)),
            {"type": "updated_messages", "chat_id": "g1", "data": [edited_wire]},
        ),
        (AllChats((GROUP_VIEW,)), {"type": "all_chats", "data": [GROUP_WIRE]}),
    ]
    for frame, wire in frames:
        text = encode(frame)
        assert json.loads(text) == wire, type(frame).__name__
        assert "recipient_id" not in text
    # A direct chat's message keeps it, as before.
    assert "recipient_id" in json.loads(encode(MessageEvent(MESSAGE)))


@pytest.mark.parametrize(
    ("frame", "wire"),
    [
        (ChatUpdated(GROUP_VIEW), {"type": "chat_updated", "data": GROUP_WIRE}),
        (
            ChatUpdated(GROUP_VIEW, "r"),
            {"type": "chat_updated", "data": GROUP_WIRE, "request_id": "r"},
        ),
        (ChatUpdated(GROUP_VIEW, 0), {"type": "chat_updated", "data": GROUP_WIRE, "request_id": 0}),
        (
            ChatUpdated(ChatView.fresh(GROUP)),
            {
                "type": "chat_updated",
                "data": {
                    **GROUP_WIRE,
                    "last_message": None,
                    "unread_count": 0,
                    "read_up_to": {"alice": 0, "bob": 0, "carol": 0},
                    "delivered_up_to": {"alice": 0, "bob": 0, "carol": 0},
                    "joined_seq": {"alice": 0, "bob": 0, "carol": 0},
                },
            },
        ),
        (
            NewChats((GROUP_VIEW,), 5),
            {"type": "new_chats", "data": [GROUP_WIRE], "request_id": 5},
        ),
    ],
    ids=["plain", "with-request-id", "request-id-0", "fresh", "new-chats"],
)
def test_encode_chat_updated(frame: protocol.ServerFrame, wire: dict[str, Any]) -> None:
    assert json.loads(encode(frame)) == wire


def test_only_a_group_chat_object_has_joined_seq() -> None:
    assert "joined_seq" not in json.loads(encode(AllChats((VIEW, ChatView.fresh(CHAT)))))["data"][0]
    assert ChatView.fresh(CHAT).joined_seq == ()
    assert ChatView.fresh(GROUP).joined_seq == (("alice", 0), ("bob", 0), ("carol", 0))
    wire = GROUP_VIEW.to_wire()
    assert set(wire["joined_seq"]) == set(wire["read_up_to"]) == set(GROUP.participants)


def test_group_chat_helpers() -> None:
    assert GROUP.is_group
    assert not CHAT.is_group
    assert (GROUP.kind, GROUP.title) == (protocol.GROUP, "Team")
    # A group message names nobody: there is no "other participant".
    assert GROUP.other_participant("alice") is None
    assert GROUP.other_participant("bob") is None


# Alice, bob, carol and dave are members after the change: dave was just added, erin removed,
# carol joined after the last message; bob has two unread, alice none listed.
CHANGE = GroupChange(
    attrs.evolve(
        GROUP_VIEW,
        chat=attrs.evolve(GROUP, participants=("alice", "bob", "carol", "dave")),
        read_up_to=(("alice", 3), ("bob", 1), ("carol", 3), ("dave", 3)),
        delivered_up_to=(("alice", 3), ("bob", 3), ("carol", 3), ("dave", 3)),
        joined_seq=(("alice", 0), ("bob", 0), ("carol", 3), ("dave", 3)),
    ),
    added=("dave",),
    removed=("erin",),
    unread=(("alice", 0), ("bob", 2), ("carol", 5)),
    unseen_last=("carol",),
    version=7,
)


@pytest.mark.parametrize(
    ("user", "last", "unread"),
    [
        ("dave", None, 0),  # added: a new chat to them, nothing before the join
        ("erin", None, 0),  # removed: their copy no longer lists them
        ("carol", None, 0),  # joined after the last message: not shown it, nothing unread
        ("bob", GROUP_MESSAGE, 2),  # kept: their own count
        ("alice", GROUP_MESSAGE, 0),
        ("zed", GROUP_MESSAGE, 0),  # not listed in `unread`: 0
    ],
)
def test_group_change_view_for(user: str, last: Message | None, unread: int) -> None:
    view = CHANGE.view_for(user)
    assert view == attrs.evolve(CHANGE.view, last_message=last, unread_count=unread)
    # Everything shared is the same for everyone: members and marks.
    assert view.chat == CHANGE.view.chat
    assert (view.read_up_to, view.delivered_up_to, view.joined_seq) == (
        CHANGE.view.read_up_to,
        CHANGE.view.delivered_up_to,
        CHANGE.view.joined_seq,
    )
    if user in CHANGE.removed:
        assert user not in view.chat.participants


def test_group_change_kept_are_the_members_before_who_still_are() -> None:
    assert CHANGE.kept == ("alice", "bob", "carol")
    assert GroupChange(ChatView.fresh(GROUP)).kept == GROUP.participants
    everyone_new = GroupChange(ChatView.fresh(GROUP), added=GROUP.participants)
    assert everyone_new.kept == ()
    # A removal: the removed user is neither kept nor a participant.
    left = GroupChange(
        ChatView.fresh(attrs.evolve(GROUP, participants=("alice", "carol"))), removed=("bob",)
    )
    assert left.kept == ("alice", "carol")


# ---------------------------------------------------------- encode: typing, presence, blocking


@pytest.mark.parametrize(
    ("frame", "wire"),
    [
        (
            TypingEvent("7", "alice", True),
            {
                "type": "typing",
                "chat_id": "7",
                "user_id": "alice",
                "active": True,
                "expires_in_ms": 6000,
            },
        ),
        (
            TypingEvent("g1", EMOJI, False),
            {
                "type": "typing",
                "chat_id": "g1",
                "user_id": EMOJI,
                "active": False,
                "expires_in_ms": 6000,
            },
        ),
        (PresenceFrame(()), {"type": "presence", "data": []}),
        (
            PresenceFrame(
                (
                    PresenceEntry("bob", True),
                    PresenceEntry("carol", False, "2026-12-02T18:00:00.123Z"),
                    PresenceEntry("dave"),  # a stranger, or never seen
                ),
                "p",
            ),
            {
                "type": "presence",
                "data": [
                    {"user_id": "bob", "online": True, "last_seen": None},
                    {
                        "user_id": "carol",
                        "online": False,
                        "last_seen": "2026-12-02T18:00:00.123Z",
                    },
                    {"user_id": "dave", "online": False, "last_seen": None},
                ],
                "request_id": "p",
            },
        ),
        (
            PresenceFrame((PresenceEntry("bob", False, "2026-12-02T18:00:00.000Z"),)),
            {
                "type": "presence",
                "data": [
                    {"user_id": "bob", "online": False, "last_seen": "2026-12-02T18:00:00.000Z"}
                ],
            },
        ),
        (
            PresenceFrame((PresenceEntry("bob"),), 0),
            {
                "type": "presence",
                "data": [{"user_id": "bob", "online": False, "last_seen": None}],
                "request_id": 0,
            },
        ),
        (BlockedFrame(()), {"type": "blocked", "data": []}),
        (
            BlockedFrame(("bob", "mallory"), "r"),
            {"type": "blocked", "data": ["bob", "mallory"], "request_id": "r"},
        ),
        (BlockedFrame(("bob",), 0), {"type": "blocked", "data": ["bob"], "request_id": 0}),
    ],
    ids=[
        "typing",
        "typing-stopped",
        "presence-empty",
        "presence-answer",
        "presence-live",
        "presence-request-id-0",
        "blocked-empty",
        "blocked",
        "blocked-request-id-0",
    ],
)
def test_encode_typing_presence_and_blocked(
    frame: protocol.ServerFrame, wire: dict[str, Any]
) -> None:
    assert json.loads(encode(frame)) == wire


def test_typing_expires_in_6_seconds_and_entries_default_to_a_strangers_view() -> None:
    assert protocol.TYPING_EXPIRES_MS == 6000
    assert TypingEvent("7", "alice", True).expires_in_ms == protocol.TYPING_EXPIRES_MS
    assert PresenceEntry("bob") == PresenceEntry("bob", online=False, last_seen=None)


# --------------------------------------------------------------------------- properties

_TYPES = [*protocol.CLIENT_FRAME_TYPES, "nope", ""]
_FIELDS = [
    "type",
    "request_id",
    "token",
    "recipient_id",
    "chat_id",
    "message_id",
    "content",
    "client_message_id",
    "limit",
    "before",
    "title",
    "member_ids",
    "user_id",
    "active",
    "user_ids",
]

any_text = st.text(st.characters(exclude_categories=()))
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | any_text
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(_FIELDS) | any_text, children, max_size=4)
    ),
    max_leaves=20,
)
frame_like = st.fixed_dictionaries(
    {"type": st.sampled_from(_TYPES) | json_values},
    optional={name: json_values for name in _FIELDS[1:]},
)


def _check(text: str | bytes) -> None:
    """`decode` returns a valid frame or raises a clean `ProtocolError`, nothing else."""
    failure: ProtocolError | None = None
    try:
        frame = decode(text)
    except ProtocolError as error:
        failure = error
    if failure is not None:
        assert isinstance(failure.code, ErrorCode)
        assert isinstance(failure.message, str)
        assert failure.message
        assert failure.field is None or isinstance(failure.field, str)
        assert failure.request_id is None or isinstance(failure.request_id, str | int)
        # The error must be encodable: it is what the client gets.
        json.loads(encode(ErrorFrame.from_error(failure)))
        return
    assert isinstance(
        frame,
        CreateChat
        | CreateGroup
        | AddMembers
        | RemoveMember
        | SendMessage
        | FetchChats
        | FetchMessages
        | Ping
        | MarkRead
        | EditMessage
        | DeleteMessage
        | Typing
        | FetchPresence
        | BlockUser
        | UnblockUser
        | FetchBlocked,
    )
    if isinstance(frame, SendMessage | EditMessage):
        assert 1 <= len(frame.content) <= protocol.MAX_MESSAGE_CHARS
        frame.content.encode()
    if isinstance(frame, CreateChat) or (
        isinstance(frame, SendMessage) and frame.recipient_id is not None
    ):
        assert frame.recipient_id is not None
        protocol.validate_user_id(frame.recipient_id, "recipient_id")
    if isinstance(frame, CreateGroup):
        assert 1 <= len(frame.title) <= protocol.MAX_TITLE_CHARS
        frame.title.encode()
    if isinstance(frame, CreateGroup | AddMembers):
        assert 1 <= len(frame.member_ids) < protocol.MAX_GROUP_MEMBERS
        assert len(set(frame.member_ids)) == len(frame.member_ids)
        for member in frame.member_ids:
            protocol.validate_user_id(member, "member_ids")
    if isinstance(frame, RemoveMember | BlockUser | UnblockUser):
        protocol.validate_user_id(frame.user_id, "user_id")
    if isinstance(frame, AddMembers | RemoveMember | Typing):
        assert 1 <= len(frame.chat_id) <= protocol.MAX_ID_CHARS
        frame.chat_id.encode()
    if isinstance(frame, Typing):
        assert type(frame.active) is bool
    if isinstance(frame, FetchPresence) and frame.user_ids is not None:
        assert 1 <= len(frame.user_ids) <= protocol.MAX_PRESENCE_IDS
        assert len(set(frame.user_ids)) == len(frame.user_ids)
        for user in frame.user_ids:
            protocol.validate_user_id(user, "user_ids")
    if isinstance(frame, MarkRead | EditMessage | DeleteMessage):
        for value in (frame.chat_id, frame.message_id):
            assert 1 <= len(value) <= protocol.MAX_ID_CHARS
            value.encode()
    if isinstance(frame, FetchChats):
        assert 0 <= frame.limit <= protocol.HISTORY_LIMIT  # 0: the chat list alone
    if isinstance(frame, FetchMessages):
        assert 1 <= frame.limit <= protocol.HISTORY_LIMIT
    if isinstance(frame.request_id, str):
        assert 1 <= len(frame.request_id) <= 64


@settings(max_examples=300, deadline=None)
@given(any_text)
def test_any_text_decodes_or_fails_cleanly(text: str) -> None:
    _check(text)


@settings(max_examples=200, deadline=None)
@given(st.binary())
def test_any_bytes_are_bad_json(payload: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(payload)
    assert info.value.code == ErrorCode.BAD_JSON


@settings(max_examples=200, deadline=None)
@given(st.binary())
def test_any_bytes_as_text_decode_or_fail_cleanly(payload: bytes) -> None:
    _check(payload.decode("utf-8", "surrogateescape"))
    _check(payload.decode("latin-1"))


@settings(max_examples=300, deadline=None)
@given(frame_like, st.booleans())
def test_any_json_object_decodes_or_fails_cleanly(frame: dict[str, Any], ascii_only: bool) -> None:
    _check(json.dumps(frame, ensure_ascii=ascii_only))


@settings(max_examples=200, deadline=None)
@given(json_values, st.booleans())
def test_any_json_value_decodes_or_fails_cleanly(value: Any, ascii_only: bool) -> None:
    _check(json.dumps(value, ensure_ascii=ascii_only))


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=1, max_value=5000), st.sampled_from(["[", '{"a":', '[{"b":']))
def test_any_nesting_depth_decodes_or_fails_cleanly(depth: int, opener: str) -> None:
    closer = {"[": "]", '{"a":': "}", '[{"b":': "}]"}[opener]
    _check('{"type": "ping", "x": ' + opener * depth + "1" + closer * depth + "}")
    _check(opener * depth)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_FIELDS), json_values), max_size=8))
def test_duplicate_keys_decode_or_fail_cleanly(pairs: list[tuple[str, Any]]) -> None:
    body = ", ".join(f"{json.dumps(key)}: {json.dumps(value)}" for key, value in pairs)
    _check("{" + body + "}")


user_ids = st.text(
    st.characters(exclude_categories=["Cs", "Cc", "Cf", "Zs", "Zl", "Zp"]), min_size=1, max_size=128
).filter(lambda s: s == s.strip())


@settings(max_examples=200, deadline=None)
@given(
    chat_id=st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=128),
    recipient_id=st.none() | user_ids,
    content=st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=4096),
    client_message_id=st.none()
    | st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=128),
    request_id=st.none()
    | st.integers(-(2**63 - 1), 2**63 - 1)
    | st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=64),
    ascii_only=st.booleans(),
)
def test_valid_send_message_round_trips(
    chat_id: str,
    recipient_id: str | None,
    content: str,
    client_message_id: str | None,
    request_id: str | int | None,
    ascii_only: bool,
) -> None:
    frame = {
        "type": "send_message",
        "chat_id": chat_id,
        "recipient_id": recipient_id,
        "content": content,
        "client_message_id": client_message_id,
        "request_id": request_id,
    }
    assert decode(json.dumps(frame, ensure_ascii=ascii_only)) == SendMessage(
        chat_id, recipient_id, content, client_message_id, request_id=request_id
    )


@settings(max_examples=150, deadline=None)
@given(
    frame_type=st.sampled_from(["mark_read", "edit_message", "delete_message"]),
    chat_id=st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=128),
    message_id=st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=128),
    content=st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=4096),
    request_id=st.none()
    | st.integers(-(2**63 - 1), 2**63 - 1)
    | st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=64),
    ascii_only=st.booleans(),
)
def test_valid_version_2_frames_round_trip(
    frame_type: str,
    chat_id: str,
    message_id: str,
    content: str,
    request_id: str | int | None,
    ascii_only: bool,
) -> None:
    frame = {
        "type": frame_type,
        "chat_id": chat_id,
        "message_id": message_id,
        "content": content,
        "request_id": request_id,
    }
    expected: protocol.ClientFrame
    if frame_type == "mark_read":
        expected = MarkRead(chat_id, message_id, request_id=request_id)
    elif frame_type == "edit_message":
        expected = EditMessage(chat_id, message_id, content, request_id=request_id)
    else:
        expected = DeleteMessage(chat_id, message_id, request_id=request_id)
    assert decode(json.dumps(frame, ensure_ascii=ascii_only)) == expected


@settings(max_examples=150, deadline=None)
@given(
    chat_id=st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=128),
    active=st.none() | st.booleans(),
    user_id=user_ids,
    asked=st.none() | st.lists(user_ids, min_size=1, max_size=200, unique=True),
    request_id=st.none()
    | st.integers(-(2**63 - 1), 2**63 - 1)
    | st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=64),
    ascii_only=st.booleans(),
)
def test_valid_typing_presence_and_block_frames_round_trip(
    chat_id: str,
    active: bool | None,
    user_id: str,
    asked: list[str] | None,
    request_id: str | int | None,
    ascii_only: bool,
) -> None:
    def text(obj: dict[str, Any]) -> str:
        return json.dumps({**obj, "request_id": request_id}, ensure_ascii=ascii_only)

    typing = {"type": "typing", "chat_id": chat_id, "active": active}
    assert decode(text(typing)) == Typing(
        chat_id, True if active is None else active, request_id=request_id
    )
    presence = {"type": "fetch_presence", "user_ids": asked}
    assert decode(text(presence)) == FetchPresence(
        None if asked is None else tuple(asked), request_id=request_id
    )
    for frame_type, cls in (("block_user", BlockUser), ("unblock_user", UnblockUser)):
        block = {"type": frame_type, "user_id": user_id}
        assert decode(text(block)) == cls(user_id, request_id=request_id)
    assert decode(text({"type": "fetch_blocked"})) == FetchBlocked(request_id=request_id)


# --------------------------------------------------------------------------- layering


@pytest.mark.parametrize("modules", ["handler.protocol, handler.errors", "handler.session.machine"])
def test_the_pure_core_imports_no_io_framework(modules: str) -> None:
    """Style rule 1: the protocol core and the session machine pull in no trio, web or
    database."""
    script = (
        f"import sys, {modules}\n"
        "banned = ('trio', 'quart', 'quart_trio', 'hypercorn', 'wsproto', 'h11', 'sqlite3',\n"
        "          '_sqlite3', 'psycopg', 'psycopg_pool', 'coredis', 'redis', 'jwt',\n"
        "          'trio_websocket', 'asyncio')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in banned))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout
