"""Wire protocol: frames, decoding, validation and encoding. Pure code, no I/O.

This module is the schema shared by the server, the Python clients and the docs. Client frames
are decoded by `decode()` into frozen attrs classes; every rule a frame can break raises
`ProtocolError` with the error code and field of the protocol, never another exception.
Server frames are attrs classes too; `encode()` turns one into the JSON text sent on the wire.

Theory of operation of `decode()`:
1. JSON is parsed by orjson (fast path). orjson refuses a few inputs that are valid JSON but
   carry lone UTF-16 surrogates or integers beyond 64 bits; those are re-parsed by the stdlib
   parser so the client gets `bad_request` naming the field instead of a misleading `bad_json`.
   NaN/Infinity literals, nesting deeper than the parsers allow, and non-objects are `bad_json`.
2. `request_id` is read first, so that every later error can quote it.
3. `type` selects the frame; each frame validates its own fields, in declaration order
   (`decode_object()`: steps 2 and 3, for a frame that is already parsed).
Unknown extra fields are ignored, so clients may send fields a newer server understands.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Final

import attrs
import orjson

from handler.errors import ErrorCode, ProtocolError

MAX_MESSAGE_CHARS: Final = 4096
MAX_FRAME_BYTES: Final = 65536
HISTORY_LIMIT: Final = 1000
FETCH_MESSAGES_DEFAULT: Final = 100
FETCH_MESSAGES_MAX: Final = 1000
MAX_USER_ID_CHARS: Final = 128
MAX_ID_CHARS: Final = 128
MAX_REQUEST_ID_CHARS: Final = 64
MAX_TOKEN_CHARS: Final = 8192
MAX_GROUP_MEMBERS: Final = 256
MAX_TITLE_CHARS: Final = 128
MAX_PRESENCE_IDS: Final = 200
TYPING_EXPIRES_MS: Final = 6000
_INT64_MAX: Final = 2**63 - 1

RequestId = str | int


@attrs.frozen
class Limits:
    """The protocol limits a decoder enforces; defaults are the protocol's, config overrides."""

    max_message_chars: int = MAX_MESSAGE_CHARS
    history_limit: int = HISTORY_LIMIT
    max_group_members: int = MAX_GROUP_MEMBERS


DEFAULT_LIMITS: Final = Limits()


# --------------------------------------------------------------------------- client frames


@attrs.frozen
class CreateChat:
    recipient_id: str
    token: str | None = None
    request_id: RequestId | None = None
    type: ClassVar[str] = "create_chat"


@attrs.frozen
class SendMessage:
    """`recipient_id` is required in a direct chat and absent in a group (checked once the
    chat is known)."""

    chat_id: str
    recipient_id: str | None
    content: str
    client_message_id: str | None = None
    token: str | None = None
    request_id: RequestId | None = None
    type: ClassVar[str] = "send_message"


@attrs.frozen
class FetchChats:
    limit: int = HISTORY_LIMIT
    token: str | None = None
    request_id: RequestId | None = None
    type: ClassVar[str] = "fetch_chats"


@attrs.frozen
class FetchMessages:
    chat_id: str
    before: str | None = None
    limit: int = FETCH_MESSAGES_DEFAULT
    token: str | None = None
    request_id: RequestId | None = None
    type: ClassVar[str] = "fetch_messages"


@attrs.frozen
class Ping:
    token: str | None = None
    request_id: RequestId | None = None
    type: ClassVar[str] = "ping"


@attrs.frozen
class MarkRead:
    chat_id: str
    message_id: str
    token: str | None = None
    request_id: RequestId | None = None
    type: ClassVar[str] = "mark_read"


@attrs.frozen
class EditMessage:
    chat_id: str
    message_id: str
    content: str
    token: str | None = None
    request_id: RequestId | None = None
    type: ClassVar[str] = "edit_message"


