"""The AsyncAPI 3 document of the WebSocket protocol, written once as data.

`GET /asyncapi.json` serves `ASYNCAPI`: one channel (`/ws`), the operation of the client
frames the server receives and the one of the frames it sends, and a JSON Schema (Draft
2020-12) for every frame of version 1 and 2. `CLIENT_FRAMES` and `SERVER_FRAMES` map each
wire `type` to its schema's name under `components.schemas`. The message, chat and error
objects are `handler.schemas`', shared with the OpenAPI document of the HTTP API.

The schemas describe what the decoder accepts and what the server sends; the tests hold both
to it (every frame an end-to-end test receives is validated; a property test compares
`protocol.decode` with the client-frame schema). What a schema cannot say is in the
description of the frame or field it concerns: limits that `config.json` changes (the
schemas carry the defaults), and that an integral number written with a fraction (`1.0`) is
not an integer to the decoder while JSON Schema deems it one. Strings hold Unicode text: a
lone surrogate (which the decoder refuses) is not a JSON Schema string to begin with.
Pure data, no I/O.
"""

from __future__ import annotations

from typing import Any, Final

from handler import protocol, schemas
from handler.schemas import (
    CONTENT,
    ID,
    MESSAGE_PROPERTIES,
    MESSAGE_REQUIRED,
    TIMESTAMP,
    USER_ID,
    JsonSchema,
    nullable,
    ref,
)

# The decoder's range of an integer request_id.
_INT64_MAX: Final = protocol._INT64_MAX

REQUEST_ID: Final[JsonSchema] = {
    "oneOf": [
        {"type": "string", "minLength": 1, "maxLength": protocol.MAX_REQUEST_ID_CHARS},
        {"type": "integer", "minimum": -_INT64_MAX, "maximum": _INT64_MAX},
    ],
    "description": "copied into the server's direct reply and into any error the frame causes",
}
_TOKEN: Final[JsonSchema] = {
    "type": "string",
    "minLength": 1,
    "maxLength": protocol.MAX_TOKEN_CHARS,
    "description": "a JWT whose sub is the user id; binds the connection, or refreshes it",
}


def _member_ids(most: int, description: str) -> JsonSchema:
    return {
        "type": "array",
        "items": USER_ID,
        "minItems": 1,
        "maxItems": most,
        "uniqueItems": True,
        "description": description,
    }


_MEMBER_IDS: Final = _member_ids(
    protocol.MAX_GROUP_MEMBERS - 1,
    "distinct user ids, not the requester; at most limits.max_group_members - 1 (default"
    f" {protocol.MAX_GROUP_MEMBERS - 1})",
)


def _client(
    frame_type: str,
    summary: str,
    required: dict[str, JsonSchema] | None = None,
    optional: dict[str, JsonSchema] | None = None,
) -> JsonSchema:
    """A client frame: open to unknown fields (the decoder ignores them); an optional field
    may be null, which the decoder reads as absent."""
    fields = {name: nullable(schema) for name, schema in (optional or {}).items()}
    return {
        "type": "object",
        "description": summary,
        "required": ["type", *(required or {})],
        "properties": {
            "type": {"const": frame_type},
            **(required or {}),
            **fields,
            "token": nullable(_TOKEN),
            "request_id": nullable(REQUEST_ID),
        },
    }


def _server(
    frame_type: str,
    summary: str,
    fields: dict[str, JsonSchema],
    required: tuple[str, ...],
    *,
    replies: bool = True,
) -> JsonSchema:
    """A server frame: closed, so a field the server starts sending must be described first.
    `replies`: the frame can be a direct reply, which carries the request's `request_id`."""
    return {
        "type": "object",
        "description": summary,
        "required": ["type", *required],
        "properties": {
            "type": {"const": frame_type},
            **fields,
            **({"request_id": REQUEST_ID} if replies else {}),
        },
        "additionalProperties": False,
    }


_CHATS: Final[JsonSchema] = {"type": "array", "items": ref("Chat")}
_MESSAGES: Final[JsonSchema] = {"type": "array", "items": ref("Message")}

