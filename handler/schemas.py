"""The JSON Schemas both machine-readable documents share: ids, timestamps, the message and
chat objects, and the error object.

Pure data, no I/O. The OpenAPI document of the HTTP API (`handler.api.openapi`) and the
AsyncAPI document of the WebSocket protocol (`handler.asyncapi`) both put `SHARED` under
`components.schemas`, so a `$ref` such as `#/components/schemas/Message` means the same object
in both, and the two doors cannot describe a message differently. Limits are the protocol's
constants (its defaults; `config.json` may change them).
"""

from __future__ import annotations

from typing import Any, Final

from handler import protocol
from handler.errors import ErrorCode

JsonSchema = dict[str, Any]


def ref(name: str) -> JsonSchema:
    """A reference to a schema of the document's `components.schemas`."""
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: JsonSchema) -> JsonSchema:
    """`schema` or null: the decoder reads a null field as an absent one."""
    return {"anyOf": [schema, {"type": "null"}]}


# The characters a user id may not hold (`protocol.validate_user_id`): Unicode categories Cc,
# Cf, Zl and Zp, as code point ranges. JSON Schema regexes have no portable Unicode
# categories, so the ranges are written out; a test recomputes them from `unicodedata` (the
# rule's source) and fails when a new Unicode version moves them.
INVISIBLE_RANGES: Final = (
    (0x0, 0x1F),
    (0x7F, 0x9F),
    (0xAD, 0xAD),
    (0x600, 0x605),
    (0x61C, 0x61C),
    (0x6DD, 0x6DD),
    (0x70F, 0x70F),
    (0x890, 0x891),
    (0x8E2, 0x8E2),
    (0x180E, 0x180E),
    (0x200B, 0x200F),
    (0x2028, 0x202E),
    (0x2060, 0x2064),
    (0x2066, 0x206F),
    (0xFEFF, 0xFEFF),
    (0xFFF9, 0xFFFB),
    (0x110BD, 0x110BD),
    (0x110CD, 0x110CD),
    (0x13430, 0x13438),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0001, 0xE0001),
    (0xE0020, 0xE007F),
)
# White space (`str.isspace`) that is not already invisible: not allowed at either end.
EDGE_SPACE_RANGES: Final = (
    (0x20, 0x20),
    (0xA0, 0xA0),
    (0x1680, 0x1680),
    (0x2000, 0x200A),
    (0x202F, 0x202F),
    (0x205F, 0x205F),
    (0x3000, 0x3000),
)


def _char_class(ranges: tuple[tuple[int, int], ...]) -> str:
    # Literal characters, not escapes: `\uXXXX` cannot name an astral character in every
    # regex dialect, a literal one can. None of them is special inside a class.
    return "[" + "".join(chr(a) if a == b else f"{chr(a)}-{chr(b)}" for a, b in ranges) + "]"


_INVISIBLE: Final = _char_class(INVISIBLE_RANGES)
_EDGE: Final = _char_class(INVISIBLE_RANGES + EDGE_SPACE_RANGES)

USER_ID: Final[JsonSchema] = {
    "type": "string",
    "minLength": 1,
    "maxLength": protocol.MAX_USER_ID_CHARS,
    # Refused by pattern rather than allowed by one: an anchored `[^...]*$` would let a
    # trailing newline through in regex dialects whose `$` matches before one.
    "not": {"pattern": f"{_INVISIBLE}|^{_EDGE}|{_EDGE}$"},
    "description": "no control or format characters or line separators (Unicode Cc, Cf, Zl,"
    " Zp), no leading or trailing white space",
}
ID: Final[JsonSchema] = {"type": "string", "minLength": 1, "maxLength": protocol.MAX_ID_CHARS}
CONTENT: Final[JsonSchema] = {
    "type": "string",
    "minLength": 1,
    "maxLength": protocol.MAX_MESSAGE_CHARS,
    "description": "Unicode code points; longer than limits.max_message_chars (default"
    f" {protocol.MAX_MESSAGE_CHARS}): too_large",
}
TIMESTAMP: Final[JsonSchema] = {
    "type": "string",
    "pattern": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z$",
    "description": "ISO-8601 UTC with milliseconds",
}
SEQ: Final[JsonSchema] = {"type": "integer", "minimum": 1}
MARKS: Final[JsonSchema] = {
    "type": "object",
    "additionalProperties": {"type": "integer", "minimum": 0},
    "description": "user id -> seq",
}

# The message object's fields, apart so that the `message` and `message_updated` frames can
# extend them (a closed object cannot be extended by `allOf`).
MESSAGE_PROPERTIES: Final[dict[str, JsonSchema]] = {
    "message_id": ID,
    "chat_id": ID,
    "sender_id": USER_ID,
    "recipient_id": {**USER_ID, "description": "direct chats only"},
    "content": {"type": "string", "description": "empty for a deleted message"},
    "timestamp": TIMESTAMP,
    "seq": SEQ,
    "client_message_id": ID,
    "edited_at": nullable(TIMESTAMP),
    "deleted": {"type": "boolean"},
}
MESSAGE_REQUIRED: Final = ("message_id", "chat_id", "sender_id", "content", "timestamp", "seq")

# The error object's fields; the WebSocket `error` frame adds `type` and `request_id`.
ERROR_PROPERTIES: Final[dict[str, JsonSchema]] = {
    "code": {"enum": [str(code) for code in ErrorCode]},
    "message": {"type": "string", "description": "human readable"},
    "field": {"type": "string", "description": "the field at fault"},
    "retry_after_ms": {"type": "integer", "minimum": 1},
}

SHARED: Final[dict[str, JsonSchema]] = {
    "Message": {
        "type": "object",
        "required": list(MESSAGE_REQUIRED),
        "properties": MESSAGE_PROPERTIES,
        "additionalProperties": False,
    },
    "Chat": {
        "type": "object",
        "description": "a chat object, computed for the user it is sent to",
        "required": [
            "chat_id",
            "kind",
            "title",
            "participants",
            "created_by",
            "created_at",
            "last_message",
            "unread_count",
            "read_up_to",
            "delivered_up_to",
        ],
        "properties": {
            "chat_id": ID,
            "kind": {"enum": [protocol.DIRECT, protocol.GROUP]},
            "title": {"type": ["string", "null"], "description": "null for a direct chat"},
            "participants": {
                "type": "array",
                "items": USER_ID,
                "minItems": 1,
                "uniqueItems": True,
                "description": "every current member, sorted",
            },
            "created_by": USER_ID,
            "created_at": TIMESTAMP,
            "last_message": nullable(ref("Message")),
            "unread_count": {"type": "integer", "minimum": 0},
            "read_up_to": MARKS,
            "delivered_up_to": MARKS,
            "joined_seq": {**MARKS, "description": "groups only: seq when each member joined"},
        },
        "additionalProperties": False,
        # A direct chat: its two users, no title.
        "if": {"properties": {"kind": {"const": protocol.DIRECT}}},
        "then": {
            "properties": {
                "participants": {"minItems": 2, "maxItems": 2},
                "title": {"type": "null"},
            }
        },
    },
    "Error": {
        "type": "object",
        "required": ["code", "message"],
        "properties": {
            **ERROR_PROPERTIES,
            # The HTTP API picks the frame type itself: never `unknown_type` there.
            "code": {"enum": [str(code) for code in ErrorCode if code != ErrorCode.UNKNOWN_TYPE]},
        },
        "additionalProperties": False,
    },
}