@attrs.frozen
class DeleteMessage:
    chat_id: str
    message_id: str
    token: str | None = None
    request_id: RequestId | None = None
    type: ClassVar[str] = "delete_message"


@attrs.frozen
class CreateGroup:
    title: str
    member_ids: tuple[str, ...]
    token: str | None = None
    request_id: RequestId | None = None
    type: ClassVar[str] = "create_group"


@attrs.frozen
class AddMembers:
    chat_id: str
    member_ids: tuple[str, ...]
    token: str | None = None
    request_id: RequestId | None = None
    type: ClassVar[str] = "add_members"


@attrs.frozen
class RemoveMember:
    chat_id: str
    user_id: str
    token: str | None = None
    request_id: RequestId | None = None
    type: ClassVar[str] = "remove_member"


@attrs.frozen
class Typing:
    chat_id: str
    active: bool = True
    token: str | None = None
    request_id: RequestId | None = None
    type: ClassVar[str] = "typing"


@attrs.frozen
class FetchPresence:
    """`user_ids` None: the user's most recently active contacts."""

    user_ids: tuple[str, ...] | None = None
    token: str | None = None
    request_id: RequestId | None = None
    type: ClassVar[str] = "fetch_presence"


@attrs.frozen
class BlockUser:
    user_id: str
    token: str | None = None
    request_id: RequestId | None = None
    type: ClassVar[str] = "block_user"


@attrs.frozen
class UnblockUser:
    user_id: str
    token: str | None = None
    request_id: RequestId | None = None
    type: ClassVar[str] = "unblock_user"


@attrs.frozen
class FetchBlocked:
    token: str | None = None
    request_id: RequestId | None = None
    type: ClassVar[str] = "fetch_blocked"


ClientFrame = (
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
    | FetchBlocked
)
# The frames that name a chat the user must be a participant of (loaded before serving).
ChatFrame = (
    SendMessage
    | FetchMessages
    | MarkRead
    | EditMessage
    | DeleteMessage
    | AddMembers
    | RemoveMember
    | Typing
)


# --------------------------------------------------------------------------- records


DIRECT: Final = "direct"
GROUP: Final = "group"


@attrs.frozen
class Chat:
    """A chat as stored. `participants` is sorted: the two user ids of a direct chat (which
    never change), or a group's current members. The per-user state (marks, unread count,
    last message) is a `ChatView`, computed for the user it is sent to."""

    chat_id: str
    participants: tuple[str, ...]
    created_by: str
    created_at: str
    kind: str = DIRECT
    title: str | None = None

    @property
    def is_group(self) -> bool:
        return self.kind == GROUP

    def other_participant(self, user_id: str) -> str | None:
        """The other user of a direct chat; None in a group (its messages have no
        recipient)."""
        if self.kind == GROUP:
            return None
        first, second = self.participants
        return second if first == user_id else first


@attrs.frozen
class ChatView:
    """The chat object of the wire: a chat with its server state, for one user.

    `read_up_to` and `delivered_up_to` hold one `(user_id, seq)` pair per participant, in
    participant order.
    """

    chat: Chat
    last_message: Message | None = None
    unread_count: int = 0
    read_up_to: tuple[tuple[str, int], ...] = ()
    delivered_up_to: tuple[tuple[str, int], ...] = ()
    # A group's: the chat's newest seq when each member joined (0: from the start). Their
    # marks start there, so "read by" of a message counts only members who joined before it.
    joined_seq: tuple[tuple[str, int], ...] = ()

    @classmethod
    def fresh(cls, chat: Chat) -> ChatView:
        """A chat nobody has written to yet: every mark 0."""
        zeros = tuple((user, 0) for user in chat.participants)
        return cls(chat, None, 0, zeros, zeros, zeros if chat.is_group else ())

    @property
    def chat_id(self) -> str:
        return self.chat.chat_id

    def to_wire(self) -> dict[str, Any]:
        chat = self.chat
        last = self.last_message
        return {
            "chat_id": chat.chat_id,
            "kind": chat.kind,
            "title": chat.title,
            "participants": list(chat.participants),
            "created_by": chat.created_by,
            "created_at": chat.created_at,
            "last_message": None if last is None else last.to_wire(),
            "unread_count": self.unread_count,
            "read_up_to": dict(self.read_up_to),
            "delivered_up_to": dict(self.delivered_up_to),
        } | ({"joined_seq": dict(self.joined_seq)} if chat.kind == GROUP else {})


