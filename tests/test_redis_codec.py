"""The Redis bus's wire format (`handler.bus.redis_codec`): pure tables, no Redis.

Every node of a cluster speaks the same format, so the bytes are pinned here. Version 2
replaced the message arrays (seq and version instead of the previous message's id), and a
cluster upgrades all its nodes together: a version 1 payload is refused as malformed rather
than misread.
"""

from __future__ import annotations

from typing import Any

import attrs
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from handler.bus import redis_codec
from handler.bus.base import Delivery
from handler.bus.redis_codec import Channels, MalformedPayload, Outgoing
from handler.protocol import (
    BlockChange,
    Chat,
    ChatView,
    GroupChange,
    Message,
    ReceiptFrame,
    TypingEvent,
)

WHEN = "2026-01-01T00:00:00.000Z"
EDITED = "2026-01-01T00:00:01.500Z"
ODD_TEXT = 'a\x00b \ufeff \U0010ffff \r\n "q" \U0001f600'
MESSAGE = Message("12", "7", "bob", "alice", "hi", WHEN, "client-1", seq=5, version=9)
EDITED_MESSAGE = Message(
    "12", "7", "bob", "alice", "hi again", WHEN, "client-1", seq=5, version=10, edited_at=EDITED
)
TOMBSTONE = Message(
    "12", "7", "bob", "alice", "", WHEN, seq=5, version=11, edited_at=EDITED, deleted=True
)
RECEIPT = ReceiptFrame("7", "alice", "read", 5, "12", WHEN)
CHAT = Chat("7", ("alice", "bob"), "bob", WHEN)
GROUP = Chat("8", ("alice", "bob", "carol"), "alice", WHEN, "group", "Team")
GROUP_MESSAGE = Message("13", "8", "bob", None, "hi all", WHEN, seq=2, version=3)
# Carol was just added (after message 2: not shown it), dave removed; version 3 at the change.
CHANGE = GroupChange(
    ChatView(
        GROUP,
        GROUP_MESSAGE,
        0,
        (("alice", 2), ("bob", 2), ("carol", 2)),
        (("alice", 2), ("bob", 2), ("carol", 2)),
        (("alice", 0), ("bob", 0), ("carol", 2)),
    ),
    added=("carol",),
    removed=("dave",),
    unread=(("alice", 1), ("bob", 0), ("carol", 0)),
    unseen_last=("carol",),
    version=3,
)


def members_event(change: GroupChange = CHANGE) -> Delivery:
    return Delivery(
        "members",
        (*change.added, *change.kept, *change.removed),
        group=change,
        origin_connection="conn-1",
        origin_request_id="r-3",
    )


def message_event(message: Message = MESSAGE) -> Delivery:
    return Delivery(
        "message",
        ("alice", "bob"),
        message=message,
        origin_connection="conn-1",
        origin_request_id="r-1",
    )


def update_event(message: Message = EDITED_MESSAGE) -> Delivery:
    return Delivery(
        "update",
        ("alice", "bob"),
        message=message,
        origin_connection="conn-1",
        origin_request_id="r-2",
    )


def receipt_event(receipt: ReceiptFrame = RECEIPT) -> Delivery:
    return Delivery(
        "receipt", ("bob", "alice"), receipt=receipt, origin_connection="c", origin_request_id=3
    )


TYPING = TypingEvent("7", "alice", True)
BLOCK = BlockChange("alice", "bob", True, ("bob", "carol"))
UNBLOCK = BlockChange("alice", "bob", False, ())


def typing_event(typing: TypingEvent = TYPING) -> Delivery:
    # Typing is never acknowledged: no origin, as the hub publishes it.
    return Delivery("typing", ("bob",), typing=typing)


def block_event(block: BlockChange = BLOCK) -> Delivery:
    return Delivery(
        "block",
        (block.blocker, block.blocked),
        block=block,
        origin_connection="conn-1",
        origin_request_id="r-4",
    )


