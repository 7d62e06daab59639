"""The OpenAPI 3.1 document of the HTTP API, written once as data.

The JSON Schemas of the request and response bodies are the contract `GET
/api/v1/openapi.json` serves; the tests validate every answer they get against the schema of
its path, method and status, so the document cannot drift from what the server does. The
limits quoted are the protocol's defaults (`config.json` may change them).
"""

from __future__ import annotations

from typing import Any, Final

from handler import protocol
from handler.errors import ErrorCode

JsonSchema = dict[str, Any]

_TIMESTAMP: Final[JsonSchema] = {
    "type": "string",
    "pattern": r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$",
    "description": "ISO-8601 UTC with milliseconds",
}
_USER_ID: Final[JsonSchema] = {
    "type": "string",
    "minLength": 1,
    "maxLength": protocol.MAX_USER_ID_CHARS,
    "description": "no control or format characters, no leading or trailing white space",
}
_ID: Final[JsonSchema] = {"type": "string", "minLength": 1, "maxLength": protocol.MAX_ID_CHARS}
_MARKS: Final[JsonSchema] = {
    "type": "object",
    "additionalProperties": {"type": "integer", "minimum": 0},
    "description": "user id -> seq",
}


def _ref(name: str) -> JsonSchema:
    return {"$ref": f"#/components/schemas/{name}"}


SCHEMAS: Final[dict[str, JsonSchema]] = {
    "Error": {
        "type": "object",
        "required": ["code", "message"],
        "properties": {
            "code": {"enum": [str(code) for code in ErrorCode if code != ErrorCode.UNKNOWN_TYPE]},
            "message": {"type": "string"},
            "field": {"type": "string", "description": "the request field at fault"},
            "retry_after_ms": {"type": "integer", "minimum": 1},
        },
        "additionalProperties": False,
    },
    "Message": {
        "type": "object",
        "required": ["message_id", "chat_id", "sender_id", "content", "timestamp", "seq"],
        "properties": {
            "message_id": {"type": "string"},
            "chat_id": {"type": "string"},
            "sender_id": {"type": "string"},
            "recipient_id": {"type": "string", "description": "direct chats only"},
            "content": {"type": "string"},
            "timestamp": _TIMESTAMP,
            "seq": {"type": "integer", "minimum": 1},
            "client_message_id": {"type": "string"},
            "edited_at": {"oneOf": [_TIMESTAMP, {"type": "null"}]},
            "deleted": {"type": "boolean"},
        },
        "additionalProperties": False,
    },
    "Chat": {
        "type": "object",
        "description": "a chat object, computed for the user it is answered for",
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
            "chat_id": {"type": "string"},
            "kind": {"enum": [protocol.DIRECT, protocol.GROUP]},
            "title": {"type": ["string", "null"]},
            "participants": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "created_by": {"type": "string"},
            "created_at": _TIMESTAMP,
            "last_message": {"oneOf": [_ref("Message"), {"type": "null"}]},
            "unread_count": {"type": "integer", "minimum": 0},
            "read_up_to": _MARKS,
            "delivered_up_to": _MARKS,
            "joined_seq": {**_MARKS, "description": "groups only: seq when each member joined"},
        },
        "additionalProperties": False,
    },
    "SendMessage": {
        "type": "object",
        "required": ["sender_id", "chat_id", "content"],
        "properties": {
            "sender_id": _USER_ID,
            "chat_id": _ID,
            "content": {
                "type": "string",
                "minLength": 1,
                "maxLength": protocol.MAX_MESSAGE_CHARS,
                "description": "longer than limits.max_message_chars: 400 too_large",
            },
            "client_message_id": {
                **_ID,
                "description": "a resend with the same one stores nothing new and answers"
                " the stored message",
            },
            "recipient_id": {
                **_USER_ID,
                "description": "direct chats: optional, the other participant when given;"
                " groups: must be absent",
            },
        },
    },
    "CreateDirectChat": {
        "type": "object",
        "required": ["user_id", "recipient_id"],
        "properties": {"user_id": _USER_ID, "recipient_id": _USER_ID},
    },
    "CreateGroup": {
        "type": "object",
        "required": ["user_id", "title", "member_ids"],
        "properties": {
            "user_id": _USER_ID,
            "title": {"type": "string", "minLength": 1, "maxLength": protocol.MAX_TITLE_CHARS},
            "member_ids": {
                "type": "array",
                "items": _USER_ID,
                "minItems": 1,
                "maxItems": protocol.MAX_GROUP_MEMBERS - 1,
                "uniqueItems": True,
                "description": "the other members (not user_id)",
            },
        },
    },
    "ChatList": {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"type": "array", "items": _ref("Chat")}},
        "additionalProperties": False,
    },
    "MessagePage": {
        "type": "object",
        "required": ["data", "has_more"],
        "properties": {
            "data": {"type": "array", "items": _ref("Message"), "description": "oldest first"},
            "has_more": {"type": "boolean"},
        },
        "additionalProperties": False,
    },
    "Disconnected": {
        "type": "object",
        "required": ["closed"],
        "properties": {
            "closed": {
                "type": "integer",
                "minimum": 0,
                "description": "connections closed: on this node, plus those the other nodes"
                " reported within 2 s",
            }
        },
        "additionalProperties": False,
    },
}

