"""The Redis bus's wire format: channel names and payloads, bytes in and bytes out.

Pure (no I/O, no clock, no trio): `handler.bus.redis` publishes what this module builds and
hands it what comes back; the tests check it as tables. Every node of a cluster must speak the
same format. Version 2 changed the message arrays (seq and version instead of the previous
message's id) together with the schema, so a cluster upgrades all its nodes together.

Channels, in one namespace (`prefix`):
- `{prefix}u:{user_id}`: the user's events, resync notices, settle and disconnect requests;
- `{prefix}n:{node_id}`: one node's heartbeat and the answers to its requests;
- `{prefix}all`: "resynchronize everyone" notices.

Payloads are orjson objects; `"o"` always names the publishing node, so a node can skip the
copies of its own payloads that Redis sends back:
- a message event: `{"o", "m": [message_id, chat_id, sender_id, recipient_id, content,
  timestamp, client_message_id, seq, version, edited_at, deleted]}` (positional arrays:
  compact), and a changed message the same under `"u"` (with `"h"`: the recipients not
  told of it, see `Delivery.hidden`);
- a receipt: `{"o", "k": [chat_id, user_id, kind, seq, message_id, timestamp]}`;
- a chat event: `{"o", "c": [chat_id, [participant, ...], created_by, created_at, kind,
  title]}`;
- a change of a group's members: `{"o", "g": [chat, last message array or null, read marks,
  delivered marks, added, removed, unread counts, unseen_last, version, joined seqs]}`,
  `chat` the chat
  event's array and each marks or counts list `[[user_id, number], ...]` (one payload for all
  members: the per-user parts are lists, not one object per member);
- a block or unblock: `{"o", "b": [blocker, blocked, on, [every user the blocker blocks]]}`;
- typing: `{"o", "t": [chat_id, user_id, active]}` (at most once: never repaired);
- a resync notice: `{"o", "r": 1}`;
- a settle request: `{"o", "s": token}`, and its answer `{"o", "a": token}`;
- a disconnect request: `{"o", "d": token}`, and its answer `{"o", "a": token, "n": closed}`
  (how many of the user's connections the answering node closed);
- a heartbeat: `{"o"}` alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import orjson

from handler.bus.base import Delivery
from handler.protocol import (
    DIRECT,
    GROUP,
    BlockChange,
    Chat,
    ChatView,
    GroupChange,
    Message,
    ReceiptFrame,
    TypingEvent,
)


class MalformedPayload(ValueError):
    """A payload that decodes as JSON but is not a well-formed event (the one error here)."""


@attrs.frozen
class Outgoing:
    """One payload and the channels to publish it on (an item of the publisher's queue)."""

    channels: tuple[bytes, ...]
    payload: bytes
    # False for what may be lost without repair (typing): a failed send owes no resync.
    repaired: bool = True


class Channels:
    """The channel names of one bus namespace, as bytes (what Redis hands back)."""

    __slots__ = ("_node_prefix", "_user_prefix", "all")

    def __init__(self, prefix: str) -> None:
        self._user_prefix = f"{prefix}u:".encode()
        self._node_prefix = f"{prefix}n:".encode()
        self.all = f"{prefix}all".encode()

    def user(self, user_id: str) -> bytes:
        # surrogatepass: a user id is any JSON string, lone surrogates included.
        return self._user_prefix + user_id.encode("utf-8", "surrogatepass")

    def node(self, node_id: str) -> bytes:
        return self._node_prefix + node_id.encode("utf-8", "surrogatepass")

    def user_of(self, channel: bytes) -> str | None:
        """The user whose channel this is, or None for any other channel."""
        if not channel.startswith(self._user_prefix):
            return None
        return channel[len(self._user_prefix) :].decode("utf-8", "surrogatepass")

    def users_of(self, channels: Iterable[bytes]) -> list[str]:
        """The users of the user channels among `channels`, in order."""
        return [user for user in map(self.user_of, channels) if user is not None]


def _message_array(message: Message) -> list[Any]:
    return [
        message.message_id,
        message.chat_id,
        message.sender_id,
        message.recipient_id,
        message.content,
        message.timestamp,
        message.client_message_id,
        message.seq,
        message.version,
        message.edited_at,
        message.deleted,
    ]


def encode_event(node: str, event: Delivery) -> bytes:
    """The remote copy of `event`: origin node, kind and record as positional arrays.

    Recipients and the origin connection are left out: a receiving node learns the recipient
    from the channel, and the origin connection lives on the publishing node.
    Raises `TypeError` or `orjson.JSONEncodeError` for what JSON cannot carry.
    """
    kind = event.kind
    if kind == "message" or kind == "update":
        message = event.message
        assert message is not None
        payload = {"o": node, "m" if kind == "message" else "u": _message_array(message)}
        if event.hidden:
            payload["h"] = list(event.hidden)
        return orjson.dumps(payload)
    if kind == "typing":
        t = event.typing
        assert t is not None
        return orjson.dumps({"o": node, "t": [t.chat_id, t.user_id, t.active]})
    if kind == "block":
        b = event.block
        assert b is not None
        return orjson.dumps({"o": node, "b": [b.blocker, b.blocked, b.on, list(b.blocks)]})
    if kind == "receipt":
        r = event.receipt
        assert r is not None
        return orjson.dumps(
            {"o": node, "k": [r.chat_id, r.user_id, r.kind, r.seq, r.message_id, r.timestamp]}
        )
    group = event.group
    if group is not None:
        view = group.view
        last = view.last_message
        return orjson.dumps(
            {
                "o": node,
                "g": [
                    _chat_array(view.chat),
                    None if last is None else _message_array(last),
                    view.read_up_to,
                    view.delivered_up_to,
                    group.added,
                    group.removed,
                    group.unread,
                    group.unseen_last,
                    group.version,
                    view.joined_seq,
                ],
            }
        )
    chat = event.chat
    assert chat is not None
    return orjson.dumps({"o": node, "c": _chat_array(chat)})


def _chat_array(chat: Chat) -> list[Any]:
    return [
        chat.chat_id,
        list(chat.participants),
        chat.created_by,
        chat.created_at,
        chat.kind,
        chat.title,
    ]


def _strings(items: Any) -> tuple[str, ...]:
    """A list of user ids, refused (not split into characters) when it is anything else."""
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise ValueError(f"not a list of strings: {items!r}")
    return tuple(items)


def _chat(c: Any) -> Chat:
    if not isinstance(c, list) or len(c) != 6:
        raise ValueError(f"a chat array has 6 fields: {c!r}")
    participants = _strings(c[1])
    kind = c[4]
    if kind not in (DIRECT, GROUP) or (kind == DIRECT and len(participants) != 2):
        raise ValueError(f"not a chat of its kind: {c!r}")
    if not all(isinstance(field, str) for field in (c[0], c[2], c[3])):
        raise ValueError(f"a chat's id, creator and time are strings: {c!r}")
    return Chat(c[0], participants, c[2], c[3], kind, c[5])


def _pairs(items: Any) -> tuple[tuple[str, int], ...]:
    if not isinstance(items, list):
        raise ValueError(f"not a list of pairs: {items!r}")
    pairs = []
    for pair in items:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
            raise ValueError(f"not a [user, number] pair: {pair!r}")
        if isinstance(pair[1], bool) or not isinstance(pair[1], int):
            raise ValueError(f"not a [user, number] pair: {pair!r}")
        pairs.append((pair[0], pair[1]))
    return tuple(pairs)


def _group(g: Any) -> GroupChange:
    if not isinstance(g, list) or len(g) != 10:
        raise ValueError(f"a members change has 10 fields: {g!r}")
    view = ChatView(
        _chat(g[0]),
        None if g[1] is None else _message(g[1]),
        0,
        _pairs(g[2]),
        _pairs(g[3]),
        _pairs(g[9]),
    )
    return GroupChange(
        view, _strings(g[4]), _strings(g[5]), _pairs(g[6]), _strings(g[7]), int(g[8])
    )


def _typing(t: Any) -> TypingEvent:
    if not (isinstance(t, list) and len(t) == 3 and isinstance(t[2], bool)):
        raise ValueError(f"a typing array has chat, user and a boolean: {t!r}")
    chat_id, user_id = _strings(t[:2])
    return TypingEvent(chat_id, user_id, t[2])


def _block(b: Any) -> BlockChange:
    if not (isinstance(b, list) and len(b) == 4 and isinstance(b[2], bool)):
        raise ValueError(f"a block array has two users, a boolean and a list: {b!r}")
    blocker, blocked = _strings(b[:2])
    return BlockChange(blocker, blocked, b[2], _strings(b[3]))


def _message(m: list[Any]) -> Message:
    return Message(
        m[0], m[1], m[2], m[3], m[4], m[5], m[6], int(m[7]), int(m[8]), m[9], bool(m[10])
    )


def decode_event(data: Mapping[str, Any], user_id: str) -> Delivery | None:
    """The event in a decoded payload, narrowed to `user_id` (whose channel carried it).

    None when the payload carries no event (a notice of a kind this node does not know);
    `MalformedPayload` when its event is cut short or of the wrong shape.
    """
    try:
        if "m" in data:
            return Delivery("message", (user_id,), message=_message(data["m"]))
        if "u" in data:
            hidden = (user_id,) if user_id in data.get("h", ()) else ()
            return Delivery("update", (user_id,), message=_message(data["u"]), hidden=hidden)
        if "k" in data:
            k = data["k"]
            receipt = ReceiptFrame(k[0], k[1], k[2], int(k[3]), k[4], k[5])
            return Delivery("receipt", (user_id,), receipt=receipt)
        if "c" in data:
            return Delivery("chat", (user_id,), chat=_chat(data["c"]))
        if "g" in data:
            return Delivery("members", (user_id,), group=_group(data["g"]))
        if "t" in data:
            return Delivery("typing", (user_id,), typing=_typing(data["t"]))
        if "b" in data:
            return Delivery("block", (user_id,), block=_block(data["b"]))
    except (LookupError, TypeError, ValueError) as error:
        raise MalformedPayload(f"malformed event: {error!r}") from error
    return None


def resync_notice(node: str) -> bytes:
    """Tells the nodes on a channel that events for its users (or everyone) were lost."""
    return orjson.dumps({"o": node, "r": 1})


def settle_request(node: str, token: str) -> bytes:
    return orjson.dumps({"o": node, "s": token})


def settle_answer(node: str, token: str) -> bytes:
    return orjson.dumps({"o": node, "a": token})


def disconnect_request(node: str, token: str) -> bytes:
    return orjson.dumps({"o": node, "d": token})


def disconnect_answer(node: str, token: str, closed: int) -> bytes:
    return orjson.dumps({"o": node, "a": token, "n": closed})


def heartbeat(node: str) -> bytes:
    return orjson.dumps({"o": node})