# --------------------------------------------------------------------------- events


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (
            message_event(),
            b'{"o":"n1","m":["12","7","bob","alice","hi","2026-01-01T00:00:00.000Z",'
            b'"client-1",5,9,null,false]}',
        ),
        (
            update_event(),
            b'{"o":"n1","u":["12","7","bob","alice","hi again","2026-01-01T00:00:00.000Z",'
            b'"client-1",5,10,"2026-01-01T00:00:01.500Z",false]}',
        ),
        (
            update_event(TOMBSTONE),
            b'{"o":"n1","u":["12","7","bob","alice","","2026-01-01T00:00:00.000Z",'
            b'null,5,11,"2026-01-01T00:00:01.500Z",true]}',
        ),
        (
            receipt_event(),
            b'{"o":"n1","k":["7","alice","read",5,"12","2026-01-01T00:00:00.000Z"]}',
        ),
        (
            Delivery("chat", ("alice", "bob"), chat=CHAT),
            b'{"o":"n1","c":["7",["alice","bob"],"bob","2026-01-01T00:00:00.000Z","direct",null]}',
        ),
        (
            Delivery("chat", ("alice", "bob", "carol"), chat=GROUP),
            b'{"o":"n1","c":["8",["alice","bob","carol"],"alice","2026-01-01T00:00:00.000Z",'
            b'"group","Team"]}',
        ),
        (
            message_event(GROUP_MESSAGE),
            b'{"o":"n1","m":["13","8","bob",null,"hi all","2026-01-01T00:00:00.000Z",'
            b"null,2,3,null,false]}",
        ),
        (
            members_event(),
            b'{"o":"n1","g":[["8",["alice","bob","carol"],"alice","2026-01-01T00:00:00.000Z",'
            b'"group","Team"],["13","8","bob",null,"hi all","2026-01-01T00:00:00.000Z",null,2,3,'
            b'null,false],[["alice",2],["bob",2],["carol",2]],[["alice",2],["bob",2],'
            b'["carol",2]],["carol"],["dave"],[["alice",1],["bob",0],["carol",0]],["carol"],3,'
            b'[["alice",0],["bob",0],["carol",2]]]}',
        ),
        (
            members_event(GroupChange(ChatView.fresh(GROUP), removed=("dave",), version=0)),
            b'{"o":"n1","g":[["8",["alice","bob","carol"],"alice","2026-01-01T00:00:00.000Z",'
            b'"group","Team"],null,[["alice",0],["bob",0],["carol",0]],[["alice",0],["bob",0],'
            b'["carol",0]],[],["dave"],[],[],0,[["alice",0],["bob",0],["carol",0]]]}',
        ),
        (typing_event(), b'{"o":"n1","t":["7","alice",true]}'),
        (
            typing_event(TypingEvent("ç 😀", "ünï 😀", False)),
            '{"o":"n1","t":["ç 😀","ünï 😀",false]}'.encode(),
        ),
        (block_event(), b'{"o":"n1","b":["alice","bob",true,["bob","carol"]]}'),
        (block_event(UNBLOCK), b'{"o":"n1","b":["alice","bob",false,[]]}'),
    ],
    ids=[
        "message",
        "update",
        "tombstone",
        "receipt",
        "chat",
        "group-chat",
        "group-message",
        "members",
        "members-no-message",
        "typing",
        "typing-odd-text",
        "block",
        "unblock",
    ],
)
def test_an_event_is_pinned_to_its_bytes(event: Delivery, expected: bytes) -> None:
    assert redis_codec.encode_event("n1", event) == expected