@attrs.frozen
class GroupChange:
    """A committed change of a group's members, as its fan-out needs it.

    `view` is the chat object everyone shares (new participants, everyone's marks, the last
    message). What differs per user is kept apart, so one record serves 256 members:
    `unread` holds each remaining member's unread count, and `unseen_last` the members who
    joined after the last message (they are not shown it). `added` get the chat as a new
    chat; `removed` get a copy that no longer lists them. `version` is the chat's change
    counter at the change: a node's order gate starts an added member's chain there.
    """

    view: ChatView
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    unread: tuple[tuple[str, int], ...] = ()
    unseen_last: tuple[str, ...] = ()
    version: int = 0

    @property
    def kept(self) -> tuple[str, ...]:
        """The members before the change who still are."""
        added = set(self.added)
        return tuple(user for user in self.view.chat.participants if user not in added)

    _unread: dict[str, int] = attrs.field(init=False, eq=False, repr=False)
    _sees_nothing: frozenset[str] = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        # Looked up once per member by the fan-out: built once, not searched per member.
        object.__setattr__(self, "_unread", dict(self.unread))
        object.__setattr__(
            self, "_sees_nothing", frozenset((*self.added, *self.removed, *self.unseen_last))
        )

    def view_for(self, user_id: str) -> ChatView:
        """The chat object for one user: an added or removed user, or one who joined after
        the last message, sees no last message and nothing unread."""
        if user_id in self._sees_nothing:
            return attrs.evolve(self.view, last_message=None, unread_count=0)
        return attrs.evolve(self.view, unread_count=self._unread.get(user_id, 0))


@attrs.frozen
class BlockChange:
    """`blocker` started (`on`) or stopped blocking `blocked`; `blocks` is every user the
    blocker blocks now, sorted (their `blocked` frame)."""

    blocker: str
    blocked: str
    on: bool
    blocks: tuple[str, ...]


@attrs.frozen
class Message:
    """A message in its current state.

    `seq` is its place in its chat (1, 2, 3, ... without gaps). `version` is internal, never
    sent: the chat's change counter when the message was created or last changed (every new
    message and every edit or delete of a chat takes the next one), which orders a chat's
    events across nodes and tells a binding which changes it has already covered.
    """

    message_id: str
    chat_id: str
    sender_id: str
    recipient_id: str | None  # None in a group
    content: str
    timestamp: str
    client_message_id: str | None = None
    seq: int = 0
    version: int = 0
    edited_at: str | None = None
    deleted: bool = False

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "message_id": self.message_id,
            "chat_id": self.chat_id,
            "sender_id": self.sender_id,
            "recipient_id": self.recipient_id,
            "content": self.content,
            "timestamp": self.timestamp,
            "seq": self.seq,
        }
        if self.recipient_id is None:  # a group message has no recipient field at all
            del wire["recipient_id"]
        if self.client_message_id is not None:
            wire["client_message_id"] = self.client_message_id
        # Absent rather than null/false (both allowed): most messages are never changed.
        if self.edited_at is not None:
            wire["edited_at"] = self.edited_at
        if self.deleted:
            wire["deleted"] = True
        return wire


# --------------------------------------------------------------------------- server frames


@attrs.frozen
class Authenticated:
    user_id: str
    request_id: RequestId | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"type": "authenticated", "user_id": self.user_id}


