"""The rules a request must pass before the store is called, whoever asks. Pure code.

A connection's session machine and the HTTP API for backends (`handler.api`) both apply these,
so a request is refused the same way, with the same code and field, whichever door it came
in by. Each check raises `ProtocolError`; the caller adds its `request_id` or HTTP status.
The rules the store decides under its write lock (membership of a group at commit time,
blocks, the size of a group) stay in the store.
"""

from __future__ import annotations

from handler import protocol
from handler.errors import ErrorCode, ProtocolError


def check_create_chat(frame: protocol.CreateChat, user_id: str) -> None:
    """A direct chat is between two different users."""
    if frame.recipient_id == user_id:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, "cannot create a chat with yourself", field="recipient_id"
        )


def check_create_group(frame: protocol.CreateGroup, user_id: str) -> None:
    """`member_ids` names the others; the creator is a member by creating."""
    if user_id in frame.member_ids:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            "member_ids names the others: the creator is a member already",
            field="member_ids",
        )


def check_chat(chat: protocol.Chat | None) -> protocol.Chat:
    """The chat a request names exists."""
    if chat is None:
        raise ProtocolError(ErrorCode.NOT_FOUND, "no such chat", field="chat_id")
    return chat


def check_participant(chat: protocol.Chat | None, user_id: str) -> protocol.Chat:
    """The chat exists and the user is one of its participants."""
    chat = check_chat(chat)
    if user_id not in chat.participants:
        raise ProtocolError(
            ErrorCode.FORBIDDEN, "you are not a participant of this chat", field="chat_id"
        )
    return chat


def check_recipient(frame: protocol.SendMessage, chat: protocol.Chat, user_id: str) -> None:
    """A direct chat's message names the other participant; a group's names nobody."""
    if chat.is_group:
        if frame.recipient_id is not None:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                "a group message has no recipient_id: it goes to every member",
                field="recipient_id",
            )
        return
    if frame.recipient_id is None:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "recipient_id is required", field="recipient_id")
    if frame.recipient_id != chat.other_participant(user_id):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            "recipient_id is not the other participant of this chat",
            field="recipient_id",
        )


def unknown_before() -> ProtocolError:
    """The answer to a page read whose `before` is not a message of the chat."""
    return ProtocolError(
        ErrorCode.BAD_REQUEST, "before is not a message of this chat", field="before"
    )