_CLIENT_SCHEMAS: Final[dict[str, JsonSchema]] = {
    "create_chat": _client(
        "create_chat",
        "Create or find the direct chat with recipient_id; reply new_chats [chat].",
        {"recipient_id": USER_ID},
    ),
    "send_message": _client(
        "send_message",
        "Store a message and push it (message) to every participant's open connections; the"
        " sender's copy is the acknowledgement.",
        {"chat_id": ID, "content": CONTENT},
        {
            "recipient_id": {
                **USER_ID,
                "description": "a direct chat's other participant (required there); absent"
                " in a group",
            },
            "client_message_id": {**ID, "description": "a resend with the same one is a no-op"},
        },
    ),
    "fetch_chats": _client(
        "fetch_chats",
        "Reply all_chats, then one all_messages per chat.",
        optional={
            "limit": {
                "type": "integer",
                "minimum": 0,
                "description": "messages per chat, capped at limits.history_limit (default"
                f" {protocol.HISTORY_LIMIT}); 0: only all_chats",
            }
        },
    ),
    "fetch_messages": _client(
        "fetch_messages",
        "Reply one all_messages with a page of the chat's messages, oldest first.",
        {"chat_id": ID},
        {
            "before": {**ID, "description": "a message_id of the chat"},
            "limit": {
                "type": "integer",
                "minimum": 1,
                "maximum": protocol.FETCH_MESSAGES_MAX,
                "default": protocol.FETCH_MESSAGES_DEFAULT,
            },
        },
    ),
    "ping": _client("ping", "Reply pong; needs no token."),
    "mark_read": _client(
        "mark_read",
        "The user has read the chat up to message_id; reply receipt.",
        {"chat_id": ID, "message_id": ID},
    ),
    "edit_message": _client(
        "edit_message",
        "Replace a message's content (its sender only); reply message_updated.",
        {"chat_id": ID, "message_id": ID, "content": CONTENT},
    ),
    "delete_message": _client(
        "delete_message",
        "Leave a tombstone of a message (its sender only); reply message_updated.",
        {"chat_id": ID, "message_id": ID},
    ),
    "create_group": _client(
        "create_group",
        "Create a group of the requester and member_ids; reply new_chats [chat].",
        {
            "title": {"type": "string", "minLength": 1, "maxLength": protocol.MAX_TITLE_CHARS},
            "member_ids": _MEMBER_IDS,
        },
    ),
    "add_members": _client(
        "add_members",
        "Add members to a group; reply chat_updated.",
        {"chat_id": ID, "member_ids": _MEMBER_IDS},
    ),
    "remove_member": _client(
        "remove_member",
        "Remove a member (the creator), or leave (oneself); reply chat_updated.",
        {"chat_id": ID, "user_id": USER_ID},
    ),
    "typing": _client(
        "typing",
        "Forwarded to the other participants as typing; not answered on success.",
        {"chat_id": ID},
        {"active": {"type": "boolean", "default": True}},
    ),
    "fetch_presence": _client(
        "fetch_presence",
        "Reply presence for user_ids, or for the user's most recently active contacts.",
        optional={
            "user_ids": _member_ids(protocol.MAX_PRESENCE_IDS, "distinct user ids"),
        },
    ),
    "block_user": _client("block_user", "Block user_id; reply blocked.", {"user_id": USER_ID}),
    "unblock_user": _client(
        "unblock_user", "Stop blocking user_id; reply blocked.", {"user_id": USER_ID}
    ),
    "fetch_blocked": _client("fetch_blocked", "Reply blocked."),
}

_MESSAGE_FIELDS: Final = {"chat_id": ID, "data": _MESSAGES}

_SERVER_SCHEMAS: Final[dict[str, JsonSchema]] = {
    "authenticated": _server(
        "authenticated",
        "The connection is bound to user_id; the backlog follows.",
        {"user_id": USER_ID},
        ("user_id",),
        replies=False,
    ),
    "all_chats": _server(
        "all_chats",
        "Every chat of the user, most recently active first.",
        {"data": _CHATS},
        ("data",),
    ),
    "new_chats": _server(
        "new_chats",
        "Chats not delivered to this user before.",
        {"data": _CHATS},
        ("data",),
    ),
    "chat_updated": _server(
        "chat_updated",
        "A group's members changed; data is the chat object for this user.",
        {"data": ref("Chat")},
        ("data",),
    ),
    "all_messages": _server(
        "all_messages",
        "A page of a chat's messages, oldest first.",
        {**_MESSAGE_FIELDS, "has_more": {"type": "boolean"}},
        ("chat_id", "data", "has_more"),
    ),
    "new_messages": _server(
        "new_messages",
        "On binding: a chat's messages not delivered to this user before, oldest first.",
        _MESSAGE_FIELDS,
        ("chat_id", "data"),
        replies=False,
    ),
    "updated_messages": _server(
        "updated_messages",
        "On binding: the current state of messages that changed while the user was away.",
        _MESSAGE_FIELDS,
        ("chat_id", "data"),
        replies=False,
    ),
    "message": _server(
        "message",
        "A new message, live; the sender's copy (with request_id) is the acknowledgement.",
        MESSAGE_PROPERTIES,
        MESSAGE_REQUIRED,
    ),
    "message_updated": _server(
        "message_updated",
        "A message was edited or deleted: its new state.",
        MESSAGE_PROPERTIES,
        MESSAGE_REQUIRED,
    ),
    "receipt": _server(
        "receipt",
        "user_id's delivered or read mark of the chat moved to seq.",
        {
            "chat_id": ID,
            "user_id": USER_ID,
            "kind": {"enum": ["delivered", "read"]},
            "seq": {"type": "integer", "minimum": 0},
            "message_id": {
                "type": ["string", "null"],
                "description": "the message at seq; null while the mark is 0",
            },
            "timestamp": TIMESTAMP,
        },
        ("chat_id", "user_id", "kind", "seq", "message_id", "timestamp"),
    ),
    "typing": _server(
        "typing",
        "user_id started (or stopped) typing in the chat.",
        {
            "chat_id": ID,
            "user_id": USER_ID,
            "active": {"type": "boolean"},
            "expires_in_ms": {"const": protocol.TYPING_EXPIRES_MS},
        },
        ("chat_id", "user_id", "active", "expires_in_ms"),
        replies=False,
    ),
    "presence": _server(
        "presence",
        "Users' presence, as this user may see it.",
        {
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["user_id", "online", "last_seen"],
                    "properties": {
                        "user_id": USER_ID,
                        "online": {"type": "boolean"},
                        "last_seen": {
                            **nullable(TIMESTAMP),
                            "description": "null while online, if never connected, or for"
                            " a user who is not a contact",
                        },
                    },
                    "additionalProperties": False,
                },
            }
        },
        ("data",),
    ),
    "blocked": _server(
        "blocked",
        "Every user id this user blocks, sorted.",
        {"data": {"type": "array", "items": USER_ID, "uniqueItems": True}},
        ("data",),
    ),
    "pong": _server("pong", "The reply to ping.", {}, ()),
    "error": _server(
        "error",
        "A frame broke a rule; nothing changed.",
        schemas.ERROR_PROPERTIES,
        ("code", "message"),
    ),
}