@attrs.frozen
class AllChats:
    data: tuple[ChatView, ...]
    request_id: RequestId | None = None

    def to_wire(self) -> dict[str, Any]:
        return _with_request_id(
            {"type": "all_chats", "data": [chat.to_wire() for chat in self.data]},
            self.request_id,
        )


@attrs.frozen
class NewChats:
    data: tuple[ChatView, ...]
    request_id: RequestId | None = None

    def to_wire(self) -> dict[str, Any]:
        return _with_request_id(
            {"type": "new_chats", "data": [chat.to_wire() for chat in self.data]},
            self.request_id,
        )


@attrs.frozen
class ChatUpdated:
    """`chat_updated`: a group's members changed; `data` is the chat object for the user it
    is sent to (a removed user's copy no longer lists them)."""

    data: ChatView
    request_id: RequestId | None = None

    def to_wire(self) -> dict[str, Any]:
        return _with_request_id(
            {"type": "chat_updated", "data": self.data.to_wire()}, self.request_id
        )


@attrs.frozen
class AllMessages:
    chat_id: str
    data: tuple[Message, ...]
    has_more: bool
    request_id: RequestId | None = None

    def to_wire(self) -> dict[str, Any]:
        return _with_request_id(
            {
                "type": "all_messages",
                "chat_id": self.chat_id,
                "data": [message.to_wire() for message in self.data],
                "has_more": self.has_more,
            },
            self.request_id,
        )


@attrs.frozen
class NewMessages:
    chat_id: str
    data: tuple[Message, ...]

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": "new_messages",
            "chat_id": self.chat_id,
            "data": [message.to_wire() for message in self.data],
        }


@attrs.frozen
class MessageEvent:
    """The live `message` frame; the sender's copy carries its `request_id` as the ack."""

    message: Message
    request_id: RequestId | None = None

    def to_wire(self) -> dict[str, Any]:
        return _with_request_id({"type": "message", **self.message.to_wire()}, self.request_id)


@attrs.frozen
class UpdatedMessages:
    """On binding: the current state of messages the user had received and that changed
    while this device was away."""

    chat_id: str
    data: tuple[Message, ...]

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": "updated_messages",
            "chat_id": self.chat_id,
            "data": [message.to_wire() for message in self.data],
        }


@attrs.frozen
class MessageUpdated:
    """The live `message_updated` frame (an edit or a delete); the requester's copy carries
    its `request_id` as the acknowledgement."""

    message: Message
    request_id: RequestId | None = None

    def to_wire(self) -> dict[str, Any]:
        return _with_request_id(
            {"type": "message_updated", **self.message.to_wire()}, self.request_id
        )


@attrs.frozen
class ReceiptFrame:
    """`receipt`: `user_id`'s `kind` mark of the chat moved to `seq` (`message_id`) at
    `timestamp`."""

    chat_id: str
    user_id: str
    kind: str  # "delivered" or "read"
    seq: int
    message_id: str | None
    timestamp: str
    request_id: RequestId | None = None

    def to_wire(self) -> dict[str, Any]:
        return _with_request_id(
            {
                "type": "receipt",
                "chat_id": self.chat_id,
                "user_id": self.user_id,
                "kind": self.kind,
                "seq": self.seq,
                "message_id": self.message_id,
                "timestamp": self.timestamp,
            },
            self.request_id,
        )


@attrs.frozen
class TypingEvent:
    """`typing`: `user_id` started (or stopped) typing in the chat."""

    chat_id: str
    user_id: str
    active: bool
    expires_in_ms: int = TYPING_EXPIRES_MS

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": "typing",
            "chat_id": self.chat_id,
            "user_id": self.user_id,
            "active": self.active,
            "expires_in_ms": self.expires_in_ms,
        }


@attrs.frozen
class PresenceEntry:
    """One user's presence as another user may see it (`last_seen`: None while online,
    or never connected, or not visible)."""

    user_id: str
    online: bool = False
    last_seen: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "online": self.online, "last_seen": self.last_seen}