@pytest.mark.parametrize(
    "event",
    [
        message_event(),
        message_event(Message("1", "7", "bob", "alice", "hi", WHEN, seq=1, version=1)),
        message_event(Message("2", "7", "bob", "ünï 😀", ODD_TEXT, WHEN, "ç 😀", seq=2, version=2)),
        update_event(),
        update_event(TOMBSTONE),
        update_event(
            Message("2", "7", "bob", "alice", ODD_TEXT, WHEN, seq=2, version=3, edited_at=EDITED)
        ),
        receipt_event(),
        receipt_event(ReceiptFrame("7", "bob", "delivered", 0, None, WHEN)),
        receipt_event(ReceiptFrame("7", "ünï 😀", "delivered", 2**40, "99", WHEN)),
        Delivery("chat", ("alice", "bob"), chat=CHAT),
        Delivery("chat", ("alice", "bob"), chat=Chat("8", ("ünï 😀", "bob"), "ünï 😀", WHEN)),
        Delivery("chat", ("alice", "bob", "carol"), chat=GROUP),
        Delivery(
            "chat",
            ("bob",),
            chat=Chat("9", ("bob",), "ünï 😀", WHEN, "group", ODD_TEXT),  # everyone else left
        ),
        message_event(GROUP_MESSAGE),
        update_event(
            Message("13", "8", "bob", None, ODD_TEXT, WHEN, "c", seq=2, version=4, edited_at=EDITED)
        ),
    ],
    ids=[
        "message",
        "first-of-chat",
        "odd-text",
        "update",
        "tombstone",
        "update-odd-text",
        "receipt",
        "receipt-at-zero",
        "receipt-odd-text",
        "chat",
        "chat-odd-text",
        "group-chat",
        "group-chat-odd-text",
        "group-message",
        "group-update",
    ],
)
def test_a_remote_copy_is_narrowed_to_the_channels_user(event: Delivery) -> None:
    decoded = redis_codec.decode_event(orjson.loads(redis_codec.encode_event("n1", event)), "bob")
    # Recipients come from the channel; the origin connection stays on the publishing node.
    assert decoded == Delivery(
        event.kind, ("bob",), message=event.message, chat=event.chat, receipt=event.receipt
    )
    # Every field the order gate and the frames need survives: seq, version, the change.
    if event.message is not None:
        assert decoded.message is not None
        assert (decoded.position, decoded.previous) == (event.position, event.previous)
        assert decoded.message.to_wire() == event.message.to_wire()
        assert decoded.message.recipient_id == event.message.recipient_id
    if event.chat is not None:
        assert decoded.chat is not None
        assert (decoded.chat.kind, decoded.chat.title) == (event.chat.kind, event.chat.title)


def test_an_update_hidden_from_some_members_names_them() -> None:
    """A change of a message reaches only the members who had it; the others (who joined
    after it) still get its place in the chat's order, marked hidden."""
    event = attrs.evolve(update_event(EDITED_MESSAGE), hidden=("carol",))
    encoded = redis_codec.encode_event("n1", event)
    assert encoded == (
        b'{"o":"n1","u":["12","7","bob","alice","hi again","2026-01-01T00:00:00.000Z",'
        b'"client-1",5,10,"2026-01-01T00:00:01.500Z",false],"h":["carol"]}'
    )
    payload = orjson.loads(encoded)
    for user, hidden in (("carol", ("carol",)), ("alice", ())):
        decoded = redis_codec.decode_event(payload, user)
        assert decoded == Delivery("update", (user,), message=EDITED_MESSAGE, hidden=hidden)
    assert b'"h"' not in redis_codec.encode_event("n1", update_event())


@pytest.mark.parametrize(
    "change",
    [
        CHANGE,
        GroupChange(ChatView.fresh(GROUP), removed=("dave",)),  # no message yet
        GroupChange(ChatView.fresh(GROUP), added=("alice", "bob", "carol"), version=2**40),
        GroupChange(
            ChatView(
                Chat("9", ("ünï 😀", "zed"), "zed", WHEN, "group", ODD_TEXT),
                Message("2", "9", "zed", None, ODD_TEXT, WHEN, "ç", seq=1, version=7, deleted=True),
                0,
                (("ünï 😀", 1), ("zed", 1)),
                (("ünï 😀", 0), ("zed", 1)),
                (("ünï 😀", 1), ("zed", 0)),
            ),
            added=("ünï 😀",),
            unread=(("ünï 😀", 0), ("zed", 0)),
            unseen_last=("ünï 😀",),
            version=7,
        ),
    ],
    ids=["added-and-removed", "no-message", "everyone-added", "odd-text"],
)
@pytest.mark.parametrize("user", ["carol", "dave", "alice", "ünï 😀"])
def test_a_members_event_round_trips_narrowed_to_the_channels_user(
    change: GroupChange, user: str
) -> None:
    """One payload serves every member: the user comes from the channel, and every user's
    part (unread counts, who is new, who does not see the last message) survives."""
    payload = orjson.loads(redis_codec.encode_event("n1", members_event(change)))
    decoded = redis_codec.decode_event(payload, user)
    assert decoded == Delivery("members", (user,), group=change)
    assert decoded.group is not None
    assert decoded.group.view_for(user) == change.view_for(user)
    assert decoded.group.kept == change.kept