def _name(direction: str, frame_type: str) -> str:
    return direction + "".join(part.title() for part in frame_type.split("_"))


CLIENT_FRAMES: Final[dict[str, str]] = {t: _name("Client", t) for t in _CLIENT_SCHEMAS}
"""Client frame `type` -> the name of its schema and message under `components`."""
SERVER_FRAMES: Final[dict[str, str]] = {t: _name("Server", t) for t in _SERVER_SCHEMAS}
"""Server frame `type` -> the name of its schema and message under `components`."""


def _message(frame_type: str, name: str, schema: JsonSchema) -> dict[str, Any]:
    return {
        "name": frame_type,
        "title": frame_type,
        "summary": schema["description"],
        "contentType": "application/json",
        "payload": ref(name),
    }


def _operation(action: str, summary: str, names: dict[str, str]) -> dict[str, Any]:
    return {
        "action": action,
        "summary": summary,
        "channel": {"$ref": "#/channels/ws"},
        "messages": [{"$ref": f"#/channels/ws/messages/{name}"} for name in names.values()],
    }


ASYNCAPI: Final[dict[str, Any]] = {
    "asyncapi": "3.0.0",
    "info": {
        "title": "Chat handler: the WebSocket protocol",
        "version": "2",
        "description": "JSON over WebSocket: every message is one JSON object in one text"
        " frame, with a `type`. Version 2 extends version 1; a client may ignore any field or"
        " frame type it does not know. Limits are the defaults, which config.json may change.",
    },
    "defaultContentType": "application/json",
    "channels": {
        "ws": {
            "address": "/ws",
            "title": "The WebSocket endpoint",
            "description": "Optionally /ws?token=JWT; or give the token in any frame.",
            "messages": {
                name: {"$ref": f"#/components/messages/{name}"}
                for name in (*CLIENT_FRAMES.values(), *SERVER_FRAMES.values())
            },
            "bindings": {
                "ws": {
                    "method": "GET",
                    "query": {
                        "type": "object",
                        "properties": {"token": _TOKEN},
                    },
                }
            },
        }
    },
    "operations": {
        "receiveClientFrames": _operation("receive", "The frames a client sends", CLIENT_FRAMES),
        "sendServerFrames": _operation("send", "The frames the server sends", SERVER_FRAMES),
    },
    "components": {
        "schemas": {
            **schemas.SHARED,
            "RequestId": REQUEST_ID,
            "ClientFrame": {"oneOf": [ref(name) for name in CLIENT_FRAMES.values()]},
            "ServerFrame": {"oneOf": [ref(name) for name in SERVER_FRAMES.values()]},
            **{CLIENT_FRAMES[t]: schema for t, schema in _CLIENT_SCHEMAS.items()},
            **{SERVER_FRAMES[t]: schema for t, schema in _SERVER_SCHEMAS.items()},
        },
        "messages": {
            **{name: _message(t, name, _CLIENT_SCHEMAS[t]) for t, name in CLIENT_FRAMES.items()},
            **{name: _message(t, name, _SERVER_SCHEMAS[t]) for t, name in SERVER_FRAMES.items()},
        },
    },
}