_DESCRIPTIONS: Final = {
    200: "OK",
    201: "Created",
    400: "bad_json, bad_request or too_large; `field` names the field at fault",
    401: "no API key, or a wrong one",
    403: "forbidden: not a participant of the chat, or a block is in place",
    404: "not_found: no such chat (or no such endpoint)",
    429: "rate_limited: over the key's rate; `Retry-After` and `retry_after_ms` say when",
    500: "internal: logged with the correlation id the message quotes",
}


def _json(schema: JsonSchema) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _responses(ok: dict[int, str], errors: tuple[int, ...]) -> dict[str, Any]:
    answers: dict[str, Any] = {
        str(status): {"description": _DESCRIPTIONS[status], "content": _json(_ref(name))}
        for status, name in ok.items()
    }
    for status in (*errors, 401, 429, 500):
        answers[str(status)] = {
            "description": _DESCRIPTIONS[status],
            "content": _json(_ref("Error")),
        }
    return answers


def _path_parameter(name: str, schema: JsonSchema, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": schema,
        "description": description,
    }


OPENAPI: Final[dict[str, Any]] = {
    "openapi": "3.1.0",
    "info": {
        "title": "Chat handler: the HTTP API for backends",
        "version": "1",
        "description": "Every call goes through the validation, storage and fan-out of the"
        " WebSocket frames: a message posted here is pushed to its participants' open"
        " connections, deduplicated by client_message_id and delivered exactly as if its"
        " sender had sent it.",
    },
    "servers": [{"url": "/api/v1"}],
    "security": [{"apiKey": []}],
    "paths": {
        "/messages": {
            "post": {
                "operationId": "sendMessage",
                "summary": "Send a message as sender_id",
                "requestBody": {"required": True, "content": _json(_ref("SendMessage"))},
                "responses": _responses({201: "Message"}, (400, 403, 404)),
            }
        },
        "/chats": {
            "post": {
                "operationId": "createChat",
                "summary": "Create or find a direct chat (idempotent), or create a group",
                "requestBody": {
                    "required": True,
                    "content": _json({"oneOf": [_ref("CreateDirectChat"), _ref("CreateGroup")]}),
                },
                "responses": {
                    **_responses({200: "Chat", 201: "Chat"}, (400, 403)),
                    "200": {
                        "description": "the direct chat existed already",
                        "content": _json(_ref("Chat")),
                    },
                    "201": {"description": "a new chat", "content": _json(_ref("Chat"))},
                },
            }
        },
        "/users/{user_id}/chats": {
            "get": {
                "operationId": "listChats",
                "summary": "Every chat of the user, most recently active first",
                "description": "Marks nothing delivered.",
                "parameters": [_path_parameter("user_id", _USER_ID, "the user (percent-encoded)")],
                "responses": _responses({200: "ChatList"}, (400,)),
            }
        },
        "/chats/{chat_id}/messages": {
            "get": {
                "operationId": "listMessages",
                "summary": "A page of a chat's messages, oldest first",
                "description": "As the fetch_messages frame; marks nothing delivered.",
                "parameters": [
                    _path_parameter("chat_id", _ID, "the chat"),
                    {
                        "name": "before",
                        "in": "query",
                        "required": False,
                        "schema": _ID,
                        "description": "a message_id of the chat: the page older than it",
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": protocol.FETCH_MESSAGES_MAX,
                            "default": protocol.FETCH_MESSAGES_DEFAULT,
                        },
                    },
                ],
                "responses": _responses({200: "MessagePage"}, (400, 404)),
            }
        },
        "/users/{user_id}/disconnect": {
            "post": {
                "operationId": "disconnectUser",
                "summary": "Close every connection of the user, on every node, with 1008",
                "description": "E.g. after the product revoked the user's tokens. `closed`"
                " counts the connections closed on the node that answered, plus those the"
                " other nodes serving the user reported within 2 s.",
                "parameters": [_path_parameter("user_id", _USER_ID, "the user (percent-encoded)")],
                "responses": _responses({200: "Disconnected"}, (400,)),
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "responses": {
                    "200": {
                        "description": "the OpenAPI 3.1 document",
                        "content": _json({"type": "object", "required": ["openapi", "paths"]}),
                    },
                    **{
                        str(status): {
                            "description": _DESCRIPTIONS[status],
                            "content": _json(_ref("Error")),
                        }
                        for status in (401, 429, 500)
                    },
                },
            }
        },
    },
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {
            "apiKey": {
                "type": "http",
                "scheme": "bearer",
                "description": "one of the keys in api.keys (or CHAT_API_KEYS)",
            }
        },
    },
}