@pytest.mark.parametrize(
    "event",
    [
        typing_event(),
        typing_event(TypingEvent("7", "alice", False)),
        typing_event(TypingEvent("ç 😀", "ünï 😀", True)),
        typing_event(TypingEvent(ODD_TEXT, ODD_TEXT, False)),
        attrs.evolve(typing_event(), origin_connection="conn-1", origin_request_id="r-5"),
        block_event(),
        block_event(UNBLOCK),
        block_event(BlockChange("alice", "bob", False, ("carol", "dave"))),  # others still
        block_event(BlockChange("ünï 😀", "ç 😀", True, ("zed", "ç 😀", "ünï ☃"))),
        block_event(BlockChange(ODD_TEXT, "bob", True, ("bob", ODD_TEXT))),
        attrs.evolve(block_event(), origin_connection=None, origin_request_id=None),
        attrs.evolve(block_event(), origin_request_id=2**40),
    ],
    ids=[
        "typing",
        "typing-stopped",
        "typing-odd-text",
        "typing-odd-text-stopped",
        "typing-with-origin",
        "block",
        "unblock",
        "unblock-others-still-blocked",
        "block-odd-text",
        "block-odd-text-in-list",
        "block-without-origin",
        "block-integer-request-id",
    ],
)
@pytest.mark.parametrize("user", ["bob", "alice", "ünï 😀"])
def test_a_typing_or_block_event_round_trips_narrowed_to_the_channels_user(
    event: Delivery, user: str
) -> None:
    """The same payload for every recipient: the user comes from the channel, the origin
    (connection and request id) stays on the publishing node."""
    decoded = redis_codec.decode_event(orjson.loads(redis_codec.encode_event("n1", event)), user)
    assert decoded == Delivery(event.kind, (user,), block=event.block, typing=event.typing)
    # 1 == True: equality alone would let a number through where a flag belongs.
    if decoded.block is not None:
        assert type(decoded.block.on) is bool
    if decoded.typing is not None:
        assert type(decoded.typing.active) is bool


@pytest.mark.parametrize(
    "payload",
    [
        {"o": "n0", "m": ["12", "7", "bob", "alice", "hi", WHEN, None]},
        {"o": "n0", "m": ["12", "7", "bob", "alice", "hi", WHEN, "client-1", "11"]},
    ],
    ids=["no-predecessor", "with-predecessor"],
)
def test_a_version_1_message_is_refused_not_misread(payload: dict[str, Any]) -> None:
    with pytest.raises(MalformedPayload):
        redis_codec.decode_event(payload, "alice")


@pytest.mark.parametrize(
    "payload",
    [
        {"o": "n1"},
        {"o": "n1", "r": 1},
        {"o": "n1", "s": "t"},
        {"o": "n1", "x": [1]},
        {},
        # Kinds are one letter and case matters: these are not typing nor a block.
        {"o": "n1", "T": ["7", "alice", True]},
        {"o": "n1", "typing": ["7", "alice", True]},
        {"o": "n1", "B": ["alice", "bob", True, ["bob"]]},
    ],
    ids=[
        "heartbeat",
        "resync-notice",
        "settle-request",
        "unknown-kind",
        "empty",
        "typing-upper-case",
        "typing-spelled-out",
        "block-upper-case",
    ],
)
def test_a_payload_without_an_event_decodes_to_none(payload: dict[str, Any]) -> None:
    assert redis_codec.decode_event(payload, "alice") is None


FULL = ["12", "7", "bob", "alice", "hi", WHEN, None, 5, 9, None, False]
G_FULL: list[Any] = orjson.loads(redis_codec.encode_event("n0", members_event()))["g"]


def test_the_members_payload_template_decodes() -> None:
    """The malformed rows below break one part each of this well-formed payload."""
    assert redis_codec.decode_event({"g": G_FULL}, "alice") == Delivery(
        "members", ("alice",), group=CHANGE
    )


@pytest.mark.parametrize(
    "payload",
    [
        # A string where an array of user ids belongs is not split into characters.
        {"c": ["7", "ab", "bob", WHEN, "direct", None]},
        {"c": ["7", "alice", "alice", WHEN, "group", "T"]},
        {"c": ["7", ["alice"], "bob", WHEN, "direct", None]},  # a direct chat is a pair
        {"c": ["7", ["alice", "bob", "carol"], "bob", WHEN, "direct", None]},
        {"g": [*G_FULL[:4], "carol", *G_FULL[5:]]},
        {"g": [*G_FULL[:5], "dave", *G_FULL[6:]]},
        {"g": [*G_FULL[:7], "carol", *G_FULL[8:]]},
    ],
    ids=[
        "chat-participants-string",
        "group-participants-string",
        "direct-one-participant",
        "direct-three-participants",
        "members-added-string",
        "members-removed-string",
        "members-unseen-string",
    ],
)
def test_a_full_length_event_of_the_wrong_shape_is_refused_not_misread(
    payload: dict[str, Any],
) -> None:
    """The rows of `test_a_malformed_event_raises_one_error` for chat arrays are cut short
    (version 1's four fields); these have version 2's length, so only the shape is wrong."""
    with pytest.raises(MalformedPayload):
        redis_codec.decode_event(payload, "alice")


