"""Webhook events on the wire: the body every endpoint gets, and its signature. Pure.

A body is `{"id", "type", "created_at", "data"}` as compact JSON. It is encoded once, when the
event is stored, and every attempt sends those same bytes, so the signature a receiver checks
is over exactly what it received and a retry is byte-for-byte the first attempt.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any, Final

import orjson

from handler.protocol import Chat, ChatView, Message, ReceiptFrame
from handler.timefmt import format_ms

CHAT_CREATED: Final = "chat.created"
MESSAGE_CREATED: Final = "message.created"
MESSAGE_UPDATED: Final = "message.updated"
MESSAGE_READ: Final = "message.read"
MESSAGE_UNREAD: Final = "message.unread"

EVENT_ID_HEADER: Final = "X-Chat-Event-Id"
SIGNATURE_HEADER: Final = "X-Chat-Signature"
_SIGNATURE_PREFIX: Final = "sha256="


def new_event_id() -> str:
    """Unique across nodes without coordination (128 random bits)."""
    return "evt_" + secrets.token_hex(16)


def chat_data(chat: Chat) -> dict[str, Any]:
    """A new chat: its chat object as a participant first sees it (every mark 0)."""
    return ChatView.fresh(chat).to_wire()


def message_data(message: Message) -> dict[str, Any]:
    """A new or changed message: the message object (an edit has `edited_at`, a delete is a
    tombstone with `deleted: true` and empty `content`)."""
    return message.to_wire()


def read_data(receipt: ReceiptFrame) -> dict[str, Any]:
    """A moved read mark: the receipt frame without `type` and `kind`."""
    return {
        "chat_id": receipt.chat_id,
        "user_id": receipt.user_id,
        "seq": receipt.seq,
        "message_id": receipt.message_id,
        "timestamp": receipt.timestamp,
    }


def unread_data(user_id: str, message: Message) -> dict[str, Any]:
    """A message `user_id` has not received: whom it concerns, and the message object."""
    return {"user_id": user_id, "message": message.to_wire()}


def encode_event(event_id: str, event_type: str, created_at_ms: int, data: Any) -> bytes:
    return orjson.dumps(
        {"id": event_id, "type": event_type, "created_at": format_ms(created_at_ms), "data": data}
    )


def sign(secret: str, body: bytes) -> str:
    """The `X-Chat-Signature` value: `sha256=` and the hex HMAC-SHA256 of the raw body."""
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return _SIGNATURE_PREFIX + digest


def verify(secret: str, body: bytes, signature: str) -> bool:
    """What a receiver does, in constant time (used by the tests and the docs' example)."""
    return hmac.compare_digest(sign(secret, body), signature)
