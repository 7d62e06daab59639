"""The OpenAPI 3.1 document of the HTTP API, written once as data.

The JSON Schemas of the request and response bodies are the contract `GET
/api/v1/openapi.json` serves; the tests validate every answer they get against the schema of
its path, method and status, so the document cannot drift from what the server does. The
limits quoted are the protocol's defaults (`config.json` may change them).
"""

from __future__ import annotations

from typing import Any, Final

from handler import protocol, schemas
from handler.schemas import ID, USER_ID, JsonSchema, ref

SCHEMAS: Final[dict[str, JsonSchema]] = {
    # The message, chat and error objects are the WebSocket protocol's too (`handler.schemas`).
    **schemas.SHARED,
    "SendMessage": {
        "type": "object",
        "required": ["sender_id", "chat_id", "content"],
        "properties": {
            "sender_id": USER_ID,
            "chat_id": ID,
            "content": {
                **schemas.CONTENT,
                "description": "longer than limits.max_message_chars: 400 too_large",
            },
            "client_message_id": {
                **ID,
                "description": "a resend with the same one stores nothing new and answers"
                " the stored message",
            },
            "recipient_id": {
                **USER_ID,
                "description": "direct chats: optional, the other participant when given;"
                " groups: must be absent",
            },
        },
    },
    "CreateDirectChat": {
        "type": "object",
        "required": ["user_id", "recipient_id"],
        "properties": {
            "user_id": USER_ID,
            "recipient_id": {**USER_ID, "description": "not user_id (400 bad_request)"},
        },
    },
    "CreateGroup": {
        "type": "object",
        "required": ["user_id", "title", "member_ids"],
        "properties": {
            "user_id": USER_ID,
            "title": {"type": "string", "minLength": 1, "maxLength": protocol.MAX_TITLE_CHARS},
            "member_ids": {
                "type": "array",
                "items": USER_ID,
                "minItems": 1,
                "maxItems": protocol.MAX_GROUP_MEMBERS - 1,
                "uniqueItems": True,
                "description": "the other members (not user_id: 400 bad_request)",
            },
        },
    },
    "ChatList": {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"type": "array", "items": ref("Chat")}},
        "additionalProperties": False,
    },
    "MessagePage": {
        "type": "object",
        "required": ["data", "has_more"],
        "properties": {
            "data": {"type": "array", "items": ref("Message"), "description": "oldest first"},
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
        str(status): {"description": _DESCRIPTIONS[status], "content": _json(ref(name))}
        for status, name in ok.items()
    }
    for status in (*errors, 401, 429, 500):
        answers[str(status)] = {
            "description": _DESCRIPTIONS[status],
            "content": _json(ref("Error")),
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
                "requestBody": {"required": True, "content": _json(ref("SendMessage"))},
                "responses": _responses({201: "Message"}, (400, 403, 404)),
            }
        },
        "/chats": {
            "post": {
                "operationId": "createChat",
                "summary": "Create or find a direct chat (idempotent), or create a group",
                "requestBody": {
                    "required": True,
                    "content": _json({"oneOf": [ref("CreateDirectChat"), ref("CreateGroup")]}),
                },
                "responses": {
                    **_responses({200: "Chat", 201: "Chat"}, (400, 403)),
                    "200": {
                        "description": "the direct chat existed already",
                        "content": _json(ref("Chat")),
                    },
                    "201": {"description": "a new chat", "content": _json(ref("Chat"))},
                },
            }
        },
        "/users/{user_id}/chats": {
            "get": {
                "operationId": "listChats",
                "summary": "Every chat of the user, most recently active first",
                "description": "Marks nothing delivered.",
                "parameters": [_path_parameter("user_id", USER_ID, "the user (percent-encoded)")],
                "responses": _responses({200: "ChatList"}, (400,)),
            }
        },
        "/chats/{chat_id}/messages": {
            "get": {
                "operationId": "listMessages",
                "summary": "A page of a chat's messages, oldest first",
                "description": "As the fetch_messages frame; marks nothing delivered.",
                "parameters": [
                    _path_parameter("chat_id", ID, "the chat"),
                    {
                        "name": "before",
                        "in": "query",
                        "required": False,
                        "schema": ID,
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
                "parameters": [_path_parameter("user_id", USER_ID, "the user (percent-encoded)")],
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
                            "content": _json(ref("Error")),
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