@pytest.mark.parametrize(
    "payload",
    [
        {"m": FULL[:10]},  # cut short: no deleted flag
        {"m": FULL[:8]},  # no version
        {"m": [*FULL[:7], None, 9, None, False]},  # seq null
        {"m": [*FULL[:7], 5, "nine", None, False]},  # version not a number
        {"m": [*FULL[:7], [5], 9, None, False]},
        {"m": []},
        {"m": None},
        {"m": 12},
        {"m": {"0": "12"}},
        {"u": FULL[:10]},
        {"u": [*FULL[:7], 5, None, None, False]},  # an update without its version
        {"u": []},
        {"u": None},
        {"u": 5},
        {"k": ["7", "alice", "read", 5, "12"]},  # no timestamp
        {"k": ["7", "alice", "read", "five", "12", WHEN]},
        {"k": ["7", "alice", "read", None, "12", WHEN]},
        {"k": []},
        {"k": None},
        {"k": 7},
        {"k": {"chat": "7"}},
        {"c": ["7", ["alice"], "bob", WHEN]},  # one participant
        {"c": ["7", "a", "bob", WHEN]},  # participants not a pair
        {"c": ["7", ["alice", "bob"], "bob"]},  # no creation time
        {"c": ["7", None, "bob", WHEN]},
        {"c": 7},
        # Version 2's chat arrays (with kind and title) of the wrong shape.
        {"c": ["7", ["alice", "bob"], "bob", WHEN, "direct"]},  # no title
        {"c": ["7", None, "bob", WHEN, "direct", None]},
        {"c": ["7", 5, "bob", WHEN, "group", "T"]},
        {"c": None},
        {"g": None},
        {"g": 5},
        {"g": []},
        {"g": {"chat": "8"}},
        {"g": G_FULL[:8]},  # no version
        {"g": G_FULL[:9]},  # no joined seqs
        {"g": [*G_FULL[:8], None, G_FULL[9]]},
        {"g": [*G_FULL[:8], "three", G_FULL[9]]},
        {"g": [*G_FULL[:9], None]},
        {"g": [*G_FULL[:9], [["alice"]]]},
        {"g": [*G_FULL[:9], [["alice", "zero"]]]},
        {"g": [G_FULL[0][:4], *G_FULL[1:]]},  # a version 1 chat array
        {"g": [None, *G_FULL[1:]]},
        {"g": [G_FULL[0], G_FULL[1][:8], *G_FULL[2:]]},  # last message cut short
        {"g": [G_FULL[0], 5, *G_FULL[2:]]},
        {"g": [*G_FULL[:2], [["alice"]], *G_FULL[3:]]},  # a mark without its number
        {"g": [*G_FULL[:2], [["alice", "two"]], *G_FULL[3:]]},
        {"g": [*G_FULL[:2], [["alice", None]], *G_FULL[3:]]},
        {"g": [*G_FULL[:2], None, *G_FULL[3:]]},
        {"g": [*G_FULL[:3], 5, *G_FULL[4:]]},
        {"g": [*G_FULL[:4], 5, *G_FULL[5:]]},  # added a number
        {"g": [*G_FULL[:4], None, *G_FULL[5:]]},
        {"g": [*G_FULL[:5], 5, *G_FULL[6:]]},
        {"g": [*G_FULL[:6], [["alice", 1, 2]], *G_FULL[7:]]},  # not a pair
        {"g": [*G_FULL[:6], [5], *G_FULL[7:]]},
        {"g": [*G_FULL[:7], None, *G_FULL[8:]]},
        {"t": ["7", "alice"]},  # no flag
        {"t": ["7", "alice", True, 6000]},  # one field too many
        {"t": ["7", "alice", 1]},  # a number, not a boolean
        {"t": ["7", "alice", "true"]},
        {"t": ["7", "alice", None]},
        {"t": [7, "alice", True]},
        {"t": ["7", None, True]},
        {"t": ["7", ["alice"], True]},
        {"t": []},
        {"t": None},
        {"t": 7},
        {"t": "7"},
        {"t": {"chat_id": "7", "user_id": "alice", "active": True}},
        {"b": ["alice", "bob", True]},  # no list of blocks
        {"b": ["alice", "bob", True, ["bob"], "x"]},
        {"b": ["alice", "bob", 1, ["bob"]]},
        {"b": ["alice", "bob", "on", ["bob"]]},
        {"b": ["alice", "bob", None, ["bob"]]},
        {"b": ["alice", 5, True, ["5"]]},
        {"b": [None, "bob", True, ["bob"]]},
        {"b": ["alice", "bob", True, "bob"]},  # not split into characters
        {"b": ["alice", "bob", True, None]},
        {"b": ["alice", "bob", True, [5]]},
        {"b": ["alice", "bob", True, [["bob"]]]},
        {"b": []},
        {"b": None},
        {"b": 5},
        {"b": {"blocker": "alice"}},
    ],
    ids=[
        "message-no-deleted",
        "message-no-version",
        "message-seq-null",
        "message-version-text",
        "message-seq-list",
        "message-empty",
        "message-null",
        "message-number",
        "message-object",
        "update-short",
        "update-version-null",
        "update-empty",
        "update-null",
        "update-number",
        "receipt-short",
        "receipt-seq-text",
        "receipt-seq-null",
        "receipt-empty",
        "receipt-null",
        "receipt-number",
        "receipt-object",
        "chat-one-participant",
        "chat-participants-string",
        "chat-short",
        "chat-participants-null",
        "chat-number",
        "chat-v2-no-title",
        "chat-v2-participants-null",
        "chat-v2-participants-number",
        "chat-null",
        "members-null",
        "members-number",
        "members-empty",
        "members-object",
        "members-no-version",
        "members-no-joined",
        "members-version-null",
        "members-version-text",
        "members-joined-null",
        "members-joined-no-number",
        "members-joined-text",
        "members-v1-chat",
        "members-chat-null",
        "members-last-short",
        "members-last-number",
        "members-mark-no-number",
        "members-mark-text",
        "members-mark-null",
        "members-marks-null",
        "members-delivered-number",
        "members-added-number",
        "members-added-null",
        "members-removed-number",
        "members-unread-triple",
        "members-unread-number",
        "members-unseen-null",
        "typing-short",
        "typing-long",
        "typing-flag-number",
        "typing-flag-text",
        "typing-flag-null",
        "typing-chat-number",
        "typing-user-null",
        "typing-user-list",
        "typing-empty",
        "typing-null",
        "typing-number",
        "typing-string",
        "typing-object",
        "block-short",
        "block-long",
        "block-flag-number",
        "block-flag-text",
        "block-flag-null",
        "block-blocked-number",
        "block-blocker-null",
        "block-list-string",
        "block-list-null",
        "block-list-number",
        "block-list-nested",
        "block-empty",
        "block-null",
        "block-number",
        "block-object",
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
    lambda inner: st.lists(inner, max_size=11) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(
    st.dictionaries(
        st.sampled_from(["o", "m", "u", "k", "c", "g", "t", "b", "r", "s", "a"]) | st.text(),
        json_values,
    )
)
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
@pytest.mark.parametrize("kind", ["message", "update"])
def test_what_json_cannot_carry_raises_an_encode_error(content: str, kind: str) -> None:
    message = Message("1", "7", "bob", "alice", content, WHEN, seq=1, version=2)
    event = message_event(message) if kind == "message" else update_event(message)
    with pytest.raises((TypeError, orjson.JSONEncodeError)):
        redis_codec.encode_event("n1", event)


@pytest.mark.parametrize(
    "event",
    [
        typing_event(TypingEvent("\ud800", "alice", True)),
        typing_event(TypingEvent("7", "lone \udfff", False)),
        block_event(BlockChange("alice", "\ud800", True, ("\ud800",))),
        block_event(BlockChange("alice", "bob", False, ("lone \udfff",))),
    ],
    ids=["typing-chat", "typing-user", "block-blocked", "block-list"],
)
def test_a_typing_or_block_json_cannot_carry_raises_an_encode_error(event: Delivery) -> None:
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