@attrs.frozen
class PresenceFrame:
    entries: tuple[PresenceEntry, ...]
    request_id: RequestId | None = None

    def to_wire(self) -> dict[str, Any]:
        return _with_request_id(
            {"type": "presence", "data": [entry.to_wire() for entry in self.entries]},
            self.request_id,
        )


@attrs.frozen
class BlockedFrame:
    """`blocked`: every user id the user blocks, sorted."""

    user_ids: tuple[str, ...]
    request_id: RequestId | None = None

    def to_wire(self) -> dict[str, Any]:
        return _with_request_id({"type": "blocked", "data": list(self.user_ids)}, self.request_id)


@attrs.frozen
class Pong:
    request_id: RequestId | None = None

    def to_wire(self) -> dict[str, Any]:
        return _with_request_id({"type": "pong"}, self.request_id)


@attrs.frozen
class ErrorFrame:
    code: ErrorCode
    message: str
    field: str | None = None
    request_id: RequestId | None = None
    retry_after_ms: int | None = None

    @classmethod
    def from_error(cls, error: ProtocolError) -> ErrorFrame:
        return cls(
            code=error.code,
            message=error.message,
            field=error.field,
            request_id=error.request_id,
            retry_after_ms=error.retry_after_ms,
        )

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"type": "error", "code": str(self.code), "message": self.message}
        if self.field is not None:
            wire["field"] = self.field
        if self.retry_after_ms is not None:
            wire["retry_after_ms"] = self.retry_after_ms
        return _with_request_id(wire, self.request_id)


ServerFrame = (
    Authenticated
    | AllChats
    | NewChats
    | ChatUpdated
    | AllMessages
    | NewMessages
    | MessageEvent
    | UpdatedMessages
    | MessageUpdated
    | ReceiptFrame
    | TypingEvent
    | PresenceFrame
    | BlockedFrame
    | Pong
    | ErrorFrame
)


def _with_request_id(wire: dict[str, Any], request_id: RequestId | None) -> dict[str, Any]:
    if request_id is not None:
        wire["request_id"] = request_id
    return wire


def encode(frame: ServerFrame) -> str:
    """Serialize a server frame to the JSON text of one WebSocket text message."""
    return orjson.dumps(frame.to_wire()).decode()


# --------------------------------------------------------------------------- decoding


def decode(text: str | bytes, limits: Limits = DEFAULT_LIMITS) -> ClientFrame:
    """Parse and validate one client frame.

    Raises:
        ProtocolError: for every rule the frame breaks; `request_id` is set when readable.
    """
    if isinstance(text, bytes | bytearray | memoryview):
        raise ProtocolError(ErrorCode.BAD_JSON, "binary frames are not accepted; send JSON text")
    obj = parse_json(text)
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_JSON, "a frame must be a JSON object")
    return decode_object(obj, limits)


def decode_object(obj: Mapping[str, Any], limits: Limits = DEFAULT_LIMITS) -> ClientFrame:
    """Validate one client frame that is already parsed: `decode()` without the JSON step.

    The HTTP API builds the frame its request stands for and passes it here, so a request
    and a WebSocket frame are held to the same rules by the same code.

    Raises:
        ProtocolError: as `decode()`.
    """
    request_id = _request_id(obj)
    try:
        frame_type = obj.get("type")
        if not isinstance(frame_type, str):
            raise ProtocolError(ErrorCode.UNKNOWN_TYPE, "the frame has no string 'type' field")
        builder = _BUILDERS.get(frame_type)
        if builder is None:
            raise ProtocolError(
                ErrorCode.UNKNOWN_TYPE,
                f"unknown frame type; expected one of {', '.join(sorted(_BUILDERS))}",
            )
        fields = _Fields(obj)
        token = fields.optional_str("token", MAX_TOKEN_CHARS)
        return builder(fields, token, request_id, limits)
    except ProtocolError as error:
        raise error.with_request_id(request_id) from None


def parse_json(text: str) -> Any:
    """JSON text to a value; `ProtocolError(bad_json)` when it is not valid JSON."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    # orjson refuses lone surrogates and integers past 64 bits, both valid JSON; the stdlib
    # parser accepts them, so field validation can give a precise answer. Anything it refuses
    # too is genuinely malformed.
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise ProtocolError(ErrorCode.BAD_JSON, "the frame is not valid JSON") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _request_id(obj: Mapping[str, Any]) -> RequestId | None:
    value = obj.get("request_id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            "request_id must be a string of 1..64 characters or an integer",
            field="request_id",
        )
    if isinstance(value, int):
        if not -_INT64_MAX <= value <= _INT64_MAX:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, "request_id integer is out of range", field="request_id"
            )
        return value
    if not 1 <= len(value) <= MAX_REQUEST_ID_CHARS or not _is_utf8(value):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            "request_id must be a string of 1..64 characters or an integer",
            field="request_id",
        )
    return value


def _is_utf8(value: str) -> bool:
    if value.isascii():
        return True
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def validate_user_id(value: str, field: str) -> str:
    """Check the user id rules: 1..128 characters, no edge white space, and none of the
    invisible characters (Unicode Cc, Cf, Zl, Zp) that would let one user pose as another or
    split a log line."""
    if not 1 <= len(value) <= MAX_USER_ID_CHARS:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"{field} must be 1..128 characters", field=field
        )
    if value != value.strip() or _has_invisible(value):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f"{field} must not contain control or format characters or line separators,"
            " nor leading or trailing white space",
            field=field,
        )
    if not _is_utf8(value):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{field} is not valid Unicode", field=field)
    return value


_INVISIBLE_CATEGORIES: Final = frozenset({"Cc", "Cf", "Zl", "Zp"})


def _has_invisible(value: str) -> bool:
    # `isprintable()` is true for none of these categories: one C-level pass for the common
    # case, the per-character lookup only for ids that hold something unusual.
    if value.isprintable():
        return False
    return any(unicodedata.category(char) in _INVISIBLE_CATEGORIES for char in value)


class _Fields:
    """Typed accessors over a frame's JSON object that raise the protocol's errors."""

    def __init__(self, obj: Mapping[str, Any]) -> None:
        self._obj = obj

    def _string(self, name: str, value: Any, max_chars: int) -> str:
        if not isinstance(value, str):
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{name} must be a string", field=name)
        if not value:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{name} must not be empty", field=name)
        if len(value) > max_chars:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"{name} is longer than {max_chars} characters", field=name
            )
        if not _is_utf8(value):
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"{name} is not valid Unicode (lone surrogate)", field=name
            )
        return value

    def required_str(self, name: str, max_chars: int = MAX_ID_CHARS) -> str:
        if name not in self._obj or self._obj[name] is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{name} is required", field=name)
        return self._string(name, self._obj[name], max_chars)

    def optional_str(self, name: str, max_chars: int = MAX_ID_CHARS) -> str | None:
        value = self._obj.get(name)
        if value is None:
            return None
        return self._string(name, value, max_chars)

    def user_id(self, name: str) -> str:
        if name not in self._obj or self._obj[name] is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{name} is required", field=name)
        value = self._obj[name]
        if not isinstance(value, str):
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{name} must be a string", field=name)
        return validate_user_id(value, name)

    def member_ids(self, limits: Limits) -> tuple[str, ...]:
        """A non-empty array of distinct user ids, fewer than `max_group_members` (the
        requester makes the group one larger)."""
        name = "member_ids"
        value = self._obj.get(name)
        if value is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{name} is required", field=name)
        if not isinstance(value, list):
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"{name} must be an array of user ids", field=name
            )
        most = limits.max_group_members - 1
        if not 1 <= len(value) <= most:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                f"{name} must hold 1..{most} user ids (a group has at most"
                f" {limits.max_group_members} members)",
                field=name,
            )
        return self._distinct_user_ids(name, value)

    def optional_user_ids(self, name: str, most: int) -> tuple[str, ...] | None:
        """Absent, or an array of 1..`most` distinct user ids."""
        value = self._obj.get(name)
        if value is None:
            return None
        if not isinstance(value, list) or not 1 <= len(value) <= most:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"{name} must be an array of 1..{most} user ids", field=name
            )
        return self._distinct_user_ids(name, value)

    @staticmethod
    def _distinct_user_ids(name: str, value: list[Any]) -> tuple[str, ...]:
        for member in value:
            if not isinstance(member, str):
                raise ProtocolError(
                    ErrorCode.BAD_REQUEST, f"{name} must be an array of user ids", field=name
                )
            validate_user_id(member, name)
        if len(set(value)) != len(value):
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"{name} must not name a user twice", field=name
            )
        return tuple(value)

    def optional_bool(self, name: str, default: bool) -> bool:
        value = self._obj.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{name} must be a boolean", field=name)
        return value

    def absent_or_user_id(self, name: str) -> str | None:
        if self._obj.get(name) is None:
            return None
        return self.user_id(name)

    def content(self, limits: Limits) -> str:
        if "content" not in self._obj or self._obj["content"] is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "content is required", field="content")
        value = self._obj["content"]
        if not isinstance(value, str):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "content must be a string", field="content")
        if not value:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "content must not be empty", field="content")
        if len(value) > limits.max_message_chars:
            raise ProtocolError(
                ErrorCode.TOO_LARGE,
                f"content is longer than {limits.max_message_chars} characters",
                field="content",
            )
        if not _is_utf8(value):
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                "content is not valid Unicode (lone surrogate)",
                field="content",
            )
        return value

    def optional_limit(self, default: int, maximum: int | None, minimum: int = 1) -> int:
        """An integer >= `minimum`; above `maximum` is an error when given, else capped by
        the caller."""
        value = self._obj.get("limit")
        if value is None:
            return default
        if isinstance(value, float) and value.is_integer() and abs(value) > _INT64_MAX:
            # The JSON parser turns integers past 64 bits into floats; they are still
            # integers, just larger than any limit.
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "limit must be an integer", field="limit")
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"{minimum}..{maximum}" if maximum is not None else f">= {minimum}"
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"limit must be {bounds}", field="limit")
        return value


_Builder = Callable[[_Fields, str | None, RequestId | None, Limits], ClientFrame]


def _build_create_chat(
    fields: _Fields, token: str | None, request_id: RequestId | None, limits: Limits
) -> ClientFrame:
    return CreateChat(fields.user_id("recipient_id"), token=token, request_id=request_id)


def _build_send_message(
    fields: _Fields, token: str | None, request_id: RequestId | None, limits: Limits
) -> ClientFrame:
    return SendMessage(
        chat_id=fields.required_str("chat_id"),
        recipient_id=fields.absent_or_user_id("recipient_id"),
        content=fields.content(limits),
        client_message_id=fields.optional_str("client_message_id"),
        token=token,
        request_id=request_id,
    )


def _build_fetch_chats(
    fields: _Fields, token: str | None, request_id: RequestId | None, limits: Limits
) -> ClientFrame:
    # 0: only the chat list (`all_chats`), no history: how a client loads its chats with counts.
    limit = fields.optional_limit(limits.history_limit, None, minimum=0)
    return FetchChats(min(limit, limits.history_limit), token=token, request_id=request_id)


def _build_fetch_messages(
    fields: _Fields, token: str | None, request_id: RequestId | None, limits: Limits
) -> ClientFrame:
    chat_id = fields.required_str("chat_id")
    before = fields.optional_str("before")
    limit = fields.optional_limit(FETCH_MESSAGES_DEFAULT, FETCH_MESSAGES_MAX)
    return FetchMessages(
        chat_id,
        before=before,
        limit=min(limit, limits.history_limit),
        token=token,
        request_id=request_id,
    )


def _build_ping(
    fields: _Fields, token: str | None, request_id: RequestId | None, limits: Limits
) -> ClientFrame:
    return Ping(token=token, request_id=request_id)


def _build_mark_read(
    fields: _Fields, token: str | None, request_id: RequestId | None, limits: Limits
) -> ClientFrame:
    return MarkRead(
        fields.required_str("chat_id"),
        fields.required_str("message_id"),
        token=token,
        request_id=request_id,
    )


def _build_edit_message(
    fields: _Fields, token: str | None, request_id: RequestId | None, limits: Limits
) -> ClientFrame:
    return EditMessage(
        fields.required_str("chat_id"),
        fields.required_str("message_id"),
        fields.content(limits),
        token=token,
        request_id=request_id,
    )


def _build_delete_message(
    fields: _Fields, token: str | None, request_id: RequestId | None, limits: Limits
) -> ClientFrame:
    return DeleteMessage(
        fields.required_str("chat_id"),
        fields.required_str("message_id"),
        token=token,
        request_id=request_id,
    )


def _build_create_group(
    fields: _Fields, token: str | None, request_id: RequestId | None, limits: Limits
) -> ClientFrame:
    return CreateGroup(
        fields.required_str("title", MAX_TITLE_CHARS),
        fields.member_ids(limits),
        token=token,
        request_id=request_id,
    )


def _build_add_members(
    fields: _Fields, token: str | None, request_id: RequestId | None, limits: Limits
) -> ClientFrame:
    return AddMembers(
        fields.required_str("chat_id"),
        fields.member_ids(limits),
        token=token,
        request_id=request_id,
    )


def _build_remove_member(
    fields: _Fields, token: str | None, request_id: RequestId | None, limits: Limits
) -> ClientFrame:
    return RemoveMember(
        fields.required_str("chat_id"),
        fields.user_id("user_id"),
        token=token,
        request_id=request_id,
    )


def _build_typing(
    fields: _Fields, token: str | None, request_id: RequestId | None, limits: Limits
) -> ClientFrame:
    return Typing(
        fields.required_str("chat_id"),
        fields.optional_bool("active", True),
        token=token,
        request_id=request_id,
    )


def _build_fetch_presence(
    fields: _Fields, token: str | None, request_id: RequestId | None, limits: Limits
) -> ClientFrame:
    return FetchPresence(
        fields.optional_user_ids("user_ids", MAX_PRESENCE_IDS), token=token, request_id=request_id
    )


def _build_block_user(
    fields: _Fields, token: str | None, request_id: RequestId | None, limits: Limits
) -> ClientFrame:
    return BlockUser(fields.user_id("user_id"), token=token, request_id=request_id)


def _build_unblock_user(
    fields: _Fields, token: str | None, request_id: RequestId | None, limits: Limits
) -> ClientFrame:
    return UnblockUser(fields.user_id("user_id"), token=token, request_id=request_id)


def _build_fetch_blocked(
    fields: _Fields, token: str | None, request_id: RequestId | None, limits: Limits
) -> ClientFrame:
    return FetchBlocked(token=token, request_id=request_id)


_BUILDERS: Final[dict[str, _Builder]] = {
    "create_chat": _build_create_chat,
    "send_message": _build_send_message,
    "fetch_chats": _build_fetch_chats,
    "fetch_messages": _build_fetch_messages,
    "ping": _build_ping,
    "mark_read": _build_mark_read,
    "edit_message": _build_edit_message,
    "delete_message": _build_delete_message,
    "create_group": _build_create_group,
    "add_members": _build_add_members,
    "remove_member": _build_remove_member,
    "typing": _build_typing,
    "fetch_presence": _build_fetch_presence,
    "block_user": _build_block_user,
    "unblock_user": _build_unblock_user,
    "fetch_blocked": _build_fetch_blocked,
}

CLIENT_FRAME_TYPES: Final = tuple(sorted(_BUILDERS))
